"""The "tcp" KV transport: chunks on a raw socket from the prefill worker to the decode worker.

The ``Prefill`` RPC stays the control channel (it carries ``kv_endpoint`` and ``transfer_token`` and
returns ``PrefillDone``); the bulk bytes skip protobuf and gRPC's copies. The decode worker runs one
``KvReceiver`` (a listening socket and a thread per connection): a transfer starts with its token,
then frames ``header | K bytes | V bytes | checksum``; the prefill side pools connections, so a connection
carries transfers one after another. On CPU pools both ends skip every copy
of their own: the sender ``sendmsg``s straight from the pool's blocks and the receiver
``recvmsg_into``s straight into the blocks reserved for the request (``PoolSink``), so the only
extra pass over the bytes is the checksum on each side. It streams with the bytes, ``PIECE_BYTES`` at
a time, so it reads them from the core's cache rather than from memory: each side hashes a piece just
after the kernel copied it (the sender once it is sent, the receiver once it arrived), and the
checksum trails the frame. Each frame is checked (size, coverage) before a byte lands.

Wire format (little endian), per transfer: preamble ``b"DKV4"`` + u32 token length + token; frames
``header | K bytes | V bytes | u64 checksum``, the header ``u32 seq, u32 first_block, u32 num_blocks,
u32 layer_start, u32 num_layers, u64 k_bytes, u64 v_bytes`` and the checksum ``chunk_checksum`` (the
placement fields, then K, then V); a header with ``num_blocks == 0`` ends the transfer, and the
receiver answers a transfer it verified and installed with one byte ``0x00`` (a failed one: end of
stream). Only an acknowledged connection goes back to the sender's pool.

A prefill worker that cannot connect to the receiver (``KvPortUnreachable``: nothing was sent) sends
that transfer's chunks on the ``Prefill`` stream instead, as the "grpc" transport does, and flags it
in ``PrefillDone.kv_on_stream``; the pool refuses that endpoint at once for ``UNREACHABLE_RETRY_SECONDS``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import secrets
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from disagg_worker.engine.kv_cache import KVLayout
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, chunk_hasher
from disagg_worker.transfer.grpc_stream import Coverage
from disagg_worker.transfer.sinks import KvSink

log = logging.getLogger(__name__)
# 4: the checksum trails the frame (3: it covers the placement; 2: pooled connections, the ack byte)
MAGIC = b"DKV4"
HEADER = struct.Struct("<IIIIIQQ")
TRAILER = struct.Struct("<Q")
IOV_BATCH = 64  # buffers per sendmsg/recvmsg_into call (the kernel allows 1024)
# Bytes hashed and moved per step: few enough to be still in cache when hashed (xxh3 measured 32 GB/s
# from cache, 9 GB/s from memory here), many enough to keep the per-call cost small (128 KiB pieces
# measured 35% slower than 0.5-2 MiB on 2 cores; in an A/B at 256 MiB, 1 MiB pieces moved 1.9-2.2 GB/s
# where hashing each 4 MiB chunk whole before sending it moved 1.4-2.0).
PIECE_BYTES = 1 << 20
ACK = b"\x00"  # the receiver's answer to a transfer it verified and installed
ACCEPT_RETRY_SECONDS = 0.1
# A connection with no transfer for this long is closed by the receiver: each holds a thread. Senders
# retire pooled connections after 60 s idle (KvConnectionPool), well before, so none is cut in use.
RECEIVER_IDLE_SECONDS = 180.0
# Each connection holds a thread: past this many, a new one is closed at once (its sender falls back
# to local prefill) instead of a port scan or a runaway sender exhausting the decode worker's threads.
# Prefill workers keep at most 4 idle connections each, so this allows ~250 prefill workers.
MAX_RECEIVER_CONNECTIONS = 1024
# A decode worker's KV port that does not answer within this (a firewall or NetworkPolicy that lets
# only the gRPC port through drops the SYN) costs a transfer no more than this before the chunks go on
# the Prefill stream instead; the transfer's own deadline (30 s by default) would have been spent whole.
CONNECT_TIMEOUT_SECONDS = 2.0
# ...and the port is not tried again for this long: the transfers meanwhile go on the stream at once.
UNREACHABLE_RETRY_SECONDS = 30.0


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise TransferError("KV connection closed mid-frame")
        got += n


def _recv_preamble(sock: socket.socket) -> str | None:
    """The next transfer's token, or None if the connection closed cleanly before one began."""
    pre = bytearray(8)
    first = sock.recv_into(pre, 8)
    if first == 0:
        return None
    _recv_exact(sock, memoryview(pre)[first:])
    if pre[:4] != MAGIC:
        raise TransferError("not a disagg KV connection")
    token_len = struct.unpack("<I", pre[4:])[0]
    if token_len > 256:
        raise TransferError("bad transfer token")
    token = bytearray(token_len)
    _recv_exact(sock, memoryview(token))
    return token.decode()


