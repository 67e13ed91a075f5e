"""Process-level behaviour of ``disagg up`` and ``disagg worker`` with real processes on 127.0.0.1:
no orphan survives its launcher, Ctrl-C during start-up stops everything at once, a taken gRPC port
is a clear error (never a silent split of the traffic)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from disagg_worker.launcher import LocalCluster, free_port

pytestmark = pytest.mark.e2e


def gone(pid: int) -> bool:
    """Exited (a zombie counts: PID 1 in a container may never reap it)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return True
    return state in ("Z", "X")


def wait_gone(pid: int, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return gone(pid)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_a_child_does_not_outlive_a_killed_launcher(tmp_path: Path) -> None:
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        "from disagg_worker.launcher import Process\n"
        "p = Process('sleeper', [sys.executable, '-c', 'import time; time.sleep(120)'], ready_url='')\n"
        "p.start(None)\n"
        "print(p.popen.pid, flush=True)\n"
        "time.sleep(120)\n")
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert not gone(child)
        parent.kill()  # SIGKILL: no finally, no handler runs in the launcher
        parent.wait(10)
        assert wait_gone(child, 10), "the child outlived its launcher"
    finally:
        parent.kill()
        if child and not gone(child):
            os.kill(child, signal.SIGKILL)


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries ``marker`` (children inherit the launcher's)."""
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes() and not gone(int(environ.parent.name)):
                pids.append(int(environ.parent.name))
        except (OSError, ValueError):
            continue
    return pids


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_ctrl_c_during_start_up_stops_everything_at_once(tmp_path: Path) -> None:
    from disagg_worker.engine.cpu_kernels import load_cpu_kernels

    # built (cached) beforehand: ninja runs each compile job in its own process group, so compilers
    # interrupted mid-build finish on their own; this test is about the router and the workers
    load_cpu_kernels()
    marker = f"disagg-test-{uuid.uuid4().hex}"
    up = subprocess.Popen([sys.executable, "-m", "disagg_worker.cli", "up", "--port", str(free_port()),
                           "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True, env={**os.environ, "DISAGG_TEST_MARKER": marker})
    try:
        deadline = time.monotonic() + 60
        while len(marked_processes(marker)) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)  # launcher + workers started, still loading the model: not ready yet
        up.send_signal(signal.SIGINT)
        time.sleep(0.2)  # an impatient second Ctrl-C: it used to cut the clean-up short or kill the exit
        with contextlib.suppress(ProcessLookupError):
            up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=30)
        assert up.returncode == 130, err
        assert "interrupted during start-up" in err
        deadline = time.monotonic() + 10
        while marked_processes(marker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert marked_processes(marker) == []
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)
        for pid in marked_processes(marker):
            os.kill(pid, signal.SIGKILL)


def test_ctrl_c_while_modules_import_is_a_line_not_a_traceback(tmp_path: Path) -> None:
    """0.2 s in, ``disagg up`` is still importing (before its own handling exists): a Python traceback
    and rc -2 used to end it."""
    up = subprocess.Popen([sys.executable, "-m", "disagg_worker.cli", "up", "--port", str(free_port()),
                           "--log-dir", str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True)
    try:
        time.sleep(0.2)
        up.send_signal(signal.SIGINT)
        _, err = up.communicate(timeout=60)
        assert up.returncode == 130, err
        assert "Traceback" not in err and "interrupted" in err, err
    finally:
        if up.poll() is None:
            os.killpg(up.pid, signal.SIGKILL)


def test_an_interrupted_command_exits_130_with_one_line(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    from disagg_worker import cli

    (tmp_path / "interrupted_command.py").write_text("def main(argv):\n    raise KeyboardInterrupt\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(cli.COMMANDS, "interrupted", ("interrupted_command", "raises KeyboardInterrupt"))
    assert cli.main(["interrupted"]) == 130
    assert capsys.readouterr().err == "disagg: interrupted\n"


def test_start_up_polls_for_an_interruption_and_stops_what_already_runs(tmp_path: Path) -> None:
    """The signal handler's KeyboardInterrupt can be swallowed by library code it lands in (a Ctrl-C one
    second into `disagg up` was lost and the cluster came up anyway), so start-up also polls."""
    polls = 0

    def interrupted() -> bool:
        nonlocal polls
        polls += 1
        return polls > 3  # after the kernels and both workers' starts: while waiting for them

    cluster = LocalCluster(port=free_port(), log_dir=tmp_path)
    try:
        with pytest.raises(KeyboardInterrupt):
            cluster.start(120, interrupted=interrupted)
        assert [p.name for p in cluster.processes] == ["prefill-0", "decode-0"]
        assert all(p.popen is not None and p.popen.poll() is not None for p in cluster.processes)
    finally:
        cluster.stop()


def test_a_taken_grpc_port_is_a_clear_error() -> None:
    """grpcio binds with SO_REUSEPORT by default: without turning that off, a second worker on a taken
    port binds too and the kernel splits the traffic between two processes at random."""
    with socket.socket() as holder:
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        worker = subprocess.run([sys.executable, "-m", "disagg_worker.cli", "worker", "--role", "decode",
                                 "--port", str(port), "--http-port", str(free_port()), "--kv-cache-blocks", "64"],
                                capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stderr[-2000:]
    assert f"cannot bind gRPC port 127.0.0.1:{port}" in worker.stderr


def test_a_taken_http_port_is_a_clear_error_before_the_worker_says_ready() -> None:
    """It used to log "worker ready", serve gRPC, and then exit with uvicorn's status 3."""
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        worker = subprocess.run([sys.executable, "-m", "disagg_worker.cli", "worker", "--role", "decode",
                                 "--port", str(free_port()), "--http-port", str(port), "--kv-cache-blocks", "64"],
                                capture_output=True, text=True, timeout=120)
    assert worker.returncode == 2, worker.stderr[-2000:]
    assert f"cannot bind HTTP port 127.0.0.1:{port}" in worker.stderr
    assert "worker ready" not in worker.stderr


def test_workers_sharing_a_gpu_each_get_a_share_and_a_worker_arg_overrides_it() -> None:
    def share(cmd: list[str]) -> float:
        return float(cmd[len(cmd) - 1 - cmd[::-1].index("--gpu-memory-utilization") + 1])  # the last one wins

    disagg = LocalCluster(num_prefill=2, num_decode=1)
    proc, _ = disagg._worker("decode-0", "decode", [])
    assert share(proc.cmd) == pytest.approx(0.3)
    mono = LocalCluster(monolithic=True, num_workers=1, worker_args=["--gpu-memory-utilization", "0.5"])
    assert share(mono._worker("both-0", "both", [])[0].cmd) == 0.5


@pytest.mark.parametrize(("argv", "message"), [
    (["--decode", "0"], "--decode must be at least 1"),  # the router never got ready: a 300 s wait
    (["--monolithic", "--workers", "0"], "--workers must be at least 1"),
    (["--prefill", "-1"], "--prefill must be at least 0"),
    (["--port", "99999"], "--port must be between 1 and 65535"),  # the router died after the workers loaded
    (["--host", "::1"], "cannot serve on ::1"),  # a socket.gaierror traceback
    (["--cpu-affinity", "prefill=3-1"], "'3-1' names no CPU"),  # an empty set: EINVAL in the child
    (["--cpu-affinity", "decode="], "'' is not a CPU number"),  # "invalid literal for int()"
    (["--cpu-affinity", "decode=0,x"], "'x' is not a CPU number"),
    (["--cpu-affinity", "gpu=0"], "use ROLE=CPUS"),
    (["--cpu-affinity", "prefill=0-99999999999"], "past the kernel's limit"),  # a MemoryError traceback
    (["--cpu-affinity", "prefill=+1"], "'+1' is not a CPU number"),
])
def test_bad_counts_ports_and_hosts_are_refused_before_anything_starts(
        argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    from disagg_worker.launcher import main

    with pytest.raises(SystemExit) as exc:
        main(["--port", str(free_port()), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_a_taken_router_port_is_refused_instead_of_reporting_someone_elses_cluster_up(
        capsys: pytest.CaptureFixture[str]) -> None:
    """The ready check reached whatever answered on the port: a second ``disagg up --port P`` printed
    "disagg is up" for the first one's router while its own died with EADDRINUSE."""
    from disagg_worker.launcher import main

    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(SystemExit) as exc:
        main(["--port", str(taken.getsockname()[1])])
    assert exc.value.code == 2 and "cannot serve on 127.0.0.1" in capsys.readouterr().err


@pytest.mark.parametrize(("command", "argv"), [
    ("worker", ["--role", "both", "--port", "70000"]),  # gRPC wrapped it to 4464 and logged 70000
    ("worker", ["--role", "both", "--http-port", "-1"]),
    ("worker", ["--role", "both", "--log-level", "loud"]),  # a traceback
    ("worker", ["--role", "both", "--threads", "-1"]),  # a traceback
    ("worker", ["--role", "both", "--max-model-len", "0"]),  # silently the model's
    ("worker", ["--role", "both", "--kv-cache-blocks", "0"]),
    ("router", ["--decode-workers", "x:1", "--port", "70000"]),  # a traceback
    ("router", ["--decode-workers", "x:1", "--max-request-bytes", "-5"]),  # every request a 413
    ("router", ["--decode-workers", ""]),  # a router with no worker
    ("router", ["--decode-workers", "x:1", "--stream-idle-timeout", "nan"]),
    ("operator", ["--reconcile-interval", "0"]),  # reconciled in a busy loop
    ("operator", ["--metrics-port", "65536"]),
])
def test_bad_flags_are_usage_errors_naming_the_flag(command: str, argv: list[str],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from disagg_worker import cli

    with pytest.raises(SystemExit) as exc:
        cli.main([command, *argv])
    assert exc.value.code == 2
    assert "error:" in capsys.readouterr().err
