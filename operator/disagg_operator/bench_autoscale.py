"""``disagg bench autoscale``: replay a bursty, diurnal arrival trace through a simulated
prefill/decode cluster and compare static-min, static-max and the planner (``autoscale.decide``).

The simulator is discrete-time (``--dt`` seconds) and pure Python. Its service times come from the
real engine: ``--service-times FILE`` (JSON, see ``ServiceTimes``), or, without it, they are
measured by running ``disagg_worker.engine`` on the built-in tiny model on CPU (prefill seconds per
token at a few prompt lengths, decode seconds per step at a few batch sizes).

Model: a prefill pod serves its FIFO queue one prompt at a time (``prompt x seconds-per-token``),
the first token is ready when the prompt is done (TTFT); the request then joins the least-loaded
decode pod, which runs a continuous batch of at most ``--max-batch`` requests, one token per request
per step, each step taking ``decode_step(batch)``; a waiting request takes a slot the moment one
frees. A new pod serves after ``--startup`` seconds; a removed pod first drains (takes no new work,
finishes what it has). Every ``intervalSeconds`` the planner samples per-pod averages (queue length,
busy %, KV %, each a mean over the interval, as the workers' time-integral counters give it; a pod
ready for part of the interval shares its load for that part, as the operator counts it) and calls
``decide``. Within a simulation step (``--dt``, longer than a short request lives) every request's
wait, KV and busy time count for the part of the step it was there.

Reported per policy: SLO attainment (TTFT <= SLO and TPOT <= SLO), replica-seconds, scale reversals
(a change of direction), and p50/p99 TTFT and TPOT. Targets (reported, not asserted): >= 99 %
attainment at <= 0.6x the replica-seconds of static-max, <= 1 reversal per 10 simulated minutes.
Writes ``autoscale.json``, ``autoscale-service-times.json`` and ``autoscale.png`` under ``--out``.
``--seeds 0-9`` runs each of several traces as ``--seed N`` would (into ``seed-N/``, no plot), prints
one table of the planner on each and writes ``autoscale-seeds.json``.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import json
import math
import os
import random
import statistics
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from disagg_operator.autoscale import HISTORY_SECONDS, WARMUP_SECONDS, Sample, decide, ready_share, target
from disagg_worker.argtypes import positive
from disagg_worker.policy import RoleAutoscale, Thresholds

DEFAULT_OUT = Path("benchmarks/out/autoscale")
# requests per second a decode pod serves over those a prefill pod does, on any host (the balance the
# stored service times have: measured on the engine on this project's CPU VM on 2026-11-30)
DECODE_TO_PREFILL_CAPACITY = 1.7
# The share of a pod's capacity at which the bench's policy scales a role up and down (prefill's busy
# fraction; for decode, the KV usage it has at that share of its requests per second)
UP_UTILISATION, DOWN_UTILISATION = 0.59, 0.38


# ---- service times ----------------------------------------------------------------------------


@dataclass
class ServiceTimes:
    """Measured costs: prefill seconds per prompt token (by prompt length) and decode seconds per
    step (by batch size). JSON keys are strings: {"prefill_seconds_per_token": {"256": 1e-4}, ...}."""

    prefill_seconds_per_token: dict[int, float]
    decode_step_seconds: dict[int, float]
    source: str = "file"

    @classmethod
    def load(cls, path: Path) -> ServiceTimes:
        data = json.loads(Path(path).read_text())
        return cls(
            {int(k): float(v) for k, v in data["prefill_seconds_per_token"].items()},
            {int(k): float(v) for k, v in data["decode_step_seconds"].items()},
            data.get("source", str(path)),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "prefill_seconds_per_token": {str(k): v for k, v in sorted(self.prefill_seconds_per_token.items())},
            "decode_step_seconds": {str(k): v for k, v in sorted(self.decode_step_seconds.items())},
            "source": self.source,
        }

    @staticmethod
    def _interp(table: dict[int, float], x: float) -> float:
        keys = sorted(table)
        if x <= keys[0]:
            return table[keys[0]]
        if x >= keys[-1]:
            if len(keys) == 1:
                return table[keys[0]]
            a, b = keys[-2], keys[-1]  # extrapolate linearly
            return table[b] + (table[b] - table[a]) * (x - b) / (b - a)
        i = bisect.bisect_left(keys, x)
        a, b = keys[i - 1], keys[i]
        return table[a] + (table[b] - table[a]) * (x - a) / (b - a)

    def prefill_seconds(self, tokens: int) -> float:
        return tokens * self._interp(self.prefill_seconds_per_token, tokens)

    def decode_step(self, batch: float) -> float:
        return max(1e-6, self._interp(self.decode_step_seconds, max(1, batch)))


def measure_service_times(
    prompt_lengths: tuple[int, ...] = (64, 256, 512), batch_sizes: tuple[int, ...] = (1, 4, 8, 16), repeats: int = 3
) -> ServiceTimes:
    """Run the real engine (tiny-llama, CPU, fp32) and time prefill and decode steps."""
    from disagg_worker.engine.engine import EngineConfig, LLMEngine  # heavy: torch

    eng = LLMEngine(EngineConfig(model="tiny-llama", device="cpu", dtype="float32"))
    rng = random.Random(0)
    ids = iter(range(1_000_000))

    def prompt(n: int) -> list[int]:
        return [rng.randrange(10, 1000) for _ in range(n)]

    def run_all() -> None:
        while eng.has_unfinished():
            eng.step()

    eng.add_request(f"warm-{next(ids)}", prompt(32), {"max_tokens": 4, "temperature": 0})
    run_all()
    # the minimum over repeats: the least disturbed by whatever else runs on the machine
    prefill: dict[int, float] = {}
    for n in prompt_lengths:
        times = []
        for _ in range(repeats):
            eng.add_request(f"p-{next(ids)}", prompt(n), {"max_tokens": 1, "temperature": 0})
            t0 = time.perf_counter()
            run_all()
            times.append((time.perf_counter() - t0) / n)
        prefill[n] = min(times)
    decode: dict[int, float] = {}
    for b in batch_sizes:
        medians = []
        for _ in range(max(1, repeats - 1)):
            rids = [f"d-{next(ids)}" for _ in range(b)]
            for rid in rids:
                eng.add_request(rid, prompt(16), {"max_tokens": 32, "temperature": 0})
            seen: set[str] = set()
            steps: list[float] = []
            while eng.has_unfinished():
                t0 = time.perf_counter()
                outs = eng.step()
                dt = time.perf_counter() - t0
                if len(seen) == b:  # every request is past its prefill: a pure decode step at batch b
                    steps.append(dt)
                seen.update(o.request_id for o in outs if o.request_id in rids)
            if steps:
                medians.append(statistics.median(steps))
        decode[b] = min(medians) if medians else 0.0
    return ServiceTimes(prefill, decode, source="measured: disagg_worker.engine tiny-llama cpu float32")


# ---- workload ---------------------------------------------------------------------------------


@dataclass(eq=False)  # identity: two requests with equal fields are still two requests
class Request:
    arrival: float
    prompt: int
    output: int
    first_token: float | None = None
    finished: float | None = None
    generated: float = 0.0


@dataclass(frozen=True)
class Workload:
    duration: float
    peak_rate: float
    trough_rate: float
    bursts: tuple[tuple[float, float, float], ...]  # (start, length, extra rate)
    prompt_range: tuple[int, int] = (64, 512)
    output_range: tuple[int, int] = (16, 128)

    def rate(self, t: float) -> float:
        diurnal = (
            self.trough_rate + (self.peak_rate - self.trough_rate) * (1 - math.cos(2 * math.pi * t / self.duration)) / 2
        )
        return diurnal + sum(extra for start, length, extra in self.bursts if start <= t < start + length)

    def mean_prompt(self) -> float:
        return sum(self.prompt_range) / 2

    def mean_output(self) -> float:
        return sum(self.output_range) / 2

    def mean_prefill_seconds(self, st: ServiceTimes) -> float:
        """A prompt's mean prefill time over the trace's (uniform) prompt lengths. Not the time of the
        mean prompt: the cost per token depends on the length, so the two differ (by 2-13% with the
        stored costs). Sized by the mean prompt's time, the load was up to 13% heavier than the bench
        meant: with one host's costs the first burst offered the four prefill pods serving it 100% of
        their capacity instead of 88%."""
        lo, hi = self.prompt_range
        return sum(st.prefill_seconds(n) for n in range(lo, hi + 1)) / (hi - lo + 1)

    def trace(self, seed: int = 0) -> list[Request]:
        """Poisson arrivals at ``rate(t)`` (thinning), uniform prompt / output lengths."""
        rng = random.Random(seed)
        top = max(self.rate(t) for t in range(int(self.duration) + 1))
        out, t = [], 0.0
        while True:
            t += rng.expovariate(top)
            if t >= self.duration:
                return out
            if rng.random() < self.rate(t) / top:
                out.append(Request(t, rng.randint(*self.prompt_range), rng.randint(*self.output_range)))


# ---- the simulated cluster --------------------------------------------------------------------


@dataclass
class Pod:
    ready_at: float
    draining: bool = False
    queue: deque[Request] = field(default_factory=deque)  # prefill: waiting; decode: waiting for a slot
    running: list[Request] = field(default_factory=list)  # decode batch
    busy_left: float = 0.0  # prefill: seconds left on the current prompt
    busy_time: float = 0.0  # busy seconds since the last sample
    kv_time: float = 0.0  # KV usage (fraction of the cache) x seconds since the last sample
    queue_time: float = 0.0  # requests waiting x seconds since the last sample

    def ready(self, now: float) -> bool:
        return now >= self.ready_at

    def load(self) -> int:
        return len(self.queue) + len(self.running) + (1 if self.busy_left > 0 else 0)


@dataclass
class PolicyRun:
    name: str
    requests: list[Request]
    replica_seconds: float
    decisions: list[tuple[float, str, str, int, int]]  # time, role, direction, from, to
    timeline: list[tuple[float, int, int, float]]  # time, prefill pods, decode pods, arrival rate


class Cluster:
    def __init__(
        self, st: ServiceTimes, prefill: int, decode: int, *, max_batch: int, kv_tokens: float, startup: float
    ):
        self.st, self.max_batch, self.kv_tokens, self.startup = st, max_batch, kv_tokens, startup
        self.pools: dict[str, list[Pod]] = {
            "prefill": [Pod(0.0) for _ in range(prefill)],
            "decode": [Pod(0.0) for _ in range(decode)],
        }
        self.replica_seconds = 0.0

    def serving(self, role: str, now: float) -> list[Pod]:
        return [p for p in self.pools[role] if p.ready(now) and not p.draining]

    def submit(self, req: Request, now: float) -> None:
        pods = self.serving("prefill", now) or [p for p in self.pools["prefill"] if not p.draining]
        min(pods, key=Pod.load).queue.append(req)

    def _to_decode(self, req: Request, now: float) -> None:
        pods = self.serving("decode", now) or [p for p in self.pools["decode"] if not p.draining]
        min(pods, key=Pod.load).queue.append(req)

    def step(self, now: float, dt: float) -> None:
        """Advance ``dt`` seconds. Event times inside the step are exact (not rounded to ``dt``): a
        prompt starts no earlier than its arrival, a request decodes from the moment its first
        token exists, and finishes after exactly its remaining tokens' steps."""
        end = now + dt
        self.replica_seconds += dt * sum(len(pods) for pods in self.pools.values())
        for pod in self.pools["prefill"]:
            if not pod.ready(now):
                continue
            clock = max(now, pod.ready_at)
            while clock < end - 1e-12:
                if pod.busy_left <= 0:
                    if not pod.queue:
                        break
                    head = pod.queue[0]
                    clock = max(clock, head.arrival)
                    if clock >= end:
                        break
                    pod.busy_left = self.st.prefill_seconds(head.prompt)
                    pod.queue_time += clock - max(now, head.arrival)  # its wait within this step
                used = min(end - clock, pod.busy_left)
                pod.busy_left -= used
                pod.busy_time += used
                clock += used
                if pod.busy_left <= 1e-12:
                    req = pod.queue.popleft()
                    req.first_token = clock
                    req.generated = 1
                    pod.busy_left = 0.0
                    self._to_decode(req, now)
            pod.queue_time += self.seconds_waiting(pod.queue, now, end, skip_head=pod.busy_left > 0,
                                                   since=lambda req: req.arrival)
        for pod in self.pools["decode"]:
            if pod.ready(now):
                self._decode(pod, now, end)
        for role in self.pools:  # drained pods leave
            self.pools[role] = [p for p in self.pools[role] if not (p.draining and p.load() == 0)]

    def _decode(self, pod: Pod, now: float, end: float) -> None:
        """A decode pod's continuous batch from ``now`` to ``end``, event by event: every request
        decoding makes a token per ``decode_step(b)`` seconds, ``b`` the requests decoding at that
        moment; a request decodes from its first token, and one waiting for a slot takes it the
        moment a request finishes (the engine admits waiting requests every step, not every ``dt``).
        A step is longer than a short request lives here, so one batch size for the whole of it read
        the step times, and with them the KV usage, of every request that came or went within it."""
        if not pod.running and not pod.queue:
            return
        while pod.queue and len(pod.running) < self.max_batch:
            pod.running.append(pod.queue.popleft())  # their wait ended by ``now`` (or they came since)

        def begins(req: Request) -> float:
            return max(now, req.first_token or now)

        clock, waited, busy, token_seconds = now, 0.0, 0.0, 0.0
        while clock < end - 1e-12:
            active = [r for r in pod.running if begins(r) <= clock + 1e-12]
            upcoming = [begins(r) for r in pod.running if begins(r) > clock + 1e-12]
            if not active:
                if not upcoming:
                    break
                clock = min(min(upcoming), end)
                continue
            step = self.st.decode_step(len(active))
            until = min([end, *upcoming, clock + min(r.output - r.generated for r in active) * step])
            span = until - clock
            busy += span
            for req in active:
                gained = min(req.output - req.generated, span / step)
                # the KV it holds grows by a token a step: its mean over the span
                token_seconds += span * (req.prompt + req.generated + gained / 2)
                req.generated += gained
            clock = until
            for req in [r for r in active if r.output - r.generated <= 1e-9]:
                req.generated, req.finished = req.output, clock
                pod.running.remove(req)
                if pod.queue:  # its slot goes to the longest waiting request
                    joined = begins(pod.queue[0])
                    waited += max(0.0, clock - joined)
                    pod.running.append(pod.queue.popleft())
        pod.queue_time += waited + self.seconds_waiting(pod.queue, now, end, skip_head=False,
                                                        since=lambda req: req.first_token or now)
        pod.busy_time += busy
        pod.kv_time += min(token_seconds / self.kv_tokens, end - now)

    @staticmethod
    def seconds_waiting(queue: deque[Request], now: float, end: float, *, skip_head: bool,
                        since: Callable[[Request], float]) -> float:
        """Request-seconds spent waiting in ``queue`` from ``now`` to ``end`` by the requests still in
        it (not the head when ``skip_head``: the prompt in progress), each from ``since(request)`` if
        that falls inside the step: the time integral a worker exports, which a planner divides by
        the interval. Those that joined during the step are at the tail, so only they are visited: a
        static-min queue holds hundreds of thousands."""
        first = 1 if skip_head else 0
        total, count = 0.0, max(0, len(queue) - first)
        for i in range(len(queue) - 1, first - 1, -1):
            joined = since(queue[i])
            if joined <= now:
                break
            total += max(0.0, end - joined)
            count -= 1
        return total + count * (end - now)

    def sample(self, role: str, now: float, elapsed: float, warmup: float) -> tuple[Sample, int]:
        """What the operator's planner reads at ``now`` (the end of the step just run), as it reads it:
        per-pod averages over the pods ready for ``warmup`` seconds (pods still starting or warming up
        count as ``starting``) of the busy fraction, the queue (requests waiting, not the prompt in
        progress) and the KV usage, each a mean over the ``elapsed`` seconds since the last sample (the
        workers' time-integral counters between two scrapes)."""
        pods = [p for p in self.pools[role] if not p.draining]
        serving = [p for p in pods if p.ready(now)]
        warm = [p for p in serving if now - p.ready_at >= warmup - 1e-9]
        starting = len(pods) - len(warm)

        def mean(seconds: float, cap: float = math.inf) -> float:
            return min(cap, seconds / elapsed) if elapsed > 0 else 0.0
        means = [(mean(p.queue_time), mean(p.busy_time, 1.0), mean(p.kv_time, 1.0)) for p in warm]
        for p in self.pools[role]:
            p.busy_time = p.kv_time = p.queue_time = 0.0
        if not warm:
            return Sample(now, 0), starting
        n = len(warm)
        queue, busy, kv = (sum(column) / n for column in zip(*means, strict=True))
        # each pod for the share of the interval it served, as the operator's ``sharing_pods`` counts it
        sharing = sum(ready_share(p.ready_at, now, elapsed) for p in serving)
        return Sample(now, n, queue_length=queue, gpu_utilization=100 * busy, kv_cache_usage=100 * kv,
                      serving=sharing), starting

    def resize(self, role: str, desired: int, now: float) -> None:
        pods = [p for p in self.pools[role] if not p.draining]
        if desired > len(pods):
            self.pools[role] += [Pod(now + self.startup) for _ in range(desired - len(pods))]
            return
        # remove the pods holding the least state first (starting ones, then the least loaded)
        for pod in sorted(pods, key=lambda p: (p.ready(now), p.load()))[: len(pods) - desired]:
            pod.draining = True
            if role == "prefill" or not pod.ready(now):
                # hand queued work to the others; the prompt in progress (the head) finishes here
                for req in list(pod.queue)[1 if pod.busy_left > 0 else 0:]:
                    pod.queue.remove(req)
                    (self.submit if role == "prefill" else self._to_decode)(req, now)
            else:
                waiting = list(pod.queue)
                pod.queue.clear()
                for req in waiting:
                    self._to_decode(req, now)


