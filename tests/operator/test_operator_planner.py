"""The planner loop's parts: pod classification, metric parsing and scraping, deletion costs, and
one planning round against a fake cluster."""

from __future__ import annotations

import contextlib
import copy
import http.server
import json
import socket
import threading
from collections.abc import Iterator, Mapping
from dataclasses import replace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from disagg_operator import planner
from disagg_operator.autoscale import Sample, decide
from disagg_operator.builders import ANNOTATION_DELETION_COST
from disagg_operator.metrics import PodSample, parse_worker_metrics
from disagg_operator.planner import (
    RoleState,
    aggregate,
    classify,
    deletion_costs,
    interval_averages,
    plan_once,
    pod_state,
    query_prometheus,
    recover_states,
    scrape_pod,
    sharing_pods,
)
from disagg_operator.spec import parse_spec
from disagg_worker.policy import RoleAutoscale, Thresholds

NOW = 10_000.0


def iso(t: float) -> str:
    from datetime import UTC, datetime
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def pod(name: str, *, ready_for: float | None = 600.0, ip: str = "10.0.0.1", terminating: bool = False,
        role: str = "decode") -> dict[str, Any]:
    status: dict[str, Any] = {"phase": "Running" if ready_for is not None else "Pending", "podIP": ip}
    if ready_for is not None:
        status["conditions"] = [{"type": "Ready", "status": "True", "lastTransitionTime": iso(NOW - ready_for)}]
    meta: dict[str, Any] = {"name": name, "namespace": "ns", "labels": {
        "app.kubernetes.io/name": "disagg", "app.kubernetes.io/instance": "demo", "app.kubernetes.io/component": role}}
    if terminating:
        meta["deletionTimestamp"] = iso(NOW)
    return {"metadata": meta, "status": status}


def exposition(role: str = "decode", waiting: float = 3, running: float = 5, kv: float = 0.4, util: float = 0.5,
               draining: float = 0, busy_seconds: float | None = None, waiting_seconds: float | None = None,
               kv_seconds: float | None = None) -> str:
    reg = CollectorRegistry()
    for name, value in (("disagg_requests_waiting", waiting), ("disagg_requests_running", running),
                        ("disagg_kv_cache_usage_ratio", kv), ("disagg_utilization_ratio", util),
                        ("disagg_draining", draining), ("disagg_prefix_cache_hit_ratio", 0.9)):
        Gauge(name, name, ["role"], registry=reg).labels(role).set(value)
    for name, value in (("disagg_busy_seconds_total", busy_seconds),
                        ("disagg_requests_waiting_seconds_total", waiting_seconds),
                        ("disagg_kv_cache_usage_seconds_total", kv_seconds)):
        if value is not None:
            Counter(name, name, ["role"], registry=reg).labels(role).inc(value)
    return generate_latest(reg).decode()


def test_classify_pods() -> None:
    pods = [pod("warm", ready_for=600), pod("warming", ready_for=5), pod("pending", ready_for=None),
            pod("leaving", terminating=True), pod("no-ip", ip="")]
    warm, starting = classify(pods, NOW)
    assert [p.name for p in warm] == ["warm"]
    assert starting == 3  # warming, pending, no-ip; the terminating pod is neither


def test_finished_and_stuck_pods_are_not_capacity_on_its_way() -> None:
    """An evicted (Failed) pod lingers until garbage-collected, an unschedulable one stays Pending: as
    "starting" pods they would block every scale-down for good."""
    evicted = pod("evicted", ready_for=None)
    evicted["status"]["phase"] = "Failed"
    done = pod("done", ready_for=None)
    done["status"]["phase"] = "Succeeded"
    stuck, fresh = pod("stuck", ready_for=None), pod("fresh", ready_for=None)
    stuck["metadata"]["creationTimestamp"] = iso(NOW - 3600)
    fresh["metadata"]["creationTimestamp"] = iso(NOW - 60)
    warm, starting = classify([pod("warm"), evicted, done, stuck, fresh], NOW)
    assert [p.name for p in warm] == ["warm"] and starting == 1  # only the fresh pod is on its way


def test_parse_worker_metrics_in_planner_units() -> None:
    sample = parse_worker_metrics(exposition(waiting=3, kv=0.4, util=0.5), "decode")
    assert sample == PodSample(queue_length=3, gpu_utilization=50.0, kv_cache_usage=40.0, running=5, draining=False)
    assert parse_worker_metrics(exposition(role="prefill"), "decode") is None  # another role's gauges
    assert parse_worker_metrics(exposition(role="both"), "decode") is not None
    assert parse_worker_metrics("# nothing here\n", "decode") is None


