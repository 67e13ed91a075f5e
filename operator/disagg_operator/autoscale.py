"""The planner's scaling decision: a pure function of the metrics history, the role's autoscale
policy, and the current replicas.

``decide(history, policy, current_replicas, starting_pods, now, last_change, last_direction=...)``
returns the desired replica count, a reason and a direction. Rules, in order:

1. outside ``[minReplicas, maxReplicas]`` -> straight to the nearest bound;
2. no fresh sample (metrics source down, no ready pod) -> hold: missing data never scales anything,
   and a stabilisation window with a hole in it (a sample without data, or none for ``stale_after``
   seconds) is not sustained load either;
3. within ``cooldownSeconds`` of the last change -> hold, except a further scale-up after a scale-up
   (``last_direction``), as the HPA allows: a burst that lands just after a step for the ramp need
   not wait out the cooldown on too few pods. It is sized like any scale-up, pods still starting
   counted, so it adds only what the pods already on their way do not cover. The cooldown still
   holds every reversal;
4. scale **up** when ANY ``scaleUp`` threshold is exceeded by every sample of the last
   ``scaleUpStabilizationSeconds`` (the window must be covered by samples taken after the last
   change). The new count brings the sustained per-pod load down to a target (the middle of the
   scale-down and scale-up thresholds), counting pods still starting as capacity already on its
   way, at most ``maxStep`` more and at most ``maxReplicas``. A queue crossed while the busy
   fraction stays under its own threshold is a transient: it does not size the step, and it adds one
   pod only once two samples in a row show it;
5. scale **down** when ALL ``scaleDown`` thresholds hold for every sample of the last
   ``scaleDownStabilizationSeconds`` and no pod is starting: remove as many pods (at most
   ``maxStep``, never below ``minReplicas``) as keep the projected per-pod load of every metric, at
   the window's worst, at or below its target, so that the next decision is not a scale-up (no
   flapping). Unlike the scale-up window, this one may reach back past the last change (as the HPA's
   scale-down stabilisation does): each sample is read as the load it means for the pods serving now
   (its per-pod value x its pods / today's pods). A falling load then steps down every cooldown
   instead of once per window, and a sample taken when more pods shared the load is not mistaken for
   a lighter one. With ``scaleDownForecastSeconds`` set, a scale-down while the load trends up keeps
   the pods the trend needs that far ahead (``load_trend``): after a burst on a rising ramp, the pools
   would otherwise shrink when the burst ends and grow back as the ramp catches up (two reversals).
   Until the history is long enough to fit that trend (after a restart or a long outage), a
   scale-down holds: a pool shrunk on a rising ramp just before the trend is known grows back;
6. otherwise hold.

Samples are per-pod averages over the role's ready, warmed-up pods (``Sample``), each a mean over the
interval since the previous sample where the workers export the time integral (queue, busy, KV usage;
see ``planner.interval_averages``), not a snapshot: a decode pod's KV usage read 0% and 58% in two
snapshots 5 s apart at a steady 25%. Pods that are not ready yet, or ready for less than the warm-up
time, are not sampled and count as ``starting_pods``.
Units are the policy's: ``queue_length`` requests per pod, ``gpu_utilization`` and
``kv_cache_usage`` in percent.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import pairwise
from typing import Literal

from disagg_worker.policy import RoleAutoscale

METRICS = ("queue_length", "gpu_utilization", "kv_cache_usage")
Direction = Literal["up", "down", "hold"]
EPSILON = 1e-9
STALE_AFTER_SECONDS = 60.0
# A ready pod is sampled only after this long (its first requests include model warm-up); until then it
# counts as starting. And how much history the planner keeps, which bounds the stabilisation windows.
WARMUP_SECONDS = 30.0
HISTORY_SECONDS = 3600.0
# Target per-pod load when only a scale-up threshold is set: this fraction of it.
UP_ONLY_TARGET = 0.8
# The scale-down forecast's trend: fitted over this much history, to the means of buckets this long
# (a 5 s busy fraction is noisy), from at least this many buckets: a line through two minutes of a
# flat but noisy load extrapolated 10 minutes ahead read anywhere from 0.4x to 1.6x the load.
TREND_SECONDS = 900.0
TREND_BUCKET_SECONDS = 30.0
TREND_MIN_BUCKETS = 10
# Metrics the forecast extrapolates: those proportional to the load (a queue is not).
FORECAST_METRICS = ("gpu_utilization", "kv_cache_usage")


@dataclass(frozen=True)
class Sample:
    """Per-pod averages over ``pods`` ready, warmed-up pods at ``time`` (None: not measured).

    ``serving``: the pods that shared the load over the interval the means cover, answered or not (a
    scrape that timed out, a pod still warming up), each for the share of the interval it was ready
    (so it may be fractional); None when that is ``pods``. The total load is the average times
    ``serving``: the pods that answered stand for those that did not."""

    time: float
    pods: int
    queue_length: float | None = None
    gpu_utilization: float | None = None
    kv_cache_usage: float | None = None
    serving: float | None = None

    @property
    def sharing(self) -> float:
        return max(self.pods, self.serving or 0)

    def value(self, metric: str) -> float | None:
        return getattr(self, metric)


def ready_share(ready_since: float, now: float, window: float) -> float:
    """How much of the load of the last ``window`` seconds a pod ready since ``ready_since`` shared: the
    share of the window it was ready (one pod in ``Sample.serving``)."""
    return 1.0 if window <= 0 else min(1.0, max(0.0, now - ready_since) / window)


@dataclass(frozen=True)
class Decision:
    desired: int
    reason: str
    direction: Direction

    @property
    def changed(self) -> bool:
        return self.direction != "hold"


def _label(metric: str) -> str:
    return {"queue_length": "queueLength", "gpu_utilization": "gpuUtilization", "kv_cache_usage": "kvCacheUsage"}[
        metric
    ]


def target(policy: RoleAutoscale, metric: str) -> float | None:
    """The per-pod load a resize aims at: between the two thresholds (hysteresis on both sides)."""
    up = policy.scale_up.items().get(metric)
    down = policy.scale_down.items().get(metric)
    if up is not None and down is not None:
        return (up + down) / 2
    if up is not None:
        return up * UP_ONLY_TARGET
    return down


def _window(history: Sequence[Sample], now: float, seconds: float, last_change: float | None,
            max_gap: float = STALE_AFTER_SECONDS) -> list[Sample] | None:
    """Samples of the last ``seconds``, or None when they do not cover the window: too little data,
    a sample from before the last change (or from its round: it saw the old pods), or a hole in it (a
    sample without data, or no sample for over ``max_gap`` seconds). Load during a hole is unknown, so
    it is never sustained. A window of 0 seconds is the newest sample, which must hold data."""
    start = now - seconds
    known = [s for s in history if s.time <= now + EPSILON]
    if not known:
        return None
    if seconds <= 0:
        latest = known[-1]  # not the last one with data: a failed scrape since means we know nothing now
        if latest.pods <= 0 or now - latest.time > max_gap + EPSILON:
            return None
        window = [latest]
    else:
        usable = [s for s in known if s.pods > 0]
        if not usable or usable[0].time > start + EPSILON:
            return None  # the history does not reach back to the window's start
        inside = [s for s in usable if s.time >= start - EPSILON]
        if not inside:
            return None
        before = [s for s in usable if s.time < start - EPSILON]
        # the sample in force at the window's start counts too (samples are taken every interval)
        window = ([before[-1]] if before and inside[0].time > start + EPSILON else []) + inside
        if any(s.pods <= 0 and s.time >= window[0].time - EPSILON for s in known):
            return None
        times = [s.time for s in window] + [now]
        if any(later - earlier > max_gap + EPSILON for earlier, later in pairwise(times)):
            return None
    if last_change is not None and any(s.time <= last_change + EPSILON for s in window):
        return None
    return window


def _spread_over(sample: Sample, pods: int) -> Sample:
    """``sample``'s load spread over ``pods`` pods instead of the ones that shared it (the total load
    is what carries over)."""
    def scaled(metric: str) -> float | None:
        value = sample.value(metric)
        return None if value is None else value * sample.sharing / pods
    return Sample(sample.time, pods, **{metric: scaled(metric) for metric in METRICS})


def _sustained(window: Sequence[Sample], metric: str, above: float | None = None, below: float | None = None) -> bool:
    for sample in window:
        value = sample.value(metric)
        if value is None:
            return False
        if above is not None and not value > above:
            return False
        if below is not None and not value < below:
            return False
    return True


def _sizing_metrics(window: Sequence[Sample], policy: RoleAutoscale, crossed: list[str]) -> list[str]:
    """The crossed metrics a scale-up is sized by (none: it adds one pod).

    A queue crossed while the busy fraction (``gpuUtilization``, when the policy sets it) stays under
    its own scale-up threshold is the transient any Poisson arrival stream has, not a shortage of that
    size: it adds one pod instead of sizing the step. A queue is not proportional to the load (one
    request waiting per pod turns up at 20% busy as at 90%), so sizing by it doubled a pool on a sample
    that caught one waiting request per pod, and the next scale-down took the pods back. Once the role
    is busy, the queue sizes the step again: the busy fraction stops at 100% and the queue is what
    shows how far over it the load is. KV usage cannot tell a transient: a decode worker whose batch
    slots are full queues requests at any KV usage.
    """
    busy_threshold = policy.scale_up.gpu_utilization
    transient = (busy_threshold is not None and "gpu_utilization" not in crossed
                 and all(s.gpu_utilization is not None for s in window))
    return [m for m in crossed if not (m == "queue_length" and transient)]


def _transient_persists(history: Sequence[Sample], up_window: Sequence[Sample], policy: RoleAutoscale,
                        crossed: list[str], now: float, last_change: float | None, stale_after: float) -> bool:
    """Whether a transient (see ``_sizing_metrics``) showed in two samples in a row, both taken after
    the last change. One sample is enough to size a real shortage, but a queue that one sample caught
    at a low busy fraction is most often gone by the next: acting on it added a pod that the next
    scale-down window took back (two reversals). A scale-up window of two samples has checked it."""
    if len(up_window) >= 2:
        return True
    earlier = [s for s in history if s.time < up_window[0].time - EPSILON]
    if not earlier:
        return False
    # the window back to the sample before: it checks for a failed scrape, a hole and the last change
    pair = _window(history, now, now - earlier[-1].time, last_change, stale_after)
    return pair is not None and any(_sustained(pair, m, above=policy.scale_up.items()[m]) for m in crossed)


@dataclass(frozen=True)
class Trend:
    """A straight line through a role's total load (the per-pod value x the pods that shared it)."""

    slope: float  # load units per second
    level: float  # the line's value now
    span: float  # seconds of history it was fitted to

    def ahead(self, seconds: float) -> float:
        return self.level + self.slope * seconds


