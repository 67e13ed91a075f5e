"""``TimeIntegral``: the integral over time of a value that changes in steps (a queue length, the KV
usage), so that a reader can take its mean over any window: (integral now - integral then) / seconds.

Written by one thread (the engine's, each time the value may have changed), read by any (a metrics
scrape). The planner reads queue length and KV usage this way, not as snapshots: on a decode worker
whose requests live a fraction of a second, two snapshots 5 s apart read 0% and 58% KV usage at a
steady 25%, and a single one sized a scale-up.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class TimeIntegral:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._total = 0.0
        self._value = 0.0
        self._since = clock()

    def set(self, value: float) -> None:
        """The value from now on (it held the previous one since the last call)."""
        with self._lock:
            now = self._clock()
            self._total += self._value * max(0.0, now - self._since)
            self._value, self._since = float(value), now

    def total(self) -> float:
        """Value x seconds since creation, up to now."""
        with self._lock:
            return self._total + self._value * max(0.0, self._clock() - self._since)