def test_the_time_integrals_are_read_from_the_exposition() -> None:
    sample = parse_worker_metrics(exposition(busy_seconds=12.5, waiting_seconds=3.0, kv_seconds=7.25), "decode")
    assert (sample.busy_seconds, sample.waiting_seconds, sample.kv_seconds) == (12.5, 3.0, 7.25)
    old = parse_worker_metrics(exposition(), "decode")  # a worker without them
    assert (old.busy_seconds, old.waiting_seconds, old.kv_seconds) == (None, None, None)


def test_busy_queue_and_kv_are_means_over_the_whole_interval() -> None:
    """Gauges are snapshots: the utilisation gauge covers the last second (read every 15 s, a pod busy
    14 s of 15 could read 0), and a decode pod's KV usage read 0% and 58% 5 s apart at a steady 25%."""
    def at(busy: float | None, util: float = 0.0, waiting: float | None = None, kv: float | None = None) -> PodSample:
        return PodSample(queue_length=9, gpu_utilization=util, kv_cache_usage=90, busy_seconds=busy,
                         waiting_seconds=waiting, kv_seconds=kv)

    first, readings = interval_averages({}, {"a": at(100.0, util=10.0, waiting=50.0, kv=20.0), "b": None}, NOW)
    assert first["a"] == at(100.0, util=10.0, waiting=50.0, kv=20.0) and first["b"] is None  # no previous: gauges
    assert readings == {"a": (NOW, {"gpu_utilization": 100.0, "queue_length": 50.0, "kv_cache_usage": 20.0})}
    second, readings = interval_averages(readings, {"a": at(114.0, waiting=80.0, kv=23.0), "b": None}, NOW + 15)
    assert second["a"].gpu_utilization == pytest.approx(100 * 14 / 15)
    assert second["a"].queue_length == pytest.approx(2.0)  # 30 request-seconds over 15 s
    assert second["a"].kv_cache_usage == pytest.approx(20.0)  # 3 of 15 s a full cache: 20%
    # a failed scrape keeps the old reading: the next average spans both intervals
    third, kept = interval_averages(readings, {"a": None}, NOW + 30)
    assert third["a"] is None and kept == readings
    fourth, _ = interval_averages(kept, {"a": at(120.0, waiting=80.0, kv=23.0)}, NOW + 45)
    assert (fourth["a"].gpu_utilization, fourth["a"].queue_length, fourth["a"].kv_cache_usage) == pytest.approx(
        (100 * 6 / 30, 0.0, 0.0))
    # a restarted pod's counters start again from 0: its gauges this once, not negative means
    restarted, readings = interval_averages(readings, {"a": at(3.0, util=20.0, waiting=1.0, kv=0.5)}, NOW + 60)
    assert restarted["a"] == at(3.0, util=20.0, waiting=1.0, kv=0.5)
    assert readings["a"] == (NOW + 60, {"gpu_utilization": 3.0, "queue_length": 1.0, "kv_cache_usage": 0.5})
    # a worker exporting only the busy counter: its queue and KV stay the gauges
    busy_only, _ = interval_averages({"a": (NOW, {"gpu_utilization": 1.0})}, {"a": at(8.5)}, NOW + 15)
    assert (busy_only["a"].gpu_utilization, busy_only["a"].queue_length, busy_only["a"].kv_cache_usage) == \
        pytest.approx((50.0, 9, 90))
    # pods that are gone are forgotten; pods without any counter leave no reading
    assert interval_averages({"gone": (NOW, {"gpu_utilization": 1.0})}, {"a": at(1.0)}, NOW + 15)[1] == {
        "a": (NOW + 15, {"gpu_utilization": 1.0})}
    assert interval_averages({}, {"a": at(None)}, NOW)[1] == {}


