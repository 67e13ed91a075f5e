"""Real GPU utilisation on CUDA (NVML). This machine has no GPU: the NVML reader is replaced by a fake
here, the edge that cannot run on a CPU; on a CUDA machine the last test reads the real one."""

from __future__ import annotations

import logging

import pytest
import torch

from disagg_worker.gpu_utilization import GpuUtilization


def test_a_cpu_worker_has_no_gpu_reading_and_never_asks_nvml() -> None:
    def never(_: torch.device) -> float:
        raise AssertionError("NVML read on a CPU worker")

    assert GpuUtilization("cpu", never).ratio() is None


def test_a_cuda_worker_exports_nvmls_percent_as_a_ratio() -> None:
    readings = iter([37.0, 100.0, 140.0])
    asked = []

    def fake_nvml(device: torch.device) -> float:
        asked.append(device)
        return next(readings)

    gpu = GpuUtilization(torch.device("cuda", 1), fake_nvml)
    assert [gpu.ratio(), gpu.ratio(), gpu.ratio()] == [0.37, 1.0, 1.0]  # never above 1
    assert asked == [torch.device("cuda", 1)] * 3  # the worker's own GPU


def test_nvml_that_cannot_be_read_is_logged_once_and_nothing_else_changes(caplog: pytest.LogCaptureFixture) -> None:
    calls = []

    def broken(_: torch.device) -> float:
        calls.append(1)
        raise OSError("NVML Shared Library Not Found")

    gpu = GpuUtilization("cuda:0", broken)
    with caplog.at_level(logging.WARNING):
        assert [gpu.ratio(), gpu.ratio()] == [None, None]
    assert len(calls) == 1
    assert sum("GPU utilisation cannot be read" in r.message for r in caplog.records) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_the_real_reading_on_a_cuda_machine() -> None:
    ratio = GpuUtilization(torch.device("cuda", 0)).ratio()
    assert ratio is not None and 0.0 <= ratio <= 1.0
