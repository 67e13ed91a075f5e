"""The engine thread behind asyncio: concurrent streams, early exit aborts, bad input raises at once."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator

import pytest

from disagg_worker.engine.async_engine import AsyncEngine, EngineStoppedError
from disagg_worker.engine.engine import EngineConfig, LLMEngine
from disagg_worker.engine.request import InvalidRequestError
from disagg_worker.models.loader import LoadedModel
from tests.conftest import hf_greedy, random_prompts


async def collect(engine: AsyncEngine, rid: str, prompt: list[int], n: int) -> list[int]:
    return [t async for out in engine.generate(rid, prompt, {"max_tokens": n, "temperature": 0})
            for t in out.new_token_ids]


async def test_concurrent_streams_match_hf(llama: LoadedModel) -> None:
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=256), llama))
    engine.start()
    try:
        prompts = random_prompts(16, 3, 80, 17)
        results = await asyncio.gather(*(collect(engine, f"r{i}", p, 12) for i, p in enumerate(prompts)))
        for p, r in zip(prompts, results, strict=True):
            assert r == hf_greedy(llama, p, 12)
        with pytest.raises(InvalidRequestError):
            await collect(engine, "bad", [], 4)
        gen = engine.generate("early", [5] * 20, {"max_tokens": 200, "temperature": 0})
        await gen.__anext__()
        await gen.aclose()  # the client left: the request is aborted, its blocks freed
        for _ in range(100):
            if engine.engine.block_manager.usage == 0 and not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        assert engine.engine.block_manager.usage == 0
    finally:
        await engine.stop()


@pytest.fixture
async def running(llama: LoadedModel) -> AsyncIterator[AsyncEngine]:
    """A started engine on a small pool, stopped after the test whatever happened."""
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64), llama))
    engine.start()
    try:
        yield engine
    finally:
        await engine.stop()


async def test_a_failing_command_does_not_stop_the_engine(running: AsyncEngine, llama: LoadedModel) -> None:
    running._commands.put(lambda: 1 / 0)  # fire-and-forget, like an abort: nobody awaits it
    assert await collect(running, "after", [5, 6, 7], 3) == hf_greedy(llama, [5, 6, 7], 3)
    assert running.running


async def test_a_request_id_in_use_is_refused_and_its_stream_kept(running: AsyncEngine, llama: LoadedModel) -> None:
    first = running.generate("same", [5, 6, 7], {"max_tokens": 6, "temperature": 0})
    tokens = list((await anext(first)).new_token_ids)
    with pytest.raises(InvalidRequestError, match="already in use"):
        await collect(running, "same", [8, 9], 2)
    with pytest.raises(InvalidRequestError, match="empty"):
        await collect(running, "", [8, 9], 2)
    tokens += [t async for out in first for t in out.new_token_ids]
    assert tokens == hf_greedy(llama, [5, 6, 7], 6)


@pytest.mark.parametrize("engine_busy_seconds", [0.3, 0.0])
async def test_a_caller_cancelled_while_its_request_is_added_leaves_nothing_running(
        running: AsyncEngine, llama: LoadedModel, engine_busy_seconds: float) -> None:
    """Cancelled while the add waited behind a busy engine thread, the request used to be added anyway
    and decode its whole max_tokens with nobody reading, holding its blocks and its id."""
    busy = asyncio.ensure_future(running.call(lambda: time.sleep(engine_busy_seconds)))
    consumer = asyncio.ensure_future(collect(running, "gone", [5] * 20, 400))
    await asyncio.sleep(0.05 if engine_busy_seconds else 0)
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await busy
    await running.call(lambda: None)  # whatever the cancel queued has run
    assert running.engine.get_request("gone") is None or running.engine.get_request("gone").is_finished
    assert await collect(running, "gone", [5, 6, 7], 3) == hf_greedy(llama, [5, 6, 7], 3)  # the id is free
    assert running.engine.block_manager.usage == 0


def _end_the_engine_thread() -> None:
    raise SystemExit  # a BaseException: what no command handler catches


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's death is the test
async def test_calls_queued_behind_a_dying_engine_thread_get_an_error(running: AsyncEngine) -> None:
    gate = threading.Event()
    running._commands.put(lambda: gate.wait(5))  # hold the thread so both commands below queue up
    running._commands.put(_end_the_engine_thread)
    waiting = asyncio.create_task(running.call(lambda: 42))
    await asyncio.sleep(0.05)
    gate.set()
    with pytest.raises(EngineStoppedError):
        await asyncio.wait_for(waiting, 5)  # it used to wait forever
    assert not running.running
    with pytest.raises(EngineStoppedError):
        await running.call(lambda: 42)


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end is the test
async def test_a_broken_device_stops_the_engine_after_failing_its_batch(running: AsyncEngine,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A sticky CUDA error (simulated here: no GPU) makes every later step fail too: the engine stops, so
    /health answers 503 and load reports UNAVAILABLE, instead of a worker that looks idle and fails all."""
    def broken(out: object) -> None:
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    from disagg_worker.engine import engine as engine_module

    monkeypatch.setattr(running.engine.runner, "execute", broken)
    monkeypatch.setattr(engine_module, "device_works", lambda device: False)  # what a GPU answers then
    outs = [o async for o in running.generate("x", [5, 6, 7], {"max_tokens": 3, "temperature": 0})]
    assert outs[-1].finish_reason == "error" and "illegal memory access" in outs[-1].error
    for _ in range(100):
        if not running.running:
            break
        await asyncio.sleep(0.02)
    assert not running.running
    with pytest.raises(EngineStoppedError):
        await collect(running, "later", [5, 6], 2)


