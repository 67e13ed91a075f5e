"""The planner's pure scaling decision: table tests and properties (bounds, cooldown, step size,
no scaling on missing data, no flapping on oscillating load)."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from disagg_operator.autoscale import (
    TREND_MIN_BUCKETS,
    TREND_SECONDS,
    Decision,
    Sample,
    decide,
    forecast_need,
    load_trend,
    target,
)
from disagg_worker.policy import FORECAST_MAX_INTERVAL, Autoscale, RoleAutoscale, Thresholds

DECODE = RoleAutoscale(min_replicas=2, max_replicas=10, scale_up=Thresholds(queue_length=16, kv_cache_usage=75),
                       scale_down=Thresholds(queue_length=4, kv_cache_usage=30), scale_up_stabilization_seconds=30,
                       scale_down_stabilization_seconds=120, cooldown_seconds=60, max_step=2)
PREFILL = RoleAutoscale(min_replicas=1, max_replicas=6, scale_up=Thresholds(queue_length=8, gpu_utilization=80),
                        scale_down=Thresholds(queue_length=2, gpu_utilization=40), scale_up_stabilization_seconds=0,
                        scale_down_stabilization_seconds=60, cooldown_seconds=30, max_step=1)


def steady(pods: int, until: float, every: float = 15.0, span: float = 300.0, **values: float) -> list[Sample]:
    """A constant load sampled every ``every`` seconds over the last ``span`` seconds."""
    n = int(span // every)
    return [Sample(time=until - span + i * every, pods=pods, **values) for i in range(n + 1)]


NOW = 1000.0
BUSY = dict(queue_length=30.0, kv_cache_usage=80.0)
CALM = dict(queue_length=1.0, kv_cache_usage=10.0)
MIDDLE = dict(queue_length=8.0, kv_cache_usage=50.0)


@pytest.mark.parametrize(("name", "history", "current", "starting", "last_change", "expected"), [
    ("busy -> up by the step", steady(4, NOW, **BUSY), 4, 0, None, (6, "up")),
    ("busy, at max", steady(10, NOW, **BUSY), 10, 0, None, (10, "hold")),
    ("busy, but in cooldown", steady(4, NOW, **BUSY), 4, 0, NOW - 30, (4, "hold")),
    ("busy, starting pods cover it", steady(4, NOW, queue_length=17.0, kv_cache_usage=50.0), 8, 4, None, (8, "hold")),
    ("busy, starting pods not enough", steady(4, NOW, **BUSY), 8, 4, None, (10, "up")),
    ("calm -> down by the step", steady(8, NOW, **CALM), 8, 0, None, (6, "down")),
    ("calm, at min", steady(2, NOW, **CALM), 2, 0, None, (2, "hold")),
    ("calm, pods starting", steady(6, NOW, **CALM), 8, 2, None, (8, "hold")),
    ("between thresholds", steady(5, NOW, **MIDDLE), 5, 0, None, (5, "hold")),
    ("no samples at all", [], 5, 0, None, (5, "hold")),
    ("stale samples", steady(5, NOW - 600, **BUSY), 5, 0, None, (5, "hold")),
    ("no ready pods", steady(0, NOW, **BUSY), 5, 3, None, (5, "hold")),
    ("below min", [], 1, 0, None, (2, "up")),
    ("above max", steady(12, NOW, **BUSY), 12, 0, None, (10, "down")),
])
def test_decision_table(name: str, history: list[Sample], current: int, starting: int, last_change: float | None,
                        expected: tuple[int, str]) -> None:
    d = decide(history, DECODE, current, starting, NOW, last_change)
    assert (d.desired, d.direction) == expected, d.reason


def test_any_scale_up_threshold_is_enough_but_scale_down_needs_all() -> None:
    only_kv = steady(4, NOW, queue_length=1.0, kv_cache_usage=90.0)
    assert decide(only_kv, DECODE, 4, 0, NOW, None).direction == "up"
    queue_calm_kv_middle = steady(8, NOW, queue_length=1.0, kv_cache_usage=50.0)
    assert decide(queue_calm_kv_middle, DECODE, 8, 0, NOW, None).direction == "hold"


def test_a_queue_sizes_the_step_only_while_the_pods_are_busy() -> None:
    """A queue over its threshold while the busy fraction is under its own is a transient: one pod more.
    Sized by the queue (not proportional to the load), such a sample at 30% busy doubled the pool and
    the next scale-down took it back. Once busy, the queue shows how far over 100% the load is."""
    wide = PREFILL.model_copy(update={"max_step": 4, "max_replicas": 12})
    transient = steady(2, NOW, queue_length=9.0, gpu_utilization=30.0)
    d = decide(transient, wide, 2, 0, NOW, None)
    assert (d.desired, d.direction) == (3, "up")
    saturated = steady(2, NOW, queue_length=20.0, gpu_utilization=95.0)
    assert decide(saturated, wide, 2, 0, NOW, None).desired == 6  # 20 x 2 / target 5 = 8, step 4
    # without a busy threshold nothing tells a transient: the queue sizes it (decode: slots, not KV, may be full)
    assert decide(steady(2, NOW, queue_length=30.0, kv_cache_usage=50.0), DECODE, 2, 0, NOW, None).desired == 4


def test_a_transient_adds_a_pod_only_when_two_samples_in_a_row_show_it() -> None:
    """With no scale-up window (one sample), a queue that one sample caught while the pods were not busy
    waits for the next sample; a busy role, or a window that already spans two samples, does not."""
    calm = dict(queue_length=0.0, gpu_utilization=30.0)
    queued = dict(queue_length=9.0, gpu_utilization=30.0)
    one = [*steady(2, NOW - 15, **calm), Sample(NOW, 2, **queued)]
    d = decide(one, PREFILL, 2, 0, NOW, None)
    assert (d.desired, d.direction) == (2, "hold") and "second sample" in d.reason
    two = [*one, Sample(NOW + 15, 2, **queued)]
    assert decide(two, PREFILL, 2, 0, NOW + 15, None).desired == 3
    # the first of the two was taken in the round of the last change: it saw the old pods
    assert decide(two, PREFILL, 2, 0, NOW + 15, NOW).direction == "hold"
    # a hole between the two samples: they are not in a row
    apart = [*one[:-1], Sample(NOW - 30, 2, **queued), Sample(NOW + 60, 2, **queued)]
    assert decide(apart, PREFILL, 2, 0, NOW + 60, None).direction == "hold"
    # busy: one sample sizes the step at once
    busy = [*steady(2, NOW - 15, **calm), Sample(NOW, 2, queue_length=9.0, gpu_utilization=90.0)]
    assert decide(busy, PREFILL, 2, 0, NOW, None).direction == "up"
    # a window of two samples or more has checked it already
    windowed = PREFILL.model_copy(update={"scale_up_stabilization_seconds": 15})
    assert decide(two, windowed, 2, 0, NOW + 15, None).desired == 3


def test_scale_up_must_be_sustained_over_the_window() -> None:
    history = [*steady(4, NOW, **MIDDLE)[:-2], Sample(NOW - 15, 4, **BUSY), Sample(NOW, 4, **BUSY)]
    assert decide(history, DECODE, 4, 0, NOW, None).direction == "hold"  # busy for 15 s of a 30 s window
    history.append(Sample(NOW + 15, 4, **BUSY))
    assert decide(history, DECODE, 4, 0, NOW + 15, None).direction == "up"


def test_scale_down_must_be_sustained_and_reads_earlier_samples_at_todays_pod_count() -> None:
    history = steady(8, NOW, span=100, **CALM)  # only 100 s of a 120 s window
    assert decide(history, DECODE, 8, 0, NOW, None).direction == "hold"
    # the window may reach back past the last change (a falling load steps down every cooldown)
    assert decide(steady(8, NOW, **CALM), DECODE, 8, 0, NOW, NOW - 90).direction == "down"
    # went from 8 pods to 4 90 s ago, each pod at kv 20 throughout: the 8-pod samples mean kv 40 for
    # 4 pods, above scaleDown's 30, so the load has not been low for the whole window
    calm = dict(queue_length=1.0, kv_cache_usage=20.0)
    before = [x for x in steady(8, NOW, **calm) if x.time < NOW - 90]
    after = [x for x in steady(4, NOW, **calm) if x.time >= NOW - 90]
    assert decide(before + after, DECODE, 4, 0, NOW, NOW - 90).direction == "hold"
    assert decide(steady(4, NOW, **calm), DECODE, 4, 0, NOW, NOW - 90).direction == "down"  # 4 pods all along


def test_a_sample_only_some_pods_answered_is_spread_over_all_that_served() -> None:
    """Six of eight scrapes timed out at the peak: the two that answered stand for all eight, so the
    peak is not read as a quarter of itself."""
    history = steady(8, NOW, **CALM)
    history[-3] = Sample(history[-3].time, 2, queue_length=3.5, kv_cache_usage=70.0, serving=8)
    assert decide(history, DECODE, 8, 0, NOW, None).direction == "hold"
    history[-3] = Sample(history[-3].time, 2, queue_length=3.5, kv_cache_usage=70.0)  # no serving count known
    assert decide(history, DECODE, 8, 0, NOW, None).direction == "down"
    # and on the way up: 2 of 4 answered, 4 more starting; the load of 4 busy pods needs more than 8
    busy = [Sample(NOW, 2, queue_length=30.0, kv_cache_usage=80.0, serving=4)]
    assert decide(busy, PREFILL.model_copy(update={"scale_up": Thresholds(queue_length=16, kv_cache_usage=75),
                                                  "scale_down": Thresholds(queue_length=4, kv_cache_usage=30),
                                                  "max_replicas": 12, "max_step": 4}),
                  8, 4, NOW, None).direction == "up"


def test_a_falling_load_steps_down_every_cooldown_not_every_window() -> None:
    """Total load falls steadily; each step is taken once the whole window, read at today's pods, is calm."""
    policy = DECODE.model_copy(update={"scale_down_stabilization_seconds": 300, "cooldown_seconds": 60})
    pool = Pool(policy, replicas=10)
    downs = []
    for i in range(160):
        now = i * 15.0
        d = pool.step(now, max(10.0, 120.0 - now / 10))  # queue: from 12 per pod at 10 pods down to 10 total
        if d.direction == "down":
            downs.append(now)
    assert pool.replicas == DECODE.min_replicas
    gaps = [b - a for a, b in itertools.pairwise(downs)]
    assert gaps and min(gaps) < policy.scale_down_stabilization_seconds
    assert reversals(pool.decisions) == 0