def test_aggregate_and_deletion_costs() -> None:
    a = PodSample(queue_length=2, gpu_utilization=40, kv_cache_usage=10)
    b = PodSample(queue_length=4, gpu_utilization=60, kv_cache_usage=70)
    drained = PodSample(queue_length=0, gpu_utilization=0, kv_cache_usage=0, draining=True)
    s = aggregate([a, b, None, drained], NOW)
    assert (s.pods, s.queue_length, s.gpu_utilization, s.kv_cache_usage) == (2, 3, 50, 40)
    assert aggregate([None], NOW).pods == 0
    assert s.serving is None and s.sharing == 2
    # 5 pods took traffic: one did not answer, one answered as draining (it takes none any more)
    assert aggregate([a, b, None, drained], NOW, serving=5).sharing == 4
    costs = deletion_costs({"a": a, "b": b, "c": None}, starting=["d"])
    assert costs == {"a": "1000", "b": "7000", "c": "10000", "d": "-1"}
    # no KV state goes first; a pod that did not answer (it may be the busiest) goes last
    assert sorted(costs, key=lambda k: int(costs[k])) == ["d", "a", "b", "c"]


@pytest.fixture
def metrics_server() -> Iterator[tuple[str, int]]:
    body = exposition(waiting=7).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield "127.0.0.1", server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_scrape_pod_over_http(metrics_server: tuple[str, int]) -> None:
    host, port = metrics_server
    sample = scrape_pod(host, "decode", port=port)
    assert sample is not None and sample.queue_length == 7
    assert scrape_pod("127.0.0.1", "decode", port=1, timeout=0.5) is None  # down: no sample, no crash


@pytest.fixture
def raw_http() -> Iterator[Any]:
    """``serve(answer)``: a port on 127.0.0.1 that answers every connection with the raw bytes ``answer``."""
    servers: list[socket.socket] = []

    def serve(answer: bytes) -> int:
        server = socket.create_server(("127.0.0.1", 0))
        servers.append(server)

        def run() -> None:
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = server.accept()
                    with conn:
                        conn.recv(65536)
                        conn.sendall(answer)

        threading.Thread(target=run, daemon=True).start()
        return server.getsockname()[1]

    try:
        yield serve
    finally:
        for server in servers:
            server.close()


@pytest.mark.parametrize("answer", [
    b"SSH-2.0-OpenSSH_9.6\r\n",  # not HTTP at all: BadStatusLine
    b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\ndisagg_req",  # cut off mid-body: IncompleteRead
    b"HTTP/1.1 200 OK\r\n\r\n\x00\x01 not an exposition",
    b"HTTP/1.1 200 OK\r\n\r\n" + exposition(waiting=float("inf")).encode(),  # Inf would overflow a step size
    b"HTTP/1.1 200 OK\r\n\r\n" + exposition(kv=float("nan")).encode(),
], ids=["not-http", "truncated", "garbage", "inf", "nan"])
def test_a_pod_answering_garbage_is_not_measured(raw_http: Any, answer: bytes) -> None:
    assert scrape_pod("127.0.0.1", "decode", port=raw_http(answer), timeout=2) is None


