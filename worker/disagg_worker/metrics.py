"""Prometheus metrics of every disagg process (names start with ``disagg_``, units in the name).

One module defines them all so the README table, the Grafana dashboard and the autoscaler read the
same names. Gauges that mirror engine state are refreshed from ``EngineStats`` by the servers.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0,
                   7.5, 10.0, 20.0, 30.0, 60.0)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0)

# ---- worker (label role = prefill | decode | both) ----------------------------------------------
REQUESTS_WAITING = Gauge("disagg_requests_waiting", "Requests queued in the engine, not yet running", ["role"])
REQUESTS_RUNNING = Gauge("disagg_requests_running", "Requests in the continuous batch", ["role"])
REQUESTS_AWAITING_KV = Gauge("disagg_requests_awaiting_kv", "Requests with blocks reserved for remote KV", ["role"])
KV_CACHE_USAGE = Gauge("disagg_kv_cache_usage_ratio", "Fraction of KV blocks held by live requests", ["role"])
PREFIX_HIT_RATIO = Gauge("disagg_prefix_cache_hit_ratio",
                         "Prompt tokens served from the prefix cache / prompt tokens looked up (since start)", ["role"])
# the ratio of their rates is the recent hit ratio, which a since-start gauge cannot show
PREFIX_QUERIED_TOKENS = Counter("disagg_prefix_cache_queried_tokens_total",
                                "Prompt tokens looked up in the prefix cache", ["role"])
PREFIX_HIT_TOKENS = Counter("disagg_prefix_cache_hit_tokens_total", "Prompt tokens served from the prefix cache",
                            ["role"])
UTILIZATION = Gauge("disagg_utilization_ratio", "Busy fraction of the engine step loop (recent window)", ["role"])
GPU_UTILIZATION = Gauge("disagg_gpu_utilization_ratio",
                        "Share of the driver's last sample period (up to 1 s) in which a kernel ran on the "
                        "worker's GPU (NVML, as nvidia-smi shows it; CUDA only)", ["role"])


class ReadOnScrapeCounter:
    """A counter ``<name>_total{role}`` read from the engine when scraped: its rate is the mean over any
    window (the planner's interval, a PromQL range) of what it integrates. Bumped by a once-a-second
    loop instead, two scrapes a few seconds apart read 0% and 91% busy of an engine busy half the time.
    Never lower than it was (a counter that goes down reads as a restart), though a reading that
    includes the step in progress may turn out to have counted a step that ran nothing."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name, self.documentation = name, documentation
        self._sources: dict[str, Callable[[], float]] = {}
        self._last: dict[str, float] = {}
        self._lock = threading.Lock()

    def track(self, role: str, read: Callable[[], float]) -> None:
        with self._lock:
            self._sources[role] = read

    def collect(self) -> Iterator[CounterMetricFamily]:
        family = CounterMetricFamily(self.name, self.documentation, labels=["role"])
        with self._lock:
            for role, read in self._sources.items():
                self._last[role] = max(self._last.get(role, 0.0), read())
                family.add_metric([role], self._last[role])
        yield family


BUSY_SECONDS = ReadOnScrapeCounter("disagg_busy_seconds", "Seconds the engine step loop spent running batches")
# the planner's queue length and KV usage: means over its interval, not snapshots (see TimeIntegral)
WAITING_SECONDS = ReadOnScrapeCounter(
    "disagg_requests_waiting_seconds", "Integral over time of disagg_requests_waiting (its rate: the mean queue)")
KV_USAGE_SECONDS = ReadOnScrapeCounter(
    "disagg_kv_cache_usage_seconds",
    "Integral over time of disagg_kv_cache_usage_ratio (its rate: the mean KV usage)")
for _counter in (BUSY_SECONDS, WAITING_SECONDS, KV_USAGE_SECONDS):
    REGISTRY.register(_counter)
DRAINING = Gauge("disagg_draining", "1 while the worker takes no new requests", ["role"])
PREEMPTIONS = Counter("disagg_preemptions_total", "Requests preempted for lack of KV blocks", ["role"])
PROMPT_TOKENS = Counter("disagg_prompt_tokens_total", "Prompt tokens received", ["role"])
GENERATION_TOKENS = Counter("disagg_generation_tokens_total", "Tokens generated", ["role"])
STEP_SECONDS = Histogram("disagg_engine_step_seconds", "Duration of one engine step", ["role"],
                         buckets=(*TPOT_BUCKETS, 2.0, 5.0))
TTFT = Histogram("disagg_ttft_seconds", "Time to first token", ["role"], buckets=LATENCY_BUCKETS)
TPOT = Histogram("disagg_tpot_seconds", "Mean time per output token after the first", ["role"], buckets=TPOT_BUCKETS)
E2E = Histogram("disagg_e2e_seconds", "Latency of a finished request, arrival to last token", ["role"],
                buckets=LATENCY_BUCKETS)
PHASE = Histogram("disagg_request_phase_seconds",
                  "Per-request phase timings: queue, prefill, kv_transfer, first_token, first_decode",
                  ["role", "phase"],
                  buckets=LATENCY_BUCKETS)
PREFILL_DECISIONS = Counter("disagg_prefill_decisions_total",
                            "Where a decode worker ran a request's prefill: local, remote, fallback", ["outcome"])
KV_TRANSFER_BYTES = Counter("disagg_kv_transfer_bytes_total", "KV bytes moved between workers", ["direction"])
KV_TRANSFER_SECONDS = Histogram("disagg_kv_transfer_seconds", "Duration of one request's KV transfer",
                                ["direction"], buckets=LATENCY_BUCKETS)
KV_TRANSFER_FAILURES = Counter("disagg_kv_transfer_failures_total", "KV transfers that failed (decode fell back)",
                               ["reason"])
KV_TRANSFER_ON_STREAM = Counter("disagg_kv_transfer_on_stream_total",
                                "tcp transport: transfers sent on the Prefill stream because the decode worker's KV "
                                "port could not be reached (prefill side)")
REQUESTS_FINISHED = Counter("disagg_requests_finished_total", "Requests finished by reason", ["role", "reason"])

# ---- router ----------------------------------------------------------------------------------
ROUTER_REQUESTS = Counter("disagg_router_requests_total", "HTTP requests by endpoint and status",
                          ["endpoint", "status"])
ROUTER_STREAM_ERRORS = Counter("disagg_router_stream_errors_total",
                               "Streamed choices that began as HTTP 200 and ended with an in-stream error, by the "
                               "status the error would have had", ["endpoint", "status"])
ROUTING_DECISIONS = Counter("disagg_routing_decisions_total",
                            "Decode worker choices by outcome: prefix_affinity, least_loaded, retry", ["outcome"])
REJECTIONS = Counter("disagg_rejections_total", "Requests rejected by admission control", ["reason", "priority"])
SLO_VIOLATIONS = Counter("disagg_slo_violations_total", "Requests that missed an SLO", ["slo", "priority"])
SLO_REQUESTS = Counter("disagg_slo_requests_total", "Requests measured against the SLOs", ["priority"])
SLO_ATTAINMENT = Gauge("disagg_slo_attainment_ratio", "Fraction of requests meeting the SLO (since start)",
                       ["slo", "priority"])
ROUTER_TTFT = Histogram("disagg_router_ttft_seconds", "TTFT seen by the router", ["priority"],
                        buckets=LATENCY_BUCKETS)
ROUTER_TPOT = Histogram("disagg_router_tpot_seconds", "TPOT seen by the router", ["priority"], buckets=TPOT_BUCKETS)
ROUTER_E2E = Histogram("disagg_router_e2e_seconds", "End-to-end latency seen by the router", ["priority"],
                       buckets=LATENCY_BUCKETS)
# unlabelled, so it would be exported (as 0) by every process that imports this module: the router
# registers it (``register_router_metrics``), and workers never show it
ESTIMATED_TTFT = Gauge("disagg_estimated_ttft_seconds", "Admission control's current TTFT estimate", registry=None)
WORKERS_HEALTHY = Gauge("disagg_workers_healthy", "Workers answering load reports", ["role"])


def register_router_metrics() -> None:
    """Export the router's unlabelled gauges (once per process)."""
    with contextlib.suppress(ValueError):  # already registered (a second app in one process)
        REGISTRY.register(ESTIMATED_TTFT)
