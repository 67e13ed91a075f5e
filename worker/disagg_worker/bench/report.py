"""Shared output of every benchmark: a rich table on the terminal and a JSON file with the raw numbers."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table


def machine_info() -> dict[str, Any]:
    import os

    import torch

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return info


def print_table(title: str, columns: list[str], rows: list[list[Any]], console: Console | None = None) -> None:
    table = Table(title=title)
    for c in columns:
        table.add_column(c, justify="right" if c not in (columns[0],) else "left")
    for r in rows:
        table.add_row(*[_fmt(v) for v in r])
    (console or Console()).print(table)


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:,.3f}" if abs(v) < 100 else f"{v:,.1f}"
    return str(v)


def write_json(out_dir: str | Path, name: str, payload: dict[str, Any]) -> Path:
    path = Path(out_dir)
    path.mkdir(parents=True, exist_ok=True)
    target = path / f"{name}.json"
    payload = {"benchmark": name, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               "machine": machine_info(), **payload}
    target.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    return target