def in_pieces(views: Iterable[memoryview], limit: int) -> Iterator[list[memoryview]]:
    """``views`` regrouped, in order, into lists of at most ``limit`` bytes (large views are sliced)."""
    if limit <= 0:
        raise ValueError(f"piece size must be positive, not {limit}")
    piece: list[memoryview] = []
    size = 0
    for view in views:
        off = 0
        while off < len(view):
            n = min(len(view) - off, limit - size)
            piece.append(view[off:off + n])
            size += n
            off += n
            if size == limit:
                yield piece
                piece, size = [], 0
    if piece:
        yield piece


def move_views(op: Callable[[list[memoryview]], int], views: list[memoryview]) -> None:
    """Run ``op`` (a scatter-gather ``sendmsg`` or ``recvmsg_into``) until every byte of ``views`` moved.

    One call may move fewer bytes than asked; batches stay far below the kernel's IOV_MAX.
    """
    views = [v for v in views if len(v)]
    i, off = 0, 0
    while i < len(views):
        n = op([views[i][off:], *views[i + 1:i + IOV_BATCH]])
        if n == 0:
            raise TransferError("KV connection closed mid-frame")
        while n:
            left = len(views[i]) - off
            if n < left:
                off, n = off + n, 0
            else:
                n, i, off = n - left, i + 1, 0


@dataclass
class PendingTransfer:
    """A registered incoming transfer: where its chunks go and how to report the outcome.

    ``stop()`` is the fence before the request's blocks are freed: after it returns, the data plane
    never writes into them again (a late or cut-off sender cannot touch reused blocks).
    """

    request_id: str
    layout: KVLayout
    coverage: Coverage
    sink: KvSink
    verify: bool
    loop: asyncio.AbstractEventLoop
    # the negotiated chunk size: a frame claiming more is refused before anything is allocated for it
    max_frame_bytes: int | None = None
    finished: asyncio.Future[int] = field(init=False)  # total bytes, or TransferError
    attached: bool = field(init=False, default=False)  # a connection came for it (the data plane is involved)
    first_frame_at: float | None = field(init=False, default=None)  # time.monotonic() of the first frame
    _conn: socket.socket | None = field(init=False, default=None)
    _stopped: bool = field(init=False, default=False)
    _state_lock: threading.Lock = field(init=False, default_factory=threading.Lock)  # _conn and _stopped
    _write_lock: threading.Lock = field(init=False, default_factory=threading.Lock)  # held while writing blocks

    def __post_init__(self) -> None:
        self.finished = self.loop.create_future()
        # a failure nobody awaits any more (the request went away first) is not an unhandled error
        self.finished.add_done_callback(lambda f: f.cancelled() or f.exception())

    def resolve(self, result: int | BaseException) -> None:
        def set_() -> None:
            if self.finished.done():
                return
            if isinstance(result, BaseException):
                self.finished.set_exception(result)
            else:
                self.finished.set_result(result)
        with contextlib.suppress(RuntimeError):  # the loop already closed (worker shutting down)
            self.loop.call_soon_threadsafe(set_)

    def attach(self, conn: socket.socket) -> bool:
        """Bind the one connection that may deliver this transfer; False once stopped or already bound."""
        with self._state_lock:
            if self._stopped or self._conn is not None:
                return False
            self._conn = conn
            self.attached = True
            return True

    def detach(self) -> None:
        """The transfer is complete and its connection moves on to the next one."""
        with self._state_lock:
            self._conn = None

    @contextlib.contextmanager
    def writing(self) -> Iterator[None]:
        """Hold while writing into the request's blocks; refuses once ``stop()`` began."""
        with self._write_lock:
            if self._stopped:
                raise TransferError("transfer stopped")
            yield

    def recv_into(self, conn: socket.socket, views: list[memoryview]) -> None:
        """Receive into the sink's views; under the write lock only where they are the request's blocks."""
        def guarded(batch: list[memoryview]) -> int:
            with self.writing():
                return conn.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]

        def staged(batch: list[memoryview]) -> int:
            if self._stopped:
                raise TransferError("transfer stopped")
            return conn.recvmsg_into(batch, 0, socket.MSG_WAITALL)[0]

        move_views(guarded if self.sink.in_place else staged, views)

    def stop(self) -> None:
        """Cut the connection and wait out a write in progress (milliseconds: the socket is shut)."""
        with self._state_lock:  # shut while still ours: after detach() the connection serves another transfer
            self._stopped = True
            if self._conn is not None:
                with contextlib.suppress(OSError):
                    self._conn.shutdown(socket.SHUT_RDWR)
        with self._write_lock:
            pass


