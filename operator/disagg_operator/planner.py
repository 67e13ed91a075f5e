"""The built-in autoscaler: one loop per DisaggDeployment (a kopf daemon), active with
``autoscale.mode: builtin``.

Every ``autoscale.intervalSeconds`` and for each worker role it

1. lists the role's pods and splits them into *warm* (ready for at least ``WARMUP_SECONDS``) and
   *starting* (not ready yet, or still warming up: their first requests include model warm-up);
2. reads the warm pods' metrics: by default it scrapes ``http://<podIP>:8081/metrics`` of each, or
   it queries ``autoscale.prometheusUrl`` (``metricsSource: prometheus``); a pod that cannot be
   scraped is left out, and no data at all means hold;
3. appends the per-pod averages to the role's history and calls ``autoscale.decide``;
4. on a change: before a decode scale-down it sets ``controller.kubernetes.io/pod-deletion-cost``
   on the decode pods from their KV-cache usage, so the ReplicaSet removes those with the least KV
   state first (they then drain through their preStop hook); it patches the Deployment's replicas,
   writes ``status.lastScale`` and an Event, and counts the decision in the operator's metrics.

Scaling holds the per-resource lock the reconciler holds, so the two never interleave. The pure
parts (pod classification, aggregation, deletion costs) are functions tested on their own.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import logging
import math
import re
import threading
import time
import urllib.parse
import urllib.request
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from disagg_operator import metrics
from disagg_operator.autoscale import (
    HISTORY_SECONDS,
    STALE_AFTER_SECONDS,
    WARMUP_SECONDS,
    Decision,
    Direction,
    Sample,
    decide,
    ready_share,
)
from disagg_operator.builders import (
    ANNOTATION_DELETION_COST,
    RATE_WINDOW_SECONDS,
    ROLES,
    THRESHOLD_METRICS,
    TIME_INTEGRALS,
    WORKER_HTTP_PORT,
    Owner,
    child_name,
    promql,
    selector_labels,
)
from disagg_operator.conditions import timestamp
from disagg_operator.kube import ApiError, get_kube
from disagg_operator.metrics import PodSample, parse_worker_metrics
from disagg_operator.reconcile import involved_object
from disagg_operator.spec import ParsedSpec, SpecError, parse_spec
from disagg_worker.policy import Autoscale

log = logging.getLogger(__name__)

# A pod not ready this long after its creation (unschedulable, crash-looping, failing admission) is not
# capacity on its way: counting it as "starting" would block every scale-down (and hold scale-ups).
STUCK_AFTER_SECONDS = 900.0
SCRAPE_TIMEOUT_SECONDS = 2.0
# a worker's /metrics is tens of KiB; a pod answering more is not a worker we can read
MAX_METRICS_BYTES = 8 << 20
UNKNOWN_KV_COST = 10_000  # a full KV cache in basis points: the cost of a pod whose KV usage is unknown
Scraper = Callable[[str, str], PodSample | None]  # (pod IP, role) -> sample


# ---- pure helpers ------------------------------------------------------------------------------


def parse_time(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


@dataclass(frozen=True)
class PodState:
    name: str
    ip: str | None
    ready_since: float | None  # None: not ready
    terminating: bool
    phase: str = ""
    created: float | None = None

    @property
    def leaving(self) -> bool:
        """Terminating, or finished (Failed after an eviction, Succeeded): neither capacity nor a pod
        the next scale-down may pick."""
        return self.terminating or self.phase in ("Failed", "Succeeded")


def pod_state(pod: Mapping[str, Any]) -> PodState:
    meta = pod.get("metadata", {})
    status = pod.get("status") or {}
    ready_since = None
    if status.get("phase") == "Running":
        for cond in status.get("conditions") or []:
            if cond.get("type") == "Ready" and cond.get("status") == "True":
                ready_since = parse_time(cond.get("lastTransitionTime")) or 0.0
    return PodState(
        name=meta.get("name", ""),
        ip=status.get("podIP"),
        ready_since=ready_since,
        terminating=bool(meta.get("deletionTimestamp")),
        phase=status.get("phase", ""),
        created=parse_time(meta.get("creationTimestamp")),
    )


def classify(
    pods: Iterable[Mapping[str, Any]],
    now: float,
    warmup: float = WARMUP_SECONDS,
    stuck_after: float = STUCK_AFTER_SECONDS,
) -> tuple[list[PodState], int]:
    """(warm pods to sample, number of pods still starting). Terminating pods are neither, nor are
    finished ones (Failed after an eviction, Succeeded) or pods stuck unready for ``stuck_after``."""
    warm: list[PodState] = []
    starting = 0
    for pod in pods:
        state = pod_state(pod)
        if state.leaving:
            continue
        if state.ready_since is not None and state.ip:
            if now - state.ready_since >= warmup:
                warm.append(state)
            else:
                starting += 1
        elif state.created is None or now - state.created < stuck_after:
            starting += 1
    return warm, starting


def sharing_pods(states: Iterable[PodState], now: float, window: float) -> float:
    """The pods that shared a role's load over the last ``window`` seconds (the interval the sampled
    means cover): every pod taking traffic (ready, with an address, not on its way out; warm or still
    warming up, its scrape answered or not), each for the share of the window it was ready. A pod that
    turned ready a second before a 5-s round took a fifth of the interval's load, not half: counting it
    whole read the other pod's mean as twice the load it was and sized a scale-up on it."""
    total = 0.0
    for state in states:
        if state.leaving or state.ready_since is None or not state.ip:
            continue
        total += ready_share(state.ready_since, now, window)
    return total