@dataclass(frozen=True)
class BenchConfig:
    workload: Workload
    prefill: RoleAutoscale
    decode: RoleAutoscale
    interval: float = 15.0
    startup: float = 30.0
    warmup: float = WARMUP_SECONDS  # a ready pod is sampled after this long, as the operator's planner does
    max_batch: int = 16
    dt: float = 0.05
    ttft_slo: float = 1.0
    tpot_slo: float = 0.05
    drain_tail: float = 120.0


def simulate(cfg: BenchConfig, st: ServiceTimes, name: str, *, seed: int = 0) -> PolicyRun:
    static = {
        "static-min": (cfg.prefill.min_replicas, cfg.decode.min_replicas),
        "static-max": (cfg.prefill.max_replicas, cfg.decode.max_replicas),
    }
    start = static.get(name, (cfg.prefill.min_replicas, cfg.decode.min_replicas))
    kv_tokens = cfg.max_batch * (cfg.workload.mean_prompt() + cfg.workload.mean_output())
    cluster = Cluster(
        st, max(1, start[0]), max(1, start[1]), max_batch=cfg.max_batch, kv_tokens=kv_tokens, startup=cfg.startup
    )
    requests = cfg.workload.trace(seed)
    pending = deque(requests)
    history: dict[str, list[Sample]] = {"prefill": [], "decode": []}
    last_change: dict[str, float | None] = {"prefill": None, "decode": None}
    last_direction: dict[str, str | None] = {"prefill": None, "decode": None}
    decisions: list[tuple[float, str, str, int, int]] = []
    timeline: list[tuple[float, int, int, float]] = []
    steps = int((cfg.workload.duration + cfg.drain_tail) / cfg.dt)
    sample_every = max(1, round(cfg.interval / cfg.dt))
    last_sample = 0.0
    for i in range(steps):
        now = i * cfg.dt
        while pending and pending[0].arrival <= now + cfg.dt:
            cluster.submit(pending.popleft(), now)
        cluster.step(now, cfg.dt)
        if (i + 1) % sample_every == 0:
            t = now + cfg.dt  # the planner's round reads the cluster as this step left it
            timeline.append(
                (
                    t,
                    len(cluster.pools["prefill"]),
                    len(cluster.pools["decode"]),
                    cfg.workload.rate(min(t, cfg.workload.duration)),
                )
            )
            for role, policy in (("prefill", cfg.prefill), ("decode", cfg.decode)):
                sample, starting = cluster.sample(role, t, t - last_sample, cfg.warmup)
                if name != "planner":
                    continue
                history[role].append(sample)
                history[role] = [s for s in history[role] if t - s.time <= HISTORY_SECONDS]
                current = len([p for p in cluster.pools[role] if not p.draining])
                d = decide(history[role], policy, current, starting, t, last_change[role],
                           last_direction=last_direction[role])
                if d.changed:
                    cluster.resize(role, d.desired, t)
                    last_change[role] = t
                    last_direction[role] = d.direction
                    decisions.append((t, role, d.direction, current, d.desired))
            last_sample = t
        if not pending and now > cfg.workload.duration and all(r.finished for r in requests):
            break
    return PolicyRun(name, requests, cluster.replica_seconds, decisions, timeline)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, math.ceil(q / 100 * len(values)) - 1))]


