"""OpenAI request bodies the router accepts, and OpenAI-format errors.

Fields the official clients send are accepted; values disagg does not implement (n > 1, logprobs,
echo, tools, ...) are refused with a 400 naming the parameter rather than ignored.
``priority``, ``top_k``, ``ignore_eos``, ``stop_token_ids`` and ``repetition_penalty`` are extensions
(send them with the client's ``extra_body``).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

from disagg_worker.engine.request import MAX_LOGIT_BIAS, MAX_STOP_TOKEN_IDS

MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is its own generation)


def check_unicode(value: str | list[Any] | None, param: str) -> None:
    """JSON may carry a lone surrogate (``"\\ud800"``), which is no Unicode text: no tokenizer or
    protobuf string takes it, so it is refused here, naming the field (stop strings: by
    ``SamplingParams``, for every caller of the engine)."""
    for text in [value] if isinstance(value, str) else value or []:
        if isinstance(text, str):
            try:
                text.encode("utf-8")
            except UnicodeEncodeError:
                raise APIError(400, f"{param} is not valid Unicode text (it contains a lone surrogate)",
                               param=param) from None


class APIError(Exception):
    """Becomes an OpenAI error body with this HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}

    def response(self) -> JSONResponse:
        return JSONResponse(error_body(self.message, self.type, self.param, self.code), status_code=self.status,
                            headers=self.headers)


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class _Common(BaseModel):
    # Strict types, as OpenAI's API: "3" or true for max_tokens, or "yes" for stream, is a 400, never
    # quietly read as 3, 1 or true (numbers for float fields may be integers). No NaN or Infinity.
    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: StrictStr
    max_tokens: StrictInt | None = None
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    n: StrictInt | None = 1
    stream: StrictBool | None = False  # null is the default, as in OpenAI's API (the SDK sends it for None)
    stream_options: dict[str, Any] | None = None
    stop: StrictStr | list[StrictStr] | None = None
    seed: StrictInt | None = None
    priority: Literal["high", "low"] | None = None
    ignore_eos: StrictBool | None = False
    # refused before a huge list is copied for every prompt (the engine's own limit)
    stop_token_ids: Annotated[list[StrictInt], Field(max_length=MAX_STOP_TOKEN_IDS)] | None = None
    presence_penalty: StrictFloat | None = 0.0
    frequency_penalty: StrictFloat | None = 0.0
    # refused before a huge mapping is validated on the event loop (the engine's own limit)
    logit_bias: Annotated[dict[str, StrictFloat], Field(max_length=MAX_LOGIT_BIAS)] | None = None
    repetition_penalty: StrictFloat | None = None  # extension: Hugging Face's (None: the model's default)
    logprobs: Any = None
    user: StrictStr | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
        bad_key = next((k for k in self.logit_bias or {} if not (k.isascii() and k.isdigit())), None)
        if bad_key is not None:  # int() would also read " 5", "+5", "1_0" and non-ASCII digits
            raise APIError(400, f"logit_bias keys are token ids: {bad_key!r} is not one", param="logit_bias")
        extra = self.model_extra or {}
        for name in ("top_logprobs", "min_tokens"):
            if extra.get(name) not in (None, 0):
                raise APIError(400, f"{name} is not supported", param=name)
        fmt = extra.get("response_format")
        if fmt not in (None, {"type": "text"}):
            raise APIError(400, "response_format other than text (JSON mode, JSON schema) is not supported",
                           param="response_format")
        if extra.get("modalities") not in (None, ["text"]) or extra.get("audio") is not None:
            raise APIError(400, "only text output is supported", param="modalities")
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed with stream: true", param="stream_options")
        if not isinstance((self.stream_options or {}).get("include_usage") or False, bool):  # null: the default
            raise APIError(400, "stream_options.include_usage must be a boolean", param="stream_options")
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise APIError(400, "top_p must be between 0 and 1", param="top_p")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage") is True)

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    def sampling(self, max_tokens: int) -> dict[str, Any]:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        temperature = 1.0 if self.temperature is None else self.temperature
        top_p = 1.0 if self.top_p is None else self.top_p
        if top_p == 0:  # a nucleus of probability 0 keeps the most likely token only: greedy
            temperature, top_p = 0.0, 1.0
        return {
            "max_tokens": max_tokens,
            "temperature": temperature,
            "top_p": top_p,
            # -1 is vLLM's "no top-k" (as 0 is here); other negatives are refused as invalid
            "top_k": 0 if self.top_k in (None, -1) else self.top_k,
            # OpenAI's seed is any int64; the engine's RNG takes non-negative ones (same seed, same map)
            "seed": None if self.seed is None else self.seed % 2**63,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
            "repetition_penalty": self.repetition_penalty,
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "logit_bias": self.logit_bias or {},  # token ids as JSON keys: strings, read as ints
        }


class CompletionRequest(_Common):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]]
    echo: StrictBool | None = False
    best_of: StrictInt | None = None
    suffix: StrictStr | None = None

    def check_supported(self) -> None:
        super().check_supported()
        check_unicode(self.prompt, "prompt")
        if self.logprobs is not None:  # legacy completions: 0 asks for the sampled tokens' logprobs
            raise APIError(400, "logprobs are not supported", param="logprobs")
        if isinstance(self.prompt, list) and self.prompt and not isinstance(self.prompt[0], int) \
                and len(self.prompt) > MAX_PROMPTS:
            raise APIError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
        if self.echo:
            raise APIError(400, "echo is not supported", param="echo")
        if self.best_of not in (None, 1):
            raise APIError(400, "best_of is not supported", param="best_of")
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: StrictStr | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None and self.role != "assistant":
            raise APIError(400, f"a {self.role} message needs content", param="messages")
        if self.content is None or isinstance(self.content, str):
            check_unicode(self.content, "messages")
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(400, f"message content of type {part.get('type')!r} is not supported",
                               param="messages")
            text = part.get("text")
            if not isinstance(text, str):
                raise APIError(400, "a text content part needs a string 'text'", param="messages")
            parts.append(text)
        check_unicode(parts, "messages")
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: StrictInt | None = None
    tools: list[dict[str, Any]] | None = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.tools:
            raise APIError(400, "tools are not supported", param="tools")
        extra = self.model_extra or {}
        if extra.get("functions"):
            raise APIError(400, "functions are not supported", param="functions")
        if extra.get("function_call") not in (None, "none"):
            raise APIError(400, "function_call is not supported (no functions)", param="function_call")
        for msg in self.messages:
            extra_fields = msg.model_extra or {}
            if msg.role == "tool" or extra_fields.get("tool_calls") or extra_fields.get("function_call"):
                raise APIError(400, "tool and function call messages are not supported (no tools)",
                               param="messages")
        if extra.get("tool_choice") not in (None, "none"):
            raise APIError(400, "tool_choice is not supported (no tools)", param="tool_choice")
