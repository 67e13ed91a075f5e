"""Smoke test of the autoscale bench's simulator with fixed service times (no engine, no torch)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from disagg_operator.bench_autoscale import ServiceTimes, default_config, main, simulate, summarize

FIXED = {"prefill_seconds_per_token": {"64": 0.0004, "256": 0.0002, "512": 0.00025},
         "decode_step_seconds": {"1": 0.006, "4": 0.008, "8": 0.011, "16": 0.018}, "source": "test"}


def fixed_service_times_file(folder: Path) -> Path:
    path = folder / "st.json"
    path.write_text(json.dumps(FIXED))
    return path


def test_service_times_interpolate() -> None:
    st = ServiceTimes({64: 0.0004, 256: 0.0002}, {1: 0.006, 16: 0.018})
    assert st.prefill_seconds(64) == 64 * 0.0004
    assert abs(st.decode_step(8) - (0.006 + 0.012 * 7 / 15)) < 1e-12
    assert st.decode_step(32) > st.decode_step(16)  # extrapolated, growing


def test_the_load_is_sized_by_the_mean_prefill_time_over_the_prompt_lengths() -> None:
    """Not by the time of the mean prompt: with a per-token cost that depends on the length they differ,
    and sizing by the mean prompt made the bench's load up to 13% heavier than it meant."""
    from dataclasses import replace

    flat = ServiceTimes({64: 1e-4}, {1: 0.006})
    cfg = default_config(flat, minutes=12)
    workload = replace(cfg.workload, prompt_range=(64, 512))
    assert workload.mean_prefill_seconds(flat) == pytest.approx(flat.prefill_seconds(288))
    curved = ServiceTimes({64: 1.6e-4, 256: 0.9e-4, 512: 1.05e-4}, {1: 0.006})  # measured on this CPU
    exact = sum(curved.prefill_seconds(n) for n in range(64, 513)) / 449
    assert workload.mean_prefill_seconds(curved) == pytest.approx(exact)
    assert exact > 1.1 * curved.prefill_seconds(288)
    assert default_config(curved).ttft_slo == pytest.approx(8 * exact, rel=1e-3)


def test_simulator_orders_the_policies(tmp_path: Path) -> None:
    st = ServiceTimes({int(k): v for k, v in FIXED["prefill_seconds_per_token"].items()},
                      {int(k): v for k, v in FIXED["decode_step_seconds"].items()})
    cfg = default_config(st, minutes=12, dt=0.1)
    rows = {name: summarize(simulate(cfg, st, name), cfg) for name in ("static-min", "static-max", "planner")}
    assert rows["static-max"]["slo_attainment"] > rows["static-min"]["slo_attainment"]
    assert rows["planner"]["replica_seconds"] < rows["static-max"]["replica_seconds"]
    assert rows["planner"]["scale_decisions"] > 0
    assert rows["static-max"]["requests"] == rows["planner"]["requests"] > 100


def test_cli_writes_json_and_plot(tmp_path: Path) -> None:
    times = fixed_service_times_file(tmp_path)
    out = tmp_path / "out"
    assert main(["--service-times", str(times), "--out", str(out), "--minutes", "6", "--dt", "0.1"]) == 0
    result = json.loads((out / "autoscale.json").read_text())
    assert [p["policy"] for p in result["policies"]] == ["static-min", "static-max", "planner"]
    assert set(result["targets"]) == {"slo_attainment_ge_0.99", "replica_seconds_le_0.6x_static_max",
                                      "reversals_le_1_per_10min"}
    assert (out / "autoscale.png").stat().st_size > 10_000
    assert json.loads((out / "autoscale-service-times.json").read_text())["source"] == "test"