def aggregate(samples: Iterable[PodSample | None], now: float, serving: float | None = None) -> Sample:
    """Per-pod averages over the pods that answered (``pods`` = how many did); ``serving``: the pods
    taking traffic, answered or not (``sharing_pods``; pods that answered as draining are taken off it)."""
    samples = [s if s is None or s.finite else None for s in samples]  # NaN / Inf: not measured
    got = [s for s in samples if s is not None and not s.draining]
    if not got:
        return Sample(time=now, pods=0)
    n = len(got)
    draining = sum(1 for s in samples if s is not None and s.draining)
    return Sample(
        time=now,
        pods=n,
        queue_length=sum(s.queue_length for s in got) / n,
        gpu_utilization=sum(s.gpu_utilization for s in got) / n,
        kv_cache_usage=sum(s.kv_cache_usage for s in got) / n,
        serving=None if serving is None else max(n, serving - draining),
    )


@dataclass(frozen=True)
class Integral:
    """A reading the planner takes as a mean over its interval: the worker's gauge (a snapshot) and the
    time integral (a counter) whose rate stands in for it, the ``PodSample`` field that holds the
    integral, the scale to the planner's units (a ratio to percent) and the most the mean can be."""

    gauge: str
    counter: str
    sample_field: str
    scale: float
    cap: float | None

    def reading(self, mean: float) -> float:
        """A ratio or count (the gauge's or the counter's rate) in the planner's units, capped."""
        return self.scale * (mean if self.cap is None else min(self.cap, mean))


INTERVAL_MEANS: dict[str, Integral] = {  # by the reading it stands for
    reading: Integral(THRESHOLD_METRICS[reading][0], TIME_INTEGRALS[reading], sample_field,
                      THRESHOLD_METRICS[reading][1], cap)
    for reading, sample_field, cap in (("queue_length", "waiting_seconds", None),
                                       ("gpu_utilization", "busy_seconds", 1.0),
                                       ("kv_cache_usage", "kv_seconds", 1.0))
}
Reading = tuple[float, dict[str, float]]  # when a pod was scraped, and its time integrals then (by reading)