def test_a_hole_in_the_metrics_is_never_sustained_load() -> None:
    """Metrics down for ten minutes, then one calm sample: the window is not covered (the sample from
    before the outage does not speak for it), so no scale-down until a window of fresh samples."""
    before = steady(8, NOW - 600, **CALM)
    outage = [Sample(NOW - 600 + t, 0) for t in range(15, 600, 15)]  # scrapes that got nothing
    history = [*before, *outage, Sample(NOW, 8, **CALM)]
    assert decide(history, DECODE, 8, 0, NOW, None).direction == "hold"
    silent = [*before, Sample(NOW, 8, **CALM)]  # no samples at all in between (the loop was stopped)
    assert decide(silent, DECODE, 8, 0, NOW, None).direction == "hold"
    recovered = [*history, *(Sample(NOW + t, 8, **CALM) for t in range(15, 136, 15))]
    assert decide(recovered, DECODE, 8, 0, NOW + 135, None).direction == "down"


def test_a_window_of_zero_seconds_never_decides_on_data_older_than_the_latest_scrape() -> None:
    """With no scale-up window, a failed scrape after a busy one used to scale up again on the old sample,
    every round for a minute (the samples stay fresh that long), also on a sample from before the
    planner's own last change."""
    busy = Sample(NOW - 15, 2, queue_length=20.0, gpu_utilization=95.0)
    failed = Sample(NOW, 0)
    assert decide([busy], PREFILL, 2, 0, NOW - 15 + 1e-3, None).direction == "up"
    assert decide([busy, failed], PREFILL, 2, 0, NOW, None).direction == "hold"
    # the busy sample is from the round of the last change: it saw the old pods
    assert decide([busy], PREFILL, 3, 0, NOW, NOW - 15).direction == "hold"


