"""Run an ``LLMEngine`` on its own thread and expose it to asyncio servers.

The engine stays single-threaded: every mutation (add, abort, KV import/export) is a command queued
to the engine thread and run between steps. Outputs are handed back to the event loop once per
step. A request's stream always ends: with a finished output, an error output, or an abort.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import Any, TypeVar

from disagg_worker.engine.engine import LLMEngine, RequestOutput
from disagg_worker.engine.request import PRIORITY_HIGH, InvalidRequestError, SamplingParams
from disagg_worker.engine.time_integral import TimeIntegral

log = logging.getLogger(__name__)
T = TypeVar("T")
STALLED_WAIT_SECONDS = 0.005
# A step raising past its own error handling is a bug in the bookkeeping; this many in a row stop the engine
# (its streams end with an error, /health answers 503) instead of retrying the same batch for ever.
MAX_FAILED_STEPS = 3
# A step running this long is a hung device or a deadlock, not work: /health fails (Kubernetes restarts
# the pod) and load reports are refused, so no router keeps sending requests that would only wait.
STUCK_STEP_SECONDS = 300.0


class EngineStoppedError(RuntimeError):
    """The engine thread is not running; the request was not taken."""


class AsyncEngine:
    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, asyncio.Queue[RequestOutput]] = {}
        self._pending: set[asyncio.Future[Any]] = set()  # call()s whose command has not run yet
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.started_at = time.monotonic()
        self._step_started: float | None = None  # monotonic start of the step in progress
        self._busy_total = 0.0  # seconds in finished steps that ran a batch
        self._busy_lock = threading.Lock()
        # the engine's load over time, for means over any window (metrics scrapes, the autoscaler)
        self.waiting_integral = TimeIntegral()
        self.kv_usage_integral = TimeIntegral()
        engine.on_scheduled = self._track_load
        # metrics hook (engine thread): a step's outputs and its seconds (None: it ran no batch, as when
        # stalled on KV imports; those passes are not engine steps and must not count as ~0 s ones)
        self.on_step: Callable[[list[RequestOutput], float | None], None] | None = None

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, 10)
        self._fail_streams("the engine stopped")

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping

    @property
    def step_seconds(self) -> float:
        """How long the step in progress has run (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def stuck(self) -> bool:
        return self.step_seconds > STUCK_STEP_SECONDS

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException:
            log.exception("the engine thread failed; ending every open request with an error")
            self._stopping = True
            if self._loop is not None and not self._loop.is_closed():
                self._loop.call_soon_threadsafe(self._fail_streams, "the engine stopped")
            raise
        finally:  # commands still queued will never run: their callers get an error, not a hang
            if self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop closed first: nobody is waiting
                    self._loop.call_soon_threadsafe(self._fail_pending)

    def _fail_pending(self) -> None:
        for fut in list(self._pending):
            _set_exception(fut, EngineStoppedError("the engine stopped before running the command"))
        self._pending.clear()

    def _fail_streams(self, message: str) -> None:
        for rid, q in list(self._streams.items()):
            q.put_nowait(RequestOutput(rid, [], "", True, "error", error=message))
        self._streams.clear()

    def _serve(self) -> None:
        failed_steps = 0
        while not self._stopping:
            self._run_commands()
            self._track_load()
            if not self.engine.has_unfinished():
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            steps_before = self.engine.steps
            with self._busy_lock:
                self._step_started = started = time.monotonic()
            try:
                outputs = self.engine.step()
                failed_steps = 0
            except Exception as exc:  # the engine itself fails requests it cannot run; this is a last resort
                log.exception("engine step raised")
                failed_steps += 1
                if failed_steps >= MAX_FAILED_STEPS:  # its bookkeeping broke: retrying would hang every stream
                    raise EngineStoppedError(f"{failed_steps} engine steps in a row raised: {exc}") from exc
                outputs = []
            finally:
                seconds = time.monotonic() - started
                ran = self.engine.steps != steps_before
                with self._busy_lock:
                    self._busy_total += seconds if ran else 0.0
                    self._step_started = None
            self._track_load()
            if self.on_step is not None:
                try:
                    self.on_step(outputs, seconds if ran else None)
                except Exception:
                    log.exception("on_step hook failed")
            if outputs:
                self._deliver(outputs)
            if self.engine.device_fault is not None:  # /health turns 503 and load reports UNAVAILABLE
                raise EngineStoppedError(f"the device failed: {self.engine.device_fault}")
            if not outputs and self.engine.stalled:  # what frees blocks or slots arrives as a command, which wakes us
                self._wake.wait(STALLED_WAIT_SECONDS)
                self._wake.clear()

    def _track_load(self) -> None:
        """Feed the load integrals (engine thread): what changes the load is a command (a new request, an
        abort), a step's scheduling (requests admitted to the batch, blocks taken: the engine calls this
        before it runs the batch) and a step's end (requests finished, blocks freed)."""
        self.waiting_integral.set(self.engine.scheduler.num_waiting)
        self.kv_usage_integral.set(self.engine.block_manager.usage)

    def _run_commands(self) -> None:
        while True:
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return
            try:
                cmd()
            except Exception:  # call() reports its own errors; this catches fire-and-forget ones (abort)
                log.exception("engine command failed")

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._dispatch, outputs)

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            q = self._streams.get(out.request_id)
            if q is not None:
                q.put_nowait(out)
                if out.finished:
                    self._streams.pop(out.request_id, None)

    # ---- commands --------------------------------------------------------------------------
    async def call(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on the engine thread between steps and return its result (or raise its error)."""
        if not self.running:
            raise EngineStoppedError("the engine is not running")
        assert self._loop is not None
        fut: asyncio.Future[T] = self._loop.create_future()
        self._pending.add(fut)
        fut.add_done_callback(self._pending.discard)
        loop = self._loop

        def run() -> None:
            try:
                result = fn()
            except BaseException as exc:
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._commands.put(run)
        self._wake.set()
        return await fut

    def open_stream(self, request_id: str) -> asyncio.Queue[RequestOutput]:
        """The queue of ``request_id``'s outputs; an id in use is refused (its stream stays its own)."""
        if not request_id:
            raise InvalidRequestError("the request id is empty")
        if request_id in self._streams:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        q: asyncio.Queue[RequestOutput] = asyncio.Queue()
        self._streams[request_id] = q
        return q

    def close_stream(self, request_id: str) -> None:
        self._streams.pop(request_id, None)

    async def generate(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | dict[str, Any],
                       priority: int = PRIORITY_HIGH) -> AsyncIterator[RequestOutput]:
        """Submit a request and yield its outputs until it finishes; leaving early aborts it.

        Raises ``InvalidRequestError`` before yielding anything if the request can never be served.
        """
        arrival = time.monotonic()  # now, not when the engine thread gets to the add (after its step)
        q = self.open_stream(request_id)
        # A caller cancelled while the add waits its turn must not leave the request running with no
        # reader (holding blocks and a batch slot for its whole max_tokens): the add is skipped if it
        # has not run yet, and aborted if it has. Only an add of ours is aborted (an id the engine
        # refused as in use belongs to someone else).
        lock, state = threading.Lock(), {"added": False, "cancelled": False}

        def add() -> None:
            with lock:
                if state["cancelled"]:
                    return
                self.engine.add_request(request_id, prompt_token_ids, params, priority, arrival_time=arrival)
                state["added"] = True

        try:
            await self.call(add)
        except BaseException as exc:
            with lock:
                state["cancelled"] = True
                added = state["added"]
            self.close_stream(request_id)
            if added and isinstance(exc, asyncio.CancelledError):
                self.abort_nowait(request_id)
            raise
        async for out in self.stream(request_id, q):
            yield out

    def abort_nowait(self, request_id: str) -> None:
        """Abort a request from the event loop without waiting (e.g. when its client went away)."""
        self.close_stream(request_id)
        if self.running:
            self._commands.put(lambda: self.engine.abort(request_id))
            self._wake.set()

    async def stream(self, request_id: str, q: asyncio.Queue[RequestOutput]) -> AsyncIterator[RequestOutput]:
        """Yield a request's outputs from its queue until it finishes; abort it if the consumer leaves."""
        finished = False
        try:
            while True:
                out = await q.get()
                finished = out.finished
                yield out
                if finished:
                    return
        finally:
            self.close_stream(request_id)
            if not finished:
                self.abort_nowait(request_id)

    def busy_seconds(self) -> float:
        """Seconds the engine thread has spent in steps that ran a batch, the step in progress included:
        a utilisation window that only counted finished steps read a step longer than the window as
        idle (2.5 s steps at 100% busy averaged 30%), and the planner scales on it."""
        with self._busy_lock:
            started = self._step_started
            return self._busy_total + (0.0 if started is None else time.monotonic() - started)


def _set_result(fut: asyncio.Future[Any], value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
