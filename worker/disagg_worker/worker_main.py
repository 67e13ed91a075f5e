"""``disagg worker``: one prefill, decode or monolithic (``both``) worker process.

gRPC on ``--port`` (Decode.Generate for decode/both, Prefill.Prefill for prefill, Worker.GetLoad for
all); HTTP on ``--http-port`` (/metrics, /health, /ready, /drain). SIGTERM drains: no new requests,
running ones finish (up to the policy's drain timeout), then the process exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import threading
import time
from collections.abc import Iterator

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1.health import aio as health_aio

from disagg_worker.argtypes import log_level, port, positive
from disagg_worker.engine.async_engine import AsyncEngine
from disagg_worker.engine.engine import DEFAULT_GPU_MEMORY_UTILIZATION, EngineConfig, LLMEngine
from disagg_worker.models.loader import ModelLoadError
from disagg_worker.policy import Policy, PolicyError, load_policy
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server.decode_service import DecodeServicer
from disagg_worker.server.http import build_app
from disagg_worker.server.peers import GRPC_OPTIONS, SERVER_PING_OPTIONS, PeerPool
from disagg_worker.server.prefill_service import PrefillServicer
from disagg_worker.server.runtime import WorkerRuntime
from disagg_worker.transfer.grpc_stream import add_prefill_servicer
from disagg_worker.transfer.tcp import KvReceiver

log = logging.getLogger("disagg.worker")
# After the drain timeout, what the rest of the shutdown (gRPC grace, closing) may take before the process exits anyway.
SHUTDOWN_EXTRA_SECONDS = 30.0


class WorkerServicer(pb_grpc.WorkerServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime

    async def GetLoad(self, request: pb.LoadRequest, context: grpc.aio.ServicerContext) -> pb.LoadReport:
        if not self.rt.engine.running:  # frozen numbers would keep requests coming to a dead engine
            await context.abort(grpc.StatusCode.UNAVAILABLE, "the engine is not running")
        if self.rt.engine.stuck:
            await context.abort(grpc.StatusCode.UNAVAILABLE,
                                f"the engine's step has run for {self.rt.engine.step_seconds:.0f} s")
        return self.rt.load_report(request.include_prefix_hashes)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="disagg worker", description=__doc__)
    ap.add_argument("--role", choices=["prefill", "decode", "both"], required=True)
    ap.add_argument("--model", default=None, help="preset name, local HF dir, or cached hub id (default tiny-llama)")
    ap.add_argument("--policy", default=None, help="policy YAML (camelCase, or seed 001's snake_case)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=port, default=50051, help="gRPC port")
    ap.add_argument("--http-port", type=port, default=8081, help="metrics/health port")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--max-batch-tokens", type=positive(int), default=512, help="token budget per engine step")
    ap.add_argument("--max-batch-size", type=positive(int), default=128, help="most requests in the continuous batch")
    ap.add_argument("--kv-cache-blocks", type=positive(int), default=None)
    ap.add_argument("--kv-cache-bytes", type=positive(int), default=None)
    ap.add_argument("--gpu-memory-utilization", type=fraction, default=DEFAULT_GPU_MEMORY_UTILIZATION,
                    help="share of the GPU's memory this worker may use, weights and KV cache together "
                         f"(default {DEFAULT_GPU_MEMORY_UTILIZATION}; workers sharing a GPU need shares that add "
                         "up to at most 1)")
    ap.add_argument("--max-model-len", type=positive(int), default=None)
    ap.add_argument("--prefill-workers", default=None,
                    help="decode/both: comma list of prefill workers host:port (a name may resolve to many)")
    ap.add_argument("--kv-port", type=port, default=0, help="tcp KV transport: receiver port (0 = any free port)")
    ap.add_argument("--advertise-host", default=None,
                    help="address prefill workers use to reach this worker's KV port (default: --host, or the "
                         "host's IP when --host is 0.0.0.0)")
    ap.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    ap.add_argument("--no-prefix-caching", action="store_true")
    ap.add_argument("--log-level", type=log_level, default="INFO")
    return ap


def fraction(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


def advertise_host(args: argparse.Namespace) -> str:
    if args.advertise_host:
        return args.advertise_host
    if args.host in ("0.0.0.0", "::", ""):
        return socket.gethostbyname(socket.gethostname())  # the pod IP on Kubernetes
    return args.host


def _bind(args: argparse.Namespace, policy: Policy) -> tuple[grpc.aio.Server, int, socket.socket, KvReceiver | None]:
    """Every port the worker listens on, bound before the model loads: a taken one is a clear error at
    once, not after minutes of loading a large model (or, for HTTP, after "worker ready")."""
    # grpcio sets SO_REUSEPORT by default: a second worker on a taken port would bind and silently
    # split the traffic with the first one
    server = grpc.aio.server(options=[*GRPC_OPTIONS, *SERVER_PING_OPTIONS, ("grpc.so_reuseport", 0)])
    try:
        bound = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError:  # grpcio raises where older versions returned 0
        bound = 0
    if bound == 0:
        raise OSError(f"cannot bind gRPC port {args.host}:{args.port} (in use?)")
    family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
    try:
        http_sock = socket.create_server((args.host, args.http_port), family=family)
    except OSError as exc:
        raise OSError(f"cannot bind HTTP port {args.host}:{args.http_port}: {exc.strerror or exc}") from None
    kv_receiver = None
    if args.role in ("decode", "both") and policy.kv_transfer.backend == "tcp":
        try:
            kv_receiver = KvReceiver(args.host, args.kv_port, advertise_host(args))
        except OSError as exc:
            raise OSError(f"cannot bind KV port {args.host}:{args.kv_port}: {exc.strerror or exc}") from None
    return server, bound, http_sock, kv_receiver


async def serve(args: argparse.Namespace) -> int:
    policy = load_policy(args.policy)
    model_ref = args.model or policy.model.ref
    server, grpc_port, http_sock, kv_receiver = _bind(args, policy)
    config = EngineConfig(model=model_ref, device=args.device, dtype=args.dtype,
                          block_size=policy.cache.block_size, num_kv_blocks=args.kv_cache_blocks,
                          kv_cache_bytes=args.kv_cache_bytes, gpu_memory_utilization=args.gpu_memory_utilization,
                          max_num_seqs=args.max_batch_size,
                          max_num_batched_tokens=args.max_batch_tokens, max_model_len=args.max_model_len,
                          enable_prefix_caching=policy.cache.reuse_prefix and not args.no_prefix_caching)
    engine = await asyncio.to_thread(LLMEngine, config)
    warm_seconds = await asyncio.to_thread(engine.warm_up)  # before "ready": the first request pays nothing
    log.info("warmed up in %.0f ms", warm_seconds * 1000)
    async_engine = AsyncEngine(engine)
    async_engine.start()
    runtime = WorkerRuntime(async_engine, args.role, policy, model_ref)
    runtime.start()
    prefill_pool = PeerPool("prefill", args.prefill_workers if args.role != "prefill" else None)
    await prefill_pool.start()

    pb_grpc.add_WorkerServicer_to_server(WorkerServicer(runtime), server)
    if args.role in ("decode", "both"):
        pb_grpc.add_DecodeServicer_to_server(DecodeServicer(runtime, prefill_pool, kv_receiver), server)
    if args.role in ("prefill", "both"):
        add_prefill_servicer(PrefillServicer(runtime), server)
    # grpc.health.v1, for Kubernetes gRPC probes and grpc_health_probe. The asyncio servicer: the
    # blocking one holds a thread of the loop's default executor per Watch stream, and a few watchers
    # starved every to_thread call (DNS polling of peers, KV chunk encoding)
    health = health_aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health, server)
    for service in ("", "disagg.v1.Worker", "disagg.v1.Decode", "disagg.v1.Prefill"):
        await health.set(service, health_pb2.HealthCheckResponse.SERVING)
    # before the first request can arrive: from then on a SIGTERM drains (earlier, it just ends the load)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await server.start()
    http = _DrainAwareServer(uvicorn.Config(build_app(runtime), host=args.host, port=args.http_port,
                                            log_level="warning", lifespan="off"))
    http_task = asyncio.create_task(http.serve(sockets=[http_sock]))
    log.info("%s worker ready: model %s, gRPC %s:%d, HTTP %s:%d, %d KV blocks (%d MiB)%s", args.role, model_ref,
             args.host, grpc_port, args.host, http_sock.getsockname()[1], engine.num_blocks,
             engine.runner.kv.nbytes >> 20,
             ", CPU attention kernel" if engine.runner.kernel is not None else "")

    await stop.wait()
    log.info("draining before exit")
    left = runtime.drain_left(policy.autoscale.drain_timeout_seconds)  # a preStop /drain may have used some
    # Whatever hangs in the shutdown below, the process ends: a worker left running after its launcher
    # or pod is gone holds its ports and memory for good.
    watchdog = threading.Timer(left + SHUTDOWN_EXTRA_SECONDS, _exit_now)
    watchdog.daemon = True
    watchdog.start()
    await health.enter_graceful_shutdown()
    drain_deadline = time.monotonic() + left
    await runtime.drain(left)
    await server.stop(grace=max(2.0, drain_deadline - time.monotonic()))
    http.should_exit = True
    with contextlib.suppress(Exception):
        await asyncio.wait_for(http_task, 5)
    await prefill_pool.stop()
    if kv_receiver is not None:
        kv_receiver.close()
    await runtime.stop()
    await async_engine.stop()
    return 0


def _exit_now() -> None:
    log.error("shutdown did not finish %ss after the drain timeout: exiting", SHUTDOWN_EXTRA_SECONDS)
    logging.shutdown()
    os._exit(1)


class _DrainAwareServer(uvicorn.Server):
    """uvicorn installs its own SIGTERM/SIGINT handlers and would close /ready, /metrics and /drain the
    moment the signal arrives; the worker stops it itself, after the drain."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=f"%(asctime)s {args.role}[{os.getpid()}] "
                        "%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        return asyncio.run(serve(args))
    except (PolicyError, ModelLoadError, OSError, ValueError) as exc:
        print(f"disagg worker: {exc}", file=sys.stderr)
        return 2
