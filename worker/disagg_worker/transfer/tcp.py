"""The "tcp" KV transport: chunks on a raw socket from the prefill worker to the decode worker.

The ``Prefill`` RPC stays the control channel (it carries ``kv_endpoint`` and ``transfer_token`` and
returns ``PrefillDone``); the bulk bytes skip protobuf and gRPC's copies. The decode worker runs one
``KvReceiver`` (a listening socket and a thread per connection): a connection starts with the
transfer token, then frames ``header | K bytes | V bytes``; each frame is read into a reused buffer,
verified (checksum, shape, coverage) and written straight into the blocks reserved for that request.

Wire format (little endian): preamble ``b"DKV1"`` + u32 token length + token; frame header
``u32 seq, u32 first_block, u32 num_blocks, u32 layer_start, u32 num_layers, u64 k_bytes,
u64 v_bytes, u64 checksum``; a frame with ``num_blocks == 0`` ends the transfer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import struct
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from disagg_worker.engine.kv_cache import KVLayout
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, checksum, tensor_bytes, tensor_from_bytes
from disagg_worker.transfer.grpc_stream import Coverage

log = logging.getLogger(__name__)
MAGIC = b"DKV1"
HEADER = struct.Struct("<IIIIIQQQ")


def _recv_exact(sock: socket.socket, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = sock.recv_into(view[got:], len(view) - got)
        if n == 0:
            raise TransferError("KV connection closed mid-frame")
        got += n


@dataclass
class PendingTransfer:
    """A registered incoming transfer: where its chunks go and how to report the outcome."""

    request_id: str
    layout: KVLayout
    coverage: Coverage
    install: Callable[[int, int, torch.Tensor, torch.Tensor], None]  # (first_block, layer_start, k, v)
    verify: bool
    loop: asyncio.AbstractEventLoop
    finished: asyncio.Future[int] = field(init=False)  # total bytes, or TransferError

    def __post_init__(self) -> None:
        self.finished = self.loop.create_future()

    def resolve(self, result: int | BaseException) -> None:
        def set_() -> None:
            if self.finished.done():
                return
            if isinstance(result, BaseException):
                self.finished.set_exception(result)
            else:
                self.finished.set_result(result)
        self.loop.call_soon_threadsafe(set_)


class KvReceiver:
    """Decode side: accepts KV connections on ``host:port`` and installs frames for registered tokens."""

    def __init__(self, host: str, port: int = 0, advertise_host: str | None = None) -> None:
        self._sock = socket.create_server((host, port))
        self.port = self._sock.getsockname()[1]
        self.endpoint = f"{advertise_host or host}:{self.port}"
        self._pending: dict[str, PendingTransfer] = {}
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
        self._closed = True
        with contextlib.suppress(OSError):
            self._sock.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                conn, _ = self._sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="kv-conn", daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        transfer: PendingTransfer | None = None
        with conn:
            try:
                pre = bytearray(8)
                _recv_exact(conn, memoryview(pre))
                if pre[:4] != MAGIC:
                    raise TransferError("not a disagg KV connection")
                token_len = struct.unpack("<I", pre[4:])[0]
                if token_len > 256:
                    raise TransferError("bad transfer token")
                token = bytearray(token_len)
                _recv_exact(conn, memoryview(token))
                with self._lock:
                    transfer = self._pending.get(token.decode())
                if transfer is None:
                    raise TransferError("unknown or expired transfer token")
                total = self._receive_frames(conn, transfer)
                transfer.resolve(total)
            except (TransferError, OSError, ValueError) as exc:
                if transfer is not None:
                    transfer.resolve(exc if isinstance(exc, TransferError) else TransferError(str(exc)))
                else:
                    log.warning("rejected a KV connection: %s", exc)

    @staticmethod
    def _receive_frames(conn: socket.socket, t: PendingTransfer) -> int:
        """Read frames into two alternating buffers; verify + install one while the next arrives."""
        header = bytearray(HEADER.size)
        bufs = [bytearray(), bytearray()]
        pending: list[Future[None] | None] = [None, None]
        lay = t.layout
        elem = lay.element_size
        total = 0

        def verify_and_install(view: memoryview, kn: int, digest: int, seq: int, first_block: int,
                               layer_start: int, shape: tuple[int, ...]) -> None:
            if t.verify and checksum(view[:kn], view[kn:]) != digest:
                raise TransferError(f"checksum mismatch on chunk {seq}")
            t.coverage.add(first_block, shape[1], layer_start, shape[0])
            t.install(first_block, layer_start, tensor_from_bytes(view[:kn], lay.dtype, shape),
                      tensor_from_bytes(view[kn:], lay.dtype, shape))  # copies into the pool

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-install") as installer:
            i = 0
            while True:
                _recv_exact(conn, memoryview(header))
                seq, first_block, num_blocks, layer_start, num_layers, kn, vn, digest = HEADER.unpack(header)
                if num_blocks == 0:
                    for job in pending:
                        if job is not None:
                            job.result()
                    if not t.coverage.complete:
                        raise TransferError("KV transfer incomplete: some blocks or layers never arrived")
                    return total
                shape = (num_layers, num_blocks, lay.block_size, lay.num_kv_heads, lay.head_dim)
                expected = num_layers * num_blocks * lay.block_size * lay.num_kv_heads * lay.head_dim * elem
                if kn != expected or vn != expected:
                    raise TransferError(f"frame {seq} has {kn}+{vn} bytes, shape {shape} needs {expected} each")
                slot = i % 2
                if pending[slot] is not None:
                    pending[slot].result()  # the buffer is free again (and its chunk was fine)
                if len(bufs[slot]) < kn + vn:
                    bufs[slot] = bytearray(kn + vn)
                view = memoryview(bufs[slot])[:kn + vn]
                _recv_exact(conn, view)
                pending[slot] = installer.submit(verify_and_install, view, kn, digest, seq, first_block,
                                                 layer_start, shape)
                total += kn + vn
                i += 1


class KvSenderConnection:
    """Prefill side: one connection to a decode worker's receiver for one transfer."""

    def __init__(self, endpoint: str, token: str, timeout: float) -> None:
        host, _, port = endpoint.rpartition(":")
        self._sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        self._sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        raw = token.encode()
        self._sock.sendall(MAGIC + struct.pack("<I", len(raw)) + raw)

    def send(self, spec: ChunkSpec, k: torch.Tensor, v: torch.Tensor, corrupt: bool = False) -> int:
        kb, vb = tensor_bytes(k), tensor_bytes(v)
        digest = checksum(kb, vb)
        if corrupt:
            digest ^= 1
        self._sock.sendall(HEADER.pack(spec.seq, spec.first_block, spec.num_blocks, spec.layer_start,
                                       spec.num_layers, len(kb), len(vb), digest))
        self._sock.sendall(kb)
        self._sock.sendall(vb)
        return len(kb) + len(vb)

    def send_all(self, specs: list[ChunkSpec],
                 export: Callable[[ChunkSpec, int], tuple[torch.Tensor, torch.Tensor]],
                 before_chunk: Callable[[ChunkSpec], None] | None = None, corrupt_seq: int | None = None) -> int:
        """Send every chunk, exporting the next one (into staging slot ``i % 2``) while this one is on the wire.

        ``before_chunk`` runs before each send (fault injection in tests); the end frame follows the last chunk.
        """
        total = 0
        if specs:
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="kv-export") as exporter:
                nxt = exporter.submit(export, specs[0], 0)
                for i, spec in enumerate(specs):
                    k, v = nxt.result()
                    if i + 1 < len(specs):
                        nxt = exporter.submit(export, specs[i + 1], (i + 1) % 2)
                    if before_chunk is not None:
                        before_chunk(spec)
                    total += self.send(spec, k, v, corrupt=spec.seq == corrupt_seq)
        self.finish()
        return total

    def finish(self) -> None:
        self._sock.sendall(HEADER.pack(0, 0, 0, 0, 0, 0, 0, 0))

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.close()
