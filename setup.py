"""Build hook: generate the gRPC stubs from proto/ before packaging (metadata lives in pyproject.toml)."""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).parent


class BuildPyWithStubs(build_py):
    def run(self) -> None:
        spec = importlib.util.spec_from_file_location("codegen", ROOT / "worker/disagg_worker/rpc/codegen.py")
        codegen = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(codegen)
        codegen.generate(ROOT / "proto/disagg/v1", ROOT / "worker/disagg_worker/rpc/_gen")
        super().run()


setup(cmdclass={"build_py": BuildPyWithStubs})
