"""``disagg up``: a local cluster on 127.0.0.1, one router + N prefill + M decode worker processes.

``--monolithic`` runs K role-``both`` workers instead (seed 000's comparison). Every process is a real
``disagg worker`` / ``disagg router``; the launcher waits until each answers ``/ready``, prints the
endpoint, and on Ctrl-C or SIGTERM stops them all (SIGTERM, then SIGKILL after a grace period).
``LocalCluster`` is also what the end-to-end tests and benchmarks use.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

import httpx

from disagg_worker.argtypes import positive

_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """An unused port, never one this process handed out before: the probe socket is closed before the
    child binds, and the kernel may offer the same port to the next probe."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind((host, 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise OSError("no free port found")


def die_with_parent() -> None:
    """In the child before exec: SIGTERM when the launcher dies, however it dies (SIGKILL, a closed
    terminal), so no worker outlives it holding its ports. Linux only; elsewhere a no-op."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGTERM)
    except (OSError, AttributeError):
        return
    if os.getppid() == 1:  # the launcher died while we were being forked
        os.kill(os.getpid(), signal.SIGTERM)


MAX_CPUS = 8192  # Linux's largest NR_CPUS


def parse_affinity(items: list[str]) -> dict[str, list[int]]:
    """``["prefill=0", "decode=1", "both=0,1"]`` -> ``{"prefill": [0], ...}``; ranges like ``0-3`` work."""
    out: dict[str, list[int]] = {}
    for item in items:
        role, sep, cpus = item.partition("=")
        if not sep or role not in ("prefill", "decode", "both", "router"):
            raise ValueError(f"--cpu-affinity {item!r}: use ROLE=CPUS with ROLE prefill|decode|both|router")
        ids: list[int] = []
        for part in cpus.split(","):
            lo, dash, hi = part.partition("-")
            numbers = (lo, hi) if dash else (lo,)
            if not all(n.isascii() and n.isdigit() for n in numbers):
                raise ValueError(f"--cpu-affinity {item!r}: {part!r} is not a CPU number or a range like 0-3")
            first, last = int(lo), int(hi) if dash else int(lo)
            if last < first:
                raise ValueError(f"--cpu-affinity {item!r}: {part!r} names no CPU")
            if last >= MAX_CPUS:  # checked before the range is built: 0-99999999999 ran out of memory
                raise ValueError(f"--cpu-affinity {item!r}: CPU {last} is past the kernel's limit of {MAX_CPUS}")
            ids.extend(range(first, last + 1))
        out[role] = ids
    return out


@dataclass
class Process:
    name: str
    cmd: list[str]
    ready_url: str
    cpus: list[int] | None = None
    env: dict[str, str] = field(default_factory=dict)
    popen: subprocess.Popen[bytes] | None = None
    log_path: Path | None = None
    _log: IO[bytes] | None = None

    def start(self, log_dir: Path | None) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.cpus:
            env["OMP_NUM_THREADS"] = str(len(self.cpus))
        out: int | IO[bytes] | None = None
        if log_dir is not None:
            self.log_path = log_dir / f"{self.name}.log"
            self._log = self.log_path.open("wb")
            out = self._log
        cpus = self.cpus

        def before_exec() -> None:
            die_with_parent()
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(self.cmd, env=env, stdout=out, stderr=subprocess.STDOUT if out else None,
                                      stdin=subprocess.DEVNULL, preexec_fn=before_exec, start_new_session=True)

    @property
    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def signal(self, sig: int) -> None:
        if self.alive:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.popen.pid, sig)  # type: ignore[union-attr]

    def close(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


class ClusterError(RuntimeError):
    pass


def _raise_if(interrupted: Callable[[], bool]) -> None:
    if interrupted():
        raise KeyboardInterrupt


@dataclass
class LocalCluster:
    model: str | None = None
    policy: str | None = None
    num_prefill: int = 1
    num_decode: int = 1
    monolithic: bool = False
    num_workers: int = 1
    host: str = "127.0.0.1"
    port: int = 8000
    cpu_affinity: dict[str, list[int]] = field(default_factory=dict)
    worker_args: list[str] = field(default_factory=list)
    worker_env: dict[str, dict[str, str]] = field(default_factory=dict)  # per process name
    log_dir: Path | None = None
    processes: list[Process] = field(default_factory=list)

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def _cli(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "disagg_worker.cli", *args]

    def _common(self) -> list[str]:
        out = []
        if self.model:
            out += ["--model", self.model]
        if self.policy:
            out += ["--policy", self.policy]
        return out

    def _gpu_share(self) -> str:
        """Each worker's share of a GPU they all land on (ignored on a CPU; a --worker-arg overrides it):
        two workers each taking the default 0.9 of one GPU would not both fit."""
        from disagg_worker.engine.engine import DEFAULT_GPU_MEMORY_UTILIZATION  # torch: imported by start()

        workers = self.num_workers if self.monolithic else self.num_prefill + self.num_decode
        return f"{DEFAULT_GPU_MEMORY_UTILIZATION / max(1, workers):.4f}"

    def _worker(self, name: str, role: str, prefill: list[str]) -> tuple[Process, str]:
        port, http_port = free_port(self.host), free_port(self.host)
        cmd = self._cli("worker", "--role", role, "--host", self.host, "--port", str(port), "--http-port",
                        str(http_port), *self._common(), "--gpu-memory-utilization", self._gpu_share(),
                        *self.worker_args)
        cpus = self.cpu_affinity.get(role)
        if cpus:
            cmd += ["--threads", str(len(cpus))]
        if prefill:
            cmd += ["--prefill-workers", ",".join(prefill)]
        proc = Process(name, cmd, f"http://{self.host}:{http_port}/ready", cpus, self.worker_env.get(name, {}))
        return proc, f"{self.host}:{port}"

    def start(self, timeout: float = 180.0, interrupted: Callable[[], bool] = lambda: False) -> None:
        """Start every process and wait until all are ready; on any error, or once ``interrupted()``
        says so, stop whatever already runs and raise (KeyboardInterrupt for an interruption)."""
        # A signal handler's KeyboardInterrupt can be swallowed by library code it lands in (measured:
        # a Ctrl-C one second into `disagg up` was lost and the cluster came up anyway), so start-up
        # also polls ``interrupted`` between its steps.
        # Build what every worker needs once, here, instead of N times concurrently in the children.
        import disagg_worker.rpc  # noqa: F401 - generates the gRPC stubs if stale
        from disagg_worker.engine.cpu_kernels import load_cpu_kernels

        load_cpu_kernels()
        _raise_if(interrupted)
        if self.log_dir is not None:
            self.log_dir.mkdir(parents=True, exist_ok=True)
        try:
            prefill_addrs: list[str] = []
            decode_addrs: list[str] = []
            if self.monolithic:
                for i in range(self.num_workers):
                    proc, addr = self._worker(f"both-{i}", "both", [])
                    self.processes.append(proc)
                    decode_addrs.append(addr)
            else:
                for i in range(self.num_prefill):
                    proc, addr = self._worker(f"prefill-{i}", "prefill", [])
                    self.processes.append(proc)
                    prefill_addrs.append(addr)
                for i in range(self.num_decode):
                    proc, addr = self._worker(f"decode-{i}", "decode", prefill_addrs)
                    self.processes.append(proc)
                    decode_addrs.append(addr)
            self.prefill_addresses, self.decode_addresses = prefill_addrs, decode_addrs
            for proc in self.processes:
                _raise_if(interrupted)
                proc.start(self.log_dir)
            self._wait_ready(self.processes, timeout, interrupted)
            router_cmd = self._cli("router", "--host", self.host, "--port", str(self.port),
                                   "--decode-workers", ",".join(decode_addrs), *self._common())
            if prefill_addrs:
                router_cmd += ["--prefill-workers", ",".join(prefill_addrs)]
            router = Process("router", router_cmd, f"{self.base_url}/ready", self.cpu_affinity.get("router"))
            self.processes.append(router)
            _raise_if(interrupted)
            router.start(self.log_dir)
            self._wait_ready([router], timeout, interrupted)
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self, procs: list[Process], timeout: float, interrupted: Callable[[], bool]) -> None:
        deadline = time.monotonic() + timeout
        pending = list(procs)
        with httpx.Client(timeout=2.0, trust_env=False) as client:  # 127.0.0.1: never via an HTTP_PROXY
            while pending:
                _raise_if(interrupted)
                for proc in list(pending):
                    if not proc.alive:
                        raise ClusterError(f"{proc.name} exited during start-up (code "
                                           f"{proc.popen.returncode if proc.popen else '?'}):\n{proc.log_tail()}")
                    with contextlib.suppress(httpx.HTTPError):
                        if client.get(proc.ready_url).status_code == 200:
                            pending.remove(proc)
                if pending and time.monotonic() > deadline:
                    tails = "\n".join(f"--- {p.name}:\n{p.log_tail()}" for p in pending)
                    raise ClusterError(f"not ready after {timeout:.0f}s: {', '.join(p.name for p in pending)}\n{tails}")
                if pending:
                    time.sleep(0.2)

    def get(self, name: str) -> Process:
        return next(p for p in self.processes if p.name == name)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM the router first (no new work reaches the workers), then the workers; SIGKILL stragglers."""
        routers = [p for p in self.processes if p.name == "router"]
        workers = [p for p in self.processes if p.name != "router"]
        deadline = time.monotonic() + grace
        for group in (routers, workers):
            for proc in group:
                proc.signal(signal.SIGTERM)
            for proc in group:
                if proc.popen is not None:
                    try:
                        proc.popen.wait(max(0.1, deadline - time.monotonic()))
                    except subprocess.TimeoutExpired:
                        proc.signal(signal.SIGKILL)
                        proc.popen.wait(5)
                proc.close()

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def port_in_use(host: str, port: int) -> str | None:
    """Why ``host:port`` cannot be served on (taken, or no such address), or None if it can now."""
    try:
        with socket.create_server((host, port)):
            return None
    except OSError as exc:
        return exc.strerror or str(exc)


