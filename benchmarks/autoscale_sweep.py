"""Sweep the autoscale bench's planner settings over several traces: one line per variant.

Each variant is a JSON object of policy fields per role, in the policy's spelling, laid over the
bench's configuration (``bench_autoscale.default_config``); ``{}`` is the bench as shipped. For each
trace the planner runs as in ``disagg bench autoscale --seed N`` and is compared with static-max on
the same trace. Prints one line per variant (mean replica-seconds vs static-max, reversals per 10
minutes summed over the traces, traces meeting every target) and writes them to ``--out``.

    PYTHONPATH=worker:operator .venv/bin/python benchmarks/autoscale_sweep.py \\
        '{}' '{"prefill": {"scaleDownStabilizationSeconds": 135}, "decode": {"scaleDownStabilizationSeconds": 240}}'

About 2 minutes per variant for ten traces on 2 cores (static-max once per trace, first).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import statistics
from pathlib import Path
from typing import Any

from disagg_operator import bench_autoscale as bench
from disagg_worker.policy import RoleAutoscale

SERVICE_TIMES = Path("benchmarks/results/autoscale-service-times.json")


def configured(st: bench.ServiceTimes, overrides: dict[str, dict[str, Any]]) -> bench.BenchConfig:
    """The bench's configuration with ``overrides`` (``{"prefill": {...}, "decode": {...}}``) applied."""
    cfg = bench.default_config(st)
    roles = {}
    for role in ("prefill", "decode"):
        base = getattr(cfg, role).model_dump(by_alias=True)
        roles[role] = RoleAutoscale.model_validate({**base, **overrides.get(role, {})})
    return dataclasses.replace(cfg, **roles)


def run_one(job: tuple[str, dict[str, dict[str, Any]], int]) -> tuple[int, dict[str, Any]]:
    policy, overrides, seed = job
    st = bench.ServiceTimes.load(SERVICE_TIMES)
    cfg = configured(st, overrides)
    return seed, bench.summarize(bench.simulate(cfg, st, policy, seed=seed), cfg)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("variants", nargs="+", help="JSON objects of per-role policy fields")
    ap.add_argument("--seeds", default="0-9")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/out/autoscale-sweep.json"))
    args = ap.parse_args(argv)
    seeds = bench.parse_seeds(args.seeds)
    variants = [json.loads(v) for v in args.variants]
    st = bench.ServiceTimes.load(SERVICE_TIMES)
    for v in variants:
        configured(st, v)  # a bad variant fails here, before any simulation
    lines = []
    with mp.get_context("spawn").Pool(args.workers) as pool:
        static = dict(pool.map(run_one, [("static-max", {}, s) for s in seeds]))
        for v in variants:
            runs = dict(pool.map(run_one, [("planner", v, s) for s in seeds]))
            ratios = [runs[s]["replica_seconds"] / static[s]["replica_seconds"] for s in seeds]
            reversals = [runs[s]["reversals_per_10min"] for s in seeds]
            attainment = [runs[s]["slo_attainment"] for s in seeds]
            met = [s for s, r, v_, a in zip(seeds, ratios, reversals, attainment, strict=True)
                   if a >= 0.99 and r <= 0.6 and v_ <= 1.0]
            line = {"variant": v, "mean_vs_static_max": statistics.fmean(ratios), "vs_static_max": ratios,
                    "reversals_per_10min_sum": sum(reversals), "reversals_per_10min": reversals,
                    "slo_attainment": attainment, "min_slo_attainment": min(attainment), "all_targets_met_on": met}
            lines.append(line)
            print(f"{json.dumps(v)}: mean {line['mean_vs_static_max']:.3f}x static-max, reversals/10 min summed "
                  f"{sum(reversals):.2f}, attainment >= {min(attainment):.2%}, every target on {len(met)} of "
                  f"{len(seeds)}", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(lines, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
