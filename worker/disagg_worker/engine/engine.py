"""LLMEngine: the glue of scheduler, block manager, model runner, sampler and detokenizer.

A step is schedule -> run -> postprocess. The engine is single-threaded and synchronous; servers
drive it from one thread (see ``async_engine``). It also exposes what disaggregation needs: export the
KV of a finished prefill, reserve blocks and import KV on the decode side, then continue decoding.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from disagg_worker.engine.block_manager import BlockManager
from disagg_worker.engine.detokenizer import IncrementalDetokenizer
from disagg_worker.engine.model_runner import ModelRunner, kv_layout
from disagg_worker.engine.request import (
    PRIORITY_HIGH,
    FinishReason,
    InvalidRequestError,
    Request,
    RequestStatus,
    SamplingParams,
)
from disagg_worker.engine.sampler import NOT_FINITE, Sampler
from disagg_worker.engine.scheduler import Scheduler, SchedulerConfig
from disagg_worker.models.loader import LoadedModel, load_model

log = logging.getLogger(__name__)

DEFAULT_CPU_KV_BYTES = 256 << 20
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9
# Left free on a GPU for a step's activations and the allocator's slack, out of this process's share.
GPU_ACTIVATION_HEADROOM = 0.05
GPU_MIN_HEADROOM_BYTES = 512 << 20


# Errors a broken GPU raises. Some are not sticky (an allocation outside torch's allocator, a launch
# too big for one batch's shape), so a match only makes the engine check the device itself.
_DEVICE_ERROR_MARKS = ("CUDA error", "CUBLAS_STATUS", "cuDNN error", "device-side assert", "illegal memory access",
                       "unspecified launch failure")


def looks_like_device_error(exc: BaseException) -> bool:
    """Whether a failed step may have broken the device (never for an out-of-memory, which the next
    step survives)."""
    if isinstance(exc, torch.OutOfMemoryError):
        return False
    accelerator_error = getattr(torch, "AcceleratorError", ())  # torch >= 2.8
    return isinstance(exc, accelerator_error) or any(mark in str(exc) for mark in _DEVICE_ERROR_MARKS)


def device_works(device: torch.device) -> bool:
    """Run one tiny kernel and wait for it: after a sticky error (an illegal memory access, a device-side
    assert) every later call on the device fails, so this does too."""
    if device.type != "cuda":
        return True
    try:
        return torch.ones(1, device=device).add_(1).item() == 2.0
    except Exception:
        return False


def gpu_kv_budget(total: int, free: int, held: int, utilization: float) -> int:
    """Bytes for the KV pool on a GPU: this process may use ``utilization`` of the device's ``total``
    memory (weights already ``held`` included), less activation headroom, and never more than is
    ``free`` now, so that workers sharing one GPU can each take their share (``disagg up`` gives each
    0.9 / number of workers)."""
    headroom = max(GPU_MIN_HEADROOM_BYTES, int(total * GPU_ACTIVATION_HEADROOM))
    share = int(total * utilization) - held - headroom
    budget = min(share, free - headroom)
    if budget <= 0:
        raise ValueError(
            f"no GPU memory left for the KV cache: this worker may use {utilization:.0%} of "
            f"{total / 2**30:.1f} GiB, the model holds {held / 2**30:.1f} GiB and {free / 2**30:.1f} GiB is free "
            f"(another process has the rest?); raise --gpu-memory-utilization or set --kv-cache-bytes")
    return budget


@dataclass
class EngineConfig:
    model: str | None = None  # preset name, local HF dir, or cached hub id
    device: str = "auto"
    dtype: str = "auto"
    block_size: int = 16
    num_kv_blocks: int | None = None  # wins over kv_cache_bytes
    kv_cache_bytes: int | None = None  # default: 256 MiB on CPU, gpu_kv_budget on CUDA
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # this process's share of the GPU
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int | None = None  # default: the model's max_position_embeddings
    enable_prefix_caching: bool = True
    cpu_kernels: bool = True  # compiled paged-attention kernel on CPU (falls back to torch if unbuildable)


@dataclass
class RequestOutput:
    """What one request produced since its previous output."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: str | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    num_output_tokens: int = 0
    error: str | None = None
    arrival_time: float = 0.0
    first_scheduled_time: float | None = None
    first_token_time: float | None = None


