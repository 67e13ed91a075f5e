"""The policy schema and seed 001's decisions as pure functions."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from disagg_worker.engine.prefix_hash import block_hashes
from disagg_worker.policy import CachePolicy, PolicyError, QoS, SplitPolicy, load_policy, parse_policy
from disagg_worker.routing import (
    WorkerLoad,
    admit_request,
    cache_overlap_ratio,
    estimate_request_ttft,
    estimate_ttft,
    pick_decode_worker,
    should_offload_prefill,
)

SEED_CONFIG = {
    "model": "llama-70b",
    "split_policy": {"prompt_length_threshold": 256, "prefix_cache_weight": 10.0, "queue_length_weight": 1.5,
                     "decode_load_weight": 0.5, "enable_hotspot_prevention": True},
    "cache": {"reuse_prefix": True, "min_cache_hit_ratio": 0.75},
    "autoscale": {
        "prefill": {"min_replicas": 4, "max_replicas": 12, "scale_up": {"queue_length": 8, "gpu_utilization": 80},
                    "scale_down": {"queue_length": 2, "gpu_utilization": 40}},
        "decode": {"min_replicas": 8, "max_replicas": 24, "scale_up": {"queue_length": 16, "kv_cache_usage": 75},
                   "scale_down": {"queue_length": 4, "kv_cache_usage": 30}}},
    "qos": {"enable_early_rejection": True, "low_priority_threshold_ms": 500, "reject_on_slo_violation": True},
}


def test_seed_001_config_loads_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "seed.json"
    path.write_text(json.dumps(SEED_CONFIG, indent=2))
    p = load_policy(path)
    assert p.model.name == "llama-70b"
    assert p.split_policy.prompt_length_threshold == 256 and p.cache.min_cache_hit_ratio == 0.75
    assert p.autoscale.decode.scale_up.kv_cache_usage == 75 and p.autoscale.prefill.max_replicas == 12
    assert p.qos.low_priority_threshold_ms == 500
    assert parse_policy(p.to_camel_dict()) == p  # camelCase round trip


def test_a_whole_disaggdeployment_is_accepted_as_a_policy_file(tmp_path: Path) -> None:
    path = tmp_path / "dd.yaml"
    path.write_text("apiVersion: disagg.dev/v1alpha1\nkind: DisaggDeployment\nspec:\n  image: x\n"
                    "  decode: {replicas: 2}\n  splitPolicy: {promptLengthThreshold: 64}\n")
    assert load_policy(path).split_policy.prompt_length_threshold == 64


def test_a_role_written_in_part_takes_the_rest_from_that_roles_defaults() -> None:
    """``prefill: {}`` used to mean the generic minReplicas 1, maxReplicas 4 and no thresholds at all (no
    autoscaling), where leaving prefill out meant seed 001's 4-12 on queue length and utilisation."""
    default = parse_policy({}).autoscale
    assert parse_policy({"autoscale": {"prefill": {}, "decode": {}}}).autoscale == default
    prefill = parse_policy({"autoscale": {"prefill": {"max_replicas": 20}}}).autoscale.prefill  # seed 001's spelling
    assert (prefill.min_replicas, prefill.max_replicas, prefill.scale_up) == (4, 20, default.prefill.scale_up)
    decode = parse_policy({"autoscale": {"decode": {"scaleUp": {"kvCacheUsage": 90}}}}).autoscale.decode
    assert decode.scale_up.items() == {"kv_cache_usage": 90} and decode.scale_down == default.decode.scale_down