def test_an_oversized_metrics_page_is_not_read_whole(raw_http: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(planner, "MAX_METRICS_BYTES", 1000)
    page = exposition(waiting=7)
    port = raw_http(b"HTTP/1.1 200 OK\r\n\r\n" + (page + "#" * 1000 + "\n").encode())
    assert scrape_pod("127.0.0.1", "decode", port=port, timeout=2) is None


def test_a_sample_that_is_not_finite_is_left_out_of_the_average() -> None:
    good = PodSample(queue_length=2, gpu_utilization=40, kv_cache_usage=10)
    bad = PodSample(queue_length=float("inf"), gpu_utilization=40, kv_cache_usage=10)
    s = aggregate([good, bad], NOW, serving=2)
    assert (s.pods, s.queue_length, s.sharing) == (1, 2, 2)


def test_query_prometheus_skips_what_is_not_a_measurement(raw_http: Any) -> None:
    rows = [{"metric": {"pod": "a"}, "value": [1, "3"]}, {"metric": {"pod": "b"}, "value": [1, "NaN"]},
            {"metric": {"pod": "c"}, "value": [1, "+Inf"]}, {"metric": "x", "value": [1, "2"]}, {"value": []}]
    answer = json.dumps({"status": "success", "data": {"resultType": "vector", "result": rows}}).encode()
    port = raw_http(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n" + answer)
    assert query_prometheus(f"http://127.0.0.1:{port}", "up") == [({"pod": "a"}, 3.0)]
    port = raw_http(b"HTTP/1.1 200 OK\r\n\r\n[1, 2]")
    with pytest.raises(ValueError, match="not a Prometheus query answer"):
        query_prometheus(f"http://127.0.0.1:{port}", "up")


class FakeCluster:
    """The planner-facing part of ``kube.Kube``, recording writes in order."""

    def __init__(self, pods: dict[str, list[dict[str, Any]]], replicas: dict[str, int]):
        self.pods, self.replicas = pods, replicas
        self.writes: list[tuple[str, Any]] = []

    def list_pods(self, namespace: str, labels: Mapping[str, str]) -> list[dict[str, Any]]:
        return copy.deepcopy(self.pods[labels["app.kubernetes.io/component"]])

    def get_deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        role = name.removeprefix("demo-")
        return {"spec": {"replicas": self.replicas[role]}} if role in self.replicas else None

    def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
        self.writes.append(("scale", (name, replicas)))
        self.replicas[name.removeprefix("demo-")] = replicas

    def annotate_pod(self, namespace: str, name: str, annotations: Mapping[str, str]) -> None:
        self.writes.append(("annotate", (name, dict(annotations))))

    def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        self.writes.append(("status", dict(status)))

    def post_event(self, involved: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        self.writes.append(("event", (reason, message)))


SPEC = {"autoscale": {"mode": "builtin", "intervalSeconds": 15,
                      "prefill": {"minReplicas": 1, "maxReplicas": 4, "scaleUp": {"queueLength": 8},
                                  "scaleDown": {"queueLength": 2}, "scaleUpStabilizationSeconds": 0,
                                  "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0},
                      "decode": {"minReplicas": 1, "maxReplicas": 4, "scaleUp": {"kvCacheUsage": 80},
                                 "scaleDown": {"kvCacheUsage": 30}, "scaleUpStabilizationSeconds": 0,
                                 "scaleDownStabilizationSeconds": 0, "cooldownSeconds": 0}}}
BODY = {"metadata": {"name": "demo", "namespace": "ns", "uid": "u"}, "spec": SPEC}


def run_round(cluster: FakeCluster, scrape: Any, states: dict[str, RoleState] | None = None) -> dict[str, Any]:
    states = {r: RoleState() for r in ("prefill", "decode")} if states is None else states
    return plan_once(BODY, parse_spec(SPEC, name="demo"), states, kube=cluster, lock=threading.Lock(), now=NOW,
                     scrape=scrape)


def test_decode_scale_down_sets_deletion_costs_first() -> None:
    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")],
                           "decode": [pod("d0", ip="10.0.0.10"), pod("d1", ip="10.0.0.11"),
                                      pod("d2", ip="10.0.0.12"), pod("d3", ready_for=None)]},
                          {"prefill": 1, "decode": 4})
    kv = {"10.0.0.10": 20.0, "10.0.0.11": 5.0, "10.0.0.12": 2.0}

    def scrape(ip: str, role: str) -> PodSample:
        return PodSample(queue_length=3, gpu_utilization=50, kv_cache_usage=kv.get(ip, 0.0))

    decisions = run_round(cluster, scrape)
    assert decisions["prefill"].direction == "hold"
    # a starting pod blocks scale-down
    assert decisions["decode"].direction == "hold"
    cluster.pods["decode"].pop()
    cluster.replicas["decode"] = 3
    decisions = run_round(cluster, scrape)
    assert decisions["decode"].direction == "down"
    kinds = [w[0] for w in cluster.writes]
    assert kinds.index("annotate") < kinds.index("scale")
    costs = {name: ann[ANNOTATION_DELETION_COST] for kind, (name, ann) in
             [(k, v) for k, v in cluster.writes if k == "annotate"]}
    assert costs == {"d0": "2000", "d1": "500", "d2": "200"}
    [status] = [w[1] for w in cluster.writes if w[0] == "status"]
    assert status["lastScale"]["role"] == "decode" and status["lastScale"]["from"] == 3
    assert [w[1][0] for w in cluster.writes if w[0] == "event"] == ["ScaledDown"]


def test_prefill_scale_up_and_missing_metrics_hold() -> None:
    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]},
                          {"prefill": 1, "decode": 1})
    states = {r: RoleState() for r in ("prefill", "decode")}
    decisions = run_round(cluster, lambda ip, role: PodSample(queue_length=20 if role == "prefill" else 1,
                                                               gpu_utilization=50, kv_cache_usage=50), states)
    assert decisions["prefill"].direction == "up" and cluster.replicas["prefill"] == 3  # maxStep 2
    # the direction is kept: within the cooldown, only a further scale-up may follow
    assert (states["prefill"].last_change, states["prefill"].last_direction) == (NOW, "up")
    assert states["decode"].last_direction is None
    assert "annotate" not in [w[0] for w in cluster.writes]
    cluster.writes.clear()
    decisions = run_round(cluster, lambda ip, role: None)  # every scrape fails
    assert {d.direction for d in decisions.values()} == {"hold"}
    assert cluster.writes == []


