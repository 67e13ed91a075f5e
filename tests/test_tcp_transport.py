"""The "tcp" KV data plane on real sockets (127.0.0.1): zero-copy views, scatter-gather I/O, the stop fence."""

from __future__ import annotations

import asyncio
import contextlib
import errno
import socket
import struct
import threading
import time
from collections.abc import Callable

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from disagg_worker.engine.kv_cache import KVLayout, PagedKVCache
from disagg_worker.transfer import tcp
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, chunk_checksum, plan_chunks
from disagg_worker.transfer.grpc_stream import Coverage
from disagg_worker.transfer.sinks import KvSink, PoolSink, StagedSink
from disagg_worker.transfer.tcp import (
    HEADER,
    IOV_BATCH,
    MAGIC,
    PIECE_BYTES,
    TRAILER,
    KvConnectionPool,
    KvReceiver,
    KvSenderConnection,
    PendingTransfer,
    in_pieces,
    move_views,
)

LAYOUT = KVLayout(num_layers=3, block_size=4, num_kv_heads=2, head_dim=8, dtype=torch.float32)
PER_BLOCK_LAYER = LAYOUT.bytes_per_block // LAYOUT.num_layers
CPU = torch.device("cpu")


def raw_preamble(token: str) -> bytes:
    return MAGIC + struct.pack("<I", len(token)) + token.encode()


def raw_frame(claimed: ChunkSpec, k: list[memoryview], v: list[memoryview], checksummed: ChunkSpec) -> bytes:
    """A frame as a peer might send it: ``claimed``'s header, the K and V bytes, and the checksum those
    bytes have as ``checksummed``'s chunk."""
    n = sum(len(x) for x in k)
    header = HEADER.pack(claimed.seq, claimed.first_block, claimed.num_blocks, claimed.layer_start,
                         claimed.num_layers, n, n)
    return header + b"".join([*k, *v]) + TRAILER.pack(chunk_checksum(checksummed, k, v))


def filled_pool(num_blocks: int, seed: int = 0) -> PagedKVCache:
    kv = PagedKVCache(LAYOUT, num_blocks, CPU)
    g = torch.Generator().manual_seed(seed)
    kv.k.copy_(torch.randn(kv.k.shape, generator=g))
    kv.v.copy_(torch.randn(kv.v.shape, generator=g))
    return kv


@given(blocks=st.lists(st.integers(0, 15), min_size=1, max_size=10, unique=True),
       layer_start=st.integers(0, 2), data=st.data())
def test_block_views_are_export_order_and_write_through(blocks: list[int], layer_start: int,
                                                        data: st.DataObject) -> None:
    num_layers = data.draw(st.integers(1, LAYOUT.num_layers - layer_start))
    layers = range(layer_start, layer_start + num_layers)
    kv = filled_pool(16)
    k_views, v_views = kv.block_views(blocks, layers)
    k_ref, v_ref = kv.export_blocks(blocks, layers)
    assert b"".join(k_views) == k_ref.numpy().tobytes() and b"".join(v_views) == v_ref.numpy().tobytes()
    assert len(k_views) <= num_layers * len(blocks)  # consecutive ids share a view

    dst = PagedKVCache(LAYOUT, 16, CPU)
    for src, dst_views in zip((k_ref, v_ref), dst.block_views(blocks, layers), strict=True):
        raw, off = src.numpy().tobytes(), 0
        for view in dst_views:
            view[:] = raw[off:off + len(view)]
            off += len(view)
    ref = PagedKVCache(LAYOUT, 16, CPU)
    ref.import_blocks(blocks, k_ref, v_ref, layer_start)
    assert torch.equal(dst.k, ref.k) and torch.equal(dst.v, ref.v)


def test_block_views_refuse_bad_ranges() -> None:
    kv = PagedKVCache(LAYOUT, 4, CPU)
    with pytest.raises(ValueError, match="outside the pool"):
        kv.block_views([1, 4], range(3))
    with pytest.raises(ValueError, match="out of range"):
        kv.block_views([1], range(2, 4))