def test_a_scale_up_window_after_a_change_is_covered_by_samples_taken_after_it() -> None:
    """The sample taken in the round of a change saw the pods before it: a 30 s window right after a
    change used to count it and rest on 15 s of data about the new pods."""
    history = steady(4, NOW, **BUSY)
    no_cooldown = DECODE.model_copy(update={"cooldown_seconds": 0})
    assert decide(history, no_cooldown, 6, 0, NOW, NOW - 31).direction == "up"
    assert decide(history, no_cooldown, 6, 0, NOW, NOW - 30).direction == "hold"


def test_the_cooldown_holds_every_reversal_but_not_a_second_scale_up() -> None:
    """A burst landing just after a step for the ramp used to wait out the cooldown on too few pods."""
    busy = [Sample(NOW, 4, **BUSY)]
    calm = steady(8, NOW, **CALM)
    assert decide(busy, PREFILL, 4, 0, NOW, NOW - 10, last_direction="up").direction == "up"
    # sized like any scale-up: the pods already on their way cover it -> hold
    hot = [Sample(NOW, 4, queue_length=5.0, gpu_utilization=85.0)]  # 340 busy-% in all: 6 pods at the 60% target
    wide = PREFILL.model_copy(update={"max_replicas": 12})
    covered = decide(hot, wide, 6, 2, NOW, NOW - 10, last_direction="up")
    assert (covered.direction, covered.reason) == ("hold", "gpuUtilization above 80; 2 pod(s) starting")
    assert decide(hot, wide, 5, 1, NOW, NOW - 10, last_direction="up") == Decision(6, "gpuUtilization above 80", "up")
    assert decide(busy, PREFILL, 4, 0, NOW, NOW - 10, last_direction="down") == Decision(4, "cooldown", "hold")
    assert decide(calm, DECODE, 8, 0, NOW, NOW - 10, last_direction="up") == Decision(8, "cooldown", "hold")
    # a sample from the round of the change saw the old pods: not a reason for a second step
    assert decide([Sample(NOW - 10, 4, **BUSY)], PREFILL, 4, 0, NOW, NOW - 10, last_direction="up").direction == \
        "hold"
    # after a restart the direction is unknown: the whole cooldown holds
    assert decide(busy, PREFILL, 4, 0, NOW, NOW - 10) == Decision(4, "cooldown", "hold")


