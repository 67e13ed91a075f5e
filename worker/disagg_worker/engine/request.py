"""Request state and sampling parameters: what the scheduler, block manager and engine share.

No tensors here. A ``Request`` is the single source of truth for one generation: its tokens, how many
of them have KV computed, its block table and its status ("computed tokens chase total tokens").
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator


class InvalidRequestError(ValueError):
    """A request that can never be served as asked; it fails alone, with this message (``param``: the
    request field at fault, when one is)."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


# Token ids and top_k travel as proto uint32; anything past int32 is no real vocabulary's id.
MAX_TOKEN_ID = 2**31 - 1
GREEDY_BELOW_TEMPERATURE = 1e-5
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 1024  # far past any real stop sequence; bounds the text a request holds back
MAX_STOP_TOKEN_IDS = 1024  # a request's list is copied per prompt and per worker call: it must stay small
MAX_LOGIT_BIAS = 1024  # as small, for the same reason


class SamplingParams(BaseModel):
    """Per-request generation settings (OpenAI-style names). ``temperature`` 0 (or below
    ``GREEDY_BELOW_TEMPERATURE``) means greedy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_tokens: int = Field(16, ge=1, description="maximum number of tokens to generate")
    temperature: float = Field(1.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=MAX_TOKEN_ID, description="0 disables top-k")
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)], ...] = Field((), max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False
    repetition_penalty: float | None = Field(
        None, ge=0.01, le=100.0,  # far below 0.01 the logits of every token seen overflow to inf
        description="Hugging Face's: the logit of every token already in the prompt or the output is divided by "
                    "it (multiplied when negative); None: the model's generation_config value (1: none)")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from the logit of "
                                                                      "every token already in the output")
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, description="OpenAI's: subtracted from a token's logit "
                                                                       "once per time it is already in the output")
    logit_bias: tuple[tuple[Annotated[int, Field(ge=0, le=MAX_TOKEN_ID)],
                            Annotated[float, Field(ge=-100.0, le=100.0)]], ...] = Field(
        (), max_length=MAX_LOGIT_BIAS,
        description="OpenAI's: (token id, added to its logit at every step, before the penalties); -100 bans it. "
                    "Given as a mapping, kept as sorted pairs (the params stay hashable)")

    @field_validator("stop", mode="before")
    @classmethod
    def _stop_as_tuple(cls, value: object) -> object:
        if isinstance(value, str):
            return (value,)
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _bias_as_pairs(cls, value: object) -> object:
        if isinstance(value, dict):
            return tuple(value.items())
        return value

    @field_validator("logit_bias")
    @classmethod
    def _one_bias_per_token(cls, value: tuple[tuple[int, float], ...]) -> tuple[tuple[int, float], ...]:
        tokens = [token for token, _ in value]
        if len(set(tokens)) != len(tokens):
            raise ValueError(f"token id {next(t for t in tokens if tokens.count(t) > 1)} is given more than once")
        return tuple(sorted(value))  # the same bias in any order: equal params

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if any(not s for s in value):
            raise ValueError("stop strings must not be empty")
        if len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        if any(len(s) > MAX_STOP_CHARS for s in value):
            raise ValueError(f"stop strings must be at most {MAX_STOP_CHARS} characters long")
        for s in value:
            try:
                s.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("stop strings must be valid Unicode (a lone surrogate is not)") from None
        return value

    @property
    def penalises_repetition(self) -> bool:
        """Whether Hugging Face's repetition penalty applies (over the prompt and the output)."""
        return (self.repetition_penalty or 1.0) != 1.0

    @property
    def penalises_occurrences(self) -> bool:
        """Whether OpenAI's presence or frequency penalty applies (over the output)."""
        return bool(self.presence_penalty or self.frequency_penalty)

    @property
    def penalises_repeats(self) -> bool:
        """Whether the logits depend on what the request has seen (any of the three penalties)."""
        return self.penalises_repetition or self.penalises_occurrences

    @property
    def changes_logits(self) -> bool:
        """Whether anything but the temperature filters (a penalty or a bias) changes the model's logits."""
        return self.penalises_repeats or bool(self.logit_bias)

    @property
    def greedy(self) -> bool:
        # Below this, sampling is argmax anyway, and logits / T would overflow to inf (NaN probabilities).
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @classmethod
    def parse(cls, **kwargs: object) -> SamplingParams:
        """Build from loose keyword arguments, turning validation failures into one clear error."""
        try:
            return cls(**kwargs)
        except ValidationError as exc:
            first = exc.errors()[0]["loc"] if exc.errors() else ()
            raise InvalidRequestError(_describe_validation_error(exc, kwargs.get("logit_bias")),
                                      str(first[0]) if first else None) from None


def _describe_validation_error(exc: ValidationError, logit_bias: object = None) -> str:
    parts = []
    for err in exc.errors():
        loc = err["loc"]
        where = ".".join(str(p) for p in loc) or "request"
        if loc[:1] == ("logit_bias",) and len(loc) >= 2 and isinstance(loc[1], int):
            # pydantic names the pair by its position; the client wrote a token id
            pairs = list(logit_bias.items()) if isinstance(logit_bias, dict) else list(logit_bias or ())
            if loc[1] < len(pairs) and isinstance(pairs[loc[1]], tuple | list) and pairs[loc[1]]:
                part = {0: " (the token id)", 1: " (the bias)"}.get(loc[2] if len(loc) > 2 else None, "")
                where = f"logit_bias[{pairs[loc[1]][0]!r}]{part}"
        parts.append(f"{where}: {err['msg']}")
    return "invalid sampling parameters: " + "; ".join(parts)


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    AWAITING_KV = "awaiting_kv"  # blocks reserved, remote KV being installed
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, enum.Enum):
    STOP = "stop"  # EOS, stop token or stop string
    LENGTH = "length"  # max_tokens or context length
    ABORT = "abort"  # cancelled by the client
    ERROR = "error"  # failed inside the engine


# Lower value is served first. Kept as ints so queues sort cheaply.
PRIORITY_HIGH = 0
PRIORITY_LOW = 1


@dataclass
class Request:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    eos_token_ids: frozenset[int] = frozenset()
    priority: int = PRIORITY_HIGH
    arrival_time: float = field(default_factory=time.monotonic)
    hold_kv_on_finish: bool = False  # keep blocks after finishing so the KV can be exported

    output_token_ids: list[int] = field(default_factory=list)
    all_token_ids: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prefix-cache hit when first scheduled
    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # hashes of this request's full blocks
    num_registered_blocks: int = 0  # leading blocks already offered to the prefix cache
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: FinishReason | None = None
    num_preemptions: int = 0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None

    def __post_init__(self) -> None:
        if not self.all_token_ids:
            self.all_token_ids = list(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def max_total_tokens(self) -> int:
        """Tokens whose KV this request may ever hold (the last sampled token is never computed)."""
        return self.num_prompt_tokens + self.params.max_tokens - 1

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def append_output(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)