def load_trend(history: Sequence[Sample], metric: str, now: float, seconds: float = TREND_SECONDS,
               bucket: float = TREND_BUCKET_SECONDS) -> Trend | None:
    """The Theil-Sen line (the median of the slopes between every two points, then the median
    intercept) through the means of ``bucket``-second buckets of the last ``seconds`` of total load,
    each placed at its samples' mean time; None with fewer than ``TREND_MIN_BUCKETS`` buckets.
    Theil-Sen rather than least squares: a burst that just ended tilts the median slope less (on a
    flat load with 10% noise per sample, a line through a 225-s burst that ended 2 minutes before read
    1.19x the load 10 minutes ahead, least squares 1.52x), so fewer of the burst's pods are held."""
    buckets: dict[int, list[tuple[float, float]]] = {}
    for s in history:
        value = s.value(metric)
        if s.pods <= 0 or value is None or not now - seconds < s.time <= now + EPSILON:
            continue
        total = value * s.sharing
        if math.isfinite(total):
            age = max(0.0, now - s.time)
            buckets.setdefault(int(age // bucket), []).append((-age, total))
    if len(buckets) < TREND_MIN_BUCKETS:
        return None
    points = sorted((sum(t for t, _ in group) / len(group), sum(v for _, v in group) / len(group))
                    for group in buckets.values())
    slope = statistics.median((v2 - v1) / (t2 - t1) for i, (t1, v1) in enumerate(points) for t2, v2 in points[i + 1:]
                              if t2 > t1)
    return Trend(slope, statistics.median(v - slope * t for t, v in points), -points[0][0])


def forecast_need(history: Sequence[Sample], policy: RoleAutoscale, now: float) -> tuple[int, str] | None:
    """The pods a rising load trend needs ``scaleDownForecastSeconds`` ahead (at most as far ahead as
    the history it was fitted to reaches back), at the metric's target, and that metric; None when the
    forecast is off, no trend is known, or none is rising."""
    horizon = policy.scale_down_forecast_seconds
    if horizon <= 0:
        return None
    best: tuple[int, str] | None = None
    for metric in FORECAST_METRICS:
        goal = target(policy, metric)
        trend = load_trend(history, metric, now) if goal is not None else None
        if goal is None or trend is None or not trend.slope > 0:
            continue
        ahead = trend.ahead(min(horizon, trend.span))
        if not math.isfinite(ahead):
            continue
        need = math.ceil(ahead / max(goal, EPSILON) - EPSILON)
        if best is None or need > best[0]:
            best = (need, metric)
    return best


def trend_unknown(history: Sequence[Sample], policy: RoleAutoscale, now: float) -> bool:
    """Whether the scale-down forecast is on but cannot fit a trend yet: the history of the metrics it
    extrapolates is shorter than ``TREND_MIN_BUCKETS`` buckets (after a restart, or a long outage)."""
    if policy.scale_down_forecast_seconds <= 0:
        return False
    metrics = [m for m in FORECAST_METRICS if target(policy, m) is not None]
    return bool(metrics) and all(load_trend(history, m, now) is None for m in metrics)


def decide(
    history: Sequence[Sample],
    policy: RoleAutoscale,
    current_replicas: int,
    starting_pods: int,
    now: float,
    last_change: float | None,
    *,
    stale_after: float = STALE_AFTER_SECONDS,
    last_direction: Direction | None = None,
) -> Decision:
    low, high = policy.min_replicas, policy.max_replicas
    if current_replicas < low:
        return Decision(low, f"below minReplicas ({low})", "up")
    if current_replicas > high:
        return Decision(high, f"above maxReplicas ({high})", "down")

    fresh = [s for s in history if s.pods > 0 and now - stale_after - EPSILON <= s.time <= now + EPSILON]
    if not fresh:
        return Decision(current_replicas, "no metrics: holding", "hold")
    cooling = last_change is not None and now - last_change < policy.cooldown_seconds - EPSILON
    if cooling and last_direction != "up":  # see rule 3: only a scale-up may follow a scale-up this soon
        return Decision(current_replicas, "cooldown", "hold")
    latest = fresh[-1]

    # ---- up: any threshold, sustained
    up_window = _window(history, now, policy.scale_up_stabilization_seconds, last_change, stale_after)
    crossed: list[str] = []
    if up_window is not None:
        crossed = [m for m, threshold in policy.scale_up.items().items()
                   if _sustained(up_window, m, above=threshold)]
    if crossed and up_window is not None:
        sizing = _sizing_metrics(up_window, policy, crossed)
        reason = ", ".join(f"{_label(m)} above {policy.scale_up.items()[m]:g}" for m in crossed)
        if not sizing and not _transient_persists(history, up_window, policy, crossed, now, last_change, stale_after):
            return Decision(current_replicas, f"{reason}, not busy: waiting for a second sample", "hold")
        needed = 0
        for metric in sizing:
            level = min(s.value(metric) or 0.0 for s in up_window)  # the sustained level
            goal = target(policy, metric) or policy.scale_up.items()[metric]
            needed = max(needed, math.ceil(level * latest.sharing / max(goal, EPSILON) - EPSILON))
        if current_replicas >= high:
            return Decision(current_replicas, f"{reason}; at maxReplicas", "hold")
        # warming pods are in both ``sharing`` and ``starting_pods``: not counted twice
        capacity = max(latest.sharing, latest.pods + starting_pods)
        if starting_pods and needed <= capacity:
            return Decision(current_replicas, f"{reason}; {starting_pods} pod(s) starting", "hold")
        desired = min(high, current_replicas + policy.max_step, max(needed, current_replicas + 1))
        return Decision(desired, reason, "up")

    if cooling:
        return Decision(current_replicas, "cooldown", "hold")
    # ---- down: all thresholds, sustained
    downs = policy.scale_down.items()
    if not downs or starting_pods or current_replicas <= low:
        return Decision(current_replicas, "within thresholds", "hold")
    pods = math.ceil(latest.sharing - EPSILON)  # serving now (no pod is starting): whole pods
    window = _window(history, now, policy.scale_down_stabilization_seconds, None, stale_after)
    down_window = None if window is None else [_spread_over(sample, pods) for sample in window]
    if down_window is None or not all(_sustained(down_window, m, below=t) for m, t in downs.items()):
        return Decision(current_replicas, "within thresholds", "hold")
    removable = 0
    for k in range(1, policy.max_step + 1):
        if current_replicas - k < low or pods - k < 1:
            break
        fits = True
        for metric in METRICS:
            goal = target(policy, metric)
            if goal is None:
                continue
            level = max((s.value(metric) or 0.0) for s in down_window)  # the worst case of the window
            if level * pods / (pods - k) > goal + EPSILON:
                fits = False
        if not fits:
            break
        removable = k
    if removable == 0:
        return Decision(current_replicas, "below scaleDown thresholds, but one pod less would overload", "hold")
    reason = ", ".join(f"{_label(m)} below {t:g}" for m, t in downs.items())
    desired = current_replicas - removable
    if trend_unknown(history, policy, now):
        wait = TREND_MIN_BUCKETS * TREND_BUCKET_SECONDS
        return Decision(current_replicas, f"{reason}, but no load trend yet (it needs {wait:g}s of history)", "hold")
    need = forecast_need(history, policy, now)
    if need is not None and need[0] > desired:
        note = f"{_label(need[1])} trending up: {need[0]} pod(s) needed in {policy.scale_down_forecast_seconds:g}s"
        if need[0] >= current_replicas:
            return Decision(current_replicas, f"{reason}, but {note}", "hold")
        return Decision(need[0], f"{reason}; {note}", "down")
    return Decision(desired, reason, "down")