def test_cooldown_survives_a_restart() -> None:
    states = recover_states({"status": {"lastScale": {"role": "decode", "from": 2, "to": 3, "reason": "x",
                                                      "time": iso(NOW - 5)}}})
    assert states["decode"].last_change == NOW - 5
    assert states["prefill"].last_change == NOW - 5  # its own last change may have been as recent
    assert recover_states({})["prefill"].last_change is None
    assert (states["decode"].last_direction, states["prefill"].last_direction) == ("up", None)  # 2 -> 3


def test_a_round_records_every_pod_taking_traffic_not_just_those_that_answered() -> None:
    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")],
                           "decode": [pod("d0", ip="10.0.0.10"), pod("d1", ip="10.0.0.11"), pod("d2", ip="10.0.0.12"),
                                      pod("warming", ip="10.0.0.13", ready_for=5.0), pod("pending", ready_for=None),
                                      pod("gone", ip="10.0.0.14", terminating=True)]},
                          {"prefill": 1, "decode": 5})
    states = {r: RoleState() for r in ("prefill", "decode")}

    def scrape(ip: str, role: str) -> PodSample | None:
        return None if ip == "10.0.0.12" else PodSample(queue_length=1, gpu_utilization=50, kv_cache_usage=40)

    plan_once(BODY, parse_spec(SPEC, name="demo"), states, kube=cluster, lock=threading.Lock(), now=NOW,
              scrape=scrape)
    [sample] = states["decode"].history
    # d0, d1 answered; d2 timed out and "warming" is ready but not sampled yet: both take traffic too,
    # "warming" for the 5 s of the 15-s interval it was ready
    assert sample.pods == 2 and sample.serving == sample.sharing == pytest.approx(3 + 5 / 15)


def test_a_pod_that_turned_ready_within_the_interval_shares_only_that_part_of_its_load() -> None:
    """The means cover the interval; a pod ready for 1 s of 5 took a fifth of a pod's share. Counting it
    whole read one warm pod's mean as the load of two and sized a scale-up 1 -> 3 that the next
    scale-down took back (two reversals, seen in the autoscale bench on a morning ramp)."""
    pods = [pod("old", ready_for=600.0), pod("new", ready_for=1.0), pod("pending", ready_for=None),
            pod("leaving", ready_for=600.0, terminating=True), pod("no-ip", ready_for=600.0, ip="")]
    assert sharing_pods(map(pod_state, pods), NOW, window=5.0) == pytest.approx(1.2)
    assert sharing_pods(map(pod_state, pods), NOW, window=60.0) == pytest.approx(1 + 1 / 60)  # Prometheus
    history = [Sample(NOW - 5 * i, 1, kv_cache_usage=49.0, serving=1.2) for i in (2, 1, 0)]
    policy = RoleAutoscale(min_replicas=1, max_replicas=8, scale_up=Thresholds(kv_cache_usage=45),
                           scale_down=Thresholds(kv_cache_usage=32), scale_up_stabilization_seconds=0,
                           cooldown_seconds=0)
    # 49% x 1.2 pods = 59: two pods at the 38.5% target, both there (one still warming up)
    assert decide(history, policy, 2, 1, NOW, None).direction == "hold"
    assert decide([replace(s, serving=2) for s in history], policy, 2, 1, NOW, None).desired == 3  # read whole


def test_a_role_whose_scale_is_refused_does_not_starve_the_other() -> None:
    """An admission policy refusing prefill's scale write ended the whole round, every round: decode,
    planned second, was never looked at."""
    from disagg_operator.kube import ApiError

    class Refusing(FakeCluster):
        def scale_deployment(self, namespace: str, name: str, replicas: int) -> None:
            if name == "demo-prefill":
                raise ApiError(403, "Forbidden", "denied by policy")
            super().scale_deployment(namespace, name, replicas)

    cluster = Refusing({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]}, {"prefill": 1, "decode": 1})
    decisions = run_round(cluster, lambda ip, role: PodSample(queue_length=20, gpu_utilization=50,
                                                               kv_cache_usage=95))
    assert "prefill" not in decisions and decisions["decode"].direction == "up"
    assert cluster.replicas == {"prefill": 1, "decode": 2}