def test_oracle_needs_less_with_higher_targets_and_never_more_than_static_max() -> None:
    from dataclasses import replace

    from disagg_operator.bench_autoscale import oracle_ratio
    from disagg_worker.policy import Thresholds

    st = ServiceTimes({int(k): v for k, v in FIXED["prefill_seconds_per_token"].items()},
                      {int(k): v for k, v in FIXED["decode_step_seconds"].items()})
    cfg = default_config(st, minutes=12)
    hotter = replace(cfg, prefill=cfg.prefill.model_copy(update={
        "scale_up": Thresholds(gpu_utilization=90), "scale_down": Thresholds(gpu_utilization=70)}))
    low = (cfg.prefill.min_replicas + cfg.decode.min_replicas) / (cfg.prefill.max_replicas + cfg.decode.max_replicas)
    assert low < oracle_ratio(hotter, st) < oracle_ratio(cfg, st) <= 1.0



def test_the_pools_keep_the_same_balance_whatever_the_hosts_costs() -> None:
    """The host's prefill/decode cost ratio used to decide which pool binds and how far static-max
    over-provisions the other (an oracle needed 0.55x static-max with one host's costs, 0.64x with
    another's): output lengths now scale so a decode pod serves 1.7x a prefill pod's requests/s."""
    from disagg_operator.bench_autoscale import DECODE_TO_PREFILL_CAPACITY, oracle_ratio

    stored = ServiceTimes.load(Path(__file__).parents[2] / "benchmarks/results/autoscale-service-times.json")
    assert default_config(stored).workload.output_range == (17, 137)  # the trace the stored results ran
    fast_prefill = ServiceTimes({64: 4.8e-5, 256: 3.5e-5, 512: 4.2e-5}, {1: 8.8e-4, 8: 1.4e-3, 16: 2.0e-3})
    for st in (stored, fast_prefill, ServiceTimes({int(k): v for k, v in FIXED["prefill_seconds_per_token"].items()},
                                                  {int(k): v for k, v in FIXED["decode_step_seconds"].items()})):
        cfg = default_config(st)
        capacity_p = 1 / cfg.workload.mean_prefill_seconds(st)
        capacity_d = cfg.max_batch / (st.decode_step(cfg.max_batch) * cfg.workload.mean_output())
        assert abs(capacity_d / capacity_p / DECODE_TO_PREFILL_CAPACITY - 1) < 0.05
        # before the balance: 0.55x with one host's costs, 0.64x with another's. What still differs by
        # host is how much faster a small decode batch steps (the oracle's KV usage follows it)
        assert 0.45 < oracle_ratio(cfg, st) < 0.56


def test_the_oracles_decode_kv_usage_is_what_the_simulator_reads_and_grows_faster_than_the_rate() -> None:
    from dataclasses import replace

    from disagg_operator.bench_autoscale import Cluster, Request, decode_kv_usage

    st = ServiceTimes({64: 1e-6}, {1: 0.001, 16: 0.004})  # a step 4x longer at a full batch
    cfg = default_config(st, minutes=12)
    cfg = replace(cfg, workload=replace(cfg.workload, prompt_range=(100, 100), output_range=(50, 50)))
    prompt, output = 100, 50

    def usage(rate: float) -> float:
        return decode_kv_usage(cfg.workload, cfg.max_batch, st, rate)
    kv_tokens = cfg.max_batch * (cfg.workload.mean_prompt() + cfg.workload.mean_output())
    for rate in (20.0, 60.0):
        cluster = Cluster(st, 4, 1, max_batch=cfg.max_batch, kv_tokens=kv_tokens, startup=0.0)
        for i in range(int(40 * rate)):  # 40 s of evenly spaced requests; read the last 20
            cluster.submit(Request(i / rate, prompt, output), i / rate)
        for i in range(400):
            cluster.step(i * 0.05, 0.05)
            if i == 399 - 200:
                cluster.sample("decode", (i + 1) * 0.05, elapsed=10.0, warmup=0.0)
        simulated = cluster.sample("decode", 20.0, elapsed=10.0, warmup=0.0)[0].kv_cache_usage / 100
        assert simulated == pytest.approx(usage(rate), rel=0.1)
    assert usage(60.0) > 3 * usage(20.0)  # 3x the rate, more than 3x the KV
    assert usage(1e6) == 1.0 and usage(0.0) == 0.0