async def test_a_device_error_that_left_the_device_working_fails_only_its_batch(
        running: AsyncEngine, llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """Not every CUDA error is sticky (an allocation outside torch's allocator, a launch too big for one
    batch): when the device still runs a kernel, the engine goes on."""
    real = running.engine.runner.execute
    calls = []

    def once(out: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("CUDA error: out of memory")
        return real(out)  # type: ignore[arg-type]

    monkeypatch.setattr(running.engine.runner, "execute", once)
    outs = [o async for o in running.generate("x", [5, 6, 7], {"max_tokens": 3, "temperature": 0})]
    assert outs[-1].finish_reason == "error"
    assert await collect(running, "after", [5, 6, 7], 3) == hf_greedy(llama, [5, 6, 7], 3)
    assert running.running


def test_which_errors_may_have_broken_the_device() -> None:
    import torch

    from disagg_worker.engine.engine import device_works, looks_like_device_error

    assert looks_like_device_error(RuntimeError("CUDA error: device-side assert triggered"))
    assert looks_like_device_error(torch.AcceleratorError("CUDA error: unspecified launch failure"))
    assert not looks_like_device_error(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not looks_like_device_error(RuntimeError("shape mismatch"))
    assert device_works(torch.device("cpu"))


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread's end is the test
async def test_a_step_that_keeps_raising_ends_the_streams_instead_of_hanging(running: AsyncEngine,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """An error outside the step's own handling (here the scheduler's bookkeeping) was logged and the same
    batch retried for ever: every stream hung while /health said OK."""
    def broken(*args: object) -> None:
        raise RuntimeError("scheduler invariant broken")

    monkeypatch.setattr(running.engine.scheduler, "update_from_output", broken)
    outs = await asyncio.wait_for(
        collect_outputs(running.generate("x", [5, 6, 7], {"max_tokens": 3, "temperature": 0})), timeout=10)
    assert outs[-1].finish_reason == "error"
    assert not running.running


async def collect_outputs(stream: AsyncIterator[object]) -> list:
    return [o async for o in stream]


async def test_a_hung_step_fails_liveness_until_it_ends(running: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """A hung device or a deadlock in a step: the thread is alive, so /health said OK for ever."""
    import time

    from fastapi.testclient import TestClient

    from disagg_worker.engine import async_engine
    from disagg_worker.policy import Policy
    from disagg_worker.server.http import build_app
    from disagg_worker.server.runtime import WorkerRuntime

    monkeypatch.setattr(async_engine, "STUCK_STEP_SECONDS", 0.2)
    real = running.engine.runner.execute

    def slow(out: object) -> object:
        time.sleep(1.0)
        return real(out)  # type: ignore[arg-type]

    monkeypatch.setattr(running.engine.runner, "execute", slow)
    client = TestClient(build_app(WorkerRuntime(running, "decode", Policy(), "tiny-llama")))
    task = asyncio.ensure_future(collect(running, "slow", [5, 6, 7], 1))
    await asyncio.sleep(0.6)
    during = client.get("/health")
    await task
    assert during.status_code == 503 and "step running" in during.json()["status"]
    assert client.get("/health").status_code == 200


def slow_forward_passes(engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Make every forward pass of ``engine`` take ``seconds`` longer (a big model's step)."""
    real_execute = engine.engine.runner.execute

    def slow_execute(*args: object, **kwargs: object) -> object:
        time.sleep(seconds)
        return real_execute(*args, **kwargs)

    monkeypatch.setattr(engine.engine.runner, "execute", slow_execute)


async def test_busy_time_counts_the_step_in_progress(running: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Utilisation (what the planner scales on) is busy time per window: a step longer than the window
    used to add nothing until it ended, so a fully busy engine read as idle."""
    slow_forward_passes(running, monkeypatch, 0.6)
    consumer = asyncio.ensure_future(collect(running, "slow", [5, 6, 7], 2))
    await asyncio.sleep(0.1)
    before, t0 = running.busy_seconds(), time.monotonic()
    await asyncio.sleep(0.3)  # inside the first 0.6 s step
    assert running.busy_seconds() - before == pytest.approx(time.monotonic() - t0, abs=0.1)  # was ~0
    await consumer
    assert running.busy_seconds() >= 1.2  # two steps, finished


async def test_the_kv_usage_integral_grows_while_a_request_holds_blocks(
        running: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner reads KV usage as this integral's rate over its interval, not as a snapshot."""
    slow_forward_passes(running, monkeypatch, 0.2)
    start = running.kv_usage_integral.total()
    consumer = asyncio.ensure_future(collect(running, "held", [5, 6, 7], 3))
    await asyncio.sleep(0.5)
    held = running.engine.block_manager.usage
    assert held > 0
    assert running.kv_usage_integral.total() - start == pytest.approx(held * 0.5, rel=0.5)
    await consumer
    await asyncio.sleep(0.1)  # the loop records the freed blocks on its next pass
    done = running.kv_usage_integral.total()
    await asyncio.sleep(0.2)
    assert running.kv_usage_integral.total() == pytest.approx(done)  # nothing held: nothing added


async def test_the_waiting_integral_counts_requests_waiting_for_a_slot_not_those_running(
        llama: LoadedModel, monkeypatch: pytest.MonkeyPatch) -> None:
    """The planner reads the queue as this integral's rate. A request admitted to the batch stops
    waiting when its step is scheduled, not when the step ends: fed only between steps, the integral
    counted every admitted request as waiting for its whole first step."""
    engine = AsyncEngine(LLMEngine(EngineConfig(num_kv_blocks=64, max_num_seqs=1), llama))
    engine.start()
    try:
        slow_forward_passes(engine, monkeypatch, 0.3)
        first = asyncio.ensure_future(collect(engine, "first", [5, 6, 7], 4))
        await asyncio.sleep(0.1)  # inside its first step: running, not waiting
        before = engine.waiting_integral.total()
        await asyncio.sleep(0.15)
        assert engine.waiting_integral.total() - before == pytest.approx(0.0, abs=0.02)
        second = asyncio.ensure_future(collect(engine, "second", [8, 9, 10], 1))
        await asyncio.sleep(0.05)  # the only slot is taken: it waits
        before, t0 = engine.waiting_integral.total(), time.monotonic()
        await asyncio.sleep(0.3)
        assert engine.waiting_integral.total() - before == pytest.approx(time.monotonic() - t0, abs=0.05)
        await asyncio.gather(first, second)
    finally:
        await engine.stop()


async def test_passes_that_ran_no_batch_are_not_reported_as_steps(
        running: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """Stalled on KV imports, the loop passes every few ms without running anything: those passes used
    to be recorded as ~0 s engine steps, pulling the mean step time the router estimates TTFT by to 0."""
    seen: list[float | None] = []
    running.on_step = lambda outputs, seconds: seen.append(seconds)
    monkeypatch.setattr(running.engine, "has_unfinished", lambda: True)
    monkeypatch.setattr(running.engine, "step", lambda: [])  # schedules nothing, as when stalled
    running._wake.set()
    await asyncio.sleep(0.1)
    monkeypatch.undo()
    assert seen and all(s is None for s in seen)
    await running.call(lambda: None)  # the pass in flight when the patches went has ended
    assert running._busy_total == 0.0  # nothing ran: none of those passes counted as busy time


async def test_a_request_arrives_when_it_is_submitted_not_when_the_engine_thread_takes_it(
        running: AsyncEngine, monkeypatch: pytest.MonkeyPatch) -> None:
    """TTFT and end-to-end times count from arrival: stamped on the engine thread, after the step in
    flight, they left that wait out (a 1.56 s TTFT was recorded as 0.83 s)."""
    slow_forward_passes(running, monkeypatch, 0.5)
    first = asyncio.ensure_future(collect(running, "a", [5, 6, 7], 2))
    await asyncio.sleep(0.1)  # a's first step is running
    submitted = time.monotonic()
    out = await anext(running.generate("b", [8, 9, 10], {"max_tokens": 1, "temperature": 0}))
    assert out.arrival_time == pytest.approx(submitted, abs=0.05)
    assert out.first_token_time - out.arrival_time > 0.4  # the wait for a's step is in b's TTFT
    await first


def test_the_busy_counter_is_read_when_scraped_and_never_goes_down() -> None:
    """Bumped by a once-a-second loop, two scrapes a few seconds apart read 0% and 91% of an engine busy
    half the time; and a counter that goes down reads as a restart to Prometheus."""
    from disagg_worker.metrics import ReadOnScrapeCounter

    collector = ReadOnScrapeCounter("disagg_busy_seconds", "busy")
    readings = iter([1.5, 2.25, 2.0])
    collector.track("decode", lambda: next(readings))

    def scrape() -> float:
        [family] = collector.collect()
        [sample] = family.samples
        assert sample.name == "disagg_busy_seconds_total" and sample.labels == {"role": "decode"}
        return sample.value

    assert [scrape(), scrape(), scrape()] == [1.5, 2.25, 2.25]