def reversals(decisions: list[tuple[float, str, str, int, int]]) -> int:
    total = 0
    for role in ("prefill", "decode"):
        dirs = [d[2] for d in decisions if d[1] == role]
        total += sum(1 for a, b in itertools.pairwise(dirs) if a != b)
    return total


def summarize(run: PolicyRun, cfg: BenchConfig) -> dict[str, Any]:
    ttfts, tpots, ok = [], [], 0
    for r in run.requests:
        if r.first_token is None or r.finished is None:
            continue
        ttft = r.first_token - r.arrival
        tpot = (r.finished - r.first_token) / max(1, r.output - 1)
        ttfts.append(ttft)
        tpots.append(tpot)
        ok += ttft <= cfg.ttft_slo and tpot <= cfg.tpot_slo
    n = len(run.requests)
    minutes = cfg.workload.duration / 60
    return {
        "policy": run.name,
        "requests": n,
        "completed": len(ttfts),
        "slo_attainment": ok / n if n else 1.0,
        "replica_seconds": run.replica_seconds,
        "scale_decisions": len(run.decisions),
        "reversals": reversals(run.decisions),
        "reversals_per_10min": reversals(run.decisions) / (minutes / 10) if minutes else 0.0,
        "ttft_p50_s": percentile(ttfts, 50),
        "ttft_p99_s": percentile(ttfts, 99),
        "tpot_p50_s": percentile(tpots, 50),
        "tpot_p99_s": percentile(tpots, 99),
    }


