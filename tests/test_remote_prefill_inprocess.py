"""Remote prefill between real decode and prefill servicers with real engines, in-process gRPC on
127.0.0.1 (faster to set up than worker processes, and the pieces can be reached into):

- a request's QoS class reaches the prefill worker's queue (it used to be high for everyone, so a
  burst of low-priority long prompts delayed high-priority ones on the prefill pool);
- a prefill worker whose channel closed under the request (it left DNS) means local prefill, not an
  error, and no transfer registration is left behind;
- a worker whose engine stopped answers load polls with UNAVAILABLE, so it leaves the pool.

The answer equals Hugging Face greedy either way."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import pytest

from disagg_worker import metrics
from disagg_worker.engine.async_engine import AsyncEngine
from disagg_worker.engine.engine import EngineConfig, LLMEngine
from disagg_worker.engine.request import PRIORITY_HIGH, PRIORITY_LOW
from disagg_worker.models.loader import LoadedModel
from disagg_worker.policy import Policy
from disagg_worker.rpc import pb, pb_grpc
from disagg_worker.server.decode_service import DecodeServicer
from disagg_worker.server.peers import PeerPool
from disagg_worker.server.prefill_service import PrefillServicer
from disagg_worker.server.runtime import WorkerRuntime
from disagg_worker.transfer.grpc_stream import add_prefill_servicer
from disagg_worker.transfer.tcp import KvReceiver
from disagg_worker.worker_main import WorkerServicer
from tests.conftest import hf_greedy


@dataclass
class Pair:
    decode: pb_grpc.DecodeStub
    prefill_priorities: list[int]  # what the prefill engine was asked to queue, in order
    prefill_pool: PeerPool
    prefill_runtime: WorkerRuntime
    decode_runtime: WorkerRuntime
    prefill_servicer: PrefillServicer


@contextlib.asynccontextmanager
async def served_pair(llama: LoadedModel, policy: Policy, kv_receiver: KvReceiver | None = None
                      ) -> AsyncIterator[Pair]:
    """A prefill and a decode servicer, each on its own gRPC server on 127.0.0.1, the decode one with
    ``kv_receiver`` (the "tcp" transport) if given; everything stopped afterwards."""
    runtimes, servers = [], []
    prefill_pool = None
    try:
        for role in ("prefill", "decode"):
            engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), llama))
            engine.start()
            runtimes.append(WorkerRuntime(engine, role, policy, "tiny-llama"))
        prefill_rt, decode_rt = runtimes
        seen: list[int] = []
        real_add = prefill_rt.engine.engine.add_request

        def spy(*args: object, **kwargs: object) -> object:
            seen.append(args[3] if len(args) > 3 else kwargs.get("priority", PRIORITY_HIGH))  # type: ignore[arg-type]
            return real_add(*args, **kwargs)  # type: ignore[arg-type]

        prefill_rt.engine.engine.add_request = spy  # type: ignore[method-assign]
        prefill_server = grpc.aio.server()
        pb_grpc.add_WorkerServicer_to_server(WorkerServicer(prefill_rt), prefill_server)
        prefill_servicer = PrefillServicer(prefill_rt)
        add_prefill_servicer(prefill_servicer, prefill_server)
        prefill_port = prefill_server.add_insecure_port("127.0.0.1:0")
        servers.append(prefill_server)
        await prefill_server.start()
        prefill_pool = PeerPool("prefill", f"127.0.0.1:{prefill_port}")
        await prefill_pool.start()
        decode_server = grpc.aio.server()
        pb_grpc.add_DecodeServicer_to_server(DecodeServicer(decode_rt, prefill_pool, kv_receiver), decode_server)
        decode_port = decode_server.add_insecure_port("127.0.0.1:0")
        servers.append(decode_server)
        await decode_server.start()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{decode_port}") as channel:
            yield Pair(pb_grpc.DecodeStub(channel), seen, prefill_pool, prefill_rt, decode_rt, prefill_servicer)
    finally:
        for server in servers:
            await server.stop(grace=None)
        if prefill_pool is not None:
            await prefill_pool.stop()
        for rt in runtimes:
            await rt.engine.stop()


@pytest.fixture
async def pair(llama: LoadedModel) -> AsyncIterator[Pair]:
    async with served_pair(llama, Policy()) as served:  # the default kvTransfer backend (gRPC stream)
        yield served


@pytest.mark.parametrize(("priority", "queued_as"),
                         [(pb.PRIORITY_LOW, PRIORITY_LOW), (pb.PRIORITY_HIGH, PRIORITY_HIGH)])
async def test_remote_prefill_is_queued_with_the_requests_priority(pair: Pair, llama: LoadedModel, priority: int,
                                                                   queued_as: int) -> None:
    prompt = list(range(40, 90))
    request = pb.GenerateRequest(request_id=f"r-{priority}", prompt_token_ids=prompt, priority=priority,
                                 prefill_mode="remote", params=pb.SamplingParams(max_tokens=6, temperature=0, top_p=1))
    counted = metrics.GENERATION_TOKENS.labels("decode")._value.get()
    messages = [m async for m in pair.decode.Generate(request, timeout=60)]
    assert messages[0].remote_prefill and not messages[0].fallback_reason
    assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 6)
    assert pair.prefill_priorities == [queued_as]
    # the first token too, sampled on the prefill worker (no decode step saw it: it went uncounted)
    assert metrics.GENERATION_TOKENS.labels("decode")._value.get() - counted == 6


async def test_a_remote_prefill_is_not_counted_as_the_decode_workers_own(pair: Pair) -> None:
    """The router reads a decode worker's mean prefill time as the cost of the prompts it prefills itself
    (its local queue); remote prefills of long prompts inflated it 12x, and low-priority work was
    rejected while the real wait was a few milliseconds."""
    request = pb.GenerateRequest(request_id="remote", prompt_token_ids=list(range(40, 90)), prefill_mode="remote",
                                 params=pb.SamplingParams(max_tokens=2, temperature=0, top_p=1))
    messages = [m async for m in pair.decode.Generate(request, timeout=60)]
    assert messages[0].remote_prefill
    assert pair.prefill_runtime.avg_prefill_seconds.value > 0
    assert pair.decode_runtime.avg_prefill_seconds.value == 0


async def test_an_unknown_prefill_mode_is_refused(pair: Pair) -> None:
    request = pb.GenerateRequest(request_id="mode", prompt_token_ids=[5, 6, 7], prefill_mode="Remote",
                                 params=pb.SamplingParams(max_tokens=2, temperature=0, top_p=1))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in pair.decode.Generate(request, timeout=30):
            pass
    assert exc.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "prefill_mode" in exc.value.details()


async def test_a_closed_prefill_channel_falls_back_to_local_prefill(pair: Pair, llama: LoadedModel) -> None:
    [peer] = pair.prefill_pool.healthy()
    await peer.channel.close()  # as when the peer is retired between the choice and the call
    prompt = list(range(40, 90))
    request = pb.GenerateRequest(request_id="closed", prompt_token_ids=prompt, prefill_mode="remote",
                                 params=pb.SamplingParams(max_tokens=6, temperature=0, top_p=1))
    messages = [m async for m in pair.decode.Generate(request, timeout=60)]
    assert not messages[0].remote_prefill and messages[0].fallback_reason == "error"
    assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 6)


async def test_a_worker_whose_engine_stopped_leaves_the_pool(pair: Pair) -> None:
    assert pair.prefill_pool.healthy()
    await pair.prefill_runtime.engine.stop()  # as if its engine thread had died
    await pair.prefill_pool.poll_once()
    assert not pair.prefill_pool.healthy()  # its frozen load report used to keep it looking idle


@contextlib.asynccontextmanager
async def prefill_peer(prefill: tuple[LoadedModel, EngineConfig], decode: tuple[LoadedModel, EngineConfig]
                       ) -> AsyncIterator[tuple[WorkerRuntime, WorkerRuntime, PeerPool]]:
    """A prefill worker served over gRPC on 127.0.0.1 and a decode runtime (not served) with a pool
    that reaches it: (prefill runtime, decode runtime, pool); everything stopped afterwards."""
    policy = Policy()
    runtimes: list[WorkerRuntime] = []
    server = grpc.aio.server()
    pool = None
    try:
        for (lm, config), role in ((prefill, "prefill"), (decode, "decode")):
            engine = AsyncEngine(LLMEngine(config, lm))
            engine.start()
            runtimes.append(WorkerRuntime(engine, role, policy, lm.name))
        prefill_rt, decode_rt = runtimes
        pb_grpc.add_WorkerServicer_to_server(WorkerServicer(prefill_rt), server)
        add_prefill_servicer(PrefillServicer(prefill_rt), server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        pool = PeerPool("prefill", f"127.0.0.1:{port}")
        await pool.start()
        yield prefill_rt, decode_rt, pool
    finally:
        await server.stop(grace=None)
        if pool is not None:
            await pool.stop()
        for rt in runtimes:
            await rt.engine.stop()


@pytest.mark.parametrize(("other_model", "block_size", "refusal"), [
    ("tiny-qwen2", 16, "model mismatch"),  # same KV layout as tiny-llama, other weights
    ("tiny-llama", 8, "KV layout mismatch"),
    ("tiny-llama:bfloat16", 16, "KV layout mismatch"),  # its fingerprint differs too: the layout says why
])
async def test_a_prefill_worker_on_another_model_or_layout_is_never_used(llama: LoadedModel, other_model: str,
                                                                        block_size: int, refusal: str) -> None:
    """Two checkpoints with KV blocks of one shape (a rolling update to a fine-tune): KV from the other
    was accepted, the output was wrong, and the decode worker's prefix cache kept the wrong blocks. The
    decode worker skips a peer reporting another model (or block size: refused, a round trip each
    time), and the prefill worker refuses one itself."""
    from disagg_worker.models.loader import load_model
    from tests.conftest import TEST_DEVICE, get_model

    name, _, dtype = other_model.partition(":")
    other = load_model(name, TEST_DEVICE, dtype) if dtype else get_model(name)
    async with prefill_peer((other, EngineConfig(num_kv_blocks=64, block_size=block_size)),
                            (llama, EngineConfig(num_kv_blocks=64, block_size=16))) as (_, decode_rt, pool):
        [peer] = pool.healthy()
        assert peer.model_fingerprint == other.fingerprint
        decode = DecodeServicer(decode_rt, pool)
        assert decode._decide("remote", list(range(40, 90)))[0] is None  # local prefill
        # asked anyway (a decode worker that cannot tell), the prefill worker refuses
        from disagg_worker.server.prefill_service import layout_message

        request = pb.PrefillRequest(request_id="x", prompt_token_ids=list(range(40, 90)), layout=layout_message(
            decode_rt), params=pb.SamplingParams(max_tokens=1, temperature=0, top_p=1))
        with pytest.raises(grpc.aio.AioRpcError) as exc:
            async for _ in peer.prefill_stream(request, timeout=30):
                pass
        assert exc.value.code() == grpc.StatusCode.FAILED_PRECONDITION and refusal in exc.value.details()


async def generate_remotely(pair: Pair, request_id: str, prompt: list[int], max_tokens: int = 8
                            ) -> list[pb.GenerateResponse]:
    """The decode worker's messages for a greedy request it is asked to prefill remotely."""
    request = pb.GenerateRequest(request_id=request_id, prompt_token_ids=prompt, prefill_mode="remote",
                                 params=pb.SamplingParams(max_tokens=max_tokens, temperature=0, top_p=1))
    return [m async for m in pair.decode.Generate(request, timeout=60)]


