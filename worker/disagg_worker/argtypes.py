"""argparse types shared by every ``disagg`` command: a bad value is a usage error (exit code 2) that
names the flag, not a traceback or a value the process silently ignores or wraps around."""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Callable

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def port(text: str) -> int:
    """A TCP port, 0 (any free one) to 65535 (gRPC took 70000 as 70000 - 65536 and logged 70000)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 0-65535, got {value}")
    return value


def positive(kind: Callable[[str], float | int], *, zero: bool = False) -> Callable[[str], float | int]:
    """A finite number above 0 (at least 0 with ``zero``) of ``kind`` (int or float)."""
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
            raise argparse.ArgumentTypeError(f"must be {'0 or more' if zero else 'above 0'}, got {text}")
        return value
    parse.__name__ = getattr(kind, "__name__", "number")  # argparse names the type in its messages
    return parse


def log_level(text: str) -> str:
    level = text.upper()
    if level not in LOG_LEVELS or not isinstance(logging.getLevelName(level), int):
        raise argparse.ArgumentTypeError(f"one of {', '.join(LOG_LEVELS)}, got {text!r}")
    return level
