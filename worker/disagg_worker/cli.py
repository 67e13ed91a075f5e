"""The ``disagg`` command line: one entry point that dispatches to each part's own ``main(argv)``.

Subcommands import their part lazily, so ``disagg operator`` never loads torch and ``disagg --help``
is instant.
"""

from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "up": ("disagg_worker.launcher", "start a local cluster: router + prefill + decode workers on 127.0.0.1"),
    "worker": ("disagg_worker.worker_main", "run a prefill, decode or monolithic (both) gRPC worker"),
    "router": ("disagg_worker.router.main", "run the OpenAI-compatible router"),
    "operator": ("disagg_operator.run", "run the Kubernetes operator (kopf)"),
    "generate": ("disagg_worker.generate_cli", "generate text offline with the engine (no servers)"),
    "preset": ("disagg_worker.models.preset_cli", "write a built-in preset as a Hugging Face model directory"),
}
BENCHMARKS: dict[str, tuple[str, str]] = {
    "engine": ("disagg_worker.bench.engine_bench", "engine vs HF generate throughput; prefix-cache TTFT"),
    "transfer": ("disagg_worker.bench.transfer_bench", "KV transfer GB/s vs raw TCP and memcpy"),
    "serve": ("disagg_worker.bench.serve_bench", "open-loop Poisson load against an OpenAI endpoint"),
    "autoscale": ("disagg_operator.bench_autoscale", "planner vs static replicas on a simulated cluster"),
    "oracle": ("disagg_worker.bench.oracle_bench", "greedy agreement with HF generate on any model/device/dtype"),
}


def _usage() -> str:
    lines = ["usage: disagg COMMAND [ARGS]", "", "commands:"]
    lines += [f"  {name:<10} {help_}" for name, (_, help_) in COMMANDS.items()]
    lines += [f"  bench {name:<5}  {help_}" for name, (_, help_) in BENCHMARKS.items()]
    lines += ["", "Run 'disagg COMMAND --help' for a command's options."]
    return "\n".join(lines)


def _run(module: str, argv: list[str]) -> int:
    try:
        mod = importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            print(f"disagg: this installation does not include {module}", file=sys.stderr)
            return 2
        raise
    return int(mod.main(argv) or 0)


def main(argv: list[str] | None = None) -> int:
    try:
        return _dispatch(list(sys.argv[1:] if argv is None else argv))
    except KeyboardInterrupt:
        # A Ctrl-C that lands before a command installs its own handling (``disagg up`` does, once its
        # modules are imported) ends here: a line and the conventional status, not a traceback.
        print("disagg: interrupted", file=sys.stderr)
        return 130


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        if rest and rest[0] in ("-h", "--help", "help"):
            print(_usage())
            return 0
        if not rest or rest[0] not in BENCHMARKS:
            unknown = f"disagg bench: unknown benchmark {rest[0]!r}\n\n" if rest else ""
            print(f"{unknown}{_usage()}", file=sys.stderr)
            return 2
        return _run(BENCHMARKS[rest[0]][0], rest[1:])
    if cmd not in COMMANDS:
        print(f"disagg: unknown command {cmd!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    return _run(COMMANDS[cmd][0], rest)


if __name__ == "__main__":
    sys.exit(main())