class KvReceiver:
    """Decode side: accepts KV connections on ``host:port`` and installs frames for registered tokens."""

    def __init__(self, host: str, port: int = 0, advertise_host: str | None = None,
                 max_connections: int = MAX_RECEIVER_CONNECTIONS) -> None:
        self._sock = socket.create_server((host, port))
        self.max_connections = max_connections
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"{advertise_host or host}:{self.port}"
        self._pending: dict[str, PendingTransfer] = {}
        self._conns: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False
        self._thread = threading.Thread(target=self._accept_loop, name="kv-receiver", daemon=True)
        self._thread.start()

    def register(self, transfer: PendingTransfer) -> str:
        token = secrets.token_hex(16)
        with self._lock:
            self._pending[token] = transfer
        return token

    def unregister(self, token: str) -> None:
        with self._lock:
            self._pending.pop(token, None)

    def close(self) -> None:
        """Stop listening and cut every connection (their senders drop them; transfers in flight fail)."""
        self._closed = True
        with contextlib.suppress(OSError):  # wakes the thread blocked in accept(); close() alone does not
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError as exc:
                if self._closed:
                    return
                # out of file descriptors and the like: the listener must outlive it, or every later
                # transfer on a new connection would wait out its deadline
                log.warning("KV receiver cannot accept a connection (%s); retrying", exc)
                time.sleep(ACCEPT_RETRY_SECONDS)
                continue
            with self._lock:
                full = len(self._conns) >= self.max_connections
            if full:
                log.warning("KV receiver has %d connections open, its limit: closed a new one", self.max_connections)
                conn.close()
                continue
            try:
                conn.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)  # a vanished peer frees its thread
                with self._lock:
                    self._conns.add(conn)
                threading.Thread(target=self._serve, args=(conn,), name="kv-conn", daemon=True).start()
            except (OSError, RuntimeError) as exc:  # no thread for it: refuse this connection, keep listening
                log.warning("KV receiver dropped a connection: %s", exc)
                with self._lock:
                    self._conns.discard(conn)
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        """Receive transfers one after another on one connection (senders pool them); an error closes it."""
        try:
            with conn:
                self._serve_transfers(conn)
        finally:
            with self._lock:
                self._conns.discard(conn)

    def _serve_transfers(self, conn: socket.socket) -> None:
        while not self._closed:
            transfer: PendingTransfer | None = None
            try:
                conn.settimeout(RECEIVER_IDLE_SECONDS)  # between transfers; a transfer has its own deadline
                token = _recv_preamble(conn)
                if token is None or self._closed:  # the sender closed it between transfers, or we did
                    return
                conn.settimeout(None)
                with self._lock:  # a token is good for one connection
                    transfer = self._pending.pop(token, None)
                if transfer is None or not transfer.attach(conn):
                    transfer = None
                    raise TransferError("unknown, expired or stopped transfer token")
                total = self._receive_frames(conn, transfer)
                transfer.detach()  # the connection outlives this transfer: its stop() must not cut it
                transfer.resolve(total)
                conn.sendall(ACK)  # only now may the sender reuse the connection
            except Exception as exc:  # every failure ends the transfer explicitly: decode then falls back
                with contextlib.suppress(OSError):  # the sender sees end-of-stream, not the ack
                    conn.shutdown(socket.SHUT_RDWR)
                if transfer is not None:
                    transfer.resolve(exc if isinstance(exc, TransferError) else TransferError(str(exc)))
                elif not isinstance(exc, OSError):
                    log.warning("rejected a KV connection: %s", exc)
                return

    @staticmethod
    def _receive_frames(conn: socket.socket, t: PendingTransfer) -> int:
        """Receive each frame into the sink, hashing each piece just after it arrived (still in cache),
        then check the trailing checksum and commit (a helper thread that verified chunk i while chunk
        i+1 arrived measured slower on 2 cores)."""
        header = bytearray(HEADER.size)
        trailer = bytearray(TRAILER.size)
        lay = t.layout
        total = 0
        while True:
            _recv_exact(conn, memoryview(header))
            seq, first_block, num_blocks, layer_start, num_layers, kn, vn = HEADER.unpack(header)
            if num_blocks == 0:
                if not t.coverage.complete:
                    raise TransferError("KV transfer incomplete: some blocks or layers never arrived")
                return total
            if t.max_frame_bytes is not None and kn + vn > max(t.max_frame_bytes, 2 * lay.kv_bytes(1, 1)):
                raise TransferError(f"frame {seq} has {kn}+{vn} bytes, over the {t.max_frame_bytes}-byte chunk size")
            expected = lay.kv_bytes(num_blocks, num_layers)
            if kn != expected or vn != expected:
                raise TransferError(f"frame {seq} has {kn}+{vn} bytes, {num_layers} layers x {num_blocks} "
                                    f"blocks need {expected} each")
            t.coverage.add(first_block, num_blocks, layer_start, num_layers)  # rejects out-of-range frames
            if t.first_frame_at is None:
                t.first_frame_at = time.monotonic()
            spec = ChunkSpec(seq, first_block, num_blocks, layer_start, num_layers)
            k, v = t.sink.views(spec)
            hasher = chunk_hasher(spec)
            for piece in in_pieces([*k, *v], PIECE_BYTES):
                t.recv_into(conn, piece)
                if t.verify:
                    for part in piece:
                        hasher.update(part)
            _recv_exact(conn, memoryview(trailer))
            if t.verify and hasher.intdigest() != TRAILER.unpack(trailer)[0]:
                raise TransferError(f"checksum mismatch on chunk {seq}")
            with t.writing():
                t.sink.commit(spec)
            total += kn + vn


