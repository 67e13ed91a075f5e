"""Synthetic mixed serving traces for ``disagg bench serve``: pure, seeded, reproducible.

A trace is an open-loop Poisson arrival process (exponential inter-arrival times with mean
``1 / rate``) whose arrivals are either short chats or long-prompt requests (each arrival is long with
probability ``long_fraction``) and either high or low priority (low with probability
``low_priority_fraction``). Prompt and output lengths are drawn from small length distributions
(:class:`LengthDist`). The arrival times, the kinds, the priorities, the lengths and the prompt words
each draw from their own stream derived from the seed: changing the rate or the priority mix leaves
the rest of the trace unchanged. The lengths of both kinds share one stream, so changing
``long_fraction`` or a length distribution changes the lengths drawn after the first request it
affects (the recorded results' traces depend on this order, so it is kept).

Prompts are either text made of words from a fixed word list (``prompt_len`` counts words; the
server's tokenizer decides the token count) or lists of token ids (``prompt_len`` counts tokens).
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

Kind = Literal["short", "long"]
Priority = Literal["high", "low"]

# Common English words: short, so most are one or two tokens in any BPE vocabulary.
_WORD_TEXT = """
the of and to in is you that it he was for on are as with his they at be this have from or one had by
word but not what all were we when your can said there use an each which she do how their if will up
other about out many then them these so some her would make like him into time has look two more write
go see number no way could people my than first water been call who oil its now find long down day did
get come made may part over new sound take only little work know place year live me back give most very
after thing our just name good sentence man think say great where help through much before line right
too mean old any same tell boy follow came want show also around form three small set put end does
another well large must big even such because turn here why ask went men read need land different home
us move try kind hand picture again change off play spell air away animal house point page letter mother
answer found study still learn should world high every near add food between own below country plant
last school father keep tree never start city earth eye light thought head under story saw left few
while along might close something seem next hard open example begin life always those both paper
together got group often run important until children side feet car mile night walk white sea began grow
took river four carry state once book hear stop without second later miss idea enough eat face watch far
real almost let above girl sometimes mountain cut young talk soon list song being leave family
"""
WORDS: tuple[str, ...] = tuple(_WORD_TEXT.split())


@dataclass(frozen=True)
class LengthDist:
    """A distribution of positive integer lengths.

    Spellings accepted by :meth:`parse`: ``"32"`` (constant), ``"16-64"`` or ``"uniform:16-64"``
    (uniform, both ends included), ``"lognormal:MEDIAN,SIGMA"`` or ``"lognormal:MEDIAN,SIGMA,MIN-MAX"``
    (log-normal around MEDIAN, clipped to [MIN, MAX], default [1, 8 * MEDIAN]).
    """

    kind: Literal["const", "uniform", "lognormal"]
    low: int
    high: int
    median: float = 0.0
    sigma: float = 0.0

    @classmethod
    def parse(cls, spec: str) -> LengthDist:
        text = spec.strip().lower()
        try:
            if text.startswith("lognormal:"):
                parts = text.split(":", 1)[1].split(",")
                if len(parts) not in (2, 3):
                    raise ValueError("expected lognormal:MEDIAN,SIGMA[,MIN-MAX]")
                median, sigma = float(parts[0]), float(parts[1])
                if not (math.isfinite(median) and math.isfinite(sigma)):
                    raise ValueError("MEDIAN and SIGMA must be finite")
                low, high = (_range(parts[2]) if len(parts) == 3 else (1, max(1, round(8 * median))))
                dist = cls("lognormal", low, high, median, sigma)
            elif text.startswith("uniform:") or "-" in text:
                low, high = _range(text.removeprefix("uniform:"))
                dist = cls("uniform", low, high)
            else:
                n = int(text)
                dist = cls("const", n, n)
        except ValueError as exc:
            raise ValueError(f"invalid length distribution {spec!r}: {exc}") from None
        dist.validate()
        return dist

    def validate(self) -> None:
        if self.low < 1 or self.high < self.low:
            raise ValueError(f"invalid length distribution {self.spec()!r}: need 1 <= MIN <= MAX")
        if self.kind == "lognormal" and not (0 < self.median < math.inf and 0 <= self.sigma < math.inf):
            raise ValueError(f"invalid length distribution {self.spec()!r}: need a finite MEDIAN > 0 and SIGMA >= 0")

    def sample(self, rng: random.Random) -> int:
        if self.kind == "const":
            return self.low
        if self.kind == "uniform":
            return rng.randint(self.low, self.high)
        log_value = rng.gauss(math.log(self.median), self.sigma)
        if log_value >= math.log(self.high):  # clipped before exp(), which a wide sigma would overflow
            return self.high
        return min(self.high, max(self.low, round(math.exp(log_value))))

    def spec(self) -> str:
        if self.kind == "const":
            return str(self.low)
        if self.kind == "uniform":
            return f"uniform:{self.low}-{self.high}"
        return f"lognormal:{self.median:g},{self.sigma:g},{self.low}-{self.high}"


def _range(text: str) -> tuple[int, int]:
    lo, sep, hi = text.partition("-")
    if not sep:
        raise ValueError("expected MIN-MAX")
    return int(lo), int(hi)


@dataclass(frozen=True)
class TraceConfig:
    """Everything that determines a trace. Exactly one of ``duration_s`` / ``num_requests`` bounds it."""

    rate: float = 4.0
    duration_s: float | None = 60.0
    num_requests: int | None = None
    long_fraction: float = 0.2
    low_priority_fraction: float = 0.0
    short_prompt: LengthDist = field(default_factory=lambda: LengthDist.parse("16-96"))
    short_output: LengthDist = field(default_factory=lambda: LengthDist.parse("16-128"))
    # 400-800 words is ~900-1800 tokens with the built-in presets' tokenizer (~2.2 tokens a word), which
    # leaves room for the output within their 2048-token context.
    long_prompt: LengthDist = field(default_factory=lambda: LengthDist.parse("400-800"))
    long_output: LengthDist = field(default_factory=lambda: LengthDist.parse("16-64"))
    token_prompts: bool = False
    token_id_range: tuple[int, int] = (10, 1000)  # [low, high) ids used by token-id prompts
    seed: int = 0

    def validate(self) -> None:
        if not (math.isfinite(self.rate) and self.rate > 0):
            raise ValueError(f"rate must be a positive number of requests/s, got {self.rate}")
        if (self.duration_s is None) == (self.num_requests is None):
            raise ValueError("give exactly one of duration_s and num_requests")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"duration_s must be a positive number of seconds, got {self.duration_s}")
        if self.num_requests is not None and self.num_requests < 1:
            raise ValueError(f"num_requests must be >= 1, got {self.num_requests}")
        for name in ("long_fraction", "low_priority_fraction"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {value}")
        lo, hi = self.token_id_range
        if not 0 <= lo < hi:
            raise ValueError(f"token_id_range must be 0 <= LOW < HIGH, got {self.token_id_range}")
        for dist in (self.short_prompt, self.short_output, self.long_prompt, self.long_output):
            dist.validate()

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        for name in ("short_prompt", "short_output", "long_prompt", "long_output"):
            d[name] = getattr(self, name).spec()
        d["token_id_range"] = list(self.token_id_range)
        return d


@dataclass(frozen=True)
class TraceRequest:
    """One arrival: when to send it (seconds from the start) and what to ask for."""

    index: int
    arrival_s: float
    kind: Kind
    priority: Priority
    prompt_len: int  # words for text prompts, tokens for token-id prompts
    max_tokens: int
    prompt: str | list[int]


def _stream(seed: int, name: str) -> random.Random:
    # Seeding with a str is deterministic across runs and processes (no hash randomisation).
    return random.Random(f"disagg-trace:{seed}:{name}")


def poisson_arrivals(rate: float, rng: random.Random, *, duration_s: float | None = None,
                     num_requests: int | None = None) -> list[float]:
    """Arrival times of a Poisson process: the first at one exponential gap after 0, then cumulative gaps.

    Bounded by ``num_requests`` arrivals, or by arrivals strictly before ``duration_s``.
    """
    times: list[float] = []
    t = 0.0
    while True:
        if num_requests is not None and len(times) >= num_requests:
            return times
        t += rng.expovariate(rate)
        if duration_s is not None and t >= duration_s:
            return times
        times.append(t)


def make_prompt(length: int, rng: random.Random, token_prompts: bool, token_id_range: tuple[int, int]
                ) -> str | list[int]:
    if token_prompts:
        lo, hi = token_id_range
        return [rng.randrange(lo, hi) for _ in range(length)]
    return " ".join(rng.choice(WORDS) for _ in range(length))


def generate_trace(cfg: TraceConfig) -> list[TraceRequest]:
    """The trace of ``cfg``: same config, same trace, in any process."""
    cfg.validate()
    arrivals = poisson_arrivals(cfg.rate, _stream(cfg.seed, "arrivals"), duration_s=cfg.duration_s,
                                num_requests=cfg.num_requests)
    kinds, prios = _stream(cfg.seed, "kind"), _stream(cfg.seed, "priority")
    lengths, words = _stream(cfg.seed, "lengths"), _stream(cfg.seed, "prompt")
    trace: list[TraceRequest] = []
    for i, t in enumerate(arrivals):
        kind: Kind = "long" if kinds.random() < cfg.long_fraction else "short"
        priority: Priority = "low" if prios.random() < cfg.low_priority_fraction else "high"
        prompt_dist, output_dist = ((cfg.long_prompt, cfg.long_output) if kind == "long"
                                    else (cfg.short_prompt, cfg.short_output))
        prompt_len, max_tokens = prompt_dist.sample(lengths), output_dist.sample(lengths)
        prompt = make_prompt(prompt_len, words, cfg.token_prompts, cfg.token_id_range)
        trace.append(TraceRequest(i, t, kind, priority, prompt_len, max_tokens, prompt))
    return trace


WARMUP_LONG_PROMPT = 512  # over the default split threshold: warms the remote-prefill path too


def warmup_requests(n: int, seed: int, token_prompts: bool, token_id_range: tuple[int, int]) -> list[TraceRequest]:
    """Requests sent before the measured trace (kernel loads, connection set-up): short ones, and a long
    one last, so that a disaggregated system's prefill worker, channel and KV connection are warm too."""
    rng = _stream(seed, "warmup")
    out = []
    for i in range(n):
        kind, length = ("long", WARMUP_LONG_PROMPT) if n > 1 and i == n - 1 else ("short", 16)
        out.append(TraceRequest(-1 - i, 0.0, kind, "high", length, 8,
                                make_prompt(length, rng, token_prompts, token_id_range)))
    return out