def decode_kv_usage(workload: Workload, max_batch: int, st: ServiceTimes, rate: float) -> float:
    """A decode pod's steady KV usage (a fraction) at ``rate`` requests per second: the batch ``b`` in
    which each request stays its ``mean_output`` steps of ``decode_step(b)`` (Little's law, solved by
    bisection), each holding its prompt and half its output on average; 1.0 once no batch keeps up.
    Not proportional to the rate: a bigger batch makes every step slower, so requests stay longer."""
    out, prompt = workload.mean_output(), workload.mean_prompt()

    def excess(b: float) -> float:  # > 0: a batch of b cannot hold the requests arriving
        return rate * out * st.decode_step(max(1.0, b)) - b

    if rate <= 0:
        return 0.0
    if excess(max_batch) > 0:
        return 1.0
    low, high = 0.0, float(max_batch)
    for _ in range(60):
        mid = (low + high) / 2
        low, high = (mid, high) if excess(mid) > 0 else (low, mid)
    return high * (prompt + out / 2) / (max_batch * (prompt + out))


def oracle_ratio(cfg: BenchConfig, st: ServiceTimes) -> float:
    """Replica-seconds of an oracle over static-max's, both over the trace's duration.

    The oracle knows the arrival rate and resizes every second, with no start-up delay, to the fewest
    pods that run at the planner's utilisation targets (prefill ``gpuUtilization``, decode
    ``kvCacheUsage``: the middle of the scale-up and scale-down thresholds; decode's KV usage as
    ``decode_kv_usage`` has it at each pod's share of the rate). No reactive planner holding those
    targets can use fewer; only higher targets (less burst headroom) can.
    """
    prefill_s = cfg.workload.mean_prefill_seconds(st)
    goal_p = (target(cfg.prefill, "gpu_utilization") or 100.0) / 100
    goal_d = (target(cfg.decode, "kv_cache_usage") or 100.0) / 100
    low_d, high_d = cfg.decode.min_replicas, cfg.decode.max_replicas
    used = 0
    seconds = int(cfg.workload.duration)
    for t in range(seconds):
        rate = cfg.workload.rate(t)
        used += min(cfg.prefill.max_replicas, max(cfg.prefill.min_replicas, math.ceil(rate * prefill_s / goal_p)))
        used += next((n for n in range(max(1, low_d), high_d + 1)
                      if decode_kv_usage(cfg.workload, cfg.max_batch, st, rate / n) <= goal_d), high_d)
    return used / ((cfg.prefill.max_replicas + cfg.decode.max_replicas) * seconds)