ChunkViews = Callable[[ChunkSpec, int], tuple[list[memoryview], list[memoryview]]]


class KvPortUnreachable(OSError):
    """No connection to the decode worker's KV receiver: nothing was sent, so the chunks can go on the
    Prefill stream instead."""


class KvSenderConnection:
    """Prefill side: a connection to a decode worker's receiver, carrying one transfer at a time."""

    def __init__(self, endpoint: str, timeout: float, connect_timeout: float = CONNECT_TIMEOUT_SECONDS) -> None:
        host, _, port = endpoint.rpartition(":")
        self.endpoint = endpoint
        try:
            self._sock = socket.create_connection((host.strip("[]"), int(port)),
                                                  timeout=min(timeout, connect_timeout))
        except (OSError, ValueError) as exc:  # refused, dropped, no route, or an endpoint that is no host:port
            raise KvPortUnreachable(f"cannot connect to the KV port {endpoint}: {exc}") from None
        self._sock.settimeout(timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    def alive(self) -> bool:
        """Not closed by the receiver (it closes a connection after a failed transfer, or when it exits)."""
        try:
            readable, _, _ = select.select([self._sock], [], [], 0)
            # an idle connection has nothing to read; readable means end of stream (or junk: drop it too)
            return not readable
        except (OSError, ValueError):
            return False

    def send(self, spec: ChunkSpec, k: list[memoryview], v: list[memoryview], corrupt: bool = False) -> int:
        """One frame, hashing each piece just after it is sent, while it is still in cache (the kernel's
        copy reads it from memory at least as fast as the hash would: copy-then-hash measured 9.2 GB/s
        of a cold pool on one core here, hash-then-copy 7.8); ``corrupt`` flips the checksum (fault
        injection)."""
        kn, vn = sum(len(x) for x in k), sum(len(x) for x in v)
        self._sock.sendall(HEADER.pack(spec.seq, spec.first_block, spec.num_blocks, spec.layer_start,
                                       spec.num_layers, kn, vn))
        hasher = chunk_hasher(spec)
        for piece in in_pieces([*k, *v], PIECE_BYTES):
            move_views(self._sock.sendmsg, piece)  # scatter-gather: straight from the pool, no staging copy
            for part in piece:
                hasher.update(part)
        self._sock.sendall(TRAILER.pack(hasher.intdigest() ^ int(corrupt)))
        return kn + vn

    def send_all(self, token: str, specs: list[ChunkSpec], chunk_views: ChunkViews,
                 before_chunk: Callable[[ChunkSpec], None] | None = None, corrupt_seq: int | None = None) -> int:
        """One transfer: the token, every chunk (``send``), then the end frame and the receiver's
        acknowledgement.

        ``chunk_views`` returns byte views of a chunk's K and V: views into the pool, or into staging
        slot ``i % 2`` it exported into. ``before_chunk`` runs before each send (fault injection in tests).
        A helper thread that checksummed chunk i+1 while chunk i was sent measured slower on 2 cores.
        """
        raw = token.encode()
        self._sock.sendall(MAGIC + struct.pack("<I", len(raw)) + raw)
        total = 0
        for i, spec in enumerate(specs):
            k, v = chunk_views(spec, i % 2)
            if before_chunk is not None:
                before_chunk(spec)
            total += self.send(spec, k, v, corrupt=spec.seq == corrupt_seq)
        self.finish()
        return total

    def finish(self) -> None:
        """End the transfer and wait (under the socket's timeout) until the receiver has verified it."""
        self._sock.sendall(HEADER.pack(0, 0, 0, 0, 0, 0, 0))
        if self._sock.recv(1) != ACK:
            raise TransferError("the decode worker did not accept the KV transfer")

    def settimeout(self, timeout: float) -> None:
        self._sock.settimeout(timeout)

    def close(self) -> None:
        """Shut, then close: a sender thread blocked in ``sendmsg`` wakes and fails at once."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        with contextlib.suppress(OSError):
            self._sock.close()


class KvConnectionPool:
    """Prefill side: idle connections to decode workers, reused across transfers.

    A reused connection skips the handshake and keeps the window TCP has grown, which is most of the
    fixed cost of a small transfer. Only a connection whose transfer the receiver acknowledged comes
    back; one the receiver has closed since (a restart) is dropped when next taken, and one idle for
    ``idle_seconds`` is closed. An endpoint that could not be connected to is refused at once
    (``KvPortUnreachable``) for ``retry_seconds``, rather than each transfer waiting for its connect
    to fail.
    """

    def __init__(self, max_idle_per_endpoint: int = 4, idle_seconds: float = 60.0,
                 retry_seconds: float = UNREACHABLE_RETRY_SECONDS) -> None:
        self.max_idle, self.idle_seconds, self.retry_seconds = max_idle_per_endpoint, idle_seconds, retry_seconds
        self._idle: dict[str, list[tuple[float, KvSenderConnection]]] = {}
        self._unreachable: dict[str, tuple[float, str]] = {}  # endpoint -> (when its connect failed, why)
        self._lock = threading.Lock()

    def _take_expired(self, now: float) -> list[KvSenderConnection]:
        expired = []
        for endpoint in list(self._idle):
            keep = [(t, c) for t, c in self._idle[endpoint] if now - t < self.idle_seconds]
            expired += [c for t, c in self._idle[endpoint] if now - t >= self.idle_seconds]
            if keep:
                self._idle[endpoint] = keep
            else:
                del self._idle[endpoint]
        return expired

    def acquire(self, endpoint: str, timeout: float) -> KvSenderConnection:
        """A connection to ``endpoint``; raises ``KvPortUnreachable`` when none can be had (nothing sent)."""
        while True:
            with self._lock:
                now = time.monotonic()
                stale = self._take_expired(now)
                idle = self._idle.get(endpoint)
                conn = idle.pop()[1] if idle else None
                self._unreachable = {e: f for e, f in self._unreachable.items() if now - f[0] < self.retry_seconds}
                failed_at, why = self._unreachable.get(endpoint, (-math.inf, ""))
            for old in stale:
                old.close()
            if conn is None:
                if now - failed_at < self.retry_seconds:
                    raise KvPortUnreachable(f"{why} ({now - failed_at:.0f} s ago; retried after "
                                            f"{self.retry_seconds:.0f} s)")
                return self._connect(endpoint, timeout)
            if conn.alive():
                conn.settimeout(timeout)
                return conn
            conn.close()

    def _connect(self, endpoint: str, timeout: float) -> KvSenderConnection:
        try:
            return KvSenderConnection(endpoint, timeout)
        except KvPortUnreachable as exc:
            with self._lock:
                self._unreachable[endpoint] = (time.monotonic(), str(exc))
            log.warning("%s: KV transfers to it go on the Prefill stream for %.0f s", exc, self.retry_seconds)
            raise

    def release(self, conn: KvSenderConnection) -> None:
        """Give back a connection whose transfer was acknowledged; others must be closed instead."""
        with self._lock:
            idle = self._idle.setdefault(conn.endpoint, [])
            if len(idle) < self.max_idle:
                idle.append((time.monotonic(), conn))
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            conns = [c for idle in self._idle.values() for _, c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