def interval_averages(
    previous: Mapping[str, Reading], samples: Mapping[str, PodSample | None], now: float
) -> tuple[dict[str, PodSample | None], dict[str, Reading]]:
    """Each pod's busy fraction, queue and KV usage averaged since its previous scrape, from the time
    integrals it exports, in place of its gauges (snapshots: a planner reading the utilisation gauge
    every 15 s saw one second in fifteen, and a decode pod's KV usage read 0% and 58% in two snapshots
    5 s apart at a steady 25%); and the readings to compare the next scrape with. A pod seen for the
    first time, a counter that went back (a restart), or a worker without one keeps that gauge. A pod
    whose scrape failed keeps its old reading, so its next average spans both intervals."""
    readings = {name: prev for name, prev in previous.items() if name in samples}
    out: dict[str, PodSample | None] = {}
    for name, sample in samples.items():
        out[name] = sample
        if sample is None:
            continue
        integrals = {reading: value for reading, spec in INTERVAL_MEANS.items()
                     if (value := getattr(sample, spec.sample_field)) is not None and math.isfinite(value)}
        if not integrals:
            continue
        prev = readings.get(name)
        readings[name] = (now, integrals)
        if prev is None or now <= prev[0]:
            continue
        means: dict[str, float] = {}
        for reading, value in integrals.items():
            before = prev[1].get(reading)
            if before is None or value < before:
                continue
            means[reading] = INTERVAL_MEANS[reading].reading((value - before) / (now - prev[0]))
        out[name] = dataclasses.replace(sample, **means)
    return out, readings


def deletion_costs(pods: Mapping[str, PodSample | None], starting: Iterable[str] = ()) -> dict[str, str]:
    """``pod-deletion-cost`` per pod: the KV usage (its mean over the last interval, where the pod
    exports the integral) in basis points, so the pods holding the least KV state are removed first.
    Pods starting hold none and go before all others; a serving pod whose scrape failed may hold the
    most (a busy pod answers slowly), so it goes last."""
    costs = {name: str(round(s.kv_cache_usage * 100)) if s is not None else str(UNKNOWN_KV_COST)
             for name, s in pods.items()}
    costs.update({name: "-1" for name in starting})
    return costs


# ---- metric sources ----------------------------------------------------------------------------


def scrape_pod(
    ip: str, role: str, *, port: int = WORKER_HTTP_PORT, timeout: float = SCRAPE_TIMEOUT_SECONDS
) -> PodSample | None:
    host = f"[{ip}]" if ":" in ip else ip
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=timeout) as resp:
            body = resp.read(MAX_METRICS_BYTES + 1)
        if len(body) > MAX_METRICS_BYTES:
            return None
        return parse_worker_metrics(body.decode("utf-8", "replace"), role)
    except (OSError, ValueError, http.client.HTTPException):  # down, garbage, cut off mid-body: not measured
        return None


def query_prometheus(base_url: str, query: str, *, timeout: float = 5.0) -> list[tuple[dict[str, str], float]]:
    url = base_url.rstrip("/") + "/api/v1/query?" + urllib.parse.urlencode({"query": query})
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        payload = json.load(resp)
    result = payload.get("data", {}).get("result", []) if isinstance(payload, dict) else None
    if not isinstance(result, list):
        raise ValueError(f"not a Prometheus query answer: {str(payload)[:200]}")
    out = []
    for item in result:
        try:
            value = float(item["value"][1])
            labels = item.get("metric", {})
        except (AttributeError, KeyError, IndexError, TypeError, ValueError):
            continue
        if math.isfinite(value) and isinstance(labels, dict):  # NaN / Inf: not a measurement
            out.append((labels, value))
    return out


