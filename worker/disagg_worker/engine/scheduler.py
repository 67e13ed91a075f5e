"""Continuous-batching scheduler: decides, each step, how many tokens of which requests to compute.

One rule covers prefill, chunked prefill, prefix hits, recompute after preemption and decode: a
request's computed tokens chase its total tokens, within a per-step token budget. The budget goes
priority by priority, high first: a priority's running requests (decodes, then prefill chunks), then
its waiting requests, admitted while budget, sequence slots and blocks allow (keeping the block a
lower-priority running decode may need; a lower-priority prefill chunk left short runs smaller or
waits a step: an admission never preempts); the head of a queue that does not fit holds back
everyone after it. When blocks run out the lowest-priority,
newest running request is preempted (its blocks freed, recomputed later). No tensors: this is tested
on ints.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

from disagg_worker.engine.block_manager import BlockManager
from disagg_worker.engine.request import FinishReason, Request, RequestStatus


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 128
    max_num_batched_tokens: int = 512
    max_model_len: int = 2048

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1 or self.max_num_batched_tokens < 1 or self.max_model_len < 2:
            raise ValueError("max_num_seqs, max_num_batched_tokens and max_model_len must be positive")


@dataclass(frozen=True)
class ScheduledRequest:
    request: Request
    start: int  # tokens already computed: position of the first token computed this step
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """True when this step computes the request's last known token, so its logits are sampled."""
        return self.start + self.num_new_tokens == self.request.num_tokens


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledRequest]
    preempted: list[Request]

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def stop_reason(req: Request, max_model_len: int) -> FinishReason | None:
    """Why the request must stop after its latest token, if it must (stop strings are checked on text)."""
    last = req.output_token_ids[-1]
    if not req.params.ignore_eos and last in req.eos_token_ids:
        return FinishReason.STOP
    if last in req.params.stop_token_ids:
        return FinishReason.STOP
    if req.num_output_tokens >= req.params.max_tokens or req.num_tokens >= max_model_len:
        return FinishReason.LENGTH
    return None


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.bm = block_manager
        self._waiting: dict[int, deque[Request]] = {}
        self.running: list[Request] = []
        self.awaiting_kv: dict[str, Request] = {}
        self.held: dict[str, Request] = {}  # finished, blocks kept for KV export
        self.num_preemptions = 0

    # ---- queues ----------------------------------------------------------------------------
    def waiting(self) -> Iterator[Request]:
        for prio in sorted(self._waiting):
            yield from self._waiting[prio]

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in self._waiting.values())

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.running) or self.num_waiting > 0

    def live_requests(self) -> Iterator[Request]:
        """Every request that holds blocks."""
        yield from self.running
        yield from self.awaiting_kv.values()
        yield from self.held.values()

    def add_request(self, req: Request) -> None:
        req.status = RequestStatus.WAITING
        self._waiting.setdefault(req.priority, deque()).append(req)

    # ---- the step decision -----------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        budget = self.config.max_num_batched_tokens
        scheduled: dict[str, ScheduledRequest] = {}  # insertion order is the step's order
        preempted: list[Request] = []

        # Priority by priority, high first: that priority's running requests (decodes before prefill
        # chunks, so that a long chunked prefill cannot take the whole budget and stall the decodes),
        # then its waiting requests. So a waiting high-priority request is admitted before a running
        # low-priority prefill chunk takes the budget. The sort is stable: admission order otherwise.
        # A preemption still takes the lowest-priority, newest request, wherever this order put it.
        self.running.sort(key=lambda r: (r.priority, r.num_tokens - r.num_computed_tokens > 1))
        step_order = list(self.running)
        admitting = True  # until the head of a queue does not fit: it holds back everyone after it
        admitted = False  # a higher priority than the one being scheduled admitted requests this step
        for prio in sorted({r.priority for r in step_order} | {p for p, q in self._waiting.items() if q}):
            for req in (r for r in step_order if r.priority == prio):
                if budget <= 0:
                    break
                if req.status is not RequestStatus.RUNNING:
                    continue  # preempted earlier in this step
                num_new = min(req.num_tokens - req.num_computed_tokens, budget)
                if admitted and not self.bm.can_allocate(req, num_new):
                    # a higher-priority admission took the blocks this prefill chunk wanted: run what
                    # still fits, or wait a step, but never preempt anyone for it
                    num_new = self.bm.num_tokens_that_fit(req, num_new)
                    if num_new == 0:
                        continue
                while not self.bm.allocate_slots(req, num_new):
                    victim = self._pick_victim()
                    self._preempt(victim)
                    preempted.append(victim)
                    if victim is req:
                        break
                    taken = scheduled.pop(victim.request_id, None)  # scheduled earlier: take it back
                    if taken is not None:
                        budget += taken.num_new_tokens
                else:
                    scheduled[req.request_id] = ScheduledRequest(req, req.num_computed_tokens, num_new)
                    budget -= num_new
            # A preemption means memory is short: admit nobody new this step.
            if admitting and not preempted:
                decodes = [r for r in step_order if r.priority > prio and r.status is RequestStatus.RUNNING
                           and r.num_tokens - r.num_computed_tokens == 1]
                before = len(scheduled)
                budget, admitting = self._admit(self._waiting.get(prio, deque()), budget, scheduled, decodes)
                admitted = admitted or len(scheduled) > before
        return SchedulerOutput(list(scheduled.values()), preempted)

    def _admit(self, queue: deque[Request], budget: int, scheduled: dict[str, ScheduledRequest],
               later_decodes: list[Request]) -> tuple[int, bool]:
        """Admit ``queue``'s requests in order while budget, sequence slots and blocks allow.

        They go before the lower-priority running requests for the token budget, and for blocks too,
        except the one block each of ``later_decodes`` may need this step: an admission never preempts
        a running request (a lower-priority prefill chunk it leaves short runs smaller or waits a
        step). Returns the budget left and whether admission may go on (False: the head did not fit)."""
        while queue:
            if budget <= 0 or self._num_slots_taken() >= self.config.max_num_seqs:
                return budget, False
            req = queue[0]
            hit, num_new = self._next_admission(req, budget)
            num_computed = len(hit) * self.bm.block_size
            kept = sum(self.bm.num_new_blocks_needed(r, 1) for r in later_decodes) if budget > num_new else 0
            if not self.bm.can_allocate(req, num_new, hit, keep_free=kept) or not self.bm.allocate_slots(
                    req, num_new, hit):
                return budget, False
            queue.popleft()
            if req.first_scheduled_time is None:
                req.first_scheduled_time = time.monotonic()
                req.num_cached_tokens = num_computed
                self.bm.record_lookup(req.num_prompt_tokens, num_computed)
            req.num_computed_tokens = num_computed
            req.status = RequestStatus.RUNNING
            self.running.append(req)
            scheduled[req.request_id] = ScheduledRequest(req, num_computed, num_new)
            budget -= num_new
        return budget, True

    def _next_admission(self, req: Request, budget: int) -> tuple[list[int], int]:
        """What admitting waiting ``req`` takes now: its cached prefix (blocks it shares) and the tokens
        it computes after it, at most ``budget`` (a waiting request has computed nothing of its own)."""
        hit = self.bm.find_cached_prefix(req) if not req.block_ids else []
        return hit, min(req.num_tokens - len(hit) * self.bm.block_size, budget)

    def _num_slots_taken(self) -> int:
        # requests receiving remote KV join the running batch when committed: they count already
        return len(self.running) + len(self.awaiting_kv)

    def _pick_victim(self) -> Request:
        """The lowest-priority, newest running request, wherever the step order put it."""
        return max(self.running, key=lambda r: (r.priority, r.arrival_time))

    def _preempt(self, req: Request) -> None:
        self.running.remove(req)
        self.bm.free(req)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        self.num_preemptions += 1
        req.status = RequestStatus.WAITING
        self._waiting.setdefault(req.priority, deque()).appendleft(req)

    # ---- after the model ran ---------------------------------------------------------------
    def update_from_output(self, out: SchedulerOutput, sampled: dict[str, int]) -> list[Request]:
        """Advance computed counts, append sampled tokens, finish stopped requests; returns the finished."""
        finished = []
        for s in out.scheduled:
            req = s.request
            req.num_computed_tokens = s.start + s.num_new_tokens
            self.bm.cache_full_blocks(req)
            token = sampled.get(req.request_id)
            if token is None:
                continue
            req.append_output(token)
            if req.first_token_time is None:
                req.first_token_time = time.monotonic()
            reason = stop_reason(req, self.config.max_model_len)
            if reason is not None:
                self.finish(req, reason)
                finished.append(req)
        return finished

    def finish(self, req: Request, reason: FinishReason) -> None:
        """End a request wherever it is; its blocks are freed unless it holds them for export."""
        if req.is_finished:
            if reason is FinishReason.STOP and req.finish_reason is FinishReason.LENGTH:
                req.finish_reason = reason  # a stop string completed by the last allowed token
            return
        if req.status is RequestStatus.RUNNING:
            self.running.remove(req)
        elif req.status is RequestStatus.WAITING:
            self._waiting[req.priority].remove(req)
        elif req.status is RequestStatus.AWAITING_KV:
            del self.awaiting_kv[req.request_id]
        req.status = RequestStatus.FINISHED
        req.finish_reason = reason
        if req.hold_kv_on_finish and reason is not FinishReason.ABORT and reason is not FinishReason.ERROR:
            self.held[req.request_id] = req
        else:
            self.bm.free(req)

    def release_held(self, request_id: str) -> None:
        req = self.held.pop(request_id, None)
        if req is not None:
            self.bm.free(req)

    # ---- remote prefill (decode side) ------------------------------------------------------
    def reserve_for_import(self, req: Request) -> int | None:
        """Reserve blocks for ``req``'s whole prompt, reusing any cached prefix.

        Returns the number of leading prompt tokens already cached (the KV to import starts there),
        or None when there are not enough free blocks or batch slots right now, or when requests of
        a higher priority are waiting, or the blocks and slot a waiting one of its own priority needs
        next would be taken (the caller then queues this one for local prefill, behind it).
        """
        if self._num_slots_taken() >= self.config.max_num_seqs:
            return None
        if any(q for prio, q in self._waiting.items() if prio < req.priority):
            return None  # higher-priority requests wait for memory here: they get it first
        # A waiting request of the same priority came first (a preempted one may have streamed tokens
        # already): an import takes only what its next admission leaves. Reservations run between
        # steps, so otherwise a steady stream of them took every freed block before it, for ever.
        keep_free, head = 0, next(iter(self._waiting.get(req.priority) or ()), None)
        if head is not None:
            if self._num_slots_taken() + 1 >= self.config.max_num_seqs:
                return None
            head_hit, head_new = self._next_admission(head, self.config.max_num_batched_tokens)
            keep_free = self.bm.num_new_blocks_needed(head, head_new, head_hit)
        hit = self.bm.find_cached_prefix(req)
        num_cached = len(hit) * self.bm.block_size
        num_new = req.num_prompt_tokens - num_cached
        if not self.bm.can_allocate(req, num_new, hit, keep_free=keep_free) or not self.bm.allocate_slots(
                req, num_new, hit):
            return None
        req.num_cached_tokens = num_cached
        req.first_scheduled_time = time.monotonic()
        self.bm.record_lookup(req.num_prompt_tokens, num_cached)
        req.status = RequestStatus.AWAITING_KV
        self.awaiting_kv[req.request_id] = req
        return num_cached

    def commit_import(self, request_id: str, first_token: int) -> Request:
        """The prompt's KV is installed: run the request from its first (remotely sampled) token."""
        req = self.awaiting_kv.pop(request_id)
        req.num_computed_tokens = req.num_prompt_tokens
        self.bm.cache_full_blocks(req)
        req.append_output(first_token)
        req.first_token_time = time.monotonic()
        req.status = RequestStatus.RUNNING
        self.running.append(req)
        reason = stop_reason(req, self.config.max_model_len)
        if reason is not None:
            self.finish(req, reason)
        return req

    def fallback_to_local(self, request_id: str) -> Request:
        """An import failed: drop the reserved blocks and queue the request for local prefill."""
        req = self.awaiting_kv.pop(request_id)
        self.bm.free(req)
        req.num_computed_tokens = 0
        # timed and prefix-counted afresh when local prefill schedules it: the reservation's values
        # would charge the failed transfer to the local prefill (and skew the router's estimates); its
        # lookup is taken back, or the prompt would count twice in the prefix-cache hit ratio
        self.bm.record_lookup(-req.num_prompt_tokens, -req.num_cached_tokens)
        req.first_scheduled_time, req.num_cached_tokens = None, 0
        self.add_request(req)
        # it was already waiting its turn: serve it before newer arrivals
        q = self._waiting[req.priority]
        q.remove(req)
        q.appendleft(req)
        return req
