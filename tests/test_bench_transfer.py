"""Smoke test of ``disagg bench transfer`` on a 1 MiB cache: every method moves the bytes, JSON and PNG appear."""

from __future__ import annotations

import json
from pathlib import Path

from disagg_worker.bench.transfer_bench import main


def test_bench_transfer_writes_every_method(tmp_path: Path) -> None:
    assert main(["--sizes", "1", "--repeats", "1", "--rounds", "2", "--chunk-bytes", str(256 << 10),
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "transfer.json").read_text())
    methods = {r["method"]: r for r in result["results"]}
    assert set(methods) == {"memcpy", "raw TCP", "disagg tcp transport (verified)",
                            "disagg gRPC (checksums verified)", "disagg gRPC (no verification)"}
    assert all(len(r["seconds"]) == 2 and r["gb_per_s"] > 0 for r in methods.values())  # one sample per round
    assert methods["raw TCP"]["vs_raw_tcp"] == 1.0
    assert (tmp_path / "transfer.png").stat().st_size > 10_000