@pytest.mark.parametrize(("data", "message"), [
    ({"splitPolicy": {"prefixCacheWeight": -1}}, "splitPolicy.prefixCacheWeight"),
    ({"cache": {"minCacheHitRatio": 1.5}}, "cache.minCacheHitRatio"),
    ({"autoscale": {"decode": {"minReplicas": 9, "maxReplicas": 2}}}, "minReplicas (9) must not exceed"),
    ({"autoscale": {"prefill": {"scaleUp": {"queueLength": 2}, "scaleDown": {"queueLength": 4}}}},
     "scaleDown.queueLength"),
    ({"qos": {"ttftSloMs": 0}}, "qos.ttftSloMs"),
    ({"qos": {"ttftSloMs": float("inf")}}, "qos.ttftSloMs"),
    ({"splitPolicy": {"prefixCacheWeight": float("nan")}}, "splitPolicy.prefixCacheWeight"),
    ({"qos": {"unknownKnob": 1}}, "qos.unknownKnob"),
    ({"kvTransfer": {"backend": "carrier-pigeon"}}, "kvTransfer.backend"),
    ({"autoscale": {"decode": {"scaleUp": {"queueLength": 0}}}}, "scaleUp.queueLength"),  # an HPA refuses 0
    # from ~1e10 s gRPC's deadline overflowed and every remote prefill failed at once, in silence
    ({"kvTransfer": {"timeoutSeconds": 1e10}}, "kvTransfer.timeoutSeconds"),
    ({"autoscale": {"drainTimeoutSeconds": 1e12}}, "autoscale.drainTimeoutSeconds"),  # the watchdog overflowed
    ({"splitPolicy": {"promptLengthThreshold": True}}, "splitPolicy.promptLengthThreshold"),  # not 1
    ({"splitPolicy": {"prefixCacheWeight": 1}, "split_policy": {}}, "'splitPolicy' and 'split_policy'"),
    ({"autoscale": {"prefill": {"maxReplicas": 6, "max_replicas": 8}}}, "'maxReplicas' and 'max_replicas'"),
    ({"autoscale": {"prefill": {1: 2}}}, "field names are text"),  # a TypeError traceback
    ({"autoscale": {"prefill": {"MaxReplicas": 6}}}, "autoscale.prefill.MaxReplicas"),  # not "maxreplicas"
])
def test_invalid_values_name_the_field(data: dict, message: str) -> None:
    with pytest.raises(PolicyError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_policy(data)


def test_a_whole_float_is_an_integer_as_the_api_server_takes_it() -> None:
    policy = parse_policy({"splitPolicy": {"promptLengthThreshold": 256.0}, "qos": {"ttftSloMs": 150}})
    assert policy.split_policy.prompt_length_threshold == 256 and policy.qos.ttft_slo_ms == 150.0


def test_unreadable_policy_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(PolicyError, match="must hold a mapping"):
        load_policy(tmp_path / "list.yaml")
    import os

    os.mkfifo(tmp_path / "fifo.yaml")  # reading it used to block for good
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(tmp_path / "fifo.yaml")
    (tmp_path / "huge.yaml").write_bytes(b"#" * (2 << 20))
    with pytest.raises(PolicyError, match="larger than"):
        load_policy(tmp_path / "huge.yaml")
    with pytest.raises(PolicyError, match="not a regular file"):
        load_policy(tmp_path)  # a directory
    (tmp_path / "latin1.yaml").write_bytes("qos: {defaultPriority: h\xe9}\n".encode("latin-1"))
    with pytest.raises(PolicyError, match=r"cannot read policy file .*latin1\.yaml"):
        load_policy(tmp_path / "latin1.yaml")


SPLIT = SplitPolicy()


@pytest.mark.parametrize(("prompt", "cached", "queue", "expected"), [
    (1000, 0, 0, True),
    (1000, 900, 0, False),   # the uncached part is short
    (200, 0, 0, False),      # short prompt
    (1000, 0, 8, False),     # prefill pool saturated (prefillQueueMax 8)
    (1000, 0, None, False),  # no prefill worker reachable
    (257, 0, 7, True),
])
def test_should_offload_prefill(prompt: int, cached: int, queue: int | None, expected: bool) -> None:
    assert should_offload_prefill(prompt, cached, queue, SPLIT) is expected


def test_overlap_ratio_respects_min_cache_hit_ratio() -> None:
    cache = CachePolicy(min_cache_hit_ratio=0.75)
    # of the reusable part: the full blocks before the last token (15 of a 256-token prompt's 16)
    assert cache_overlap_ratio(12, 16, 256, cache) == pytest.approx(0.8)
    assert cache_overlap_ratio(11, 16, 256, cache) == 0.0
    assert cache_overlap_ratio(1, 16, 22, cache) == 1.0  # all a 22-token prompt can reuse (was 0.73: miss)
    assert cache_overlap_ratio(0, 16, 10, cache) == 0.0  # nothing reusable in a prompt under one block
    assert cache_overlap_ratio(12, 16, 256, CachePolicy(reuse_prefix=False)) == 0.0


def _workers(prompt: list[int], cached_on: str, loads: dict[str, int]) -> list[WorkerLoad]:
    names = frozenset(block_hashes(prompt, 16))
    return [WorkerLoad(e, num_running=r, prefix_hashes=names if e == cached_on else frozenset())
            for e, r in loads.items()]


def test_prefix_affinity_beats_a_small_load_difference() -> None:
    prompt = list(range(320))
    workers = _workers(prompt, "b", {"a": 0, "b": 4})
    choice = pick_decode_worker(workers, block_hashes(prompt, 16), len(prompt), SPLIT, CachePolicy())
    assert choice is not None and choice.worker.endpoint == "b" and choice.outcome == "prefix_affinity"


def test_hotspot_prevention_stops_piling_onto_the_cached_worker() -> None:
    prompt = list(range(320))
    workers = _workers(prompt, "b", {"a": 0, "b": 12, "c": 0})
    hashes = block_hashes(prompt, 16)
    choice = pick_decode_worker(workers, hashes, len(prompt), SPLIT, CachePolicy(), random.Random(0))
    assert choice is not None and choice.worker.endpoint in ("a", "c") and choice.outcome == "least_loaded"
    no_guard = SplitPolicy(enable_hotspot_prevention=False, queue_length_weight=0, decode_load_weight=0.5)
    choice = pick_decode_worker(workers, hashes, len(prompt), no_guard, CachePolicy())
    assert choice is not None and choice.worker.endpoint == "b"


def test_queue_length_and_health_decide_without_cache() -> None:
    workers = [WorkerLoad("a", num_waiting=5), WorkerLoad("b", num_waiting=1), WorkerLoad("c", healthy=False),
               WorkerLoad("d", draining=True)]
    choice = pick_decode_worker(workers, [], 10, SPLIT, CachePolicy())
    assert choice is not None and choice.worker.endpoint == "b"
    assert pick_decode_worker([WorkerLoad("x", healthy=False)], [], 10, SPLIT, CachePolicy()) is None


def test_pending_requests_spread_a_burst() -> None:
    workers = [WorkerLoad("a"), WorkerLoad("b")]
    picked = []
    for _ in range(6):
        c = pick_decode_worker(workers, [], 10, SPLIT, CachePolicy(), random.Random(1))
        assert c is not None
        c.worker.pending += 1
        picked.append(c.worker.endpoint)
    assert picked.count("a") == picked.count("b") == 3


def test_estimate_ttft_is_seed_001s_formula() -> None:
    assert estimate_ttft(4, 0.1, 10, 0.02) == pytest.approx(0.6)


def _estimate(prompt: int, cached: int, prefill: list[WorkerLoad]) -> float:
    decode = WorkerLoad("d", num_waiting=2, avg_prefill_seconds=0.1, avg_decode_step_seconds=0.02)
    return estimate_request_ttft(prompt, cached, decode, prefill, SplitPolicy(prompt_length_threshold=256,
                                                                               prefill_queue_max=8))


def test_the_ttft_estimate_counts_the_prefill_queue_only_for_requests_that_go_there() -> None:
    busy = WorkerLoad("p1", num_waiting=6, avg_prefill_seconds=0.5)
    idle = WorkerLoad("p2", num_waiting=1, avg_prefill_seconds=0.3)
    # a long prompt goes to the least-loaded prefill worker: its queue at its own prefill time
    assert _estimate(1000, 0, [busy, idle]) == pytest.approx(1 * 0.3 + 2 * 0.1)
    # a short prompt, or a long one mostly cached, is prefilled on the decode worker
    assert _estimate(100, 0, [busy, idle]) == pytest.approx(2 * 0.1)
    assert _estimate(1000, 900, [busy, idle]) == pytest.approx(2 * 0.1)
    # a prefill pool at prefillQueueMax is not used either; no prefill pool: local
    full = WorkerLoad("p3", num_waiting=8, avg_prefill_seconds=0.5)
    assert _estimate(1000, 0, [full]) == pytest.approx(2 * 0.1)
    assert _estimate(1000, 0, []) == pytest.approx(2 * 0.1)
    # a prefill worker with no timing yet borrows the pool's mean
    fresh = WorkerLoad("p4", num_waiting=0, num_running=1)
    assert _estimate(1000, 0, [busy, fresh]) == pytest.approx(1 * 0.5 + 2 * 0.1)


def test_a_decode_worker_with_no_timing_yet_borrows_the_pools_mean() -> None:
    """A fresh pod (where least-loaded routing sends a burst) once read as costing nothing: 0 s for any
    backlog, so nothing was ever rejected there."""
    fresh = WorkerLoad("d0", num_waiting=50)
    warm = [WorkerLoad("d1", avg_prefill_seconds=0.05, avg_decode_step_seconds=0.02),
            WorkerLoad("d2", avg_prefill_seconds=0.01, avg_decode_step_seconds=0.03)]
    split = SplitPolicy(prompt_length_threshold=256)
    assert estimate_request_ttft(10, 0, fresh, [], split, [fresh, *warm]) == pytest.approx(50 * 0.04)
    assert estimate_request_ttft(10, 0, fresh, [], split, [fresh]) == 0.0  # nothing known anywhere yet


@pytest.mark.parametrize(("priority", "est_ms", "qos", "admitted", "reason"), [
    ("high", 10_000, QoS(), True, ""),
    ("low", 100, QoS(), True, ""),
    ("low", 600, QoS(), False, "ttft_estimate"),
    ("low", 300, QoS(), False, "slo_violation"),        # above ttftSloMs 200, below 500
    ("low", 300, QoS(reject_on_slo_violation=False), True, ""),
    ("low", 10_000, QoS(enable_early_rejection=False), True, ""),
])
def test_admit_request(priority: str, est_ms: float, qos: QoS, admitted: bool, reason: str) -> None:
    a = admit_request(priority, est_ms / 1000, qos)
    assert a.admitted is admitted and a.reason == reason


def test_a_failed_request_misses_every_slo() -> None:
    from disagg_worker.router.service import SloTracker

    slo = SloTracker(parse_policy({"qos": {"ttftSloMs": 200, "tpotSloMs": 50}}))
    slo.record("low", 0.1, 0.01)  # served within both
    slo.record("low", None, None, failed=True)  # rejected, or no worker could serve it
    assert slo.counts["low"] == {"n": 2, "ttft_ok": 1, "tpot_ok": 1, "both_ok": 1}


def test_load_reports_with_nonsense_timings_read_as_unknown() -> None:
    from disagg_worker.server.peers import _finite

    assert [_finite(x) for x in (float("nan"), float("inf"), -1.0, 0.25)] == [0.0, 0.0, 0.0, 0.25]


def test_a_request_of_several_prompts_is_admitted_or_rejected_once() -> None:
    """Admission used to run per prompt, racing the cancellation of the others: one 429 counted 1 to n
    rejections, and some prompts reached workers first. Now: one decision, on the slowest prompt."""
    from types import SimpleNamespace

    from disagg_worker import metrics as m
    from disagg_worker.router.openai_schema import APIError
    from disagg_worker.router.service import RouterService, SloTracker

    class Pool:  # the peers' load reports, as PeerPool.healthy() hands them out
        def __init__(self, *loads: WorkerLoad) -> None:
            self.loads = loads

        def healthy(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(load=load) for load in self.loads]

    policy = parse_policy({"qos": {"lowPriorityThresholdMs": 150, "ttftSloMs": 1000}})
    busy = WorkerLoad("d", num_waiting=10, avg_prefill_seconds=0.02, avg_decode_step_seconds=0.01)
    service = RouterService.__new__(RouterService)
    service.policy, service.block_size, service.slo = policy, 16, SloTracker(policy)
    service.decode_pool, service.prefill_pool = Pool(busy), Pool()

    def rejections() -> float:
        return m.REJECTIONS.labels("ttft_estimate", "low")._value.get()

    before = rejections()
    service.admit([[5] * 10] * 3, "high")  # high priority: always admitted
    with pytest.raises(APIError) as exc:
        service.admit([[5] * 10] * 3, "low")  # 10 waiting x 20 ms = 200 ms > 150 ms
    assert exc.value.status == 429 and exc.value.headers["Retry-After"]
    assert rejections() == before + 1
    assert service.slo.counts["low"]["n"] == 3  # each prompt is a generation that was not served
    busy.num_waiting, busy.pending = 5, 0  # a load report: the admitted ones are in num_waiting now
    service.admit([[5] * 10] * 3, "low")  # 100, 120 and 140 ms: each prompt queues behind the one before


def test_admission_counts_each_admitted_request_at_once() -> None:
    """A burst of low-priority requests in one event-loop pass used to see the same idle queue (a
    request was counted on its worker only when its stream started), so all 50 got in; and so did a
    request of 50 prompts. Now each admitted prompt queues the next one behind it."""
    from types import SimpleNamespace

    from disagg_worker.router.openai_schema import APIError
    from disagg_worker.router.service import RouterService, SloTracker

    class Pool:
        def __init__(self, *loads: WorkerLoad) -> None:
            self.loads = loads

        def healthy(self) -> list[SimpleNamespace]:
            return [SimpleNamespace(load=load) for load in self.loads]

    policy = parse_policy({"qos": {"lowPriorityThresholdMs": 150, "ttftSloMs": 1000}})
    idle = WorkerLoad("d", avg_prefill_seconds=0.02, avg_decode_step_seconds=0.01)
    service = RouterService.__new__(RouterService)
    service.policy, service.block_size, service.slo = policy, 16, SloTracker(policy)
    service.decode_pool, service.prefill_pool = Pool(idle), Pool()

    outcomes = []
    for _ in range(12):
        try:
            [admitted] = service.admit([[5] * 10], "low")
            outcomes.append(admitted.worker is idle)
        except APIError as exc:
            outcomes.append(exc.status)
    assert outcomes == [True] * 8 + [429] * 4  # 0..7 ahead x 20 ms <= 150 ms; 8 ahead = 160 ms
    assert idle.pending == 8  # rejected requests are not counted
    idle.pending = 0
    with pytest.raises(APIError):
        service.admit([[5] * 10] * 50, "low")  # its 50th prompt would wait behind its first 49
    assert idle.pending == 0


def test_the_router_serves_a_policy_model_under_its_name(tmp_path: Path) -> None:
    """As the operator does with --served-model-name: a local cluster on a policy with model {name, path}
    served the folder's name, and clients sending the policy's name got a 404."""
    from disagg_worker.router.main import served_name

    folder = tmp_path / "weights-v3"
    folder.mkdir()
    named = parse_policy({"model": {"name": "llama-70b", "path": str(folder)}})
    assert served_name(named, None, str(folder)) == "llama-70b"
    assert served_name(named, str(folder), str(folder)) == "weights-v3"  # --model overrides the policy's model
    assert served_name(parse_policy({"model": {"path": str(folder)}}), None, str(folder)) == "weights-v3"
    assert served_name(parse_policy({}), None, "tiny-llama") == "tiny-llama"
    # the rendered ConfigMap always carries a name: the default one is no name for the folder's model
    defaulted = parse_policy({"model": {"name": "tiny-llama", "path": str(folder)}})
    assert served_name(defaulted, None, str(folder)) == "weights-v3"
