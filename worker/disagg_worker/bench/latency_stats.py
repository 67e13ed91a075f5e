"""Per-request records of a serving benchmark and their summary: percentiles, throughput, goodput, SLOs.

Pure functions over :class:`RequestRecord` lists, so the numbers in every report can be checked on
hand-made records. Definitions (all times in seconds in records, milliseconds in summaries):

- TTFT: scheduled arrival → first token chunk. E2E: scheduled arrival → end of stream (a request the
  client sent late is charged its lateness). TPOT: ``(e2e - ttft) / (tokens - 1)``, undefined for a
  one-token answer.
- Every sent request has one ``status``: ``ok``, ``rejected`` (HTTP 429), ``error`` (any other HTTP
  error, an in-stream error, a broken connection) or ``timeout`` (the client's deadline passed).
- TTFT percentiles use every request that got a first token (also those that failed later); TPOT,
  E2E and throughput use ``ok`` requests. Each distribution says how many of the sent requests it
  leaves out (``missing``): a run that rejects or loses its slow requests has fast percentiles over
  few of them, and the count is what shows it. Wall time runs from the first send to the last outcome.
- A request meets the SLO when it is ``ok``, its TTFT <= the TTFT SLO and its TPOT <= the TPOT SLO (a
  one-token answer has no TPOT and passes that half). Goodput = such requests per second of wall
  time; ``goodput_fraction`` = such requests / sent. The compare-mode goodput ratio is the ratio of
  the two fractions (the same trace: goodput over the same duration); when monolithic met none and
  disaggregated some, it is unbounded and meets the target. Attainment per priority and per kind is
  met / sent in that group: a rejected, failed or timed-out request counts as a miss.
- Compare-mode latency ratios (TPOT p99, TTFT p99) are over the requests of the trace that *both* runs
  served (paired by trace index): a run that rejected or lost its slowest requests must not win the
  latency comparison with them left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

STATUSES = ("ok", "rejected", "error", "timeout")


@dataclass
class RequestRecord:
    """The outcome of one request; mutable while its request is in flight."""

    index: int
    kind: str
    priority: str
    prompt_len: int
    max_tokens: int
    arrival_s: float  # scheduled send time, from the start of the run
    start_s: float = math.nan  # actual send time, from the start of the run
    end_s: float = math.nan  # time of the outcome (end of stream, error, rejection, timeout), same clock
    status: str = "error"
    http_status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    e2e_s: float | None = None  # arrival -> end of stream, ok requests only
    tpot_s: float | None = None
    output_tokens: int = 0  # usage.completion_tokens when the server sent it, else token chunks
    token_chunks: int = 0
    usage_reported: bool = False  # whether output_tokens came from the server's usage
    prompt_tokens: int | None = None  # usage.prompt_tokens when the server sent it
    max_itl_s: float | None = None  # the longest gap between two token chunks

    def finish_timing(self) -> None:
        """Derive TPOT from TTFT, E2E and the token count."""
        if self.ttft_s is not None and self.e2e_s is not None and self.output_tokens >= 2:
            self.tpot_s = max(0.0, self.e2e_s - self.ttft_s) / (self.output_tokens - 1)
        else:
            self.tpot_s = None

    def to_dict(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        for key in ("start_s", "end_s"):
            if isinstance(d[key], float) and math.isnan(d[key]):
                d[key] = None
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RequestRecord:
        """The inverse of ``to_dict`` (fields a file written before them lacks take their defaults)."""
        known = {k: v for k, v in d.items() if k in cls.__dataclass_fields__}
        for key in ("start_s", "end_s"):
            if known.get(key) is None:
                known[key] = math.nan
        return cls(**known)


@dataclass(frozen=True)
class SLO:
    ttft_ms: float = 200.0
    tpot_ms: float = 50.0


def percentile(values: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be within [0, 100], got {q}")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def meets_slo(r: RequestRecord, slo: SLO) -> bool:
    if r.status != "ok" or r.ttft_s is None:
        return False
    if r.ttft_s * 1000.0 > slo.ttft_ms:
        return False
    return r.tpot_s is None or r.tpot_s * 1000.0 <= slo.tpot_ms


def _dist_ms(values: Iterable[float | None], sent: int | None = None) -> dict[str, float | None]:
    """Distribution in ms of the values that exist; ``missing``: how many of ``sent`` have none."""
    ms = [v * 1000.0 for v in values if v is not None]
    return {
        "count": len(ms),
        "missing": None if sent is None else sent - len(ms),
        "mean": sum(ms) / len(ms) if ms else None,
        "p50": percentile(ms, 50),
        "p90": percentile(ms, 90),
        "p99": percentile(ms, 99),
        "max": max(ms) if ms else None,
    }


def _attainment(records: list[RequestRecord], slo: SLO) -> dict[str, Any]:
    sent = len(records)
    ok = [r for r in records if r.status == "ok"]
    met = sum(meets_slo(r, slo) for r in records)
    ttft_met = sum(1 for r in ok if r.ttft_s is not None and r.ttft_s * 1000.0 <= slo.ttft_ms)
    tpot_met = sum(1 for r in ok if r.tpot_s is None or r.tpot_s * 1000.0 <= slo.tpot_ms)
    return {
        "sent": sent,
        "ok": len(ok),
        "rejected": sum(r.status == "rejected" for r in records),
        "met": met,
        "attainment": met / sent if sent else None,
        "ttft_attainment": ttft_met / sent if sent else None,
        "tpot_attainment": tpot_met / sent if sent else None,
    }


def summarize(records: list[RequestRecord], slo: SLO, wall_s: float | None = None) -> dict[str, Any]:
    """Summary of one run. ``wall_s`` defaults to first send → last outcome computed from the records."""
    counts = {s: sum(r.status == s for r in records) for s in STATUSES}
    unknown = [r.status for r in records if r.status not in STATUSES]
    if unknown:
        raise ValueError(f"unknown request status(es): {sorted(set(unknown))}")
    if wall_s is None:
        wall_s = _wall(records)
    ok = [r for r in records if r.status == "ok"]
    out_tokens = sum(r.output_tokens for r in ok)
    met = sum(meets_slo(r, slo) for r in records)
    per_second = (lambda n: n / wall_s) if wall_s and wall_s > 0 else (lambda n: None)
    lateness = [r.start_s - r.arrival_s for r in records if not math.isnan(r.start_s)]
    return {
        "sent": len(records),
        **counts,
        "wall_s": wall_s,
        "throughput_req_s": per_second(len(ok)),
        "output_tok_s": per_second(out_tokens),
        "output_tokens": out_tokens,
        "goodput_req_s": per_second(met),
        "goodput_fraction": met / len(records) if records else None,
        "slo_met": met,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms},
        # every request that got a first token, also those that failed later: a system must not look
        # faster for timing out its slowest requests
        "ttft_ms": _dist_ms((r.ttft_s for r in records), len(records)),
        "tpot_ms": _dist_ms((r.tpot_s for r in ok), len(records)),
        "e2e_ms": _dist_ms((r.e2e_s for r in ok), len(records)),
        "max_send_lateness_ms": max(lateness) * 1000.0 if lateness else None,
        "short_outputs": sum(1 for r in ok if r.output_tokens < r.max_tokens),
        # TPOT of these counts stream chunks, not tokens (the server sent no usage): a chunk may hold several
        "tokens_from_chunks": sum(1 for r in ok if not r.usage_reported),
        "by_priority": {p: _attainment([r for r in records if r.priority == p], slo)
                        for p in sorted({r.priority for r in records})},
        "by_kind": {k: _attainment([r for r in records if r.kind == k], slo)
                    for k in sorted({r.kind for r in records})},
        "errors_sample": sorted({r.error for r in records if r.error})[:10],
    }


def _wall(records: list[RequestRecord]) -> float | None:
    starts = [r.start_s for r in records if not math.isnan(r.start_s)]
    ends = [r.end_s for r in records if not math.isnan(r.end_s)]
    if not starts or not ends:
        return None
    return max(ends) - min(starts)


def ratio(numerator: float | None, denominator: float | None) -> float | None:
    """numerator / denominator, or None when either is missing or the denominator is 0."""
    if numerator is None or denominator is None or denominator == 0:
        return None
    return numerator / denominator


def _paired_p99(mono: Sequence[RequestRecord], disagg: Sequence[RequestRecord], key: str) -> tuple[
        float | None, float | None, int]:
    """p99 in ms of ``key`` over the trace requests both runs have it for (``ok`` requests): (mono,
    disagg, how many)."""
    def served(records: Sequence[RequestRecord]) -> dict[int, float]:
        return {r.index: getattr(r, key) for r in records if r.status == "ok" and getattr(r, key) is not None}

    a, b = served(mono), served(disagg)
    both = sorted(a.keys() & b.keys())
    return (percentile([a[i] * 1000.0 for i in both], 99), percentile([b[i] * 1000.0 for i in both], 99), len(both))


def compare(mono: dict[str, Any], disagg: dict[str, Any], mono_records: Sequence[RequestRecord],
            disagg_records: Sequence[RequestRecord]) -> dict[str, Any]:
    """The issue's comparison: TPOT p99 monolithic/disagg (higher = disagg better, target >= 3) and
    goodput disagg/monolithic (higher = disagg better, target >= 2). Reported, never asserted."""
    mono_tpot, disagg_tpot, tpot_pairs = _paired_p99(mono_records, disagg_records, "tpot_s")
    mono_ttft, disagg_ttft, ttft_pairs = _paired_p99(mono_records, disagg_records, "ttft_s")
    tpot = ratio(mono_tpot, disagg_tpot)
    # both ran the same trace: the ratio of the fractions that met the SLO is the ratio of goodputs over
    # the trace's duration (each run's own wall clock would favour the one with the shorter tail)
    mono_good, disagg_good = mono["goodput_fraction"], disagg["goodput_fraction"]
    goodput = ratio(disagg_good, mono_good)
    unbounded = mono_good == 0 and bool(disagg_good)  # monolithic met none, disaggregated some
    return {
        "tpot_p99_mono_over_disagg": tpot,
        "goodput_disagg_over_mono": goodput,
        "goodput_unbounded": unbounded,
        "ttft_p99_mono_over_disagg": ratio(mono_ttft, disagg_ttft),
        "paired": {"tpot_requests": tpot_pairs, "ttft_requests": ttft_pairs,
                   "tpot_p99_ms": {"monolithic": mono_tpot, "disagg": disagg_tpot},
                   "ttft_p99_ms": {"monolithic": mono_ttft, "disagg": disagg_ttft}},
        "targets": {"tpot_p99_mono_over_disagg": 3.0, "goodput_disagg_over_mono": 2.0},
        "tpot_target_met": tpot is not None and tpot >= 3.0,
        "goodput_target_met": unbounded or (goodput is not None and goodput >= 2.0),
    }
