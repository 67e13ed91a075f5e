"""The workers' time integrals (queue length, KV usage): means over any window, read on scrape."""

from __future__ import annotations

import pytest

from disagg_worker.engine.time_integral import TimeIntegral


def test_the_integral_is_the_value_times_the_seconds_it_held() -> None:
    now = [100.0]
    integral = TimeIntegral(clock=lambda: now[0])
    assert integral.total() == 0.0
    integral.set(4)  # 4 requests waiting from t=100
    now[0] = 102.5
    assert integral.total() == pytest.approx(10.0)  # read mid-interval: the value so far counts
    integral.set(0)
    now[0] = 110.0
    assert integral.total() == pytest.approx(10.0)
    integral.set(0.5)
    now[0] = 112.0
    # the mean over 100..112: (4 x 2.5 + 0 x 7.5 + 0.5 x 2) / 12
    assert integral.total() / 12 == pytest.approx(11.0 / 12)