def prometheus_sample(
    base_url: str, owner: Owner, role: str, warm: list[PodState], now: float, serving: float | None = None
) -> tuple[Sample, dict[str, PodSample | None]]:
    """Role averages and per-pod KV usage from Prometheus (only pods the API reports warm count)."""
    names = {p.name for p in warm}
    per_pod: dict[str, dict[str, float]] = {n: {} for n in names}
    # each reading as its time integral's rate over the last minute, where the workers export the
    # counter, else as the gauge
    queries = {}
    for spec in INTERVAL_MEANS.values():
        queries[spec.gauge] = promql(spec.gauge, owner, role, agg="max by (pod)")
        queries[spec.counter] = promql(spec.counter, owner, role, agg="max by (pod)", rate_seconds=RATE_WINDOW_SECONDS)
    for metric, query in queries.items():
        try:
            rows = query_prometheus(base_url, query)
        except (OSError, ValueError, http.client.HTTPException):
            return Sample(time=now, pods=0), dict.fromkeys(names)  # every warm pod: not measured
        for labels, value in rows:
            if labels.get("pod") in per_pod:
                per_pod[labels["pod"]][metric] = value
    samples: dict[str, PodSample | None] = {}
    for name, vals in per_pod.items():
        readings: dict[str, float] = {}
        for reading, spec in INTERVAL_MEANS.items():
            value = vals.get(spec.counter, vals.get(spec.gauge))
            if value is not None:
                readings[reading] = spec.reading(value)
        # every reading, or not measured (a missing one read as 0 could scale a busy role down)
        samples[name] = PodSample(**readings) if len(readings) == len(INTERVAL_MEANS) else None
    return aggregate(samples.values(), now, serving), samples


# ---- the loop ----------------------------------------------------------------------------------


@dataclass
class RoleState:
    history: deque[Sample] = field(default_factory=deque)  # the last HISTORY_SECONDS (at most 3,600 samples)
    last_change: float | None = None
    last_direction: Direction | None = None  # None after a restart: the whole cooldown holds
    readings: dict[str, Reading] = field(default_factory=dict)  # pod -> its time integrals, when read
    last_data: float | None = None  # when a round last got data from at least one pod
    reported_missing: bool = False  # whether the outage is reported (a warning and an Event)

    def first_seen(self, now: float) -> float:
        """When this state's history starts (now, if it has none)."""
        return self.history[0].time if self.history else now

    def add(self, sample: Sample) -> None:
        self.history.append(sample)
        while self.history and sample.time - self.history[0].time > HISTORY_SECONDS:
            self.history.popleft()


def recover_states(body: Mapping[str, Any]) -> dict[str, RoleState]:
    """Role states after a restart: the cooldown continues from ``status.lastScale``. It records the last
    change of either role only, and the other role's may have been as recent: both wait it out (an
    extra cooldown holds; a skipped one could flap). Only the recorded role knows its direction (a
    further scale-up after a scale-up may cut its cooldown short); the other's holds whole."""
    states = {role: RoleState() for role in ROLES}
    last = (body.get("status") or {}).get("lastScale") or {}
    if last.get("role") in states:
        for state in states.values():
            state.last_change = parse_time(last.get("time"))
        before, after = last.get("from"), last.get("to")
        if isinstance(before, int) and isinstance(after, int) and before != after:
            states[last["role"]].last_direction = "up" if after > before else "down"
    return states


def _sample_role(
    kube: Any, owner: Owner, parsed: ParsedSpec, role: str, now: float, scrape: Scraper, state: RoleState
) -> tuple[Sample, int, dict[str, PodSample | None], list[str]]:
    pods = kube.list_pods(owner.namespace, selector_labels(owner, role))
    warm, starting = classify(pods, now)
    warm_names = {w.name for w in warm}
    states = [pod_state(pod) for pod in pods]
    auto = parsed.policy.autoscale
    # the means cover the last interval (a minute from Prometheus)
    window = RATE_WINDOW_SECONDS if reads_prometheus(auto) else auto.interval_seconds
    serving = sharing_pods(states, now, window)
    # pods that may still be chosen for removal: not warm, not already on their way out
    not_warm = [st.name for st in states if st.name not in warm_names and not st.leaving]
    if reads_prometheus(auto):
        state.readings.clear()  # back on scrapes, a counter from before would average over the whole gap
        sample, per_pod = prometheus_sample(auto.prometheus_url, owner, role, warm, now, serving)
    else:
        with ThreadPoolExecutor(max_workers=min(16, max(1, len(warm)))) as pool:
            results = list(pool.map(lambda p: scrape(p.ip or "", role), warm))
        per_pod, state.readings = interval_averages(
            state.readings, {p.name: r for p, r in zip(warm, results, strict=True)}, now)
        sample = aggregate(per_pod.values(), now, serving)
    return sample, starting, per_pod, not_warm


