"""OpenAI request bodies the router accepts, and OpenAI-format errors.

Fields the official clients send are accepted; values disagg does not implement (n > 1, logprobs,
echo, penalties, logit_bias, ...) are refused with a 400 naming the parameter rather than ignored.
``priority``, ``top_k``, ``ignore_eos`` and ``stop_token_ids`` are extensions (send them with the
client's ``extra_body``).
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

MAX_PROMPTS = 256  # prompts in one /v1/completions request (each is its own generation)


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
    model_config = ConfigDict(extra="allow")

    model: str
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    n: int | None = 1
    stream: bool | None = False  # null is the default, as in OpenAI's API (the SDK sends it for None)
    stream_options: dict[str, Any] | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    priority: Literal["high", "low"] | None = None
    ignore_eos: bool | None = False
    stop_token_ids: list[int] | None = None
    presence_penalty: float | None = 0.0
    frequency_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    logprobs: Any = None
    user: str | None = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise APIError(400, "only n=1 is supported", param="n")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise APIError(400, f"{name} is not supported", param=name)
        if self.logit_bias:
            raise APIError(400, "logit_bias is not supported", param="logit_bias")
        if self.logprobs not in (None, False, 0):
            raise APIError(400, "logprobs are not supported", param="logprobs")
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
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise APIError(400, "top_p must be between 0 and 1", param="top_p")

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))

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
            "top_k": self.top_k or 0,
            # OpenAI's seed is any int64; the engine's RNG takes non-negative ones (same seed, same map)
            "seed": None if self.seed is None else self.seed % 2**63,
            "stop": tuple(stop),
            "stop_token_ids": tuple(self.stop_token_ids or ()),
            "ignore_eos": bool(self.ignore_eos),
        }


class CompletionRequest(_Common):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = False
    best_of: int | None = None
    suffix: str | None = None

    def check_supported(self) -> None:
        super().check_supported()
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
    content: str | list[dict[str, Any]] | None = None

    def text(self) -> str:
        if self.content is None and self.role != "assistant":
            raise APIError(400, f"a {self.role} message needs content", param="messages")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text":
                raise APIError(400, f"message content of type {part.get('type')!r} is not supported",
                               param="messages")
            parts.append(str(part.get("text", "")))
        return "".join(parts)


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = None
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
