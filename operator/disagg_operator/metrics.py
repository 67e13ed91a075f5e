"""Metrics: the operator's own Prometheus metrics, and pure parsing of what the workers export.

Operator metrics (served by ``disagg operator --metrics-port``):

- ``disagg_scale_decisions_total{namespace,deployment,role,direction,reason}`` planner decisions
  that changed replicas (direction ``up``/``down``);
- ``disagg_desired_replicas{namespace,deployment,role}`` what the planner last asked for;
- ``disagg_operator_reconciles_total{result}`` reconciles by result (``ok``, ``invalid``,
  ``degraded``, ``retry``, ``error``);
- ``disagg_operator_child_writes_total{verb,kind}`` child creates / updates / deletes.

Worker metrics read by the planner (labelled ``role``): the gauges ``disagg_requests_waiting``,
``disagg_requests_running``, ``disagg_kv_cache_usage_ratio``, ``disagg_utilization_ratio``,
``disagg_draining``, and the counters ``disagg_busy_seconds_total``,
``disagg_requests_waiting_seconds_total`` and ``disagg_kv_cache_usage_seconds_total`` (time integrals),
whose increase between two scrapes over the seconds between them is the busy fraction, the queue and
the KV usage averaged over the planner's whole interval (the gauges are snapshots; the utilisation
gauge covers the last second only).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.parser import text_string_to_metric_families

REGISTRY = CollectorRegistry(auto_describe=True)
SCALE_DECISIONS = Counter(
    "disagg_scale_decisions",
    "Planner decisions that changed a role's replicas",
    ["namespace", "deployment", "role", "direction", "reason"],
    registry=REGISTRY,
)
DESIRED_REPLICAS = Gauge(
    "disagg_desired_replicas",
    "Replicas the planner asks for",
    ["namespace", "deployment", "role"],
    registry=REGISTRY,
)
RECONCILES = Counter("disagg_operator_reconciles", "Reconciles by result", ["result"], registry=REGISTRY)
CHILD_WRITES = Counter(
    "disagg_operator_child_writes", "Child objects written", ["verb", "kind"], registry=REGISTRY
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve ``REGISTRY`` on http://addr:port/metrics (a daemon thread)."""
    start_http_server(port, addr=addr, registry=REGISTRY)


@dataclass(frozen=True)
class PodSample:
    """One scrape of one worker pod, in the planner's units (queue per pod, percentages)."""

    queue_length: float
    gpu_utilization: float  # percent
    kv_cache_usage: float  # percent
    running: float = 0.0
    draining: bool = False
    # the worker's time integrals, when it exports them (see ``planner.interval_averages``)
    busy_seconds: float | None = None  # disagg_busy_seconds_total
    waiting_seconds: float | None = None  # disagg_requests_waiting_seconds_total
    kv_seconds: float | None = None  # disagg_kv_cache_usage_seconds_total (ratio x seconds)

    def value(self, metric: str) -> float:
        return float(getattr(self, metric))

    @property
    def finite(self) -> bool:
        return all(math.isfinite(v) for v in (self.queue_length, self.gpu_utilization, self.kv_cache_usage))


_WANTED = {
    "disagg_requests_waiting": "waiting",
    "disagg_requests_running": "running",
    "disagg_kv_cache_usage_ratio": "kv",
    "disagg_utilization_ratio": "util",
    "disagg_draining": "draining",
    # counters: their families are named without _total
    "disagg_busy_seconds": "busy",
    "disagg_requests_waiting_seconds": "waiting_s",
    "disagg_kv_cache_usage_seconds": "kv_s",
}


def parse_worker_metrics(text: str, role: str | None = None) -> PodSample | None:
    """Read a worker's /metrics exposition; None when a gauge the planner reads is missing or not finite
    (a NaN or Inf would make every decision after it meaningless)."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        field = _WANTED.get(family.name)
        if field is None:
            continue
        for sample in family.samples:
            if sample.name != (family.name + "_total" if family.type == "counter" else family.name):
                continue
            if role is not None and sample.labels.get("role") not in (role, "both", None):
                continue
            if not math.isfinite(sample.value):
                return None
            values[field] = values.get(field, 0.0) + float(sample.value)
    # every gauge the planner reads, or not measured: a missing one read as 0 could scale a busy role down
    if "waiting" not in values or "kv" not in values or "util" not in values:
        return None
    return PodSample(
        queue_length=values["waiting"],
        gpu_utilization=100.0 * values.get("util", 0.0),
        kv_cache_usage=100.0 * values.get("kv", 0.0),
        running=values.get("running", 0.0),
        draining=values.get("draining", 0.0) >= 0.5,
        busy_seconds=values.get("busy"),
        waiting_seconds=values.get("waiting_s"),
        kv_seconds=values.get("kv_s"),
    )