def test_stabilisation_windows_are_at_most_the_hour_of_history_the_planner_keeps() -> None:
    with pytest.raises(ValueError, match="3600"):
        RoleAutoscale(scale_down_stabilization_seconds=5400)


def test_warmup_samples_are_not_in_the_history_and_starting_pods_count_as_capacity() -> None:
    # 2 ready pods drowning, 2 more starting: enough to reach the target? load 2 x 30 = 60, target 10
    history = steady(2, NOW, queue_length=30.0, kv_cache_usage=50.0)
    d = decide(history, DECODE, 4, 2, NOW, None)
    assert (d.desired, d.direction) == (6, "up")  # 4 (ready + starting) is not enough for 60 / 10
    history = steady(2, NOW, queue_length=17.0, kv_cache_usage=50.0)
    assert decide(history, DECODE, 4, 2, NOW, None).direction == "hold"  # 34 / 10 -> 4 pods: wait


def test_scale_down_never_projects_above_the_target() -> None:
    # 4 pods at queue 3.5: removing one gives 4.67 <= target 10, removing 2 gives 7 <= 10
    assert decide(steady(4, NOW, queue_length=3.5, kv_cache_usage=20.0), DECODE, 4, 0, NOW, None).desired == 2
    # 3 pods at kv 29: removing one gives 43.5 <= target 52.5; removing two would be 87
    assert decide(steady(3, NOW, queue_length=1.0, kv_cache_usage=29.0), DECODE, 3, 0, NOW, None).desired == 2


def test_proportional_scale_up_is_capped_by_the_step() -> None:
    # a zero stabilisation window: the latest sample decides (a transient: once the one before shows it too)
    history = [Sample(NOW - 15, 2, queue_length=40.0, gpu_utilization=50.0),
               Sample(NOW, 2, queue_length=40.0, gpu_utilization=50.0)]
    d = decide(history, PREFILL, 2, 0, NOW, None)
    assert (d.desired, d.direction) == (3, "up")
    assert "queueLength above 8" in d.reason


def test_target_sits_between_thresholds() -> None:
    assert target(DECODE, "queue_length") == 10
    assert target(DECODE, "kv_cache_usage") == 52.5
    assert target(DECODE, "gpu_utilization") is None
    up_only = RoleAutoscale(scale_up=Thresholds(queue_length=10))
    assert target(up_only, "queue_length") == 8


# ---- properties ------------------------------------------------------------------------------

