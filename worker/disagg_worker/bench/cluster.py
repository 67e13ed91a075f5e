"""Start and stop a local ``disagg up`` cluster as a subprocess, for benchmarks and end-to-end tests.

Contract with the launcher: it prints a line containing ``disagg is up`` once healthy, serves
``GET /health`` (200 when ready) on the router port, and shuts everything down on SIGINT or SIGTERM.
The launcher runs in its own session (process group), so whatever it started can be cleaned up even
if it dies first: :meth:`UpProcess.stop` sends SIGINT, then SIGTERM, then SIGKILLs the group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path
from typing import IO, Literal

import httpx

from disagg_worker.launcher import die_with_parent, free_port  # noqa: F401 - free_port: re-exported for the bench

Mode = Literal["disagg", "monolithic"]
READY_LINE = "disagg is up"


class UpError(RuntimeError):
    """The cluster did not come up (the message ends with the tail of its log)."""


def up_command(mode: Mode, port: int, *, model: str | None = None, policy: str | None = None,
               extra: list[str] | None = None, host: str = "127.0.0.1") -> list[str]:
    """The ``disagg up`` command line for the issue's two configurations.

    disagg: 1 prefill + 1 decode worker, each pinned to its own core; monolithic: one role-``both``
    worker on both cores.
    """
    cmd = [sys.executable, "-m", "disagg_worker.cli", "up", "--host", host, "--port", str(port)]
    if model:
        cmd += ["--model", model]
    if policy:
        cmd += ["--policy", policy]
    if mode == "disagg":
        cmd += ["--prefill", "1", "--decode", "1", "--cpu-affinity", "prefill=0", "--cpu-affinity", "decode=1"]
    elif mode == "monolithic":
        cmd += ["--monolithic", "--workers", "1", "--cpu-affinity", "both=0,1"]
    else:
        raise ValueError(f"unknown cluster mode {mode!r}")
    return cmd + list(extra or [])


class UpProcess:
    """A ``disagg up`` subprocess; use as a context manager so it is always stopped."""

    def __init__(self, cmd: list[str], port: int, *, host: str = "127.0.0.1", log_path: Path | None = None,
                 ready_timeout_s: float = 300.0, stop_timeout_s: float = 30.0, env: dict[str, str] | None = None):
        self.cmd = cmd
        self.host, self.port = host, port
        self.log_path = log_path
        self.ready_timeout_s, self.stop_timeout_s = ready_timeout_s, stop_timeout_s
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self._tail: deque[str] = deque(maxlen=40)
        self._reader: threading.Thread | None = None
        self._log: IO[str] | None = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    def __enter__(self) -> UpProcess:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = self.log_path.open("w", encoding="utf-8")
        env = dict(os.environ if self.env is None else self.env)
        env.setdefault("PYTHONUNBUFFERED", "1")
        # dies with the bench however the bench dies (its own session keeps it out of the bench's
        # terminal signals, so without this a killed bench left the whole cluster running)
        self.proc = subprocess.Popen(self.cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, start_new_session=True, env=env,
                                     preexec_fn=die_with_parent)
        self._reader = threading.Thread(target=self._drain, name=f"disagg-up-{self.port}", daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None:
                self._reader.join(timeout=5)
                raise UpError(f"`disagg up` exited with code {self.proc.returncode} before it was up\n"
                                   + self.tail())
            if time.monotonic() > deadline:
                raise UpError(f"`disagg up` not up after {self.ready_timeout_s:.0f} s\n" + self.tail())
        self._wait_health(deadline=max(deadline, time.monotonic() + 30))

    def _wait_health(self, deadline: float) -> None:
        url = f"http://{self.host}:{self.port}/health"
        last = ""
        with httpx.Client(timeout=5.0, trust_env=False) as client:  # local: never via an HTTP_PROXY
            while True:
                try:
                    resp = client.get(url)
                    if resp.status_code == 200:
                        return
                    last = f"HTTP {resp.status_code}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                if self.proc is not None and self.proc.poll() is not None:
                    raise UpError(f"`disagg up` exited with code {self.proc.returncode}\n" + self.tail())
                if time.monotonic() > deadline:
                    raise UpError(f"{url} not healthy ({last})\n" + self.tail())
                time.sleep(0.2)

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = raw.decode("utf-8", errors="replace")
            self._tail.append(line.rstrip("\n"))
            if self._log is not None:
                with contextlib.suppress(ValueError):  # closed by stop() after a kill
                    self._log.write(line)
                    self._log.flush()
            if READY_LINE in line:
                self._ready.set()

    def tail(self) -> str:
        where = f" (full log: {self.log_path})" if self.log_path else ""
        return f"--- last lines of `disagg up`{where}:\n" + "\n".join(self._tail)

    def stop(self) -> int | None:
        """Stop the launcher and everything in its process group; returns its exit code. Idempotent."""
        proc = self.proc
        if proc is None:
            return None
        try:
            if proc.poll() is None:
                for sig, share in ((signal.SIGINT, 0.6), (signal.SIGTERM, 0.4)):
                    with contextlib.suppress(ProcessLookupError):
                        proc.send_signal(sig)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(timeout=self.stop_timeout_s * share)
                        break
            self._kill_group(proc, grace_s=min(5.0, self.stop_timeout_s))
        finally:
            if self._reader is not None:
                self._reader.join(timeout=5)
            if proc.stdout is not None:
                proc.stdout.close()
            if self._log is not None:
                self._log.close()
                self._log = None
        return proc.returncode

    @staticmethod
    def _kill_group(proc: subprocess.Popen[bytes], grace_s: float) -> None:
        """Kill what is left of the launcher's own process group (it, and its workers if it left any)."""
        pgid = proc.pid  # start_new_session: the launcher leads its own group
        with contextlib.suppress(ProcessLookupError, PermissionError):
            proc.poll()  # reap an exited launcher so its zombie does not count as a member
            os.killpg(pgid, 0)  # raises ProcessLookupError when the group is empty
            os.killpg(pgid, signal.SIGTERM)
            deadline = time.monotonic() + grace_s
            while time.monotonic() < deadline:
                time.sleep(0.05)
                proc.poll()
                os.killpg(pgid, 0)
            os.killpg(pgid, signal.SIGKILL)
        proc.wait(timeout=10)