def test_move_views_survives_short_transfers_and_many_buffers() -> None:
    src = bytes(range(256)) * 40
    views = [memoryview(bytearray(n)) for n in [0, 1, 7, 100, 0, *([13] * (3 * IOV_BATCH)), 2000]]
    views.append(memoryview(bytearray(len(src) - sum(len(v) for v in views))))
    pos = 0

    def op(batch: list[memoryview]) -> int:  # a socket that moves at most 29 bytes per call
        nonlocal pos
        assert len(batch) <= IOV_BATCH
        n = 0
        for view in batch:
            take = min(len(view), 29 - n)
            view[:take] = src[pos + n:pos + n + take]
            n += take
            if n == 29:
                break
        pos += n
        return n

    move_views(op, views)
    assert b"".join(views) == src
    with pytest.raises(TransferError, match="closed"):
        move_views(lambda batch: 0, [memoryview(bytearray(4))])


@given(st.lists(st.integers(0, 50), max_size=12), st.integers(1, 40))
def test_in_pieces_regroups_views_in_order_under_the_limit(sizes: list[int], limit: int) -> None:
    data = bytes(range(256)) * 3
    views, off = [], 0
    for n in sizes:
        views.append(memoryview(data)[off:off + n])
        off += n
    pieces = list(in_pieces(views, limit))
    assert b"".join(b"".join(piece) for piece in pieces) == data[:off]
    assert [sum(map(len, piece)) for piece in pieces[:-1]] == [limit] * (len(pieces) - 1)
    assert all(0 < sum(map(len, piece)) <= limit for piece in pieces)


def test_in_pieces_refuses_a_piece_size_that_would_never_advance() -> None:
    with pytest.raises(ValueError, match="positive"):
        next(in_pieces([memoryview(b"abc")], 0))


def test_the_chunk_checksum_streams_over_parts_and_covers_the_placement() -> None:
    k, v = bytes(range(200)), bytes(range(50, 250))
    spec = ChunkSpec(1, 4, 2, 0, 3)
    assert chunk_checksum(spec, [memoryview(k[:33]), memoryview(k[33:])], [memoryview(v)]) == chunk_checksum(
        spec, [k], [v])
    for moved in (ChunkSpec(0, 4, 2, 0, 3), ChunkSpec(1, 6, 2, 0, 3), ChunkSpec(1, 4, 2, 1, 2)):
        assert chunk_checksum(moved, [k], [v]) != chunk_checksum(spec, [k], [v])


def run_transfer(src: PagedKVCache, src_blocks: list[int], make_sink: Callable[[], KvSink], dst_first: int,
                 num_blocks: int, chunk_bytes: int, corrupt_seq: int | None = None,
                 before_chunk: Callable[[ChunkSpec], None] | None = None,
                 on_registered: Callable[[PendingTransfer], None] | None = None,
                 max_frame_bytes: int | None = None, receiver: KvReceiver | None = None) -> int:
    """Send ``src_blocks[dst_first:]`` from a sender thread into a receiver; the transfer's byte count or its error."""
    specs = plan_chunks(dst_first, num_blocks, LAYOUT.num_layers, PER_BLOCK_LAYER, chunk_bytes)

    def chunk_views(spec: ChunkSpec, slot: int) -> tuple[list[memoryview], list[memoryview]]:
        return src.block_views(src_blocks[spec.first_block:spec.first_block + spec.num_blocks],
                               range(spec.layer_start, spec.layer_start + spec.num_layers))

    async def main() -> int:
        rx = receiver or KvReceiver("127.0.0.1")
        sender_error: list[BaseException] = []
        try:
            t = PendingTransfer("r", LAYOUT, Coverage(dst_first, num_blocks, LAYOUT.num_layers), make_sink(), True,
                                asyncio.get_running_loop(), max_frame_bytes=max_frame_bytes)
            token = rx.register(t)
            if on_registered is not None:
                on_registered(t)

            def send() -> None:
                conn = KvSenderConnection(rx.endpoint, 10)
                try:
                    conn.send_all(token, specs, chunk_views, before_chunk, corrupt_seq)
                except (OSError, TransferError) as exc:  # refused, or cut off: the receiver says why
                    sender_error.append(exc)
                finally:
                    conn.close()

            th = threading.Thread(target=send)
            th.start()
            try:
                total = await asyncio.wait_for(t.finished, 20)
            finally:
                await asyncio.to_thread(th.join, 20)
            assert not sender_error, sender_error  # a completed transfer leaves the sender fine too
            return total
        finally:
            if receiver is None:
                rx.close()

    return asyncio.run(main())


