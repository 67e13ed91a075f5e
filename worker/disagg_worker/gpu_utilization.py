"""Real GPU utilisation of a worker on CUDA, exported as ``disagg_gpu_utilization_ratio`` beside the
step loop's busy fraction (``disagg_utilization_ratio``, ``disagg_busy_seconds_total``).

It is what ``nvidia-smi`` shows: the share of the driver's last sample period (1/6 s to 1 s, by
product) in which a kernel ran, read through NVML (``torch.cuda.utilization``; the ``nvidia-ml-py``
package). The autoscaler keeps scaling on the busy fraction: NVML's reading is a snapshot of under a
second, and a step loop that waits on the CPU between kernels (sampling, scheduling) reads busy there
but idle to NVML. Where there is no CUDA device, or NVML cannot be read (no driver library, a
container without the device's management interface), there is no reading: logged once, nothing else
changes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)


def _nvml_percent(device: torch.device) -> float:
    return float(torch.cuda.utilization(device))


class GpuUtilization:
    def __init__(self, device: torch.device | str,
                 read_percent: Callable[[torch.device], float] = _nvml_percent) -> None:
        self.device = device = torch.device(device)
        self._read_percent = read_percent
        self._failed = device.type != "cuda"  # nothing to read on a CPU

    def ratio(self) -> float | None:
        """The GPU's utilisation in [0, 1], or None where it cannot be read."""
        if self._failed:
            return None
        try:
            percent = self._read_percent(self.device)
        except Exception as exc:  # NVML raises its own error types; any of them means no reading
            log.warning("GPU utilisation cannot be read (%s): disagg_gpu_utilization_ratio is not exported", exc)
            self._failed = True
            return None
        return min(1.0, max(0.0, percent / 100.0))