def test_a_prefill_pod_removed_mid_prompt_finishes_that_prompt_and_hands_on_the_rest() -> None:
    """The prompt in progress is the head of the pod's queue: handing it on too ran it twice and then
    crashed the simulator (pop from an empty queue) when the draining pod's prompt time ran out."""
    from disagg_operator.bench_autoscale import Cluster, Request

    st = ServiceTimes({64: 0.01}, {1: 0.006, 16: 0.018})  # 0.64 s per 64-token prompt
    cluster = Cluster(st, 2, 1, max_batch=16, kv_tokens=10_000, startup=0.0)
    leaving, staying = cluster.pools["prefill"]
    mine = [Request(0.0, 64, 4) for _ in range(3)]
    leaving.queue.extend(mine)
    staying.queue.extend(Request(0.0, 64, 4) for _ in range(5))  # more loaded: it stays
    cluster.step(0.0, 0.1)
    cluster.resize("prefill", 1, 0.1)
    assert leaving.draining and list(leaving.queue) == mine[:1] and leaving.busy_left > 0
    now = 0.1
    while any(r.first_token is None for r in mine):
        cluster.step(now, 0.1)
        now += 0.1
        assert now < 60
    assert abs(mine[0].first_token - 0.64) < 1e-6  # finished where it started, not run again elsewhere
    assert leaving not in cluster.pools["prefill"]  # drained, then gone


def test_seed_lists_parse_and_bad_ones_are_refused() -> None:
    import argparse

    from disagg_operator.bench_autoscale import parse_seeds

    assert parse_seeds("0-3,7,2") == [0, 1, 2, 3, 7]
    assert parse_seeds("5") == [5]
    for bad in ("", "a-3", "1-b", "0,,2", "3-", "0,5-3", "-1"):
        with pytest.raises(argparse.ArgumentTypeError, match="bad seed list"):
            parse_seeds(bad)


def test_cli_runs_several_traces_and_counts_where_every_target_is_met(tmp_path: Path) -> None:
    times = fixed_service_times_file(tmp_path)
    out = tmp_path / "out"
    assert main(["--service-times", str(times), "--out", str(out), "--minutes", "4", "--dt", "0.1",
                 "--seeds", "0-1", "--workers", "2"]) == 0
    result = json.loads((out / "autoscale-seeds.json").read_text())
    assert [r["seed"] for r in result["seeds"]] == [0, 1]
    assert result["all_targets_met_on"] == [r["seed"] for r in result["seeds"] if all(r["targets"].values())]
    alone = tmp_path / "alone"  # each trace is the same run as --seed N on its own
    assert main(["--service-times", str(times), "--out", str(alone), "--minutes", "4", "--dt", "0.1", "--seed", "1",
                 "--no-plot"]) == 0
    single = json.loads((alone / "autoscale.json").read_text())
    assert result["seeds"][1]["planner_vs_static_max_replica_seconds"] == single[
        "planner_vs_static_max_replica_seconds"]
    assert result["seeds"][1]["reversals_per_10min"] == single["policies"][2]["reversals_per_10min"]
    assert result["config"]["minutes"] == 4


