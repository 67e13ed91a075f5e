"""``Decode.Generate``: the decode-first request path (seed 001) on a decode (or ``both``) worker.

1. Validate; refuse while draining.
2. ``should_offload_prefill(prompt, cached prefix, prefill queue)``: local prefill inside the
   continuous batch, or remote.
3. Remote: reserve blocks (reusing the cached prefix), call a prefill worker, install the KV chunks it
   streams (checksum, dtype, shape and coverage verified), and commit with its first token.
4. Any failure in 3 (prefill worker gone, corrupt or misshapen chunk, deadline passed) drops the
   reservation and prefills locally: the request is never lost.
5. Stream tokens back until the request finishes; a cancelled call aborts the request.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from disagg_worker import metrics as m
from disagg_worker.engine.async_engine import EngineStoppedError
from disagg_worker.engine.engine import RequestOutput
from disagg_worker.engine.request import InvalidRequestError, SamplingParams
from disagg_worker.routing import should_offload_prefill
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server.peers import Peer, PeerPool
from disagg_worker.server.prefill_service import layout_message
from disagg_worker.server.runtime import (
    WorkerRuntime,
    abort_invalid,
    params_from_proto,
    params_to_proto,
    priority_from_proto,
    priority_to_proto,
)
from disagg_worker.transfer.chunks import TransferError
from disagg_worker.transfer.grpc_stream import Coverage, ReceivedChunk, decode_chunk, read_prefill_response
from disagg_worker.transfer.sinks import KvSink, PoolSink, StagedSink
from disagg_worker.transfer.tcp import KvReceiver, PendingTransfer

log = logging.getLogger(__name__)
PREFILL_MODES = ("", "auto", "local", "remote")  # "": auto
# A pool off the CPU installs each received gRPC chunk through the engine thread, which runs commands
# between steps: awaited one by one, every chunk waited for a step of its own (4 MiB chunks at 75 ms a
# step: ~50 MB/s). Up to kvTransfer.maxInflightChunks are queued at once (the memory bound), so those
# that arrive during a step all go in at its end; a fallback queued after them still runs after them
# (the engine's commands run in order).


def output_message(out: RequestOutput) -> pb.GenerateResponse:
    return pb.GenerateResponse(
        token_ids=out.new_token_ids, text=out.new_text, finished=out.finished, finish_reason=out.finish_reason or "",
        prompt_tokens=out.num_prompt_tokens, cached_tokens=out.num_cached_tokens,
        output_tokens=out.num_output_tokens, error=out.error or "")


class DecodeServicer(pb_grpc.DecodeServicer):
    def __init__(self, runtime: WorkerRuntime, prefill_pool: PeerPool, kv_receiver: KvReceiver | None = None) -> None:
        self.rt = runtime
        self.prefill_pool = prefill_pool
        self.kv_receiver = kv_receiver  # set when the policy's kvTransfer.backend is "tcp"

    # ---- the offload decision --------------------------------------------------------------
    def _pick_prefill_worker(self, prompt_len: int) -> Peer | None:
        # only peers serving this worker's model (a rolling update to another checkpoint runs both for a
        # while); a peer that has not reported one yet is checked by the prefill worker itself
        eng = self.rt.engine.engine
        ours = eng.model_fingerprint
        # and with this worker's block size (another layout would be refused, a round trip per request),
        # and a context that holds the prompt (a prefill worker's small KV pool caps its context)
        healthy = [p for p in self.prefill_pool.healthy()
                   if p.model_fingerprint in ("", ours) and p.load.block_size == eng.config.block_size
                   and (not p.max_model_len or prompt_len < p.max_model_len)]
        if not healthy:
            return None
        return min(healthy, key=lambda p: (p.load.load, p.endpoint))

    def _decide(self, mode: str, prompt: list[int]) -> tuple[Peer | None, int]:
        """The prefill worker to use (None: local) and the prefix length cached here."""
        cached = self.rt.engine.engine.block_manager.cached_prefix_tokens(prompt)
        if mode == "local" or not self.prefill_pool:
            return None, cached
        peer = self._pick_prefill_worker(len(prompt))
        if peer is None:
            return None, cached
        queue = peer.load.load
        if mode == "remote" or should_offload_prefill(len(prompt), cached, queue, self.rt.policy.split_policy):
            peer.load.pending += 1  # optimistic until its next load report
            return peer, cached
        return None, cached

    # ---- the RPC ---------------------------------------------------------------------------
    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[pb.GenerateResponse]:
        rt, eng = self.rt, self.rt.engine.engine
        t0 = time.monotonic()
        if rt.draining:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "decode worker is draining")
        rid = request.request_id
        prompt = list(request.prompt_token_ids)
        try:
            params = params_from_proto(request.params)
            eng.validate(prompt, params)
        except InvalidRequestError as exc:
            await abort_invalid(context, exc)
        if request.prefill_mode not in PREFILL_MODES:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"prefill_mode {request.prefill_mode!r} is not one of auto, local, remote")
        priority = priority_from_proto(request.priority)
        m.PROMPT_TOKENS.labels(rt.role).inc(len(prompt))
        peer, _cached = self._decide(request.prefill_mode or "auto", prompt)

        try:
            q = rt.engine.open_stream(rid)
        except InvalidRequestError as exc:  # an empty id, or one in use: that stream stays untouched
            await abort_invalid(context, exc)
        first_msg = pb.GenerateResponse(remote_prefill=False)
        first_output: RequestOutput | None = None
        finished = False
        try:
            try:
                if peer is not None:
                    first_output, first_msg = await self._remote_prefill(peer, rid, prompt, params, priority, t0)
                if first_output is None and not first_msg.fallback_reason:
                    await rt.engine.call(lambda: eng.add_request(rid, prompt, params, priority, arrival_time=t0))
                    m.PREFILL_DECISIONS.labels("local").inc()
            except InvalidRequestError as exc:
                finished = True
                rt.engine.close_stream(rid)
                await abort_invalid(context, exc)
            except EngineStoppedError as exc:  # UNAVAILABLE, which the router retries on another worker
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"the engine is not running: {exc}")

            first_token_at: float | None = None
            if first_output is not None:
                msg = output_message(first_output)
                msg.MergeFrom(first_msg)
                first_token_at = time.monotonic()
                finished = first_output.finished
                if finished:  # at commit (max_tokens 1, EOS first): the step loop never sees this output
                    rt.record_finished(first_output)
                yield msg
                if finished:
                    return
            async for out in rt.engine.stream(rid, q):
                finished = out.finished
                msg = output_message(out)
                if first_token_at is None and (out.new_token_ids or out.finished):
                    msg.MergeFrom(first_msg)
                    if out.first_token_time is not None:
                        msg.timings.CopyFrom(pb.PhaseTimings(
                            queue_seconds=(out.first_scheduled_time or t0) - t0,
                            prefill_seconds=out.first_token_time - (out.first_scheduled_time or t0),
                            first_token_seconds=out.first_token_time - t0))
                        _observe_phases(rt.role, msg.timings)
                    first_token_at = time.monotonic()
                elif first_token_at is not None and out.new_token_ids and out.num_output_tokens == 1 + len(
                        out.new_token_ids):
                    m.PHASE.labels(rt.role, "first_decode").observe(time.monotonic() - first_token_at)
                yield msg
        finally:
            if not finished:  # the caller went away (or we failed): free the request's blocks
                rt.engine.abort_nowait(rid)
            else:  # finished at commit (max_tokens 1, EOS first): its queue never saw the output
                rt.engine.close_stream(rid)

    async def _remote_prefill(self, peer: Peer, rid: str, prompt: list[int], params: SamplingParams,
                              priority: int, t0: float) -> tuple[RequestOutput | None, pb.GenerateResponse]:
        """Returns (first output, header) on success; (None, header with fallback_reason) after falling back."""
        rt, eng = self.rt, self.rt.engine.engine

        def reserve() -> tuple[int, list[int]] | None:
            cached = eng.reserve_for_import(rid, prompt, params, priority, arrival_time=t0)
            return None if cached is None else (cached, eng.reserved_blocks(rid))

        reserved = await rt.engine.call(reserve)
        if reserved is None:  # no blocks or batch slots free right now for a reservation
            return None, pb.GenerateResponse()
        cached, block_ids = reserved
        first_block = cached // eng.config.block_size
        prompt_blocks = eng.block_manager.blocks_for_tokens(len(prompt))
        lay = eng.runner.layout
        req = pb.PrefillRequest(request_id=rid, prompt_token_ids=prompt, params=params_to_proto(params),
                                first_block=first_block, layout=layout_message(rt),
                                chunk_bytes=rt.policy.kv_transfer.chunk_bytes, priority=priority_to_proto(priority))
        deadline = rt.policy.kv_transfer.timeout_seconds
        t_start = time.monotonic()
        received = 0
        coverage = Coverage(first_block, prompt_blocks - first_block, lay.num_layers)
        verify = rt.policy.kv_transfer.verify_checksums
        done: pb.PrefillDone | None = None
        t_first_chunk: float | None = None
        side: PendingTransfer | None = None
        token = ""
        # a CPU pool takes chunks straight into the reserved blocks (private to this request until commit)
        pool_sink = PoolSink(eng.runner.kv, block_ids) if eng.runner.kv.k.device.type == "cpu" else None
        if self.kv_receiver is not None:
            sink: KvSink = pool_sink or StagedSink(lay, lambda fb, ls, k, v: eng.import_kv(rid, fb, k, v, ls))
            side = PendingTransfer(rid, lay, coverage, sink, verify, asyncio.get_running_loop(),
                                   max_frame_bytes=rt.policy.kv_transfer.chunk_bytes)
            token = self.kv_receiver.register(side)
            req.kv_endpoint, req.transfer_token = self.kv_receiver.endpoint, token
        call: grpc.aio.UnaryStreamCall | None = None
        imports: deque[asyncio.Future[None]] = deque()
        try:
            # inside the try: a channel that closed meanwhile (the peer left DNS) raises here
            call = peer.prefill_stream(req, timeout=deadline)
            async for message in call:
                item = read_prefill_response(message)
                if isinstance(item, ReceivedChunk):
                    chunk = item
                    t_first_chunk = t_first_chunk or time.monotonic()
                    k, v = decode_chunk(chunk, lay, rid, verify)
                    coverage.add(chunk.first_block, chunk.num_blocks, chunk.layer_start, chunk.num_layers)
                    if pool_sink is not None:  # no wait for the engine's current step
                        pool_sink.write(chunk.spec, chunk.k, chunk.v)
                    else:  # queued, not awaited one by one (at most maxInflightChunks at once)
                        imports.append(asyncio.ensure_future(rt.engine.call(
                            lambda c=chunk, k=k, v=v: eng.import_kv(rid, c.first_block, k, v, c.layer_start))))
                        if len(imports) >= rt.policy.kv_transfer.max_inflight_chunks:
                            await imports.popleft()
                    received += len(chunk.k) + len(chunk.v)
                else:
                    done = item
            while imports:
                await imports.popleft()
            if done is None:
                raise TransferError("prefill stream ended without a first token")
            if side is not None and done.kv_on_stream:  # the prefill worker could not reach our KV port
                if side.attached:
                    raise TransferError("KV came on the KV port for a transfer said to be on the stream")
            elif side is not None:
                if t_first_chunk is not None:  # set by a chunk on the stream only, so far
                    raise TransferError("KV chunks came on the stream for a transfer on the KV port")
                # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancel that lands as the wait ends
                async with asyncio.timeout(max(0.1, deadline - (time.monotonic() - t_start))):
                    received = await asyncio.shield(side.finished)
                t_first_chunk = side.first_frame_at or t_start
            if not coverage.complete:
                raise TransferError("KV transfer incomplete: some blocks or layers never arrived")
            out = await rt.engine.call(lambda: eng.commit_import(rid, done.first_token))
        except EngineStoppedError:  # nothing can prefill it here either: the stream ends with an error
            raise
        except Exception as exc:  # whatever failed, the request is not lost: it prefills locally
            if call is not None:
                call.cancel()  # at once, before waiting on the data plane and falling back
            _drop_imports(imports)
            failure: BaseException = exc
            if side is not None and side.attached and not side.finished.done():
                left = deadline - (time.monotonic() - t_start)
                with contextlib.suppress(Exception):  # let the data plane report its side of the failure
                    async with asyncio.timeout(min(1.0, max(0.01, left))):
                        await asyncio.shield(side.finished)
            # the data plane's error explains the control stream's (an ABORTED from a prefill worker whose
            # send failed), unless that one failed first on its own: a deadline or a dead peer cuts the
            # socket too, and its "closed mid-frame" would then be counted as a bad chunk
            control_cause = _failure_reason(exc) in ("deadline", "unavailable")
            if (not control_cause and side is not None and side.finished.done() and not side.finished.cancelled()
                    and side.finished.exception() is not None):
                failure = side.finished.exception()  # type: ignore[assignment]
            if side is not None:
                side.stop()  # before fallback frees the reserved blocks: no late chunk lands in them
            reason = _failure_reason(failure)
            log.warning("remote prefill of %s via %s failed (%s): prefilling locally", rid, peer.endpoint, reason)
            m.KV_TRANSFER_FAILURES.labels(reason).inc()
            m.PREFILL_DECISIONS.labels("fallback").inc()
            if isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.UNAVAILABLE:
                self.prefill_pool.mark_unhealthy(peer.endpoint)  # the control stream's error, whatever the data plane's
            await rt.engine.call(lambda: eng.fallback_to_local(rid))
            return None, pb.GenerateResponse(fallback_reason=reason)
        finally:
            _drop_imports(imports)
            if call is not None:
                call.cancel()  # a no-op once the stream has ended; stops it on any other way out
            if side is not None:
                side.stop()  # the data plane never writes into these blocks again (fallback/abort free them)
                self.kv_receiver.unregister(token)  # type: ignore[union-attr]
        now = time.monotonic()
        m.PREFILL_DECISIONS.labels("remote").inc()
        m.KV_TRANSFER_BYTES.labels("received").inc(received)
        transfer_s = now - (t_first_chunk or now)
        m.KV_TRANSFER_SECONDS.labels("received").observe(now - (t_first_chunk or t_start))
        timings = pb.PhaseTimings(queue_seconds=done.queue_seconds, prefill_seconds=done.prefill_seconds,
                                  kv_transfer_seconds=transfer_s, first_token_seconds=now - t0)
        _observe_phases(rt.role, timings, remote=True)
        m.TTFT.labels(rt.role).observe(now - t0)
        m.GENERATION_TOKENS.labels(rt.role).inc(len(out.new_token_ids))  # sampled remotely: no step of ours saw it
        # (not into this worker's mean prefill time: the router reads that as the cost of the prompts
        # this worker prefills itself, and a remote prefill of a long prompt inflated it 12x)
        return out, pb.GenerateResponse(remote_prefill=True, timings=timings)


def _failure_reason(exc: BaseException) -> str:
    if isinstance(exc, grpc.aio.AioRpcError):
        if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
            return "deadline"
        if exc.code() == grpc.StatusCode.UNAVAILABLE:
            return "unavailable"
        return exc.code().name.lower()
    if isinstance(exc, TransferError):
        text = str(exc)
        return "checksum" if "checksum" in text else "incomplete" if "incomplete" in text else "invalid_chunk"
    if isinstance(exc, asyncio.TimeoutError):
        return "deadline"
    return "error"


def _observe_phases(role: str, t: pb.PhaseTimings, remote: bool = False) -> None:
    m.PHASE.labels(role, "queue").observe(max(t.queue_seconds, 0.0))
    m.PHASE.labels(role, "prefill").observe(max(t.prefill_seconds, 0.0))
    if remote:  # a local prefill moves no KV: a 0 here would only dilute the transfer histogram
        m.PHASE.labels(role, "kv_transfer").observe(max(t.kv_transfer_seconds, 0.0))
    m.PHASE.labels(role, "first_token").observe(max(t.first_token_seconds, 0.0))


def _drop_imports(imports: deque[asyncio.Future[None]]) -> None:
    """Cancel chunk imports not yet queued on the engine (a queued one still runs, before the fallback
    queued after it frees the blocks); their errors are read, not left unretrieved."""
    while imports:
        task = imports.popleft()
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
