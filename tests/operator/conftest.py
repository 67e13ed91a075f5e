"""Fixtures for the operator tests.

The kopf handlers read their timer interval from the environment at import, so it is set here,
before any test module imports them: the integration test needs a reconcile every second.
"""

from __future__ import annotations

import os

os.environ.setdefault("DISAGG_RECONCILE_INTERVAL_SECONDS", "1")
os.environ.setdefault("DISAGG_RETRY_DELAY_SECONDS", "1")