# ---- configuration from the service times ------------------------------------------------------


def default_config(
    st: ServiceTimes, *, minutes: float = 60.0, max_batch: int = 16, startup: float = 30.0, dt: float = 0.05
) -> BenchConfig:
    """Size pools, load and SLOs from the measured costs, so the bench means the same on any machine.

    That includes the balance of the two pools: output lengths are scaled so that a decode pod serves
    ``DECODE_TO_PREFILL_CAPACITY`` times the requests per second of a prefill pod whatever the host's
    prefill/decode cost ratio (with the stored service times, the trace's 16-128 tokens). Without it
    the ratio decided which pool binds and how far static-max over-provisions the other: with one
    host's costs an oracle needed 0.55x static-max's replica-seconds, with another's 0.64x."""
    duration = minutes * 60
    probe = Workload(duration, 1.0, 0.1, ())
    prefill_s = probe.mean_prefill_seconds(st)
    step_full = st.decode_step(max_batch)
    capacity_p = 1.0 / prefill_s  # requests per second per prefill pod
    # the default output range, stretched so its mean gives decode pods the capacity wanted
    stretch = max_batch / (step_full * DECODE_TO_PREFILL_CAPACITY * capacity_p) / probe.mean_output()
    shortest, longest = probe.output_range
    shaped = replace(probe, output_range=(max(1, round(shortest * stretch)), max(2, round(longest * stretch))))
    capacity_d = max_batch / (step_full * shaped.mean_output())
    max_p, max_d = 8, 8
    peak = 0.55 * min(max_p * capacity_p, max_d * capacity_d)
    bursts = ((0.22 * duration, 120.0, 0.35 * peak), (0.72 * duration, 150.0, 0.3 * peak))
    workload = replace(shaped, peak_rate=peak, trough_rate=0.08 * peak, bursts=bursts)

    def kv_at(utilisation: float) -> float:
        """Decode's KV usage (percent, rounded) at this share of a decode pod's requests per second."""
        return round(100 * decode_kv_usage(workload, max_batch, st, utilisation * capacity_d))

    def role(up: Thresholds, down: Thresholds, hi: int) -> RoleAutoscale:
        # Reacting fast matters most: a pod serves only ``startup`` seconds after the decision, and
        # the TTFT SLO is a few prompt-times long. So no scale-up stabilisation (the HPA default) and a
        # 5 s sampling interval. Scale-down waits for a sustained minute and, while the load trends
        # up, keeps what the trend needs 10 minutes ahead: that, not a long window, is what keeps a
        # pool from shrinking after a burst on the morning ramp and growing back minutes later.
        return RoleAutoscale(
            min_replicas=1,
            max_replicas=hi,
            scale_up=up,
            scale_down=down,
            scale_up_stabilization_seconds=0,
            scale_down_stabilization_seconds=60,
            cooldown_seconds=30,
            max_step=4,
            scale_down_forecast_seconds=600,
        )

    return BenchConfig(
        workload=workload,
        # Utilisation targets (between the thresholds) of about half: the headroom that absorbs a burst
        # of a third of the peak rate for the half-minute a new pod needs. The queue thresholds sit
        # above the per-pod noise of a Poisson queue at that utilisation (below them, every scale-down
        # waited for a sample with nobody queued anywhere). Decode scales on KV usage, which grows
        # faster than its load (a bigger batch makes every step slower, so each request stays longer)
        # and by how much depends on the host's step times: its thresholds are the KV usage at the
        # same shares of its capacity as prefill's busy thresholds (``decode_kv_usage``).
        prefill=role(
            Thresholds(queue_length=0.8, gpu_utilization=round(100 * UP_UTILISATION)),
            Thresholds(queue_length=0.3, gpu_utilization=round(100 * DOWN_UTILISATION)), max_p,
        ),
        decode=role(
            Thresholds(queue_length=0.2, kv_cache_usage=kv_at(UP_UTILISATION)),
            Thresholds(queue_length=0.05, kv_cache_usage=kv_at(DOWN_UTILISATION)), max_d,
        ),
        interval=5.0,
        startup=startup,
        max_batch=max_batch,
        dt=dt,
        ttft_slo=round(max(8 * prefill_s, 0.05), 4),
        tpot_slo=round(1.3 * step_full, 5),
    )


