"""``disagg bench oracle``: its comparison logic, and a real run that must agree in fp32."""

from __future__ import annotations

import json
from pathlib import Path

from disagg_worker.bench.oracle_bench import build_prompts, first_difference, main


def test_first_difference_counts_a_length_difference() -> None:
    assert first_difference([1, 2, 3], [1, 2, 3]) is None
    assert first_difference([1, 2, 3], [1, 5, 3]) == 1
    assert first_difference([1, 2], [1, 2, 3]) == 2
    assert first_difference([], [4]) == 0


def test_every_other_prompt_shares_the_prefix() -> None:
    prompts = build_prompts(list(range(10, 50)), 6, (1, 5), prefix_len=8, seed=3)
    assert [p[:8] == prompts[1][:8] for p in prompts] == [False, True, False, True, False, True]
    assert prompts == build_prompts(list(range(10, 50)), 6, (1, 5), prefix_len=8, seed=3)


def test_fp32_on_the_cpu_agrees_with_hf_and_writes_json(tmp_path: Path) -> None:
    rc = main(["--model", "tiny-qwen2", "--device", "cpu", "--dtype", "float32", "--num-requests", "6",
               "--max-tokens", "12", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "oracle.json").read_text())
    assert (rc, report["identical"], report["requests"], report["divergences"]) == (0, 6, 6, [])
    assert report["prefix_hit_ratio"] > 0
