"""State one worker process shares between its gRPC services and its HTTP endpoint.

Owns the engine thread, the role, the policy, draining, the recent-timing averages that load
reports carry, and the refresh of the Prometheus gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import NoReturn

import grpc

from disagg_worker import metrics as m
from disagg_worker.engine.async_engine import AsyncEngine
from disagg_worker.engine.engine import RequestOutput
from disagg_worker.engine.request import PRIORITY_HIGH, PRIORITY_LOW, InvalidRequestError, SamplingParams
from disagg_worker.gpu_utilization import GpuUtilization
from disagg_worker.policy import Policy
from disagg_worker.rpc import pb

log = logging.getLogger(__name__)

MAX_REPORTED_HASHES = 1 << 16


@dataclass
class Ewma:
    alpha: float = 0.2
    value: float = 0.0
    seen: bool = False

    def add(self, x: float) -> None:
        self.value = x if not self.seen else self.alpha * x + (1 - self.alpha) * self.value
        self.seen = True


@dataclass
class WorkerRuntime:
    engine: AsyncEngine
    role: str
    policy: Policy
    model_name: str
    draining: bool = False
    drain_started: float | None = None  # monotonic time of the first drain
    avg_prefill_seconds: Ewma = field(default_factory=Ewma)
    avg_step_seconds: Ewma = field(default_factory=Ewma)
    prefill_tokens_per_second: Ewma = field(default_factory=Ewma)
    utilization: float = 0.0
    _task: asyncio.Task[None] | None = None

    def __post_init__(self) -> None:
        self.engine.on_step = self._on_step
        self._last_preemptions = 0
        self._last_prefix = (0, 0)  # prefix-cache (queried, hit) tokens already counted
        self.gpu = GpuUtilization(self.engine.engine.loaded.device)

    # ---- engine hooks (engine thread) ------------------------------------------------------
    def _on_step(self, outputs: list[RequestOutput], seconds: float | None) -> None:
        if seconds is not None:  # None: a pass that ran no batch (stalled), not a step
            self.avg_step_seconds.add(seconds)
            m.STEP_SECONDS.labels(self.role).observe(seconds)
        for out in outputs:
            if out.new_token_ids:
                m.GENERATION_TOKENS.labels(self.role).inc(len(out.new_token_ids))
            if out.first_token_time is not None and out.num_output_tokens == len(out.new_token_ids):
                self.record_first_token(out)
            if out.finished:
                self.record_finished(out)

    def record_first_token(self, out: RequestOutput) -> None:
        if out.first_scheduled_time is None or out.first_token_time is None:
            return
        prefill = out.first_token_time - out.first_scheduled_time
        self.avg_prefill_seconds.add(prefill)
        uncached = out.num_prompt_tokens - out.num_cached_tokens
        if prefill > 0 and uncached > 0:
            self.prefill_tokens_per_second.add(uncached / prefill)
        m.TTFT.labels(self.role).observe(out.first_token_time - out.arrival_time)

    def record_finished(self, out: RequestOutput) -> None:
        m.REQUESTS_FINISHED.labels(self.role, out.finish_reason or "unknown").inc()
        if out.first_token_time is None or out.finish_reason not in ("stop", "length"):
            return  # an aborted or failed request has no end-to-end time (the router's histograms agree)
        end = time.monotonic()
        m.E2E.labels(self.role).observe(end - out.arrival_time)
        if out.num_output_tokens > 1:
            m.TPOT.labels(self.role).observe((end - out.first_token_time) / (out.num_output_tokens - 1))

    # ---- periodic --------------------------------------------------------------------------
    def start(self) -> None:
        m.BUSY_SECONDS.track(self.role, self.engine.busy_seconds)
        m.WAITING_SECONDS.track(self.role, self.engine.waiting_integral.total)
        m.KV_USAGE_SECONDS.track(self.role, self.engine.kv_usage_integral.total)
        self._task = asyncio.create_task(self._refresh_loop(), name="metrics-refresh")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _refresh_loop(self) -> None:
        last_busy, last_t = self.engine.busy_seconds(), time.monotonic()
        while True:
            await asyncio.sleep(1.0)
            now, busy = time.monotonic(), self.engine.busy_seconds()
            self.utilization = min(1.0, max(0.0, busy - last_busy) / max(now - last_t, 1e-6))
            last_busy, last_t = max(busy, last_busy), now
            try:
                self.refresh_gauges()
            except Exception:  # a bad round must not freeze utilisation for routing and autoscaling
                log.exception("refreshing the metrics failed")

    def refresh_gauges(self) -> None:
        s = self.engine.engine.stats()
        r = self.role
        m.REQUESTS_WAITING.labels(r).set(s.num_waiting)
        m.REQUESTS_RUNNING.labels(r).set(s.num_running)
        m.REQUESTS_AWAITING_KV.labels(r).set(s.num_awaiting_kv)
        m.KV_CACHE_USAGE.labels(r).set(s.kv_usage)
        m.PREFIX_HIT_RATIO.labels(r).set(s.prefix_hit_ratio)
        m.UTILIZATION.labels(r).set(self.utilization)
        gpu = self.gpu.ratio()
        if gpu is not None:
            m.GPU_UTILIZATION.labels(r).set(gpu)
        m.DRAINING.labels(r).set(1 if self.draining else 0)
        m.PREEMPTIONS.labels(r).inc(s.num_preemptions - self._last_preemptions)
        self._last_preemptions = s.num_preemptions
        bm = self.engine.engine.block_manager
        queried, hit = bm.prefix_queries_tokens, bm.prefix_hit_tokens
        # a lookup taken back (a fallen-back import) can lower the totals: counters only go up
        m.PREFIX_QUERIED_TOKENS.labels(r).inc(max(0, queried - self._last_prefix[0]))
        m.PREFIX_HIT_TOKENS.labels(r).inc(max(0, hit - self._last_prefix[1]))
        self._last_prefix = (max(queried, self._last_prefix[0]), max(hit, self._last_prefix[1]))

    # ---- load report -----------------------------------------------------------------------
    def load_report(self, include_hashes: bool) -> pb.LoadReport:
        eng = self.engine.engine
        s = eng.stats()
        report = pb.LoadReport(
            role=self.role, num_waiting=s.num_waiting, num_running=s.num_running,
            num_awaiting_kv=s.num_awaiting_kv, kv_usage=s.kv_usage, utilization=self.utilization,
            block_size=eng.config.block_size, num_free_blocks=s.num_free_blocks, num_blocks=s.num_blocks,
            avg_prefill_seconds=self.avg_prefill_seconds.value, avg_decode_step_seconds=self.avg_step_seconds.value,
            draining=self.draining, model=self.model_name, max_model_len=eng.max_model_len,
            prefill_tokens_per_second=self.prefill_tokens_per_second.value,
            model_fingerprint=eng.model_fingerprint,
        )
        if include_hashes:
            report.prefix_hashes.extend(eng.block_manager.cached_hashes()[:MAX_REPORTED_HASHES])
        return report

    @property
    def num_active(self) -> int:
        s = self.engine.engine.stats()
        # + KV held for export: a prefill worker's finished request whose transfer is still streaming
        return s.num_waiting + s.num_running + s.num_awaiting_kv + len(self.engine.engine.scheduler.held)

    async def drain(self, wait_seconds: float) -> bool:
        """Stop taking requests; with ``wait_seconds`` > 0 wait until running ones finish. True if idle."""
        self.draining = True
        if self.drain_started is None:
            self.drain_started = time.monotonic()
        self.refresh_gauges()
        deadline = time.monotonic() + wait_seconds
        while self.num_active and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        return self.num_active == 0

    def drain_left(self, timeout: float) -> float:
        """What is left of a drain ``timeout`` counted from the first drain (a pod's preStop /drain, say):
        the SIGTERM after it must not start the wait again, or the kubelet kills the pod mid-shutdown."""
        if self.drain_started is None:
            return timeout
        return max(0.0, timeout - (time.monotonic() - self.drain_started))


def params_from_proto(p: pb.SamplingParams) -> SamplingParams:
    return SamplingParams.parse(
        max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
        seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop), stop_token_ids=tuple(p.stop_token_ids),
        ignore_eos=p.ignore_eos,
        repetition_penalty=p.repetition_penalty if p.HasField("repetition_penalty") else None,
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty, logit_bias=dict(p.logit_bias))


def params_to_proto(p: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(max_tokens=p.max_tokens, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                            stop=list(p.stop), stop_token_ids=list(p.stop_token_ids), ignore_eos=p.ignore_eos,
                            presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
                            logit_bias=dict(p.logit_bias))
    if p.seed is not None:
        msg.seed = p.seed
    if p.repetition_penalty is not None:
        msg.repetition_penalty = p.repetition_penalty
    return msg


def priority_from_proto(value: int) -> int:
    return PRIORITY_LOW if value == pb.PRIORITY_LOW else PRIORITY_HIGH


def priority_to_proto(value: int) -> int:
    return pb.PRIORITY_LOW if value == PRIORITY_LOW else pb.PRIORITY_HIGH


PARAM_METADATA_KEY = "disagg-param"  # trailing metadata of an INVALID_ARGUMENT: the request field at fault


async def abort_invalid(context: grpc.aio.ServicerContext, exc: InvalidRequestError) -> NoReturn:
    """End the RPC with INVALID_ARGUMENT, and the request field at fault in the trailing metadata (the
    router's 400 names the parameter, as OpenAI's do)."""
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc),
                        ((PARAM_METADATA_KEY, exc.param),) if exc.param else ())


__all__ = ["PARAM_METADATA_KEY", "InvalidRequestError", "WorkerRuntime", "abort_invalid", "params_from_proto",
           "params_to_proto", "priority_from_proto", "priority_to_proto"]