policies = st.builds(
    lambda lo, span, up_q, gap_q, step, cool, up_stab, down_stab: RoleAutoscale(
        min_replicas=lo, max_replicas=max(1, lo + span), scale_up=Thresholds(queue_length=up_q, kv_cache_usage=80),
        scale_down=Thresholds(queue_length=max(0.1, up_q - gap_q), kv_cache_usage=30), max_step=step,
        cooldown_seconds=cool, scale_up_stabilization_seconds=up_stab, scale_down_stabilization_seconds=down_stab),
    st.integers(0, 4), st.integers(0, 8), st.floats(1, 40), st.floats(0.5, 30), st.integers(1, 4),
    st.sampled_from([0, 30, 60, 120]), st.sampled_from([0, 15, 30, 60]), st.sampled_from([0, 60, 300])).flatmap(
    lambda policy: st.sampled_from([0, 600]).map(
        lambda forecast: policy.model_copy(update={"scale_down_forecast_seconds": forecast})))
samples = st.lists(st.builds(Sample, time=st.floats(0, 1000), pods=st.integers(0, 12),
                             queue_length=st.none() | st.floats(0, 100), kv_cache_usage=st.none() | st.floats(0, 100)),
                   max_size=30).map(lambda xs: sorted(xs, key=lambda s: s.time))


@settings(max_examples=400, deadline=None)
@given(policies, samples, st.integers(0, 20), st.integers(0, 5), st.none() | st.floats(0, 1000))
def test_properties_of_one_decision(policy: RoleAutoscale, history: list[Sample], current: int, starting: int,
                                    last_change: float | None) -> None:
    d = decide(history, policy, current, starting, 1000.0, last_change)
    assert policy.min_replicas <= d.desired <= policy.max_replicas
    in_bounds = policy.min_replicas <= current <= policy.max_replicas
    if in_bounds:
        assert abs(d.desired - current) <= policy.max_step
        if last_change is not None and 1000.0 - last_change < policy.cooldown_seconds:
            assert d.desired == current
        if not [s for s in history if s.pods > 0 and s.time >= 1000.0 - 60]:
            assert d.desired == current  # no fresh data: hold, never scale (to zero or anywhere)
    assert d.changed == (d.desired != current)
    assert {"up": d.desired > current, "down": d.desired < current, "hold": d.desired == current}[d.direction]


class Pool:
    """A tiny closed loop: total load in requests, replicas become ready after ``startup`` seconds."""

    def __init__(self, policy: RoleAutoscale, replicas: int, startup: float = 30.0):
        self.policy, self.replicas, self.startup = policy, replicas, startup
        self.ready_at: list[float] = [-1e9] * replicas
        self.history: list[Sample] = []
        self.last_change: float | None = None
        self.decisions: list[Decision] = []

    def step(self, now: float, load: float) -> Decision:
        ready = sum(1 for t in self.ready_at if t <= now)
        starting = len(self.ready_at) - ready
        per_pod = load / max(ready, 1)
        self.history.append(Sample(now, ready, queue_length=per_pod, kv_cache_usage=min(100.0, per_pod * 4)))
        self.history = self.history[-100:]
        d = decide(self.history, self.policy, self.replicas, starting, now, self.last_change)
        if d.changed:
            self.last_change = now
            if d.desired > self.replicas:
                self.ready_at += [now + self.startup] * (d.desired - self.replicas)
            else:
                self.ready_at = sorted(self.ready_at)[: d.desired]
            self.replicas = d.desired
            self.decisions.append(d)
        return d


def reversals(decisions: list[Decision]) -> int:
    dirs = [d.direction for d in decisions]
    return sum(1 for a, b in itertools.pairwise(dirs) if a != b)


@settings(max_examples=60, deadline=None)
@given(st.floats(20, 120), st.floats(5, 60), st.floats(2, 8))
def test_oscillating_load_faster_than_the_windows_does_not_flap(base: float, amplitude: float, period: float) -> None:
    """A wave whose period (``period`` samples of 15 s) fits in the scale-down window: the pool may
    grow to its peak, but never shrinks back and forth with every trough."""
    pool = Pool(DECODE, replicas=6)
    changes = []
    for i in range(400):
        now = i * 15.0
        load = base + amplitude * math.sin(2 * math.pi * now / (period * 15.0))
        changes.append(pool.step(now, load))
    assert reversals(pool.decisions) <= 2  # it settles; it does not follow every wave
    times = [i * 15.0 for i, d in enumerate(changes) if d.changed]
    assert all(b - a >= DECODE.cooldown_seconds for a, b in itertools.pairwise(times))