SRC_BLOCKS = [9, 2, 3, 4, 11, 0, 7, 8]  # scattered and partly consecutive, as a block table is
DST_BLOCKS = [5, 6, 1, 12, 13, 14, 3, 10]


@pytest.mark.parametrize("chunk_bytes", [1 << 20, 2 * PER_BLOCK_LAYER * 3 + 1, PER_BLOCK_LAYER])
@pytest.mark.parametrize("staged", [False, True])
@pytest.mark.parametrize("piece_bytes", [PIECE_BYTES, 100])  # 100: pieces split blocks and values mid-way
def test_scattered_blocks_arrive_exactly(chunk_bytes: int, staged: bool, piece_bytes: int,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tcp, "PIECE_BYTES", piece_bytes)
    src, dst = filled_pool(16, seed=1), PagedKVCache(LAYOUT, 16, CPU)
    first = 2  # the first two blocks are a prefix the decode side already had cached

    def install(first_block: int, layer_start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        ids = DST_BLOCKS[first_block:first_block + k.shape[1]]
        dst.import_blocks(ids, k, v, layer_start)

    def make_sink() -> KvSink:
        return StagedSink(LAYOUT, install) if staged else PoolSink(dst, DST_BLOCKS)

    total = run_transfer(src, SRC_BLOCKS, make_sink, first, len(SRC_BLOCKS) - first, chunk_bytes)
    assert total == (len(SRC_BLOCKS) - first) * LAYOUT.bytes_per_block
    for s, d in zip(SRC_BLOCKS[first:], DST_BLOCKS[first:], strict=True):
        assert torch.equal(dst.k[:, d], src.k[:, s]) and torch.equal(dst.v[:, d], src.v[:, s])
    untouched = [b for b in range(16) if b not in DST_BLOCKS[first:]]
    assert not dst.k[:, untouched].any() and not dst.v[:, untouched].any()


@pytest.mark.parametrize("staged", [False, True])
def test_a_corrupt_chunk_fails_the_transfer(staged: bool) -> None:
    src, dst = filled_pool(16, seed=2), PagedKVCache(LAYOUT, 16, CPU)
    sink: KvSink = StagedSink(LAYOUT, lambda *a: None) if staged else PoolSink(dst, DST_BLOCKS)
    with pytest.raises(TransferError, match="checksum mismatch on chunk 1"):
        run_transfer(src, SRC_BLOCKS, lambda: sink, 0, len(SRC_BLOCKS), PER_BLOCK_LAYER * 2, corrupt_seq=1)


def test_frames_with_swapped_placements_do_not_verify() -> None:
    """Each frame's bytes intact, but two frames' block ranges swapped in flight: both are in range and
    together cover the transfer exactly, so only a checksum over the placement catches it (one over
    the bytes alone would install each chunk in the other's blocks)."""
    src, dst = filled_pool(16, seed=5), PagedKVCache(LAYOUT, 16, CPU)
    specs = plan_chunks(0, 4, LAYOUT.num_layers, PER_BLOCK_LAYER, 2 * LAYOUT.bytes_per_block)
    assert len(specs) == 2

    async def main() -> None:
        receiver = KvReceiver("127.0.0.1")
        try:
            t = PendingTransfer("r", LAYOUT, Coverage(0, 4, LAYOUT.num_layers), PoolSink(dst, DST_BLOCKS[:4]), True,
                                asyncio.get_running_loop())
            token = receiver.register(t)

            def send() -> None:
                host, port = receiver.endpoint.rsplit(":", 1)
                with contextlib.suppress(OSError), socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(raw_preamble(token))
                    for spec, claimed in zip(specs, reversed(specs), strict=True):
                        k, v = src.block_views(SRC_BLOCKS[spec.first_block:spec.first_block + spec.num_blocks],
                                               range(spec.layer_start, spec.layer_start + spec.num_layers))
                        sock.sendall(raw_frame(claimed, k, v, checksummed=spec))
                    sock.sendall(HEADER.pack(0, 0, 0, 0, 0, 0, 0))
                    sock.recv(1)

            th = threading.Thread(target=send)
            th.start()
            try:
                with pytest.raises(TransferError, match="checksum mismatch"):
                    await asyncio.wait_for(t.finished, 10)
            finally:
                await asyncio.to_thread(th.join, 10)
        finally:
            receiver.close()

    asyncio.run(main())


def test_a_frame_over_the_chunk_size_is_refused_before_anything_is_allocated() -> None:
    src = filled_pool(16, seed=2)
    sink = StagedSink(LAYOUT, lambda *a: None)
    with pytest.raises(TransferError, match=r"over the \d+-byte chunk size"):  # a peer ignoring the negotiated size
        run_transfer(src, SRC_BLOCKS, lambda: sink, 0, len(SRC_BLOCKS), 1 << 20, max_frame_bytes=2 * PER_BLOCK_LAYER)
    assert len(sink._buf) == 0  # refused on its header: no staging buffer for what it claimed


def test_the_receiver_closes_connections_over_its_limit_and_takes_new_ones_once_under_it() -> None:
    """Each connection holds a thread: a port scan or a runaway sender must not exhaust them."""
    receiver = KvReceiver("127.0.0.1", max_connections=2)
    host, port = receiver.endpoint.rsplit(":", 1)
    idle = [socket.create_connection((host, int(port)), timeout=5) for _ in range(2)]
    try:
        for _ in range(200):  # the accept thread registers them
            if len(receiver._conns) == 2:
                break
            time.sleep(0.01)
        with socket.create_connection((host, int(port)), timeout=5) as extra:
            assert extra.recv(1) == b""  # closed at once, not left waiting
        idle.pop().close()
        for _ in range(200):
            if len(receiver._conns) == 1:
                break
            time.sleep(0.01)
        src, dst = filled_pool(16, seed=6), PagedKVCache(LAYOUT, 16, CPU)
        total = run_transfer(src, SRC_BLOCKS, lambda: PoolSink(dst, DST_BLOCKS), 0, len(SRC_BLOCKS), 1 << 20,
                             receiver=receiver)
        assert total == len(SRC_BLOCKS) * LAYOUT.bytes_per_block
    finally:
        for conn in idle:
            conn.close()
        receiver.close()


def test_the_receiver_keeps_listening_after_a_failed_accept(monkeypatch: pytest.MonkeyPatch) -> None:
    """An accept() error (out of file descriptors, say) used to end the accept loop for good: every later
    transfer on a new connection then waited out its deadline and fell back."""
    receiver = KvReceiver("127.0.0.1")
    try:
        real_accept = socket.socket.accept
        failures = [OSError(errno.EMFILE, "Too many open files")]

        def flaky_accept(sock: socket.socket) -> tuple[socket.socket, object]:
            if failures:
                raise failures.pop()
            return real_accept(sock)

        monkeypatch.setattr(socket.socket, "accept", flaky_accept)
        host, port = receiver.endpoint.rsplit(":", 1)
        socket.create_connection((host, int(port))).close()  # the loop takes it; its next accept() fails
        for _ in range(100):
            if not failures:
                break
            time.sleep(0.01)
        assert not failures
        src, dst = filled_pool(16, seed=5), PagedKVCache(LAYOUT, 16, CPU)
        total = run_transfer(src, SRC_BLOCKS, lambda: PoolSink(dst, DST_BLOCKS), 0, len(SRC_BLOCKS), 1 << 20,
                             receiver=receiver)
        assert total == len(SRC_BLOCKS) * LAYOUT.bytes_per_block
    finally:
        receiver.close()


def test_a_frame_outside_the_reservation_is_refused_before_it_lands() -> None:
    src, dst = filled_pool(16, seed=3), PagedKVCache(LAYOUT, 16, CPU)

    async def main() -> None:
        receiver = KvReceiver("127.0.0.1")
        try:
            t = PendingTransfer("r", LAYOUT, Coverage(4, 4, LAYOUT.num_layers), PoolSink(dst, DST_BLOCKS), True,
                                asyncio.get_running_loop())
            token = receiver.register(t)
            specs = plan_chunks(0, 8, LAYOUT.num_layers, PER_BLOCK_LAYER, 1 << 20)  # it expects blocks 4.. only

            def send() -> None:
                conn = KvSenderConnection(receiver.endpoint, 10)
                try:
                    conn.send_all(token, specs, lambda spec, slot: src.block_views(SRC_BLOCKS, range(3)))
                except (OSError, TransferError):
                    pass  # the receiver hung up on us
                finally:
                    conn.close()

            th = threading.Thread(target=send)
            th.start()
            try:
                with pytest.raises(TransferError, match="outside this transfer"):
                    await asyncio.wait_for(t.finished, 20)
            finally:
                await asyncio.to_thread(th.join, 20)
        finally:
            receiver.close()

    asyncio.run(main())
    assert not dst.k.any() and not dst.v.any()


def test_stop_fences_off_the_blocks_mid_frame() -> None:
    """A sender stalls halfway through a frame; stop() still returns at once, and nothing lands after it."""
    src, dst = filled_pool(16, seed=4), PagedKVCache(LAYOUT, 16, CPU)
    spec = ChunkSpec(0, 0, len(SRC_BLOCKS), 0, LAYOUT.num_layers)
    k_views, v_views = src.block_views(SRC_BLOCKS, range(LAYOUT.num_layers))
    frame = raw_frame(spec, k_views, v_views, checksummed=spec)
    stalled, resume = threading.Event(), threading.Event()

    async def main() -> tuple[float, torch.Tensor, torch.Tensor]:
        receiver = KvReceiver("127.0.0.1")
        try:
            t = PendingTransfer("r", LAYOUT, Coverage(0, len(SRC_BLOCKS), LAYOUT.num_layers),
                                PoolSink(dst, DST_BLOCKS), True, asyncio.get_running_loop())
            token = receiver.register(t)
            cut = HEADER.size + len(frame) // 4

            def send() -> None:
                host, port = receiver.endpoint.rsplit(":", 1)
                with socket.create_connection((host, int(port)), timeout=10) as sock:
                    sock.sendall(raw_preamble(token))
                    sock.sendall(frame[:cut])  # the receiver is now mid-frame, in recvmsg_into
                    stalled.set()
                    resume.wait(10)
                    with contextlib.suppress(OSError):  # the receiver hung up
                        sock.sendall(frame[cut:])

            th = threading.Thread(target=send)
            th.start()
            try:
                await asyncio.to_thread(stalled.wait, 10)
                await asyncio.sleep(0.05)
                t0 = time.monotonic()
                t.stop()
                took = time.monotonic() - t0
                k_after, v_after = dst.k.clone(), dst.v.clone()
                resume.set()
                with pytest.raises(TransferError):
                    await asyncio.wait_for(t.finished, 10)
                with socket.socket() as other:
                    assert not t.attach(other)  # and no second connection is taken
                return took, k_after, v_after
            finally:
                resume.set()
                await asyncio.to_thread(th.join, 10)
        finally:
            receiver.close()

    took, k_after, v_after = asyncio.run(main())
    assert took < 1.0
    assert torch.equal(dst.k, k_after) and torch.equal(dst.v, v_after)


def test_concurrent_transfers_into_one_pool_stay_apart() -> None:
    """Several prefill workers sending to one decode worker at once: each request's blocks get its own KV."""
    srcs = [filled_pool(16, seed=10 + i) for i in range(4)]
    dst = PagedKVCache(LAYOUT, 64, CPU)
    reservations = [[4 * i + j for j in range(4)][::-1] + [32 + 4 * i + j for j in range(4)] for i in range(4)]
    specs = plan_chunks(0, 8, LAYOUT.num_layers, PER_BLOCK_LAYER, PER_BLOCK_LAYER * 3)

    async def main() -> list[int]:
        receiver = KvReceiver("127.0.0.1")
        loop = asyncio.get_running_loop()
        try:
            transfers = [PendingTransfer(f"r{i}", LAYOUT, Coverage(0, 8, LAYOUT.num_layers),
                                         PoolSink(dst, reservations[i]), True, loop) for i in range(4)]
            tokens = [receiver.register(t) for t in transfers]

            def send(i: int) -> None:
                conn = KvSenderConnection(receiver.endpoint, 10)
                try:
                    conn.send_all(tokens[i], specs, lambda spec, slot: srcs[i].block_views(
                        SRC_BLOCKS[spec.first_block:spec.first_block + spec.num_blocks],
                        range(spec.layer_start, spec.layer_start + spec.num_layers)))
                finally:
                    conn.close()

            threads = [threading.Thread(target=send, args=(i,)) for i in range(4)]
            for th in threads:
                th.start()
            try:
                return list(await asyncio.wait_for(asyncio.gather(*(t.finished for t in transfers)), 20))
            finally:
                for th in threads:
                    await asyncio.to_thread(th.join, 20)
        finally:
            receiver.close()

    assert asyncio.run(main()) == [8 * LAYOUT.bytes_per_block] * 4
    for src, blocks in zip(srcs, reservations, strict=True):
        for s, d in zip(SRC_BLOCKS, blocks, strict=True):
            assert torch.equal(dst.k[:, d], src.k[:, s]) and torch.equal(dst.v[:, d], src.v[:, s])


def test_pooled_connections_carry_transfers_one_after_another() -> None:
    """Reuse after an acknowledged transfer (even after the decode side's stop()); never after a refused one."""
    src = filled_pool(16, seed=20)
    specs = plan_chunks(0, 8, LAYOUT.num_layers, PER_BLOCK_LAYER, PER_BLOCK_LAYER * 5)

    def chunk_views(spec: ChunkSpec, slot: int) -> tuple[list[memoryview], list[memoryview]]:
        return src.block_views(SRC_BLOCKS[spec.first_block:spec.first_block + spec.num_blocks],
                               range(spec.layer_start, spec.layer_start + spec.num_layers))

    async def main() -> None:
        receiver = KvReceiver("127.0.0.1")
        pool = KvConnectionPool()
        loop = asyncio.get_running_loop()
        try:
            used: list[KvSenderConnection] = []
            for i, corrupt in enumerate([None, None, len(specs) - 1, None]):
                dst = PagedKVCache(LAYOUT, 16, CPU)
                t = PendingTransfer(f"r{i}", LAYOUT, Coverage(0, 8, LAYOUT.num_layers), PoolSink(dst, DST_BLOCKS),
                                    True, loop)
                token = receiver.register(t)
                conn = await asyncio.to_thread(pool.acquire, receiver.endpoint, 10)
                used.append(conn)
                if corrupt is None:
                    await asyncio.to_thread(conn.send_all, token, specs, chunk_views)
                    pool.release(conn)  # acknowledged: the receiver verified and installed it
                    assert await asyncio.wait_for(t.finished, 10) == 8 * LAYOUT.bytes_per_block
                    for s, d in zip(SRC_BLOCKS, DST_BLOCKS, strict=True):
                        assert torch.equal(dst.k[:, d], src.k[:, s]) and torch.equal(dst.v[:, d], src.v[:, s])
                else:  # the sender learns of the refusal and closes the connection; the next take is at once
                    with pytest.raises(TransferError, match="did not accept"):
                        await asyncio.to_thread(conn.send_all, token, specs, chunk_views, None, corrupt)
                    conn.close()
                    with pytest.raises(TransferError, match="checksum"):
                        await asyncio.wait_for(t.finished, 10)
                t.stop()  # what the decode worker does after every transfer
            assert used[1] is used[0] and used[2] is used[0]  # reused; stop() after success did not cut it
            assert used[3] is not used[2]
        finally:
            pool.close()
            receiver.close()

    asyncio.run(main())


def test_closing_the_receiver_cuts_pooled_connections() -> None:
    src = filled_pool(16, seed=21)
    specs = plan_chunks(0, 8, LAYOUT.num_layers, PER_BLOCK_LAYER, 1 << 20)

    async def main() -> KvSenderConnection:
        receiver = KvReceiver("127.0.0.1")
        t = PendingTransfer("r", LAYOUT, Coverage(0, 8, LAYOUT.num_layers),
                            PoolSink(PagedKVCache(LAYOUT, 16, CPU), DST_BLOCKS), True, asyncio.get_running_loop())
        conn = KvSenderConnection(receiver.endpoint, 10)
        await asyncio.to_thread(conn.send_all, receiver.register(t), specs,
                                lambda spec, slot: src.block_views(SRC_BLOCKS, range(LAYOUT.num_layers)))
        await asyncio.wait_for(t.finished, 10)
        assert conn.alive()
        receiver.close()
        return conn

    conn = asyncio.run(main())
    try:
        deadline = time.monotonic() + 5
        while conn.alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not conn.alive()  # a pool would drop it rather than send into a dead receiver
    finally:
        conn.close()


def test_a_closed_receiver_stops_listening_at_once() -> None:
    """Closing the listening socket did not wake the thread blocked in accept(): the port still took
    connections until one more came in."""
    receiver = KvReceiver("127.0.0.1")
    receiver.close()
    assert not receiver._thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", receiver.port), timeout=2).close()


def test_a_connection_that_sends_nothing_is_closed_and_a_pooled_one_still_works(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Each connection holds a receiver thread: one that never starts a transfer was held forever."""
    monkeypatch.setattr(tcp, "RECEIVER_IDLE_SECONDS", 0.3)
    receiver = KvReceiver("127.0.0.1")
    try:
        host, port = receiver.endpoint.rsplit(":", 1)
        with socket.create_connection((host, int(port)), timeout=5) as silent:
            silent.sendall(b"DKV")  # part of a preamble, then nothing
            t0 = time.monotonic()
            assert silent.recv(1) == b""  # closed by the receiver
            assert 0.2 < time.monotonic() - t0 < 4
        for _ in range(100):
            if not receiver._conns:
                break
            time.sleep(0.02)
        assert not receiver._conns
        src, dst = filled_pool(16, seed=3), PagedKVCache(LAYOUT, 16, CPU)
        assert run_transfer(src, SRC_BLOCKS, lambda: PoolSink(dst, DST_BLOCKS), 0, len(SRC_BLOCKS), 1 << 20,
                            receiver=receiver) == len(SRC_BLOCKS) * LAYOUT.bytes_per_block  # the listener lives on
    finally:
        receiver.close()


def test_an_unreachable_kv_port_is_refused_at_once_until_it_is_retried() -> None:
    """A port that refuses connections fails the take with ``KvPortUnreachable`` (the prefill worker's cue to
    send on the stream), and so does every take for ``retry_seconds`` without a connect; then it is tried
    again."""
    with socket.create_server(("127.0.0.1", 0)) as gone:
        port = gone.getsockname()[1]
    endpoint = f"127.0.0.1:{port}"
    pool = KvConnectionPool(retry_seconds=0.5)
    listener = None
    try:
        with pytest.raises(tcp.KvPortUnreachable, match="refused"):
            pool.acquire(endpoint, 10)
        listener = socket.create_server(("127.0.0.1", port))  # it answers now...
        with pytest.raises(tcp.KvPortUnreachable, match="ago"):
            pool.acquire(endpoint, 10)  # ...but is not tried before retry_seconds
        time.sleep(0.6)
        conn = pool.acquire(endpoint, 10)
        assert conn._sock.gettimeout() == 10  # the transfer's deadline, not the connect timeout
        conn.close()
        with pytest.raises(tcp.KvPortUnreachable):
            pool.acquire("no-port-here", 10)  # a malformed endpoint from a peer: the same, not a crash
    finally:
        pool.close()
        if listener is not None:
            listener.close()


def test_a_connect_waits_no_longer_than_the_connect_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    """A port behind a firewall that drops the SYN used to hold each transfer for its whole deadline."""
    asked: list[float] = []

    def unanswered(address: tuple[str, int], timeout: float) -> socket.socket:
        asked.append(timeout)
        raise TimeoutError("timed out")

    monkeypatch.setattr(tcp.socket, "create_connection", unanswered)
    with pytest.raises(tcp.KvPortUnreachable, match="timed out"):
        KvSenderConnection("10.0.0.1:7000", 30)
    with pytest.raises(tcp.KvPortUnreachable):
        KvSenderConnection("10.0.0.1:7000", 0.5)
    assert asked == [tcp.CONNECT_TIMEOUT_SECONDS, 0.5]
