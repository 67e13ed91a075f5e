"""Discover workers and keep their load reports fresh.

A pool is given ``host:port`` entries; each host is resolved again every few seconds, so a Kubernetes
headless Service name (one A record per ready pod) tracks the pods as they come and go. Each
endpoint gets one gRPC channel and is polled with ``Worker.GetLoad``; an endpoint that fails to answer
is marked unhealthy (and skipped by routing) until it answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import socket
import time
from dataclasses import dataclass, field

import grpc

from disagg_worker.routing import WorkerLoad
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.transfer.grpc_stream import prefill_stream

log = logging.getLogger(__name__)

GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 256 << 20),
    ("grpc.max_send_message_length", 256 << 20),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
    ("grpc.http2.max_pings_without_data", 0),
]
# What a worker's server accepts from those clients: a ping every keepalive_time_ms even while it
# sends nothing. The default (5 minutes between pings on a quiet connection, 2 strikes) answered the
# third ping of a stream waiting for its first token with GOAWAY "too_many_pings" and failed it after
# ~30 s, on any channel not also carrying load reports (a retired worker's, finishing its streams).
SERVER_PING_OPTIONS = [("grpc.http2.min_ping_interval_without_data_ms", 5_000)]
# A worker that leaves DNS (scale-down, drain) keeps its channel this long, so the streams it is
# finishing are not cut off by the router; after that they are cancelled.
RETIRE_GRACE_SECONDS = 600.0


def parse_endpoints(spec: str | list[str] | None) -> list[tuple[str, int]]:
    """``"a:1,b:2"`` or ``["a:1", "b:2"]`` -> ``[("a", 1), ("b", 2)]``."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else [s for part in spec for s in part.split(",")]
    out = []
    for item in (i.strip() for i in items):
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"worker address {item!r} must be host:port")
        out.append((host.strip("[]"), int(port)))
    return out