def _staged(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make the decode worker install KV as it does for a GPU pool (through the engine thread) in 4 KiB
    chunks; returns a list with, per import the engine ran, the engine calls then waiting (itself
    included), or -1 for an import that ran when its request no longer awaited KV."""
    from disagg_worker.server import decode_service

    monkeypatch.setattr(decode_service, "PoolSink", lambda *a: None)  # what a pool off the CPU gets
    rt = pair.decode_runtime
    rt.policy = rt.policy.model_copy(update={"kv_transfer": rt.policy.kv_transfer.model_copy(
        update={"chunk_bytes": 4096})})
    imports: list[int] = []
    eng = rt.engine.engine
    real = eng.import_kv

    def counted(*args: object, **kwargs: object) -> None:
        imports.append(len(rt.engine._pending) if args[0] in eng.scheduler.awaiting_kv else -1)
        time.sleep(0.005)  # a GPU copy's worth: chunks arriving meanwhile can queue up behind it
        real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(eng, "import_kv", counted)
    return imports


async def test_kv_for_a_pool_off_the_cpu_is_installed_through_the_engine(pair: Pair, llama: LoadedModel,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    imports = _staged(pair, monkeypatch)
    prompt = list(range(40, 340))  # 19 blocks: dozens of 4 KiB chunks, more than the queued window
    messages = await generate_remotely(pair, "staged", prompt)
    assert messages[0].remote_prefill and not messages[0].fallback_reason
    assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 8)
    assert len(imports) > 8
    assert max(imports) > 1  # chunks were queued on the engine together, not awaited one at a time


async def test_kv_from_a_pool_off_the_cpu_is_exported_chunk_by_chunk(pair: Pair, llama: LoadedModel,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A prefill worker on a GPU copies each chunk out of its pool (``export_kv``) before sending it: the
    path a CPU pool, read in place, never takes. Both sides as off the CPU here, with 4 KiB chunks."""
    from disagg_worker.server import prefill_service

    _staged(pair, monkeypatch)
    monkeypatch.setattr(prefill_service, "reads_pool_in_place", lambda kv: False)
    eng = pair.prefill_runtime.engine.engine
    exports: list[int] = []
    real = eng.export_kv

    def counted(*args: object, **kwargs: object) -> object:
        exports.append(args[2])  # type: ignore[arg-type]
        return real(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(eng, "export_kv", counted)
    prompt = list(range(40, 340))
    messages = await generate_remotely(pair, "exported", prompt)
    assert messages[0].remote_prefill and not messages[0].fallback_reason
    assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 8)
    assert len(exports) > 8


async def test_a_failed_install_falls_back_after_the_queued_ones(pair: Pair, llama: LoadedModel,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    imports = _staged(pair, monkeypatch)
    eng = pair.decode_runtime.engine.engine
    counted = eng.import_kv

    def fails_third(*args: object, **kwargs: object) -> None:
        counted(*args, **kwargs)  # type: ignore[arg-type]
        if len(imports) == 3:
            raise RuntimeError("install failed")

    monkeypatch.setattr(eng, "import_kv", fails_third)
    prompt = list(range(40, 340))
    messages = await generate_remotely(pair, "fails", prompt)
    assert not messages[0].remote_prefill and messages[0].fallback_reason
    assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 8)
    assert await pair.decode_runtime.engine.call(lambda: eng.block_manager.usage) == 0
    assert len(imports) >= 3 and -1 not in imports  # none ran after the fallback had freed the blocks


class _AbortingContext:
    async def abort(self, code: object, details: str) -> None:
        raise RuntimeError(f"abort {code} {details}")


async def test_a_prefill_cancelled_while_queued_still_releases_its_blocks(llama: LoadedModel) -> None:
    """The decode side gave up while the add waited for a step: the request then prefilled, finished and
    held its KV blocks for an export nobody would ever ask for (the pool filled up over time)."""
    from disagg_worker.server.prefill_service import layout_message

    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), llama))
    engine.start()
    try:
        rt = WorkerRuntime(engine, "prefill", Policy(), "tiny-llama")
        eng = engine.engine
        real_add = eng.add_request

        def slow_add(*args: object, **kwargs: object) -> object:
            time.sleep(0.3)  # an engine step in progress when the add is queued
            return real_add(*args, **kwargs)  # type: ignore[arg-type]

        eng.add_request = slow_add  # type: ignore[method-assign]
        request = pb.PrefillRequest(request_id="p1", prompt_token_ids=list(range(40, 90)), first_block=0,
                                    params=pb.SamplingParams(max_tokens=4, temperature=0, top_p=1),
                                    layout=layout_message(rt), chunk_bytes=1 << 20)
        stream = PrefillServicer(rt).Prefill(request, _AbortingContext())  # type: ignore[arg-type]
        task = asyncio.ensure_future(stream.__anext__())
        await asyncio.sleep(0.1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(100):
            if not eng.has_unfinished() and not eng.scheduler.held:
                break
            await asyncio.sleep(0.05)
        assert await engine.call(lambda: (dict(eng.scheduler.held), eng.block_manager.usage, rt.num_active)) == (
            {}, 0, 0)
    finally:
        await engine.stop()


async def test_a_worker_whose_engine_stopped_answers_unavailable(pair: Pair) -> None:
    """UNAVAILABLE is what the router retries on another decode worker; this was UNKNOWN (a 502)."""
    await pair.decode_runtime.engine.stop()
    request = pb.GenerateRequest(request_id="stopped", prompt_token_ids=list(range(40, 60)), prefill_mode="local",
                                 params=pb.SamplingParams(max_tokens=2, temperature=0, top_p=1))
    with pytest.raises(grpc.aio.AioRpcError) as exc:
        async for _ in pair.decode.Generate(request, timeout=30):
            pass
    assert exc.value.code() == grpc.StatusCode.UNAVAILABLE and "not running" in exc.value.details()


async def test_the_sigterm_drain_only_waits_for_what_the_prestop_drain_left(pair: Pair) -> None:
    """A pod's preStop /drain?wait=T and then SIGTERM's drain each waited T: with requests still running
    the kubelet killed the pod (grace T + 30 s) in the middle of its shutdown."""
    rt = pair.decode_runtime
    assert rt.drain_left(5.0) == 5.0  # no drain yet
    await rt.drain(0.3)  # as the preStop hook does (idle here: returns at once)
    await asyncio.sleep(0.3)
    assert 4.0 < rt.drain_left(5.0) < 4.8
    assert rt.drain_left(0.2) == 0.0


async def test_a_prefill_worker_whose_context_cannot_hold_the_prompt_is_not_asked(llama: LoadedModel) -> None:
    """A prefill worker with a small KV pool serves a small context: asked for a longer prompt it refuses,
    one reservation, one round trip and a counted transfer failure per request, then a local prefill."""
    async with prefill_peer((llama, EngineConfig(num_kv_blocks=4, block_size=16)),
                            (llama, EngineConfig(num_kv_blocks=64, block_size=16))) as (prefill_rt, decode_rt, pool):
        assert prefill_rt.engine.engine.max_model_len == 64
        decode = DecodeServicer(decode_rt, pool)
        assert decode._decide("remote", list(range(40, 120)))[0] is None  # 80 tokens: local
        assert decode._decide("remote", list(range(40, 90)))[0] is not None  # 50 tokens fit


async def test_an_unreachable_kv_port_gets_the_kv_on_the_stream(llama: LoadedModel) -> None:
    """"tcp" transport with the decode worker's KV port out of the prefill worker's reach (a NetworkPolicy
    that lets only gRPC through, a wrong --advertise-host): every request fell back to local prefill, and
    where the port dropped connections rather than refused them, only after waiting out its transfer
    deadline (30 s). Now the KV comes on the Prefill stream, and the next transfer does not try the port."""
    receiver = KvReceiver("127.0.0.1")
    with socket.create_server(("127.0.0.1", 0)) as gone:
        dead_port = gone.getsockname()[1]
    receiver.endpoint = f"127.0.0.1:{dead_port}"  # what it advertises: a port nobody listens on (refused)
    policy = Policy.model_validate({"kvTransfer": {"backend": "tcp"}})
    on_stream = metrics.KV_TRANSFER_ON_STREAM._value.get()
    try:
        async with served_pair(llama, policy, receiver) as pair:
            for i, prompt in enumerate([list(range(40, 340)), list(range(60, 130))]):
                messages = await generate_remotely(pair, f"on-stream-{i}", prompt)
                assert messages[0].remote_prefill and not messages[0].fallback_reason
                assert [t for m in messages for t in m.token_ids] == hf_greedy(llama, prompt, 8)
            assert receiver.endpoint in pair.prefill_servicer.kv_connections._unreachable
        assert metrics.KV_TRANSFER_ON_STREAM._value.get() - on_stream == 2
        assert not receiver._pending  # no registration left behind
    finally:
        receiver.close()