def plan_once(
    body: Mapping[str, Any],
    parsed: ParsedSpec,
    states: dict[str, RoleState],
    *,
    kube: Any,
    lock: threading.Lock,
    now: float,
    scrape: Scraper = scrape_pod,
    logger: logging.Logger | logging.LoggerAdapter[Any] = log,
) -> dict[str, Decision]:
    """One planning round for both worker roles; returns the decisions (changed or not).

    Each role is planned on its own: an API error for one (a scale write an admission policy refuses,
    say), or any other failure of its round, is logged and leaves the other's decision to be made.
    After a scale, the status, the Event and the counter are best effort: the replicas already
    changed, and failing one of them must not lose the others."""
    owner = Owner.from_body(body)
    decisions: dict[str, Decision] = {}
    for role in ROLES:
        try:
            decision = _plan_role(body, parsed, owner, role, states[role], kube=kube, lock=lock, now=now,
                                  scrape=scrape, logger=logger)
        except ApiError as exc:
            logger.warning("Planner could not read or scale %s: %s", role, exc)
            continue
        except Exception:  # a bug in one role's round must not stop the other's planning too
            logger.exception("Planner round for %s failed", role)
            continue
        if decision is not None:
            decisions[role] = decision
    return decisions


def _plan_role(body: Any, parsed: ParsedSpec, owner: Owner, role: str, state: RoleState, *, kube: Any,
               lock: threading.Lock, now: float, scrape: Scraper,
               logger: logging.Logger | logging.LoggerAdapter[Any]) -> Decision | None:
    policy = getattr(parsed.policy.autoscale, role)
    sample, starting, per_pod, not_warm = _sample_role(kube, owner, parsed, role, now, scrape, state)
    state.add(sample)
    stale_after = max(STALE_AFTER_SECONDS, 2.5 * parsed.policy.autoscale.interval_seconds)
    # an outage is pods that did not answer (pods that all answered as draining are no outage)
    _report_metrics_outage(body, role, state, sample, any(v is None for v in per_pod.values()), now, stale_after,
                           metrics_source(parsed.policy.autoscale), kube, logger)
    name = child_name(owner, role)
    with lock:
        deployment = kube.get_deployment(owner.namespace, name)
        if deployment is None:
            return None
        current = int((deployment.get("spec") or {}).get("replicas") or 0)
        # a sample may be up to ~2 intervals old before it (or a gap that long) counts as missing data
        decision = decide(list(state.history), policy, current, starting, now, state.last_change,
                          stale_after=stale_after, last_direction=state.last_direction)
        metrics.DESIRED_REPLICAS.labels(owner.namespace, owner.name, role).set(decision.desired)
        if not decision.changed:
            return decision
        if decision.direction == "down" and role == "decode":
            for pod_name, cost in deletion_costs(per_pod, not_warm).items():
                try:
                    kube.annotate_pod(owner.namespace, pod_name, {ANNOTATION_DELETION_COST: cost})
                except ApiError as exc:
                    if exc.status != 404:
                        raise
                    # gone since the listing: one pod less to rank, not a reason to skip the step
        kube.scale_deployment(owner.namespace, name, decision.desired)
        state.last_change, state.last_direction = now, decision.direction
        message = f"Scaled {role} from {current} to {decision.desired}: {decision.reason}"
        logger.info("%s", message)
        last_scale = {"role": role, "from": current, "to": decision.desired, "reason": decision.reason,
                      "time": timestamp(datetime.fromtimestamp(now, UTC))}
        reason = "ScaledUp" if decision.direction == "up" else "ScaledDown"
        for what, write in (
            ("status.lastScale", lambda: kube.patch_status(owner.namespace, owner.name, {"lastScale": last_scale})),
            ("the Event", lambda: kube.post_event(involved_object(body), "Normal", reason, message)),
        ):
            try:
                write()
            except ApiError as exc:
                logger.warning("Scaled %s, but could not write %s: %s", role, what, exc)
        metrics.SCALE_DECISIONS.labels(
            owner.namespace, owner.name, role, decision.direction, re.split("[,;]", decision.reason)[0][:60]
        ).inc()
    return decision


