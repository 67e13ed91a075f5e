"""Optional compiled CPU kernels, built on first use with torch's C++ extension loader.

If a compiler or ninja is missing, or ``DISAGG_CPU_KERNELS=0``, the engine runs the pure-torch path;
both paths are tested against Hugging Face ``generate``. The build is cached per machine and checkout (under
``TORCH_EXTENSIONS_DIR``) and guarded by torch's file lock, so concurrent workers build it once.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

CSRC = Path(__file__).parent / "csrc"
SOURCES = [CSRC / "paged_attention.cpp", CSRC / "fused_ops.cpp", CSRC / "bindings.cpp"]
# -fopenmp so that at::parallel_for really spreads work over torch's threads (without it the
# header-only OpenMP path runs serially); the extension then shares the libgomp torch has loaded.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffast-math"]
LDFLAGS = ["-fopenmp"]


def kernels_enabled() -> bool:
    return os.environ.get("DISAGG_CPU_KERNELS", "1") not in ("0", "false", "no")


def _build_directory() -> str | None:
    """One build per checkout: torch keys its cache by extension name alone, so two checkouts (a CI
    clone and a working tree) would each find the other's build out of date and rebuild (minutes)."""
    import hashlib

    try:
        from torch.utils.cpp_extension import _get_build_directory
    except ImportError:  # a torch without the helper: its default directory
        return None
    digest = hashlib.sha1(str(CSRC.resolve()).encode()).hexdigest()[:12]
    return _get_build_directory(f"disagg_cpu_kernels-{digest}", verbose=False)


def _prefer_interpreter_ninja() -> None:
    """Put the ninja that pip installed next to the interpreter first on PATH, when there is one.

    Always that one, not whichever comes first: two ninja versions write incompatible ``.ninja_log``
    files, so a system ninja and the venv's would each rebuild the other's build from scratch."""
    ours = Path(sys.executable).parent / "ninja"
    found = shutil.which("ninja")
    if ours.exists() and (found is None or Path(found) != ours):
        os.environ["PATH"] = str(ours.parent) + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=1)
def load_cpu_kernels() -> ModuleType | None:
    """The compiled module, or None when it cannot be built here (the torch path is used then)."""
    if not kernels_enabled():
        return None
    _prefer_interpreter_ninja()
    try:
        from torch.utils.cpp_extension import load

        return load(name="disagg_cpu_kernels", sources=[str(p) for p in SOURCES], extra_cflags=FLAGS,
                    extra_ldflags=LDFLAGS, build_directory=_build_directory(), verbose=False)
    except Exception as exc:  # no compiler, no ninja, unsupported flags: fall back, loudly once
        log.warning("CPU kernels unavailable (%s); using the torch path", exc)
        return None