# ---- output -----------------------------------------------------------------------------------


def plot(runs: list[PolicyRun], cfg: BenchConfig, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_load, ax_p, ax_d) = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    planner = next(r for r in runs if r.name == "planner")
    t = [x[0] / 60 for x in planner.timeline]
    ax_load.plot(t, [x[3] for x in planner.timeline], color="black")
    ax_load.set_ylabel("arrivals / s")
    ax_load.set_title("load and replicas over time")
    for run in runs:
        style = {"planner": "-", "static-min": ":", "static-max": "--"}[run.name]
        tt = [x[0] / 60 for x in run.timeline]
        ax_p.plot(tt, [x[1] for x in run.timeline], style, label=run.name)
        ax_d.plot(tt, [x[2] for x in run.timeline], style, label=run.name)
    ax_p.set_ylabel("prefill pods")
    ax_d.set_ylabel("decode pods")
    ax_d.set_xlabel("simulated minutes")
    ax_p.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def config_json(cfg: BenchConfig) -> dict[str, Any]:
    return {
        "minutes": cfg.workload.duration / 60,
        "peak_rate": cfg.workload.peak_rate,
        "trough_rate": cfg.workload.trough_rate,
        "bursts": cfg.workload.bursts,
        "prompt_range": cfg.workload.prompt_range,
        "output_range": cfg.workload.output_range,
        "ttft_slo_s": cfg.ttft_slo,
        "tpot_slo_s": cfg.tpot_slo,
        "startup_s": cfg.startup,
        "max_batch": cfg.max_batch,
        "interval_s": cfg.interval,
        "dt_s": cfg.dt,
        "prefill": cfg.prefill.model_dump(by_alias=True, exclude_none=True),
        "decode": cfg.decode.model_dump(by_alias=True, exclude_none=True),
    }