def served_model(base_url: str) -> str | None:
    """The model name the router answers to (what a request's ``model`` must say)."""
    with contextlib.suppress(httpx.HTTPError, KeyError, IndexError, ValueError):
        return str(httpx.get(f"{base_url}/v1/models", timeout=5, trust_env=False).json()["data"][0]["id"])
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="disagg up", description=__doc__)
    ap.add_argument("--model", default=None, help="preset or local HF dir (default: the policy's, tiny-llama)")
    ap.add_argument("--policy", default=None, help="policy YAML (camelCase or seed 001's snake_case)")
    ap.add_argument("--prefill", type=int, default=1, help="prefill workers")
    ap.add_argument("--decode", type=int, default=1, help="decode workers")
    ap.add_argument("--monolithic", action="store_true", help="run role-both workers only")
    ap.add_argument("--workers", type=int, default=1, help="workers in --monolithic mode")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000, help="router port")
    ap.add_argument("--cpu-affinity", action="append", default=[], metavar="ROLE=CPUS",
                    help="pin a role's workers, e.g. prefill=0 decode=1 both=0,1")
    ap.add_argument("--worker-arg", action="append", default=[], help="extra argument for every worker")
    ap.add_argument("--log-dir", type=Path, default=None, help="write each process's log here")
    ap.add_argument("--timeout", type=positive(float), default=300)
    args = ap.parse_args(argv)
    for flag, count, least in (("--prefill", args.prefill, 0), ("--decode", args.decode, 1),
                               ("--workers", args.workers, 1)):
        if count < least:  # with no decode worker the router never gets ready: a 300 s wait for nothing
            ap.error(f"{flag} must be at least {least}, not {count}")
    try:
        affinity = parse_affinity(args.cpu_affinity)
    except ValueError as exc:
        ap.error(str(exc))
    if not 0 < args.port < 65536:
        ap.error(f"--port must be between 1 and 65535, not {args.port}")
    taken = port_in_use(args.host, args.port)
    if taken:  # a router already there would answer the ready check: "up" on someone else's cluster
        ap.error(f"cannot serve on {args.host}:{args.port}: {taken}")
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    for role, cpus in affinity.items():
        if usable is not None and not set(cpus) <= usable:
            ap.error(f"--cpu-affinity {role}: CPUs {sorted(set(cpus) - usable)} are not available "
                     f"(this process may use {sorted(usable)})")
    cluster = LocalCluster(model=args.model, policy=args.policy, num_prefill=args.prefill, num_decode=args.decode,
                           monolithic=args.monolithic, num_workers=args.workers, host=args.host, port=args.port,
                           cpu_affinity=affinity, worker_args=args.worker_arg, log_dir=args.log_dir)
    stop = False
    starting = True

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        first, stop = not stop, True
        # interrupt the start-up waits (start() stops whatever already runs); only once, so a second
        # Ctrl-C cannot cut that clean-up short or escape uncaught after it
        if starting and first:
            raise KeyboardInterrupt

    def run() -> int:
        nonlocal starting
        try:
            cluster.start(args.timeout, interrupted=lambda: stop)
            starting = False
        except ClusterError as exc:
            print(f"disagg up: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            cluster.stop()  # a no-op after start()'s own clean-up; not if the signal came just as it returned
            print("disagg up: interrupted during start-up; everything started was stopped", file=sys.stderr)
            return 130
        shape = (f"{args.workers} monolithic worker(s)" if args.monolithic
                 else f"{args.prefill} prefill + {args.decode} decode workers")
        served = served_model(cluster.base_url) or args.model or "tiny-llama"
        print(f"disagg is up: {cluster.base_url}/v1 ({shape}, model {served!r})", flush=True)
        print(f"  try: curl {cluster.base_url}/v1/completions -H 'Content-Type: application/json' "
              f"-d '{{\"model\": \"{served}\", \"prompt\": \"Hello\", \"max_tokens\": 16}}'", flush=True)
        print("  Ctrl-C stops everything.", flush=True)
        reported: set[str] = set()
        try:
            while not stop:
                time.sleep(0.5)
                for proc in cluster.processes:
                    if not proc.alive and proc.name not in reported:
                        reported.add(proc.name)
                        print(f"disagg up: {proc.name} exited with code {proc.popen.returncode}", file=sys.stderr)
                if "router" in reported:  # nothing reaches the workers any more: not "up"
                    print("disagg up: the router is gone; stopping the cluster", file=sys.stderr)
                    break
        finally:
            cluster.stop()  # first: a closed terminal must not cut the orderly shutdown short
            with contextlib.suppress(OSError):
                print("disagg up: stopping", flush=True)
        return 1 if reported else 0  # a worker or the router died: not a clean run

    signals = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    for sig in signals:
        signal.signal(sig, on_signal)
    try:
        code = run()
    finally:
        # everything is stopped by now: a late Ctrl-C while the interpreter exits must not kill it with
        # SIGINT (the default action once Python's handlers are gone) instead of its exit code
        for sig in signals:
            signal.signal(sig, signal.SIG_IGN)
    if code == 130:
        # Interrupted, and everything is stopped: leave at once. The interpreter's own exit could still
        # end in SIGINT (rc -2, measured about 1 run in 20 with a second Ctrl-C 0.2 s after the first,
        # with SIGINT already ignored): Python kills itself that way when it took a KeyboardInterrupt
        # for unhandled, although ours was handled.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code

