"""Seed 001's decisions as pure functions: where to prefill, which decode worker, whether to admit.

- ``should_offload_prefill`` runs on a decode worker: offload when the uncached part of the prompt is
  long and the prefill pool has room.
- ``pick_decode_worker`` runs on the router: a multi-factor score of prefix-cache overlap, queue
  length and decode load, with hotspot prevention.
- ``estimate_ttft`` / ``estimate_request_ttft`` / ``admit_request``: QoS early rejection of
  low-priority work when the estimated time to first token would break the SLO.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from disagg_worker.engine.prefix_hash import shared_prefix_blocks
from disagg_worker.policy import CachePolicy, QoS, SplitPolicy


def should_offload_prefill(prompt_length: int, prefix_cached_length: int, prefill_queue_size: int | None,
                           policy: SplitPolicy) -> bool:
    """True: ask a prefill worker. ``prefill_queue_size`` None means no prefill worker is reachable."""
    if prefill_queue_size is None:
        return False
    long_prefill = (prompt_length - prefix_cached_length) > policy.prompt_length_threshold
    prefill_available = prefill_queue_size < policy.prefill_queue_max
    return long_prefill and prefill_available


@dataclass
class WorkerLoad:
    """The router's view of one decode worker, from its latest load report."""

    endpoint: str
    num_waiting: int = 0
    num_running: int = 0
    num_awaiting_kv: int = 0
    kv_usage: float = 0.0
    block_size: int = 16
    prefix_hashes: frozenset[bytes] = field(default_factory=frozenset)
    avg_prefill_seconds: float = 0.0
    avg_decode_step_seconds: float = 0.0
    prefill_tokens_per_second: float = 0.0
    pending: int = 0  # requests routed here since its last report
    healthy: bool = True
    draining: bool = False

    @property
    def queue_length(self) -> int:
        return self.num_waiting + self.num_awaiting_kv + self.pending

    @property
    def load(self) -> int:
        return self.queue_length + self.num_running


@dataclass(frozen=True)
class Choice:
    worker: WorkerLoad
    outcome: str  # "prefix_affinity" | "least_loaded"
    cached_blocks: int
    score: float


def cache_overlap_ratio(cached_blocks: int, block_size: int, prompt_length: int, cache: CachePolicy) -> float:
    """Fraction of the prompt's reusable part the worker holds; 0 below ``minCacheHitRatio`` or with reuse
    off. Reusable: the full blocks before the last token (a partial block is never cached, and the last
    token is always computed), so a short prompt wholly cached counts as a full hit."""
    reusable = (prompt_length - 1) // block_size * block_size if block_size > 0 else 0
    if not cache.reuse_prefix or reusable <= 0:
        return 0.0
    ratio = min(1.0, cached_blocks * block_size / reusable)
    return ratio if ratio >= cache.min_cache_hit_ratio else 0.0


def pick_decode_worker(workers: Sequence[WorkerLoad], prompt_hashes: Sequence[bytes], prompt_length: int,
                       split: SplitPolicy, cache: CachePolicy, rng: random.Random | None = None) -> Choice | None:
    """Highest score wins: prefixCacheWeight x overlap - queueLengthWeight x queue - decodeLoadWeight x running.

    With hotspot prevention, a worker loaded above ``hotspotLoadFactor`` x the pool mean gets no credit
    for its cache, so one popular prefix cannot pile every request onto one worker. Ties are broken at
    random so equal workers share load.
    """
    candidates = [w for w in workers if w.healthy and not w.draining]
    if not candidates:
        return None
    mean_load = sum(w.load for w in candidates) / len(candidates)
    best: list[tuple[float, WorkerLoad, int, float]] = []
    for w in candidates:
        cached = shared_prefix_blocks(prompt_hashes, w.prefix_hashes) if w.prefix_hashes else 0
        overlap = cache_overlap_ratio(cached, w.block_size, prompt_length, cache)
        hot = split.enable_hotspot_prevention and w.load > split.hotspot_load_factor * mean_load + 1
        affinity = 0.0 if hot else split.prefix_cache_weight * overlap
        score = affinity - split.queue_length_weight * w.queue_length - split.decode_load_weight * w.num_running
        entry = (score, w, cached, affinity)
        if not best or score > best[0][0] + 1e-9:
            best = [entry]
        elif abs(score - best[0][0]) <= 1e-9:
            best.append(entry)
    score, worker, cached, affinity = (rng or random).choice(best)
    return Choice(worker, "prefix_affinity" if affinity > 0 else "least_loaded", cached, score)


def estimate_ttft(prefill_queue: float, avg_prefill_seconds: float, decode_backlog: float,
                  avg_decode_seconds: float) -> float:
    """Seed 001: prefill queue x mean prefill time + decode backlog x mean decode time (seconds)."""
    return prefill_queue * avg_prefill_seconds + decode_backlog * avg_decode_seconds


def _per_request_seconds(w: WorkerLoad) -> float:
    return max(w.avg_prefill_seconds, w.avg_decode_step_seconds)


def estimate_request_ttft(prompt_length: int, cached_tokens: int, decode: WorkerLoad, prefill: Sequence[WorkerLoad],
                          split: SplitPolicy, decode_pool: Sequence[WorkerLoad] = ()) -> float:
    """``estimate_ttft`` for the path this request will take on ``decode``.

    The decode worker offloads to its least-loaded prefill worker when ``should_offload_prefill`` says
    so (as ``DecodeService`` decides); only then does that worker's queue count, at its own mean
    prefill time (the pool's when it has none yet). A prompt prefilled locally waits for the decode
    backlog alone; a busy prefill pool it will never use does not get it rejected. A decode worker
    with no timing yet (just started: where least-loaded routing sends work) borrows ``decode_pool``'s
    mean, so a burst on a fresh pod is not read as free.
    """
    per_request = _per_request_seconds(decode)
    if per_request <= 0:
        known = [t for t in map(_per_request_seconds, decode_pool) if t > 0]
        per_request = sum(known) / len(known) if known else 0.0
    target = min(prefill, key=lambda w: (w.load, w.endpoint), default=None)
    if target is None or not should_offload_prefill(prompt_length, cached_tokens, target.load, split):
        return estimate_ttft(0, 0.0, decode.queue_length, per_request)
    known = [w.avg_prefill_seconds for w in prefill if w.avg_prefill_seconds > 0]
    prefill_time = target.avg_prefill_seconds or (sum(known) / len(known) if known else 0.0)
    return estimate_ttft(target.load, prefill_time, decode.queue_length, per_request)


@dataclass(frozen=True)
class Admission:
    admitted: bool
    reason: str = ""  # why a request was rejected: "ttft_estimate" | "slo_violation"


def admit_request(priority: str, estimated_ttft_seconds: float, qos: QoS) -> Admission:
    """Reject low-priority work early when the TTFT estimate is over ``lowPriorityThresholdMs``, or over
    ``ttftSloMs`` with ``rejectOnSloViolation`` (seed 001's ``admit_request`` compares with the SLO; with
    its example values the lower of the two, the SLO, decides); always admit high."""
    if not qos.enable_early_rejection or priority == "high":
        return Admission(True)
    est_ms = estimated_ttft_seconds * 1000
    if est_ms > qos.low_priority_threshold_ms:
        return Admission(False, "ttft_estimate")
    if qos.reject_on_slo_violation and est_ms > qos.ttft_slo_ms:
        return Admission(False, "slo_violation")
    return Admission(True)
