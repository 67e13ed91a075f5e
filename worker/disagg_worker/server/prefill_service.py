"""``Prefill.Prefill``: compute a prompt's KV, stream the uncached blocks back, return the first token.

The request runs in this worker's continuous batch with ``max_tokens=1`` and its blocks held after it
finishes. Chunks are exported one at a time just before they are sent, so a transfer holds at most a
chunk in flight on this side; gRPC flow control pushes back when the decode side is slow. The held
blocks are always released, whether the transfer completes, fails or is cancelled.

Fault injection for tests (``DISAGG_FAULT``): ``corrupt_chunk`` spoils the first chunk's checksum (grpc:
a byte of the chunk flipped after checksumming; tcp: the trailing checksum flipped),
``slow_transfer:SECONDS`` sleeps before each chunk, ``die_mid_transfer`` exits after the first chunk.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor

import grpc
import torch

from disagg_worker import metrics as m
from disagg_worker.engine.async_engine import EngineStoppedError
from disagg_worker.engine.kv_cache import PagedKVCache
from disagg_worker.engine.request import InvalidRequestError
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server.runtime import (
    WorkerRuntime,
    abort_invalid,
    params_from_proto,
    priority_from_proto,
)
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, plan_chunks, tensor_bytes
from disagg_worker.transfer.grpc_stream import chunk_message, dtype_name, flip_payload_byte
from disagg_worker.transfer.tcp import KvConnectionPool, KvPortUnreachable

log = logging.getLogger(__name__)
MAX_CONCURRENT_SENDS = 16  # tcp transfers in flight from one prefill worker; more wait their turn


def layout_message(runtime: WorkerRuntime) -> pb.KvLayout:
    lay = runtime.engine.engine.runner.layout
    return pb.KvLayout(num_layers=lay.num_layers, block_size=lay.block_size, num_kv_heads=lay.num_kv_heads,
                       head_dim=lay.head_dim, dtype=dtype_name(lay.dtype),
                       model_fingerprint=runtime.engine.engine.model_fingerprint)


class PrefillServicer(pb_grpc.PrefillServicer):
    def __init__(self, runtime: WorkerRuntime) -> None:
        self.rt = runtime
        self.fault = os.environ.get("DISAGG_FAULT", "")
        self.kv_connections = KvConnectionPool()  # "tcp" transport: warm connections to decode workers
        # blocking tcp sends get their own threads: in asyncio's default pool, transfers held up by
        # backpressure would starve the KV exports and DNS lookups that share it
        self._senders = ThreadPoolExecutor(max_workers=MAX_CONCURRENT_SENDS, thread_name_prefix="kv-send")

    def _fault_hook(self, spec: ChunkSpec) -> None:
        """Runs before each chunk is sent; does nothing unless DISAGG_FAULT is set (tests only)."""
        if self.fault.startswith("slow_transfer"):
            time.sleep(float(self.fault.split(":")[1]))
        elif self.fault == "die_mid_transfer" and spec.seq == 1:
            log.error("fault injection: exiting in the middle of a KV transfer")
            os._exit(17)

    async def Prefill(self, request: pb.PrefillRequest, context: grpc.aio.ServicerContext
                      ) -> AsyncIterator[pb.PrefillResponse]:
        rt, eng = self.rt, self.rt.engine.engine
        if rt.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "prefill worker is draining")
        ours = layout_message(rt)
        if _shape_of(request.layout) != _shape_of(ours):  # first: another dtype changes the fingerprint too
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"KV layout mismatch: decode expects {request.layout}, this worker has {ours}")
        if request.layout.model_fingerprint != ours.model_fingerprint:
            # (a decode worker from before fingerprints sends none: refused too, it falls back to local)
            log.warning("refusing a prefill for a decode worker on another model (fingerprint %r, ours %r)",
                        request.layout.model_fingerprint, ours.model_fingerprint)
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"model mismatch: the decode worker's KV is for model "
                                f"{request.layout.model_fingerprint!r}, this worker serves "
                                f"{ours.model_fingerprint!r} ({rt.model_name})")
        rid = request.request_id
        t0 = time.monotonic()
        try:
            params = params_from_proto(request.params).model_copy(update={"max_tokens": 1})
            prompt = list(request.prompt_token_ids)
            eng.validate(prompt, params)
        except InvalidRequestError as exc:
            await abort_invalid(context, exc)
        m.PROMPT_TOKENS.labels(rt.role).inc(len(prompt))
        try:
            q = rt.engine.open_stream(rid)
        except InvalidRequestError as exc:  # an id in use: that request's stream stays untouched
            await abort_invalid(context, exc)
        queued = True  # from here on the request is released however this ends, also cancelled while queued
        try:
            try:
                priority = priority_from_proto(request.priority)
                await rt.engine.call(lambda: eng.add_request(rid, prompt, params, priority, hold_kv=True,
                                                             arrival_time=t0))
            except InvalidRequestError as exc:  # refused (an id in use): the engine's request is not ours
                queued = False
                rt.engine.close_stream(rid)
                await abort_invalid(context, exc)
            except EngineStoppedError as exc:  # UNAVAILABLE: the decode worker prefills locally or elsewhere
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}")
            first = None
            async for out in rt.engine.stream(rid, q):
                if out.error:
                    await context.abort(grpc.StatusCode.INTERNAL, out.error)
                if out.new_token_ids:
                    first = out
            if first is None:
                await context.abort(grpc.StatusCode.INTERNAL, "prefill produced no token")
            prefill_done = time.monotonic()
            num_blocks = eng.block_manager.blocks_for_tokens(len(prompt)) - request.first_block
            lay = eng.runner.layout
            per_block_layer = lay.bytes_per_block // lay.num_layers
            chunk_bytes = request.chunk_bytes or rt.policy.kv_transfer.chunk_bytes
            specs = plan_chunks(request.first_block, num_blocks, lay.num_layers, per_block_layer, chunk_bytes)
            total = 0
            # reused staging pairs (K, V) sized to the largest chunk, so no chunk allocates a buffer;
            # untouched, hence free, where the tcp sender reads a CPU pool in place
            elems = max(1, max((lay.kv_bytes(sp.num_blocks, sp.num_layers) for sp in specs), default=0)
                        // lay.element_size)
            dev = eng.runner.kv.k.device
            staging = [tuple(torch.empty(elems, dtype=lay.dtype, device=dev) for _ in "kv") for _ in range(2)]

            def export(spec: ChunkSpec, slot: int) -> tuple[torch.Tensor, torch.Tensor]:
                return eng.export_kv(rid, spec.first_block, spec.num_blocks,
                                     range(spec.layer_start, spec.layer_start + spec.num_layers), staging[slot])

            corrupt_seq = 0 if self.fault == "corrupt_chunk" else None
            total = 0
            kv = eng.runner.kv
            in_place = reads_pool_in_place(kv)
            held = await rt.engine.call(lambda: list(eng.held_blocks(rid))) if in_place else []

            def chunk_views(spec: ChunkSpec, slot: int) -> tuple[list[memoryview], list[memoryview]]:
                if in_place:  # straight from the pool: the blocks stay held until _release
                    return kv.block_views(held[spec.first_block:spec.first_block + spec.num_blocks],
                                          range(spec.layer_start, spec.layer_start + spec.num_layers))
                k, v = export(spec, slot)
                return [tensor_bytes(k)], [tensor_bytes(v)]

            loop = asyncio.get_running_loop()
            sender = None
            if request.kv_endpoint:  # "tcp" transport: bulk bytes on a raw socket, done on this stream
                try:
                    sender = await loop.run_in_executor(self._senders, self.kv_connections.acquire,
                                                        request.kv_endpoint, rt.policy.kv_transfer.timeout_seconds)
                except KvPortUnreachable:  # nothing sent: the chunks go on this stream, as with "grpc"
                    m.KV_TRANSFER_ON_STREAM.inc()
            if sender is not None:
                sent = False
                try:
                    total = await loop.run_in_executor(self._senders, sender.send_all, request.transfer_token, specs,
                                                       chunk_views, self._fault_hook, corrupt_seq)
                    sent = True
                except (TransferError, OSError) as exc:  # the decode side refused it or went away: it falls back
                    log.warning("KV transfer of %s to %s failed: %s", rid, request.kv_endpoint, exc)
                    await context.abort(grpc.StatusCode.ABORTED, f"KV transfer to {request.kv_endpoint} failed: {exc}")
                finally:
                    if sent:
                        self.kv_connections.release(sender)
                    else:  # shut first: a sender thread left by a cancelled RPC fails at once
                        sender.close()
            else:  # "grpc" transport, or "tcp" with the KV port out of reach: each chunk a message on this stream
                def encode(spec: ChunkSpec) -> tuple[bytes, int]:
                    k, v = chunk_views(spec, 0)
                    shape = lay.chunk_shape(spec.num_blocks, spec.num_layers)
                    message = chunk_message(rid, spec, k, v, lay.dtype, shape)
                    if spec.seq == corrupt_seq:
                        message = flip_payload_byte(message)
                    return message, sum(map(len, (*k, *v)))

                for spec in specs:
                    await asyncio.to_thread(self._fault_hook, spec)
                    # copies the chunk out of the pool (from a GPU: waits for it) and hashes it: not on the event
                    # loop. Cancelled meanwhile, the blocks are released while the thread may still read them:
                    # harmless, as the pool stays allocated and the message is dropped.
                    message, size = await asyncio.to_thread(encode, spec)
                    total += size
                    yield message
            m.KV_TRANSFER_BYTES.labels("sent").inc(total)
            m.KV_TRANSFER_SECONDS.labels("sent").observe(time.monotonic() - prefill_done)
            queue_s = (first.first_scheduled_time or t0) - first.arrival_time
            prefill_s = (first.first_token_time or prefill_done) - (first.first_scheduled_time or t0)
            yield pb.PrefillResponse(done=pb.PrefillDone(
                first_token=first.new_token_ids[0], num_chunks=len(specs), total_bytes=total,
                prefill_seconds=prefill_s, queue_seconds=queue_s, prefill_cached_tokens=first.num_cached_tokens,
                kv_on_stream=bool(request.kv_endpoint) and sender is None))
        finally:
            if queued:
                await _release(rt, rid)


def reads_pool_in_place(kv: PagedKVCache) -> bool:
    """Whether chunks are sent straight from the pool's blocks (a CPU pool) rather than exported first."""
    return kv.k.device.type == "cpu"


def _shape_of(layout: pb.KvLayout) -> pb.KvLayout:
    """The layout without the model fingerprint: what the KV's bytes look like."""
    shape = pb.KvLayout()
    shape.CopyFrom(layout)
    shape.ClearField("model_fingerprint")
    return shape


async def _release(rt: WorkerRuntime, rid: str) -> None:
    rt.engine.close_stream(rid)
    try:
        await asyncio.shield(rt.engine.call(lambda: rt.engine.engine.release(rid)))
    except Exception:  # the engine stopped: nothing left to release
        log.debug("release of %s skipped", rid)
