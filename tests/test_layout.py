"""The repository layout must not shadow the standard library (DESIGN.md: the operator/ hazard)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_operator_is_the_standard_library_from_repo_root() -> None:
    out = subprocess.run([sys.executable, "-c", "import operator, sys; print(operator.__file__)"],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert "site-packages" not in out and not out.startswith(str(ROOT)), out
    assert Path(out).name == "operator.py"


def test_operator_folder_is_not_a_package() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()


def test_cli_help_lists_commands() -> None:
    out = subprocess.run([sys.executable, "-m", "disagg_worker.cli", "--help"], capture_output=True, text=True,
                         check=True).stdout
    for cmd in ("up", "worker", "router", "operator", "bench engine"):
        assert cmd in out