@dataclass
class EngineStats:
    num_waiting: int
    num_running: int
    num_awaiting_kv: int
    kv_usage: float
    num_free_blocks: int
    num_blocks: int
    prefix_hit_ratio: float
    num_preemptions: int
    busy_seconds: float
    steps: int


@dataclass
class _Tracked:
    request: Request
    detok: IncrementalDetokenizer | None
    num_emitted: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


class LLMEngine:
    def __init__(self, config: EngineConfig, loaded: LoadedModel | None = None) -> None:
        self.config = config
        self.loaded = loaded or load_model(config.model, config.device, config.dtype)
        self.tokenizer = self.loaded.tokenizer
        self.vocab_size = int(self.loaded.config.vocab_size)
        self.max_model_len = min(config.max_model_len or self.loaded.max_model_len, self.loaded.max_model_len)
        self.eos_token_ids = frozenset(self.loaded.eos_token_ids)
        self.repetition_penalty = self.loaded.repetition_penalty  # for requests that do not set one
        # now, not on the first load report: on a GPU it reads every weight tensor's ends (a sync each)
        self.model_fingerprint = self.loaded.fingerprint
        unapplied = self.loaded.unapplied_generation_defaults()
        if unapplied:
            log.warning("the model's generation_config sets %s, which this engine does not apply: its output "
                        "differs from Hugging Face generate's with these settings", unapplied)
        layout = kv_layout(self.loaded.model, config.block_size)
        self.num_blocks = self._pool_blocks(layout.bytes_per_block)
        pool_tokens = self.num_blocks * config.block_size
        if pool_tokens < self.max_model_len:
            # the context a request may use is what one request can hold: advertised as the limit (load
            # reports, /v1/models), so a chat request without max_tokens defaults to what fits
            log.warning("the KV pool holds %d tokens, fewer than the model's context of %d: requests may use up "
                        "to %d tokens (more KV blocks, or GPU memory, serve the whole context)",
                        pool_tokens, self.max_model_len, pool_tokens)
            self.max_model_len = pool_tokens
        self.block_manager = BlockManager(self.num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(
            SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens, self.max_model_len),
            self.block_manager,
        )
        self.runner = ModelRunner(self.loaded.model, self.num_blocks, config.block_size, config.cpu_kernels)
        self.sampler = Sampler(self.loaded.device)
        self._tracked: dict[str, _Tracked] = {}
        self._pending_outputs: list[RequestOutput] = []
        self.busy_seconds = 0.0
        self.steps = 0
        # the last step ran nothing although requests wait (blocks held for export or import, or
        # every batch slot reserved): stepping again at once would only spin
        self.stalled = False
        self.last_step_seconds = 0.0
        # a step broke the device (a sticky CUDA error): the engine must stop, not go on failing every batch
        self.device_fault: BaseException | None = None
        # called once a step has scheduled its batch (admitted requests no longer wait, their blocks are
        # held) and before it runs: the load integrals must see the step's own state for its duration
        self.on_scheduled: Callable[[], None] | None = None

    def _pool_blocks(self, bytes_per_block: int) -> int:
        cfg = self.config
        if cfg.num_kv_blocks is not None:
            blocks = cfg.num_kv_blocks
        else:
            budget = cfg.kv_cache_bytes
            if budget is None:
                if self.loaded.device.type == "cuda":
                    free, total = torch.cuda.mem_get_info(self.loaded.device)
                    held = torch.cuda.memory_reserved(self.loaded.device)
                    budget = gpu_kv_budget(total, free, held, cfg.gpu_memory_utilization)
                else:
                    budget = DEFAULT_CPU_KV_BYTES
            blocks = budget // bytes_per_block
        if blocks < 1:
            raise ValueError(f"KV pool too small: {bytes_per_block} bytes per block, got room for {blocks}")
        return blocks

    # ---- admission -------------------------------------------------------------------------
    def validate(self, prompt_token_ids: list[int], params: SamplingParams) -> None:
        """Raise InvalidRequestError if this request can never be served."""
        n = len(prompt_token_ids)
        if n == 0:
            raise InvalidRequestError("the prompt is empty: it must contain at least one token", "prompt")
        bad = [t for t in prompt_token_ids if not (0 <= t < self.vocab_size)]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})",
                                      "prompt")
        if n >= self.max_model_len:
            raise InvalidRequestError(
                f"the prompt has {n} tokens; this model's maximum context length is {self.max_model_len} tokens",
                "prompt")
        if n + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"this model's maximum context length is {self.max_model_len} tokens; the request asks for "
                f"{n + params.max_tokens} ({n} in the prompt + {params.max_tokens} max_tokens)", "max_tokens")
        bad_stop = [t for t in params.stop_token_ids if not (0 <= t < self.vocab_size)]
        if bad_stop:
            raise InvalidRequestError(f"stop_token_ids: {bad_stop[0]} is outside the vocabulary", "stop_token_ids")
        bad_bias = [t for t, _ in params.logit_bias if not (0 <= t < self.vocab_size)]
        if bad_bias:
            raise InvalidRequestError(f"logit_bias: token id {bad_bias[0]} is outside the vocabulary", "logit_bias")
        need = self.block_manager.blocks_for_tokens(n + params.max_tokens - 1)
        if need > self.num_blocks:
            raise InvalidRequestError(
                f"the request needs up to {need} KV blocks but this worker's pool holds {self.num_blocks}",
                "max_tokens")

    def _make_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | dict,
                      priority: int, hold_kv: bool, arrival_time: float | None = None) -> Request:
        if request_id in self._tracked:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        if isinstance(params, dict):
            params = SamplingParams.parse(**params)
        if params.repetition_penalty is None:  # the model's default, as HF generate applies it
            params = params.model_copy(update={"repetition_penalty": self.repetition_penalty})
        prompt = [int(t) for t in prompt_token_ids]
        self.validate(prompt, params)
        req = Request(request_id, prompt, params, eos_token_ids=self.eos_token_ids, priority=priority,
                      hold_kv_on_finish=hold_kv)
        if arrival_time is not None:
            req.arrival_time = arrival_time
        detok = (IncrementalDetokenizer(self.tokenizer, prompt, params.stop) if self.tokenizer is not None
                 else None)
        self._tracked[request_id] = _Tracked(req, detok)
        return req

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | dict,
                    priority: int = PRIORITY_HIGH, hold_kv: bool = False, arrival_time: float | None = None
                    ) -> Request:
        """Queue a request. ``hold_kv`` keeps its blocks after it finishes (for KV export).
        ``arrival_time`` (``time.monotonic()``): when it reached the worker, default now. A caller on another
        thread passes its own, or the wait for the engine thread (up to a step) is left out of its TTFT."""
        req = self._make_request(request_id, prompt_token_ids, params, priority, hold_kv, arrival_time)
        self.scheduler.add_request(req)
        return req

    def abort(self, request_id: str) -> bool:
        tracked = self._tracked.get(request_id)
        if tracked is None:
            return False
        req = tracked.request
        if req.status is RequestStatus.FINISHED:
            self.release(request_id)
            return True
        self.scheduler.finish(req, FinishReason.ABORT)
        self._pending_outputs.append(self._output(tracked, error=None))
        self._forget(request_id)
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self._pending_outputs)

    def get_request(self, request_id: str) -> Request | None:
        tracked = self._tracked.get(request_id)
        return tracked.request if tracked else None

    # ---- the step --------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        sched = self.scheduler.schedule()
        self.stalled = sched.is_empty and self.scheduler.has_work()
        if self.on_scheduled is not None:
            self.on_scheduled()
        if sched.is_empty:
            return outputs
        t0 = time.perf_counter()
        sampling = [s.request for s in sched.scheduled if s.samples]
        try:
            logits = self.runner.execute(sched)
            tokens = self.sampler.sample(logits, sampling)
        except Exception as exc:  # a failed forward fails this batch's requests, not the engine
            log.exception("engine step failed; failing %d requests", len(sched.scheduled))
            for s in sched.scheduled:
                outputs.append(self._fail(s.request, f"engine step failed: {exc}"))
            if looks_like_device_error(exc) and not device_works(self.loaded.device):
                self.device_fault = exc  # the device itself broke: nothing it runs can succeed any more
            return outputs
        finally:
            self.last_step_seconds = time.perf_counter() - t0
            self.busy_seconds += self.last_step_seconds
            self.steps += 1
        sampled = {r.request_id: t for r, t in zip(sampling, tokens, strict=True) if t != NOT_FINITE}
        self.scheduler.update_from_output(sched, sampled)
        for req in sampling:
            if req.request_id not in sampled:  # its own logits broke (e.g. a penalty of 1e-45): it alone ends
                outputs.append(self._fail(req, "the model's logits for this request are not finite (NaN or inf): "
                                               "nothing to sample from"))
                continue
            try:
                outputs.append(self._postprocess(req))
            except Exception as exc:  # one request's text failed: it alone ends, the batch goes on
                log.exception("post-processing request %s failed", req.request_id)
                tracked = self._tracked.get(req.request_id)
                if tracked is not None:
                    tracked.detok = None  # what failed; the error output carries the token ids only
                    outputs.append(self._fail(req, f"cannot turn the output into text: {exc}"))
        return outputs

    def _postprocess(self, req: Request) -> RequestOutput:
        tracked = self._tracked[req.request_id]
        if tracked.detok is not None and (tracked.detok.add_token(req.output_token_ids[-1])
                                          or (req.is_finished and tracked.detok.flush())):
            # (the flush: text held back for an incomplete character may complete a stop string)
            self.scheduler.finish(req, FinishReason.STOP)
        out = self._output(tracked)
        if req.is_finished and req.request_id not in self.scheduler.held:
            self._forget(req.request_id)
        return out

    def _output(self, tracked: _Tracked, error: str | None = None) -> RequestOutput:
        req = tracked.request
        new_ids = req.output_token_ids[tracked.num_emitted:]
        tracked.num_emitted = len(req.output_token_ids)
        text = tracked.detok.take_new_text(req.is_finished) if tracked.detok is not None else ""
        return RequestOutput(
            request_id=req.request_id,
            new_token_ids=new_ids,
            new_text=text,
            finished=req.is_finished,
            finish_reason=req.finish_reason.value if req.finish_reason else None,
            num_prompt_tokens=req.num_prompt_tokens,
            num_cached_tokens=req.num_cached_tokens,
            num_output_tokens=req.num_output_tokens,
            error=error,
            arrival_time=req.arrival_time,
            first_scheduled_time=req.first_scheduled_time,
            first_token_time=req.first_token_time,
        )

    def _fail(self, req: Request, message: str) -> RequestOutput:
        self.scheduler.finish(req, FinishReason.ERROR)
        if req.finish_reason is not FinishReason.ERROR:  # it had just finished when its text failed
            req.finish_reason = FinishReason.ERROR
            self.scheduler.release_held(req.request_id)  # nobody will export it
        out = self._output(self._tracked[req.request_id], error=message)
        self._forget(req.request_id)
        return out

    def _forget(self, request_id: str) -> None:
        self._tracked.pop(request_id, None)
        self.sampler.forget(request_id)

    # ---- start-up ----------------------------------------------------------------------------
    def warm_up(self) -> float:
        """Run one short request (a prefill and a decode step) before serving; returns its seconds.

        A first forward pass pays one-time costs (allocator growth, thread pools, on a GPU the math
        libraries' set-up: seconds), which the first real request on a new worker would otherwise pay
        in its TTFT, just when the autoscaler added the worker for a load peak. It leaves no trace:
        nothing cached, no lookups, steps or busy time counted."""
        t0 = time.perf_counter()
        if self.max_model_len < 2:  # no request fits but a 1-token prompt with nothing to generate
            return 0.0
        bm = self.block_manager
        saved = (bm.enable_prefix_caching, bm.prefix_queries_tokens, bm.prefix_hit_tokens, self.busy_seconds,
                 self.steps, self.last_step_seconds)
        bm.enable_prefix_caching = False
        try:
            n = max(1, min(2 * self.config.block_size, self.max_model_len - 2))
            steps = min(2, self.max_model_len - n)  # a prefill and, where the context allows, a decode step
            self.generate([[1] * n], SamplingParams(max_tokens=steps, temperature=0.0, ignore_eos=True))
        finally:
            (bm.enable_prefix_caching, bm.prefix_queries_tokens, bm.prefix_hit_tokens, self.busy_seconds,
             self.steps, self.last_step_seconds) = saved
        return time.perf_counter() - t0

    # ---- offline convenience ---------------------------------------------------------------
    def generate(self, prompts: list[list[int]], params: SamplingParams | dict | list[SamplingParams]
                 ) -> list[Request]:
        """Run ``prompts`` to completion through continuous batching; returns the finished requests."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self.add_request(f"gen-{time.monotonic_ns()}-{i}", p, sp)
                for i, (p, sp) in enumerate(zip(prompts, plist, strict=True))]
        while self.has_unfinished():
            self.step()
        return reqs

    # ---- disaggregation: prefill side ------------------------------------------------------
    def held_blocks(self, request_id: str) -> list[int]:
        req = self.scheduler.held[request_id]
        return req.block_ids

    def export_kv(self, request_id: str, first_block: int, num_blocks: int | None = None,
                  layers: range | None = None, out: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V of a finished, held request's blocks ``[first_block, first_block + num_blocks)``."""
        req = self.scheduler.held.get(request_id)
        if req is None:
            raise KeyError(f"request {request_id!r} holds no exportable KV")
        prompt_blocks = self.block_manager.blocks_for_tokens(req.num_prompt_tokens)
        end = prompt_blocks if num_blocks is None else min(prompt_blocks, first_block + num_blocks)
        return self.runner.kv.export_blocks(req.block_ids[first_block:end], layers, out)

    def release(self, request_id: str) -> None:
        """Free a held request's blocks (after export, or when the export is abandoned). One that has not
        finished yet is aborted: forgotten while still scheduled, it would run on untracked, and its id
        could be taken by a new request while it does."""
        tracked = self._tracked.get(request_id)
        if tracked is not None and tracked.request.status is not RequestStatus.FINISHED:
            self.abort(request_id)
            return
        self.scheduler.release_held(request_id)
        self._forget(request_id)

    # ---- disaggregation: decode side -------------------------------------------------------
    def reserve_for_import(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams | dict,
                           priority: int = PRIORITY_HIGH, arrival_time: float | None = None) -> int | None:
        """Validate and reserve blocks for a remotely prefilled request.

        Returns how many leading prompt tokens are already cached here (import starts at that block),
        or None if the pool is too full right now (the caller then prefills locally).
        """
        req = self._make_request(request_id, prompt_token_ids, params, priority, hold_kv=False,
                                 arrival_time=arrival_time)
        cached = self.scheduler.reserve_for_import(req)
        if cached is None:
            self._forget(request_id)
        return cached

    def reserved_blocks(self, request_id: str) -> list[int]:
        """The block ids reserved for an import (fixed until commit or fallback): where its KV lands."""
        return list(self.scheduler.awaiting_kv[request_id].block_ids)

    def import_kv(self, request_id: str, first_block: int, k: torch.Tensor, v: torch.Tensor,
                  layer_start: int = 0) -> None:
        """Install K/V ``[layers, n, block_size, kv_heads, head_dim]`` at the request's blocks from ``first_block``."""
        req = self.scheduler.awaiting_kv[request_id]
        n = k.shape[1]
        prompt_blocks = self.block_manager.blocks_for_tokens(req.num_prompt_tokens)
        if first_block * self.config.block_size < req.num_cached_tokens or first_block + n > prompt_blocks:
            raise ValueError(f"blocks {first_block}..{first_block + n} are outside the importable range of "
                             f"request {request_id!r}")
        self.runner.kv.import_blocks(req.block_ids[first_block:first_block + n], k, v, layer_start)

    def commit_import(self, request_id: str, first_token: int) -> RequestOutput:
        """All KV installed: continue decoding from the remotely sampled first token."""
        if not (0 <= first_token < self.vocab_size):
            raise ValueError(f"first token {first_token} is outside the vocabulary")
        req = self.scheduler.commit_import(request_id, first_token)
        return self._postprocess(req)

    def fallback_to_local(self, request_id: str) -> None:
        """Give up on an import: the request is prefilled locally instead (nothing is lost)."""
        if request_id in self.scheduler.awaiting_kv:
            self.scheduler.fallback_to_local(request_id)

    # ---- observability ---------------------------------------------------------------------
    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            num_waiting=self.scheduler.num_waiting,
            num_running=self.scheduler.num_running,
            num_awaiting_kv=len(self.scheduler.awaiting_kv),
            kv_usage=bm.usage,
            num_free_blocks=bm.num_free_blocks,
            num_blocks=bm.num_blocks,
            prefix_hit_ratio=bm.prefix_hit_ratio,
            num_preemptions=self.scheduler.num_preemptions,
            busy_seconds=self.busy_seconds,
            steps=self.steps,
        )