def _report_metrics_outage(body: Any, role: str, state: RoleState, sample: Sample, expected: bool, now: float,
                           stale_after: float, source: str, kube: Any,
                           logger: logging.Logger | logging.LoggerAdapter[Any]) -> None:
    """A role whose pods answer nothing (a Prometheus URL that is down or wrong, pods that cannot be
    scraped) makes the planner hold: say so once it has lasted ``stale_after``, with a warning and an
    Event, and again when data is back, instead of holding in silence. ``expected``: some warm pod did
    not answer (a role with none ready yet, or whose pods all answered as draining, is not an outage)."""
    if sample.pods > 0:
        state.last_data = now
        if state.reported_missing:
            state.reported_missing = False
            message = f"Planner has {role} metrics again ({sample.pods} pod(s) answered)"
            logger.info("%s", message)
            with contextlib.suppress(ApiError):
                kube.post_event(involved_object(body), "Normal", "MetricsAvailable", message)
        return
    if not expected:
        return
    since = state.last_data if state.last_data is not None else state.first_seen(now)
    if state.reported_missing or now - since <= stale_after:
        return
    state.reported_missing = True
    message = (f"Planner has had no {role} metrics for {now - since:.0f} s from {source}: holding {role} replicas "
               f"until they are back")
    logger.warning("%s", message)
    with contextlib.suppress(ApiError):
        kube.post_event(involved_object(body), "Warning", "MetricsUnavailable", message)


def reads_prometheus(auto: Autoscale) -> bool:
    return auto.metrics_source == "prometheus" and bool(auto.prometheus_url)


def metrics_source(auto: Autoscale) -> str:
    """Where the planner reads metrics, for messages: the Prometheus URL or the pods' /metrics."""
    if reads_prometheus(auto):
        return f"Prometheus at {auto.prometheus_url}"
    return f"the pods' :{WORKER_HTTP_PORT}/metrics"


async def run_loop(
    body: Any,
    stopped: Any,
    logger: Any,
    *,
    lock: threading.Lock,
    kube_factory: Callable[[], Any] = get_kube,
    clock: Callable[[], float] = time.time,
    scrape: Scraper = scrape_pod,
) -> None:
    """The daemon: plan every ``intervalSeconds`` while ``autoscale.mode`` is builtin."""
    states = recover_states(body)
    try:
        await _loop(body, stopped, logger, states, lock=lock, kube_factory=kube_factory, clock=clock, scrape=scrape)
    finally:  # deleted (or the operator stops): its gauge must not report a desired count for ever
        _forget_desired(body)


def _forget_desired(body: Any) -> None:
    meta = body.get("metadata", {})
    for role in ROLES:
        with contextlib.suppress(KeyError):
            metrics.DESIRED_REPLICAS.remove(meta.get("namespace", ""), meta.get("name", ""), role)


async def _loop(body: Any, stopped: Any, logger: Any, states: dict[str, RoleState], *, lock: threading.Lock,
                kube_factory: Callable[[], Any], clock: Callable[[], float], scrape: Scraper) -> None:
    while not stopped:
        interval = 15.0
        try:
            parsed = parse_spec(body.get("spec"), name=body.get("metadata", {}).get("name", "x"))
            interval = parsed.policy.autoscale.interval_seconds
            if parsed.policy.autoscale.mode == "builtin":
                await asyncio.to_thread(
                    plan_once, body, parsed, states, kube=kube_factory(), lock=lock, now=clock(), scrape=scrape,
                    logger=logger,
                )
            else:  # samples (and counters) from before a mode switch must not count when builtin resumes
                for state in states.values():
                    state.history.clear()
                    state.readings.clear()
                _forget_desired(body)  # the HPA or KEDA decides now
        except SpecError:
            pass  # the reconciler reports it
        except ApiError as exc:
            logger.warning("Planner could not read or scale: %s", exc)
        except Exception:  # one bad round (a worker cut off mid-scrape, ...) must not end the loop
            logger.exception("Planner round failed")
        await stopped.wait(interval)