def test_step_load_converges_and_stays() -> None:
    pool = Pool(DECODE, replicas=2)
    for i in range(200):
        pool.step(i * 15.0, 100.0 if i >= 10 else 10.0)
    assert [d.direction for d in pool.decisions] == ["up"] * len(pool.decisions)
    assert 100.0 / pool.replicas <= DECODE.scale_up.queue_length
    for i in range(200, 400):
        pool.step(i * 15.0, 10.0)
    assert pool.replicas == DECODE.min_replicas or 10.0 / (pool.replicas - 1) > target(DECODE, "queue_length")
    assert reversals(pool.decisions) == 1


# ---- the scale-down forecast ---------------------------------------------------------------

FORECAST = DECODE.model_copy(update={"scale_down_forecast_seconds": 600})


def ramp(pods: int, until: float, start: float, per_second: float, span: float = 900.0, every: float = 5.0,
         burst: tuple[float, float, float] | None = None) -> list[Sample]:
    """Total KV load ``start + per_second * t`` over the last ``span`` seconds, spread over ``pods``;
    ``burst``: (from, to, extra total load)."""
    out = []
    for i in range(int(span // every) + 1):
        t = until - span + i * every
        total = start + per_second * (t - (until - span))
        if burst is not None and burst[0] <= t < burst[1]:
            total += burst[2]
        out.append(Sample(t, pods, queue_length=0.5, kv_cache_usage=total / pods))
    return out


def test_load_trend_is_the_line_through_the_total_load() -> None:
    trend = load_trend(ramp(4, NOW, start=40.0, per_second=0.1), "kv_cache_usage", NOW)
    assert trend is not None
    assert trend.slope == pytest.approx(0.1, rel=1e-6)
    assert trend.ahead(0) == pytest.approx(40.0 + 0.1 * 900, rel=1e-6)  # buckets sit at their samples' mean time
    assert trend.span == pytest.approx(882.5)  # the oldest bucket (ages 870-895 s; -900 s is out) at its mean
    falling = load_trend(ramp(4, NOW, start=200.0, per_second=-0.1), "kv_cache_usage", NOW)
    assert falling is not None and falling.slope < 0


def test_load_trend_needs_five_minutes_of_history_and_skips_what_it_cannot_use() -> None:
    assert load_trend(ramp(4, NOW, start=40.0, per_second=0.1, span=240.0), "kv_cache_usage", NOW) is None
    assert load_trend(ramp(4, NOW, start=40.0, per_second=0.1, span=300.0), "kv_cache_usage", NOW) is not None
    assert load_trend(steady(4, NOW, queue_length=1.0), "kv_cache_usage", NOW) is None  # metric not measured
    history = ramp(4, NOW, start=40.0, per_second=0.1)
    noisy = [*history[:50], Sample(history[50].time, 0), Sample(history[51].time, 2, kv_cache_usage=math.inf),
             Sample(history[52].time, 2, kv_cache_usage=None), *history[53:], Sample(NOW + 30, 4, kv_cache_usage=1e6)]
    trend = load_trend(noisy, "kv_cache_usage", NOW)
    assert trend is not None and trend.slope == pytest.approx(0.1, rel=1e-6)


def test_a_burst_that_just_ended_does_not_tilt_the_trend() -> None:
    """Least squares would read a burst at the end of the window as a steep rise (and hold its pods);
    the median slope stays with the ramp."""
    history = ramp(4, NOW, start=100.0, per_second=-0.05, burst=(NOW - 200, NOW - 60, 150.0))
    trend = load_trend(history, "kv_cache_usage", NOW)
    assert trend is not None and trend.slope < 0


def test_a_rising_trend_keeps_what_it_needs_ahead_and_nothing_more() -> None:
    # a burst on a rising ramp just ended: 8 pods at 8.75% KV each (70 in all), rising 0.05/s.
    # Every sample of the window is calm, so without a forecast the pool shrinks by the step.
    history = ramp(8, NOW, start=25.0, per_second=0.05)
    assert decide(history, DECODE, 8, 0, NOW, None) == Decision(6, "queueLength below 4, kvCacheUsage below 30",
                                                                "down")
    # in 600 s the trend reaches 70 + 30 = 100: two pods at the 52.5% target
    need = forecast_need(history, FORECAST, NOW)
    assert need is not None and need[0] == math.ceil((25.0 + 0.05 * 1500) / 52.5)


def test_a_steep_rise_holds_the_pods_it_will_need() -> None:
    # 8 pods at 29% KV (232 in all), rising 0.5/s over the last 400 s: 6 would do now, but in 400 s
    # (the horizon, capped at the history the line was fitted to) the load needs 9
    history = ramp(8, NOW, start=32.0, per_second=0.5, span=400.0)
    assert decide(history, DECODE, 8, 0, NOW, None).desired == 6
    d = decide(history, FORECAST, 8, 0, NOW, None)
    assert (d.desired, d.direction) == (8, "hold")
    assert "but kvCacheUsage trending up: 9 pod(s) needed" in d.reason


def test_the_forecast_never_reaches_further_ahead_than_its_history() -> None:
    history = ramp(8, NOW, start=32.0, per_second=0.5, span=400.0)
    longer = FORECAST.model_copy(update={"scale_down_forecast_seconds": 3600})
    assert forecast_need(history, longer, NOW) == forecast_need(history, FORECAST, NOW)


def test_a_rising_trend_limits_a_scale_down_to_its_need() -> None:
    # 6 pods at 20% KV (120 in all): 3 pods would do now (40% each), but the load rises 0.1/s, to
    # 180 in 600 s, which needs 4 pods at the 52.5% target
    history = ramp(6, NOW, start=30.0, per_second=0.1)
    plain = decide(history, DECODE.model_copy(update={"max_step": 4}), 6, 0, NOW, None)
    assert plain.desired == 3
    d = decide(history, FORECAST.model_copy(update={"max_step": 4}), 6, 0, NOW, None)
    assert (d.desired, d.direction) == (4, "down")
    assert "trending up" in d.reason


def test_a_falling_or_flat_trend_changes_no_scale_down() -> None:
    for per_second in (-0.05, 0.0):
        history = ramp(8, NOW, start=60.0, per_second=per_second)
        assert decide(history, FORECAST, 8, 0, NOW, None) == decide(history, DECODE, 8, 0, NOW, None)



def test_no_scale_down_until_the_forecast_knows_the_trend() -> None:
    """After a restart (or a long outage) the trend needs five minutes of history: a pool shrunk on a
    rising ramp in those minutes grew back as soon as the ramp showed (two reversals)."""
    short = steady(8, NOW, span=240.0, every=5.0, **CALM)
    d = decide(short, FORECAST, 8, 0, NOW, None)
    assert (d.desired, d.direction) == (8, "hold")
    assert d.reason == "queueLength below 4, kvCacheUsage below 30, but no load trend yet (it needs 300s of history)"
    assert decide(short, DECODE, 8, 0, NOW, None).direction == "down"  # no forecast: nothing to wait for
    assert decide(steady(8, NOW, span=300.0, every=5.0, **CALM), FORECAST, 8, 0, NOW, None).direction == "down"
    # a policy whose thresholds the forecast cannot extrapolate (queues only) never waits for it
    queues = FORECAST.model_copy(update={"scale_up": Thresholds(queue_length=16),
                                         "scale_down": Thresholds(queue_length=4)})
    assert decide(short, queues, 8, 0, NOW, None).direction == "down"


def test_the_forecast_needs_a_sampling_interval_that_gives_it_a_trend() -> None:
    # the policy's bound (worker side) and the trend's needs (operator side) are written in two places
    assert TREND_SECONDS / FORECAST_MAX_INTERVAL >= TREND_MIN_BUCKETS
    with pytest.raises(ValueError, match=r"decode\.scaleDownForecastSeconds needs intervalSeconds of at most 60"):
        Autoscale.model_validate({"intervalSeconds": 120, "decode": {"scaleDownForecastSeconds": 600}})
    assert Autoscale.model_validate({"intervalSeconds": 120}).decode.scale_down_forecast_seconds == 0
    assert Autoscale.model_validate({"intervalSeconds": 60, "prefill": {"scaleDownForecastSeconds": 600}})