def test_a_role_whose_round_fails_unexpectedly_does_not_starve_the_other() -> None:
    def scrape(ip: str, role: str) -> PodSample | None:
        if role == "prefill":
            raise RuntimeError("a bug in prefill's round")
        return PodSample(queue_length=20, gpu_utilization=50, kv_cache_usage=95)

    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]}, {"prefill": 1, "decode": 1})
    decisions = run_round(cluster, scrape)
    assert "prefill" not in decisions and decisions["decode"].direction == "up"


def test_after_a_scale_a_failed_status_write_still_leaves_the_event() -> None:
    from disagg_operator.kube import ApiError

    class NoStatus(FakeCluster):
        def patch_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
            raise ApiError(500, "InternalError", "etcd timeout")

    cluster = NoStatus({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]}, {"prefill": 1, "decode": 1})
    decisions = run_round(cluster, lambda ip, role: PodSample(queue_length=20 if role == "prefill" else 1,
                                                               gpu_utilization=50, kv_cache_usage=50))
    assert decisions["prefill"].direction == "up"
    assert [w[1][0] for w in cluster.writes if w[0] == "event"] == ["ScaledUp"]


def test_decode_above_new_bounds_is_brought_down_by_the_planner_with_costs_first() -> None:
    spec = copy.deepcopy(SPEC)
    spec["autoscale"]["decode"]["maxReplicas"] = 2
    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")],
                           "decode": [pod("d0", ip="10.0.0.10"), pod("d1", ip="10.0.0.11"), pod("d2", ip="10.0.0.12")]},
                          {"prefill": 1, "decode": 3})
    states = {r: RoleState() for r in ("prefill", "decode")}
    decisions = plan_once({**BODY, "spec": spec}, parse_spec(spec, name="demo"), states, kube=cluster,
                          lock=threading.Lock(), now=NOW,
                          scrape=lambda ip, role: PodSample(queue_length=1, gpu_utilization=50, kv_cache_usage=60))
    assert decisions["decode"].direction == "down" and cluster.replicas["decode"] == 2
    kinds = [w[0] for w in cluster.writes]
    assert "annotate" in kinds and kinds.index("annotate") < kinds.index("scale")


async def test_the_desired_replicas_gauge_goes_when_the_planner_stops_or_hands_over() -> None:
    from disagg_operator import metrics

    class Stopped:
        """kopf's DaemonStopped as the loop uses it: truthy once stopped; wait() returns at once."""

        def __init__(self, rounds: int) -> None:
            self.rounds = rounds

        def __bool__(self) -> bool:
            return self.rounds <= 0

        async def wait(self, timeout: float) -> None:
            self.rounds -= 1

    def sample_names() -> set[tuple[str, ...]]:
        return {tuple(s.labels.values()) for m in metrics.DESIRED_REPLICAS.collect() for s in m.samples}

    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]}, {"prefill": 1, "decode": 1})
    body = copy.deepcopy(BODY)
    seen: list[set[tuple[str, ...]]] = []
    scrapes: list[str] = []

    def scrape(ip: str, role: str) -> PodSample:
        scrapes.append(role)
        return PodSample(queue_length=1, gpu_utilization=50, kv_cache_usage=50)

    async def a_round_then_off() -> None:
        await planner.run_loop(body, Stopped(1), planner.log, lock=threading.Lock(), kube_factory=lambda: cluster,
                               clock=lambda: NOW, scrape=scrape)
        seen.append(sample_names())

    await a_round_then_off()
    assert scrapes == ["prefill", "decode"]  # one round ran (and set the gauge)
    assert ("ns", "demo", "decode") not in seen[-1]  # removed when the loop ended
    metrics.DESIRED_REPLICAS.labels("ns", "demo", "decode").set(3)
    body["spec"]["autoscale"]["mode"] = "hpa"
    await planner.run_loop(body, Stopped(1), planner.log, lock=threading.Lock(), kube_factory=lambda: cluster,
                           clock=lambda: NOW, scrape=scrape)
    assert ("ns", "demo", "decode") not in sample_names()


