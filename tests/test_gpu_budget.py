"""The KV pool's size on a GPU: a share of the device per worker, so that workers sharing one fit."""

from __future__ import annotations

import pytest

from disagg_worker.engine.engine import GPU_MIN_HEADROOM_BYTES, gpu_kv_budget
from disagg_worker.worker_main import build_parser

GIB = 1 << 30


def test_two_workers_with_half_shares_fit_where_two_default_ones_would_not() -> None:
    total, weights = 80 * GIB, 2 * GIB
    first = gpu_kv_budget(total, free=total - weights, held=weights, utilization=0.45)
    second = gpu_kv_budget(total, free=total - 2 * weights - first, held=weights, utilization=0.45)
    assert 2 * weights + first + second <= 0.9 * total
    assert first == second == int(total * 0.45) - weights - 4 * GIB  # 5% headroom


def test_the_budget_never_exceeds_what_is_free_now() -> None:
    budget = gpu_kv_budget(80 * GIB, free=10 * GIB, held=GIB, utilization=0.9)
    assert budget == 10 * GIB - 4 * GIB


def test_no_room_is_a_clear_error_naming_the_knobs() -> None:
    with pytest.raises(ValueError, match="gpu-memory-utilization or set --kv-cache-bytes"):
        gpu_kv_budget(8 * GIB, free=8 * GIB, held=7 * GIB, utilization=0.9)
    assert gpu_kv_budget(4 * GIB, free=4 * GIB, held=0, utilization=1.0) == 4 * GIB - GPU_MIN_HEADROOM_BYTES


@pytest.mark.parametrize("value", ["0", "1.5", "-0.2"])
def test_a_share_outside_zero_to_one_is_refused(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--role", "decode", "--gpu-memory-utilization", value])
    assert "must be in (0, 1]" in capsys.readouterr().err