def test_the_simulated_pods_report_what_the_workers_and_the_planner_would() -> None:
    """The planner must be judged on what it would see: no negative queues, no samples from pods still
    warming up (they count as starting), busy time, queue and KV usage as means over the time since
    the last sample (the workers' time integrals), not snapshots."""
    from disagg_operator.bench_autoscale import Cluster, Pod, Request

    st = ServiceTimes({64: 0.01}, {1: 0.006, 16: 0.018})
    cluster = Cluster(st, 1, 1, max_batch=16, kv_tokens=1000.0, startup=30.0)
    warm = cluster.pools["prefill"][0]
    warming = Pod(ready_at=90.0)
    cluster.pools["prefill"].append(warming)
    warm.queue.append(Request(arrival=99.99, prompt=64, output=8))  # arrived within the step, in service now
    warm.busy_left, warm.busy_time, warm.queue_time = 0.5, 2.5, 7.5
    warm.queue.append(Request(arrival=99.995, prompt=64, output=8))
    waited = Cluster.seconds_waiting(warm.queue, 99.98, 100.0, skip_head=True, since=lambda r: r.arrival)
    assert waited == pytest.approx(0.005)  # the prompt in progress is not waiting; the other since it came
    sample, starting = cluster.sample("prefill", 100.0, elapsed=5.0, warmup=30.0)
    assert (sample.pods, sample.serving, starting) == (1, 2, 1)
    assert (sample.gpu_utilization, sample.queue_length) == (50.0, 1.5)  # 2.5 busy s, 7.5 request-s over 5 s
    assert (warm.busy_time, warm.queue_time) == (0.0, 0.0)  # the next sample covers the next interval
    assert cluster.sample("prefill", 121.0, elapsed=5.0, warmup=30.0)[0].pods == 2  # warmed up
    cluster.pools["prefill"].append(Pod(ready_at=125.0))  # served the last second of the interval
    assert cluster.sample("prefill", 126.0, elapsed=5.0, warmup=30.0)[0].serving == pytest.approx(2.2)
    # a decode pod's KV usage over the interval: a step of 1 s holding 400 prompt + 100..267 generated of
    # 1,000 KV tokens (a token per 6 ms step), then an idle 4 s, reads 11.7% (a snapshot at the end: 0%)
    cluster = Cluster(st, 1, 1, max_batch=16, kv_tokens=1000.0, startup=30.0)
    decode = cluster.pools["decode"][0]
    decode.running.append(Request(arrival=199.0, prompt=400, output=1000, first_token=200.0, generated=100))
    cluster.step(200.0, 1.0)
    decode.running.clear()
    sample = cluster.sample("decode", 205.0, elapsed=5.0, warmup=30.0)[0]
    assert sample.kv_cache_usage == pytest.approx(100 * (400 + 100 + 1 / 0.006 / 2) / 5 / 1000)
    assert sample.gpu_utilization == pytest.approx(20.0)


def test_the_simulator_integrates_what_happens_within_a_step() -> None:
    """A step is longer than a short request lives (50 ms against a few tens of ms of decoding): what a
    request holds and how long it waits count for the part of the step it was there, as the workers'
    counters count them, not for the whole step (that read decode KV usage up to twice too high)."""
    from disagg_operator.bench_autoscale import Cluster, Request

    st = ServiceTimes({64: 0.01}, {1: 0.01, 16: 0.01})
    cluster = Cluster(st, 1, 1, max_batch=16, kv_tokens=1000.0, startup=0.0)
    prefill, decode = cluster.pools["prefill"][0], cluster.pools["decode"][0]
    for arrival in (100.0, 100.2, 100.5):  # 0.64 s prompts: served 100.0-100.64, 100.64-101.28, then
        prefill.queue.append(Request(arrival=arrival, prompt=64, output=11))
    decode.running.append(Request(arrival=99.0, prompt=100, output=11, first_token=100.0, generated=1))
    cluster.step(100.0, 1.0)
    assert prefill.busy_time == pytest.approx(1.0)
    assert prefill.queue_time == pytest.approx((100.64 - 100.2) + (101.0 - 100.5))
    # the first prompt's request decodes 10 tokens from 100.64 and the other one from 100.0, 0.1 s each
    assert decode.busy_time == pytest.approx(0.2)
    assert decode.kv_time == pytest.approx((0.1 * (100 + 1 + 5) + 0.1 * (64 + 1 + 5)) / 1000)
    assert not decode.running  # both finished within the step