def test_prometheus_mode_reads_the_counters_rates_and_falls_back_to_the_gauges(monkeypatch: pytest.MonkeyPatch) -> None:
    from disagg_operator.builders import Owner

    gauges = {"disagg_requests_waiting{": 2.0, "disagg_utilization_ratio{": 0.1, "disagg_kv_cache_usage_ratio{": 0.3}
    rates = {"rate(disagg_busy_seconds_total{": 0.7, "rate(disagg_requests_waiting_seconds_total{": 1.5,
             "rate(disagg_kv_cache_usage_seconds_total{": 0.25}

    def fake_query(base_url: str, query: str, **_: Any) -> list[tuple[dict[str, str], float]]:
        [rate] = [v for name, v in rates.items() if name in query] or [None]
        if rate is not None:
            return [({"pod": "a"}, rate)]  # b's worker exports no counters
        [value] = [v for name, v in gauges.items() if name in query]
        return [({"pod": "a"}, value), ({"pod": "b"}, value)]

    monkeypatch.setattr(planner, "query_prometheus", fake_query)
    owner = Owner(name="demo", namespace="ns", uid="u")
    warm = [planner.pod_state(pod("a")), planner.pod_state(pod("b"))]
    _, per_pod = planner.prometheus_sample("http://prom", owner, "decode", warm, NOW)
    assert (per_pod["a"].gpu_utilization, per_pod["a"].queue_length, per_pod["a"].kv_cache_usage) == pytest.approx(
        (70.0, 1.5, 25.0))
    assert (per_pod["b"].gpu_utilization, per_pod["b"].queue_length, per_pod["b"].kv_cache_usage) == pytest.approx(
        (10.0, 2.0, 30.0))


def test_a_metrics_outage_is_reported_once_and_its_end_too() -> None:
    """A down or mistyped Prometheus URL, or pods that cannot be scraped, used to make the planner hold
    in silence: no log line, Event or status."""
    cluster = FakeCluster({"prefill": [pod("p0", role="prefill")], "decode": [pod("d0")]},
                          {"prefill": 1, "decode": 1})
    states = {r: RoleState() for r in ("prefill", "decode")}
    spec = parse_spec(SPEC, name="demo")

    def round_at(t: float, scrape: Any) -> None:
        plan_once(BODY, spec, states, kube=cluster, lock=threading.Lock(), now=t, scrape=scrape)

    def events() -> list[tuple[str, str]]:
        return [w[1] for w in cluster.writes if w[0] == "event"]

    calm = PodSample(queue_length=3, gpu_utilization=50, kv_cache_usage=50)
    round_at(NOW, lambda ip, role: calm)
    for t in range(15, 61, 15):
        round_at(NOW + t, lambda ip, role: None)
    assert events() == []  # not yet: a minute without data is when the planner starts holding
    round_at(NOW + 75, lambda ip, role: None)
    round_at(NOW + 90, lambda ip, role: None)
    outages = [message for reason, message in events() if reason == "MetricsUnavailable"]
    assert len(outages) == 2 and {m.split()[4] for m in outages} == {"prefill", "decode"}  # one per role
    assert "pods' :8081/metrics" in outages[0]
    round_at(NOW + 105, lambda ip, role: calm)
    assert sorted(reason for reason, _ in events()).count("MetricsAvailable") == 2


def test_a_pod_missing_a_gauge_is_not_measured_rather_than_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    """A missing KV or utilisation series used to read as 0%, which could scale a busy role down."""
    text = "\n".join(line for line in exposition(kv=0.9).splitlines() if "kv_cache_usage" not in line) + "\n"
    assert parse_worker_metrics(text, "decode") is None
    from disagg_operator.builders import Owner

    def fake_query(base_url: str, query: str, **_: Any) -> list[tuple[dict[str, str], float]]:
        if "kv_cache_usage" in query:
            return [({"pod": "a"}, 0.9)]  # b's KV series is missing
        if "busy_seconds" in query:
            return []
        return [({"pod": "a"}, 1.0), ({"pod": "b"}, 1.0)]

    monkeypatch.setattr(planner, "query_prometheus", fake_query)
    warm = [planner.pod_state(pod("a")), planner.pod_state(pod("b"))]
    _, per_pod = planner.prometheus_sample("http://prom", Owner(name="demo", namespace="ns", uid="u"), "decode",
                                           warm, NOW)
    assert per_pod["a"] is not None and per_pod["a"].kv_cache_usage == pytest.approx(90.0)
    assert per_pod["b"] is None