def run_bench(
    cfg: BenchConfig, st: ServiceTimes, out: Path, *, seed: int = 0, make_plot: bool = True
) -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    runs = [simulate(cfg, st, name, seed=seed) for name in ("static-min", "static-max", "planner")]
    rows = [summarize(r, cfg) for r in runs]
    by = {r["policy"]: r for r in rows}
    ratio = by["planner"]["replica_seconds"] / by["static-max"]["replica_seconds"]
    result = {
        "config": config_json(cfg),
        "service_times": st.to_json(),
        "policies": rows,
        "planner_vs_static_max_replica_seconds": ratio,
        "oracle_vs_static_max_replica_seconds": oracle_ratio(cfg, st),
        "targets": {
            "slo_attainment_ge_0.99": by["planner"]["slo_attainment"] >= 0.99,
            "replica_seconds_le_0.6x_static_max": ratio <= 0.6,
            "reversals_le_1_per_10min": by["planner"]["reversals_per_10min"] <= 1.0,
        },
        "decisions": [asdict_decision(d) for d in runs[2].decisions],
    }
    (out / "autoscale.json").write_text(json.dumps(result, indent=2))
    (out / "autoscale-service-times.json").write_text(json.dumps(st.to_json(), indent=2))
    if make_plot:
        plot(runs, cfg, out / "autoscale.png")
    return result


def seed_summary(result: dict[str, Any], seed: int) -> dict[str, Any]:
    """One trace's line in a multi-seed run: the planner against the static pools and the oracle."""
    by = {r["policy"]: r for r in result["policies"]}
    return {
        "seed": seed,
        "planner_slo_attainment": by["planner"]["slo_attainment"],
        "planner_vs_static_max_replica_seconds": result["planner_vs_static_max_replica_seconds"],
        "reversals_per_10min": by["planner"]["reversals_per_10min"],
        "static_max_slo_attainment": by["static-max"]["slo_attainment"],
        "static_min_slo_attainment": by["static-min"]["slo_attainment"],
        "oracle_vs_static_max_replica_seconds": result["oracle_vs_static_max_replica_seconds"],
        "targets": result["targets"],
    }


def _one_seed(args: tuple[BenchConfig, ServiceTimes, Path, int]) -> dict[str, Any]:
    cfg, st, out, seed = args
    return seed_summary(run_bench(cfg, st, out / f"seed-{seed}", seed=seed, make_plot=False), seed)


def run_seeds(cfg: BenchConfig, st: ServiceTimes, out: Path, seeds: list[int], workers: int) -> dict[str, Any]:
    """The bench on several traces (one process per trace, ``workers`` at a time): how often the planner
    meets every target, not just on one lucky trace. Writes ``autoscale-seeds.json``."""
    import multiprocessing as mp

    from rich.progress import Progress

    out.mkdir(parents=True, exist_ok=True)
    jobs = [(cfg, st, out, seed) for seed in seeds]
    rows: list[dict[str, Any]] = []
    with Progress() as progress, mp.get_context("spawn").Pool(max(1, min(workers, len(jobs)))) as pool:
        task = progress.add_task(f"{len(jobs)} traces", total=len(jobs))
        for row in pool.imap_unordered(_one_seed, jobs):
            rows.append(row)
            progress.advance(task)
    rows.sort(key=lambda r: r["seed"])
    result = {
        "config": config_json(cfg),
        "seeds": rows,
        "all_targets_met_on": [r["seed"] for r in rows if all(r["targets"].values())],
    }
    (out / "autoscale-seeds.json").write_text(json.dumps(result, indent=1))
    return result