def resolve(host: str, port: int) -> list[str]:
    """Every address a name resolves to (sorted, as ``ip:port``); empty when it does not resolve."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):  # gaierror, or a name the IDNA codec refuses
        return []
    addrs = sorted({f"[{i[4][0]}]:{port}" if i[0] == socket.AF_INET6 else f"{i[4][0]}:{port}" for i in infos})
    return addrs


def _finite(value: float) -> float:
    """A reported time or rate fit for the admission estimate: NaN, inf or negative read as unknown (0)."""
    return value if math.isfinite(value) and value >= 0 else 0.0


@dataclass
class Peer:
    endpoint: str
    channel: grpc.aio.Channel
    load: WorkerLoad
    model: str = ""
    model_fingerprint: str = ""  # empty until its first load report (or from a worker that predates it)
    max_model_len: int = 0
    last_ok: float = 0.0
    # Stubs are made once, while the channel is open: grpcio (1.85) can crash the process (SIGSEGV)
    # building a stub on a channel that was closed meanwhile, e.g. a peer retired between being chosen
    # and being called. A call on a closed channel only raises.
    worker: pb_grpc.WorkerStub = field(init=False)
    decode: pb_grpc.DecodeStub = field(init=False)
    prefill_stream: grpc.aio.UnaryStreamMultiCallable = field(init=False)  # Prefill, its messages unparsed

    def __post_init__(self) -> None:
        self.worker = pb_grpc.WorkerStub(self.channel)
        self.decode = pb_grpc.DecodeStub(self.channel)
        self.prefill_stream = prefill_stream(self.channel)


class PeerPool:
    def __init__(self, name: str, spec: str | list[str] | None, include_prefix_hashes: bool = False,
                 poll_interval: float = 0.25, resolve_interval: float = 5.0, timeout: float = 2.0) -> None:
        self.name = name
        self.targets = parse_endpoints(spec)
        self.include_prefix_hashes = include_prefix_hashes
        self.poll_interval = poll_interval
        self.resolve_interval = resolve_interval
        self.timeout = timeout
        self.peers: dict[str, Peer] = {}
        self._task: asyncio.Task[None] | None = None
        self._last_resolve = 0.0
        self._resolved: dict[tuple[str, int], set[str]] = {}  # each target's last non-empty answer
        self._polling: dict[str, asyncio.Task[None]] = {}  # endpoint -> its load poll in flight
        self.first_poll = asyncio.Event()
        self._retiring: set[asyncio.Task[None]] = set()

    def __bool__(self) -> bool:
        return bool(self.targets)

    def healthy(self) -> list[Peer]:
        return [p for p in self.peers.values() if p.load.healthy and not p.load.draining]

    def get(self, endpoint: str) -> Peer | None:
        return self.peers.get(endpoint)

    def mark_unhealthy(self, endpoint: str) -> None:
        peer = self.peers.get(endpoint)
        if peer is not None:
            peer.load.healthy = False

    async def start(self) -> None:
        if self.targets:
            await self._refresh_endpoints()
            await self.poll_once()
            self._task = asyncio.create_task(self._loop(), name=f"peers-{self.name}")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        for task in list(self._polling.values()):
            task.cancel()
        await asyncio.gather(*self._polling.values(), return_exceptions=True)
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        for peer in self.peers.values():
            await peer.channel.close()
        self.peers.clear()

    def _retire(self, peer: Peer) -> None:
        """Stop routing to ``peer`` now; close its channel once its calls end (or after the grace)."""
        task = asyncio.create_task(peer.channel.close(grace=RETIRE_GRACE_SECONDS), name=f"retire-{peer.endpoint}")
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.poll_interval)
            try:
                if time.monotonic() - self._last_resolve > self.resolve_interval:
                    await self._refresh_endpoints()
                self._poll_in_background()
            except Exception:  # keep polling whatever one round did
                log.exception("polling %s workers failed", self.name)

    def _poll_in_background(self) -> None:
        """Ask every peer whose last poll has ended: one that hangs (a stopped pod, a black-holed address)
        holds up its own next report until its timeout, not everybody else's (they went 8x staler)."""
        for peer in list(self.peers.values()):
            if peer.endpoint in self._polling:
                continue
            task = asyncio.create_task(self._poll(peer), name=f"poll-{peer.endpoint}")
            self._polling[peer.endpoint] = task
            task.add_done_callback(lambda _, endpoint=peer.endpoint: self._polling.pop(endpoint, None))

    async def _refresh_endpoints(self) -> None:
        self._last_resolve = time.monotonic()
        for host, port in self.targets:
            addrs = set(await asyncio.to_thread(resolve, host, port))
            if addrs:  # a name that stops resolving keeps its last endpoints (a DNS hiccup), name by name
                self._resolved[host, port] = addrs
        found = set().union(*self._resolved.values())
        for endpoint in found - self.peers.keys():
            channel = grpc.aio.insecure_channel(endpoint, options=GRPC_OPTIONS)
            self.peers[endpoint] = Peer(endpoint, channel, WorkerLoad(endpoint, healthy=False))
        for endpoint in self.peers.keys() - found:
            self._retire(self.peers.pop(endpoint))

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(p) for p in list(self.peers.values())))
        self.first_poll.set()

    async def _poll(self, peer: Peer) -> None:
        routed_before = peer.load.pending  # requests routed while this report is in flight stay counted
        try:
            report = await peer.worker.GetLoad(pb.LoadRequest(include_prefix_hashes=self.include_prefix_hashes),
                                               timeout=self.timeout)
        except (grpc.aio.AioRpcError, asyncio.TimeoutError) as exc:
            if peer.load.healthy:
                detail = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else "timeout"
                log.warning("%s worker %s stopped answering: %s", self.name, peer.endpoint, detail)
            peer.load.healthy = False
            return
        load = peer.load
        load.num_waiting, load.num_running = report.num_waiting, report.num_running
        load.num_awaiting_kv, load.kv_usage = report.num_awaiting_kv, report.kv_usage
        load.block_size = report.block_size or load.block_size
        if self.include_prefix_hashes:
            load.prefix_hashes = frozenset(report.prefix_hashes)
        load.avg_prefill_seconds = _finite(report.avg_prefill_seconds)
        load.avg_decode_step_seconds = _finite(report.avg_decode_step_seconds)
        load.prefill_tokens_per_second = _finite(report.prefill_tokens_per_second)
        load.draining = report.draining
        load.pending = max(0, load.pending - routed_before)
        load.healthy = True
        peer.model, peer.max_model_len, peer.last_ok = report.model, report.max_model_len, time.monotonic()
        peer.model_fingerprint = report.model_fingerprint