def print_seeds_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    rows = result["seeds"]
    table = Table(title="autoscale bench: the planner on each trace (*: a target missed)")
    table.add_column("seed", justify="left")
    for r in rows:
        table.add_column(str(r["seed"]), justify="right")

    def cells(key: str, fmt: str, target: str) -> list[str]:
        return [fmt.format(r[key]) if r["targets"][target] else f"[bold]{fmt.format(r[key])}*[/bold]" for r in rows]

    table.add_row("SLO attainment", *cells("planner_slo_attainment", "{:.2%}", "slo_attainment_ge_0.99"))
    table.add_row("vs static-max", *cells("planner_vs_static_max_replica_seconds", "{:.3f}x",
                                          "replica_seconds_le_0.6x_static_max"))
    table.add_row("reversals/10min", *cells("reversals_per_10min", "{:.2f}", "reversals_le_1_per_10min"))
    console = Console(width=160)
    console.print(table)
    console.print(f"  every target met on {len(result['all_targets_met_on'])} of {len(rows)} traces: "
                  f"{result['all_targets_met_on']}")


def parse_seeds(text: str) -> list[int]:
    """``"0-9"``, ``"0,3,5"`` or a mix (``"0-2,7"``) -> the seeds, in order, without repeats."""
    seeds: dict[int, None] = {}
    for part in text.split(","):
        first, dash, last = part.strip().partition("-")
        try:
            low, high = int(first), int(last if dash else first)
        except ValueError:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: use e.g. 0-9 or 0,3,5 (seeds >= 0)") from None
        if high < low:
            raise argparse.ArgumentTypeError(f"bad seed list {text!r}: {part.strip()!r} runs backwards")
        seeds.update(dict.fromkeys(range(low, high + 1)))
    return list(seeds)


def asdict_decision(d: tuple[float, str, str, int, int]) -> dict[str, Any]:
    return {"time_s": round(d[0], 2), "role": d[1], "direction": d[2], "from": d[3], "to": d[4]}


def print_table(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"autoscale bench: {result['config']['minutes']:g} simulated minutes, TTFT SLO "
        f"{result['config']['ttft_slo_s']} s, TPOT SLO {result['config']['tpot_slo_s']} s"
    )
    for col in (
        "policy",
        "SLO attainment",
        "replica-s",
        "vs static-max",
        "reversals/10min",
        "TTFT p99 s",
        "TPOT p99 s",
        "decisions",
    ):
        table.add_column(col, justify="right" if col != "policy" else "left")
    max_rs = next(r["replica_seconds"] for r in result["policies"] if r["policy"] == "static-max")
    for r in result["policies"]:
        table.add_row(
            r["policy"],
            f"{100 * r['slo_attainment']:.2f} %",
            f"{r['replica_seconds']:.0f}",
            f"{r['replica_seconds'] / max_rs:.2f}x",
            f"{r['reversals_per_10min']:.2f}",
            f"{r['ttft_p99_s']:.3f}",
            f"{r['tpot_p99_s']:.4f}",
            str(r["scale_decisions"]),
        )
    console = Console(width=140)
    console.print(table)
    for name, ok in result["targets"].items():
        console.print(f"  target {name}: {'met' if ok else 'NOT met'}")
    console.print(f"  an oracle resizing instantly to the planner's utilisation targets would use "
                  f"{result['oracle_vs_static_max_replica_seconds']:.2f}x static-max's replica-seconds")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="disagg bench autoscale", description=__doc__.split("\n\n")[0])
    p.add_argument("--service-times", type=Path, help="JSON of measured service times (else: measure now)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--minutes", type=positive(float), default=60.0, help="simulated minutes of trace")
    p.add_argument("--max-batch", type=positive(int), default=16, help="decode batch size per pod")
    p.add_argument("--startup", type=positive(float, zero=True), default=30.0, help="seconds before a new pod serves")
    p.add_argument("--dt", type=positive(float), default=0.05,
                   help="simulation time step in seconds (planner rounds fall on a whole number of steps)")
    one_or_many = p.add_mutually_exclusive_group()
    one_or_many.add_argument("--seed", type=int, default=0)
    one_or_many.add_argument("--seeds", type=parse_seeds, help="several traces, e.g. 0-9: a table of the planner "
                             "on each and autoscale-seeds.json (no plot)")
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    p.add_argument("--workers", type=positive(int), default=cpus,
                   help="traces simulated at once (--seeds)")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    st = ServiceTimes.load(args.service_times) if args.service_times else measure_service_times()
    cfg = default_config(st, minutes=args.minutes, max_batch=args.max_batch, startup=args.startup, dt=args.dt)
    if args.seeds:
        print_seeds_table(run_seeds(cfg, st, args.out, args.seeds, args.workers))
        print(f"wrote {args.out / 'autoscale-seeds.json'}")
        return 0
    result = run_bench(cfg, st, args.out, seed=args.seed, make_plot=not args.no_plot)
    print_table(result)
    print(f"wrote {args.out / 'autoscale.json'}" + ("" if args.no_plot else f" and {args.out / 'autoscale.png'}"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
