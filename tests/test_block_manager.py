"""Block manager and scheduler without a model: unit cases plus a hypothesis state machine.

The invariants (no block freed twice, ref counts equal holders, free list consistent, cache index
consistent, usage back to zero once everything ends) are checked after every single operation.
"""

from __future__ import annotations

import random

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from disagg_worker.engine.block_manager import BlockManager
from disagg_worker.engine.prefix_hash import block_hashes, shared_prefix_blocks
from disagg_worker.engine.request import FinishReason, Request, RequestStatus, SamplingParams
from disagg_worker.engine.scheduler import Scheduler, SchedulerConfig


def make_request(rid: str, prompt: list[int], max_tokens: int = 8, **kw: object) -> Request:
    return Request(rid, prompt, SamplingParams(max_tokens=max_tokens, temperature=0), **kw)


def test_allocate_and_free_return_usage_to_zero() -> None:
    bm = BlockManager(8, 4)
    r = make_request("a", list(range(10)))
    assert bm.allocate_slots(r, 10)
    assert len(r.block_ids) == 3 and bm.usage == pytest.approx(3 / 8)
    bm.free(r)
    assert bm.usage == 0 and bm.num_free_blocks == 8
    bm.check_invariants([])


def test_allocation_is_all_or_nothing() -> None:
    bm = BlockManager(2, 4)
    r = make_request("a", list(range(12)))
    assert not bm.allocate_slots(r, 12)
    assert r.block_ids == [] and bm.num_free_blocks == 2


def test_double_free_is_detected() -> None:
    bm = BlockManager(4, 4)
    r = make_request("a", list(range(4)))
    bm.allocate_slots(r, 4)
    ids = list(r.block_ids)
    bm.free(r)
    r.block_ids = ids
    with pytest.raises(AssertionError, match="freed twice"):
        bm.free(r)


def test_prefix_hit_reuses_full_blocks_and_never_the_last_token() -> None:
    bm = BlockManager(16, 4)
    a = make_request("a", list(range(12)))
    bm.allocate_slots(a, 12)
    a.num_computed_tokens = 12
    bm.cache_full_blocks(a)
    bm.free(a)
    same = make_request("b", list(range(12)))
    assert len(bm.find_cached_prefix(same)) == 2  # 11 reusable tokens -> 2 full blocks
    longer = make_request("c", [*range(12), 99])
    hits = bm.find_cached_prefix(longer)
    assert len(hits) == 3
    assert bm.allocate_slots(longer, 1, hits)
    assert longer.block_ids[:3] == hits and bm.blocks[hits[0]].ref_count == 1
    bm.check_invariants([longer])


def test_hash_collision_is_caught_by_token_check() -> None:
    bm = BlockManager(8, 4)
    a = make_request("a", [1, 2, 3, 4, 5])
    bm.allocate_slots(a, 5)
    a.num_computed_tokens = 5
    bm.cache_full_blocks(a)
    bm.blocks[a.block_ids[0]].token_ids = (9, 9, 9, 9)  # simulate two token runs under one name
    assert bm.find_cached_prefix(make_request("b", [1, 2, 3, 4, 5])) == []


def test_lru_eviction_prefers_unhashed_then_oldest() -> None:
    bm = BlockManager(4, 2)
    a = make_request("a", [1, 2, 3, 4])
    bm.allocate_slots(a, 4)
    a.num_computed_tokens = 4
    bm.cache_full_blocks(a)
    bm.free(a)  # two cached blocks, two never-used blocks
    b = make_request("b", [7, 8, 9, 10])
    bm.allocate_slots(b, 4)  # takes the two unhashed blocks first: a's prefix survives
    assert len(bm.find_cached_prefix(make_request("c", [1, 2, 3, 4, 5]))) == 2
    c = make_request("d", [5, 6, 5, 6])
    bm.allocate_slots(c, 2)  # now one cached block must be evicted (the tail of a, freed first)
    assert bm.num_evictions == 1
    bm.check_invariants([b, c])


def test_router_side_prefix_overlap_matches_block_names() -> None:
    tokens = list(range(40))
    names = block_hashes(tokens, 16)
    assert len(names) == 2
    assert shared_prefix_blocks(block_hashes(tokens[:16] + [0] * 16, 16), set(names)) == 1
    assert shared_prefix_blocks(names, set()) == 0


def test_scheduler_respects_budget_and_chunks_long_prompts() -> None:
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=10, max_model_len=100), bm)
    s.add_request(make_request("a", list(range(25))))
    s.add_request(make_request("b", list(range(3))))
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]
    assert not out.scheduled[0].samples
    s.update_from_output(out, {})
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("a", 10)]


def test_preemption_frees_the_newest_low_priority_request() -> None:
    bm = BlockManager(4, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), bm)
    a = make_request("a", list(range(7)), max_tokens=20)
    b = make_request("b", list(range(7)), max_tokens=20, priority=1)
    s.add_request(a)
    s.add_request(b)
    out = s.schedule()
    s.update_from_output(out, {"a": 1, "b": 1})
    preempted: list[Request] = []
    for _ in range(6):
        out = s.schedule()
        preempted += out.preempted
        for r in out.preempted:
            assert r.status is RequestStatus.WAITING and r.block_ids == []
        s.update_from_output(out, {x.request.request_id: 1 for x in out.scheduled if x.samples})
        bm.check_invariants(s.live_requests())
    assert preempted and all(r is b for r in preempted)
    assert a.num_preemptions == 0


def test_a_high_priority_request_admitted_later_is_not_preempted_for_a_low_one() -> None:
    bm = BlockManager(4, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), bm)
    low = make_request("low", list(range(5)), max_tokens=20, priority=1)
    s.add_request(low)
    s.update_from_output(s.schedule(), {"low": 1})  # low runs first: 6 tokens, 2 blocks
    high = make_request("high", list(range(100, 108)), max_tokens=20)
    s.add_request(high)
    s.update_from_output(s.schedule(), {"low": 1, "high": 1})  # 4 blocks in use: the pool is full
    out = s.schedule()  # high needs a third block; low still has room in its second one
    assert out.preempted == [low]
    assert [x.request.request_id for x in out.scheduled] == ["high"]
    bm.check_invariants(s.live_requests())


def scheduler_with_running_low(num_blocks: int, budget: int, prompt_len: int, max_tokens: int,
                               sampled: bool) -> tuple[BlockManager, Scheduler, Request]:
    """A scheduler whose one low-priority request ran one step (sampling its first token if ``sampled``)."""
    bm = BlockManager(num_blocks, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget, max_model_len=256), bm)
    low = make_request("low", list(range(prompt_len)), max_tokens=max_tokens, priority=1)
    s.add_request(low)
    s.update_from_output(s.schedule(), {"low": 1} if sampled else {})
    return bm, s, low


def test_a_waiting_high_priority_request_is_admitted_before_a_running_low_priority_prefill_chunk() -> None:
    # the low-priority long prompt starts its chunked prefill
    bm, s, _low = scheduler_with_running_low(64, 16, 199, 4, False)
    high = make_request("high", list(range(300, 310)), max_tokens=4)
    s.add_request(high)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("high", 10), ("low", 6)]
    s.update_from_output(out, {"high": 1})
    out = s.schedule()  # high decodes first, low's chunk gets the rest
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("high", 1), ("low", 15)]
    bm.check_invariants(s.live_requests())


def test_a_high_priority_request_that_does_not_fit_leaves_the_running_low_priority_ones_running() -> None:
    # 21 tokens: 6 of 8 blocks
    bm, s, _low = scheduler_with_running_low(8, 64, 20, 8, True)
    high = make_request("high", list(range(100, 140)), max_tokens=4)  # needs 10 blocks: never fits now
    s.add_request(high)
    for _ in range(3):
        out = s.schedule()
        assert [x.request.request_id for x in out.scheduled] == ["low"] and not out.preempted
        s.update_from_output(out, {"low": 1})
    assert high.status is RequestStatus.WAITING
    bm.check_invariants(s.live_requests())


def test_admitting_a_high_priority_request_never_preempts_a_running_low_priority_one() -> None:
    """It goes first for the token budget, not for blocks: a running request's next block is kept for it."""
    # 21 tokens in 6 blocks of 4: its next decode needs the 6th
    bm, s, low = scheduler_with_running_low(6, 64, 20, 8, True)
    high = make_request("high", [100, 101, 102], max_tokens=4)  # needs 1 block: only if low gets none
    s.add_request(high)
    out = s.schedule()
    assert [x.request.request_id for x in out.scheduled] == ["low"] and not out.preempted
    s.update_from_output(out, {"low": 1})
    assert high.status is RequestStatus.WAITING and low.num_preemptions == 0
    bm.check_invariants(s.live_requests())


def test_a_low_priority_prefill_chunk_left_short_by_an_admission_runs_smaller_instead_of_preempting() -> None:
    # 32 of its 50 prompt tokens: 8 blocks, 6 free
    bm, s, low = scheduler_with_running_low(14, 32, 50, 4, False)
    high = make_request("high", list(range(100, 110)), max_tokens=4)  # 3 blocks: 3 left for low's 5
    s.add_request(high)
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("high", 10), ("low", 12)]
    assert not out.preempted and low.num_preemptions == 0
    bm.check_invariants(s.live_requests())


def test_a_remote_prefill_does_not_take_blocks_ahead_of_waiting_higher_priority_requests() -> None:
    # 6 of 8 blocks
    bm, s, _low = scheduler_with_running_low(8, 64, 20, 8, True)
    high = make_request("high", list(range(100, 112)), max_tokens=4)  # 3 blocks: waits for memory
    s.add_request(high)
    s.update_from_output(s.schedule(), {"low": 1})
    assert high.status is RequestStatus.WAITING
    assert s.reserve_for_import(make_request("import-low", [1, 2, 3], priority=1)) is None
    # same priority, but "high" came first and needs the 2 free blocks and one more: the import waits too
    assert s.reserve_for_import(make_request("import-high", [1, 2, 3])) is None
    bm.check_invariants(s.live_requests())


def test_remote_prefills_take_only_the_blocks_a_waiting_request_of_their_priority_leaves() -> None:
    """Reservations run between steps, so a steady stream of them used to take every freed block before
    a waiting request of the same priority, which then never ran."""
    bm = BlockManager(8, 4, enable_prefix_caching=False)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=4096), bm)
    first = make_request("first", list(range(1, 13)), max_tokens=3)  # 3 of the 8 blocks
    s.add_request(first)
    s.update_from_output(s.schedule(), {"first": 7})
    waiting = make_request("waiting", list(range(1, 25)), max_tokens=2)  # needs 6 blocks: 5 are free
    s.add_request(waiting)
    served = 0
    for i in range(40):  # one remote prefill of 3 blocks arrives per step
        imp = make_request(f"import-{i}", list(range(1, 13)), max_tokens=2)
        if s.reserve_for_import(imp) is not None:
            served += 1
            s.commit_import(imp.request_id, 5)
        out = s.schedule()
        s.update_from_output(out, {x.request.request_id: 9 for x in out.scheduled if x.samples})
        bm.check_invariants(s.live_requests())
    assert waiting.status is RequestStatus.FINISHED
    assert served >= 30  # imports still go whenever they leave the waiting request its blocks


def test_a_fallen_back_import_counts_its_prompt_once_in_the_prefix_lookups() -> None:
    bm = BlockManager(16, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=256), bm)
    req = make_request("r", list(range(1, 21)))
    assert s.reserve_for_import(req) == 0
    s.fallback_to_local("r")  # the transfer failed: prefilled locally, looked up again when scheduled
    s.schedule()
    assert (bm.prefix_queries_tokens, bm.prefix_hit_tokens) == (20, 0)  # was 40: counted twice


def test_decodes_are_scheduled_before_a_long_chunked_prefill() -> None:
    bm = BlockManager(64, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=16, max_model_len=256), bm)
    long = make_request("long", list(range(199)), max_tokens=4)
    s.add_request(long)
    s.update_from_output(s.schedule(), {})  # the long prompt starts its chunked prefill
    short = make_request("short", list(range(3)), max_tokens=20)
    assert s.reserve_for_import(short) == 0  # a remote prefill lands behind it (decode worker)
    s.commit_import("short", 1)
    for _ in range(5):
        out = s.schedule()
        assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("short", 1), ("long", 15)]
        s.update_from_output(out, {"short": 1})


def test_an_older_chunked_prefill_preempts_a_newer_decode_scheduled_before_it() -> None:
    """Decodes run before prefill chunks, but the preemption victim is still the newest request: it is
    taken back out of this step rather than the older prefill preempting itself."""
    bm = BlockManager(7, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=8, max_model_len=64), bm)
    old = make_request("old", list(range(100, 140)), max_tokens=4)
    s.add_request(old)
    s.update_from_output(s.schedule(), {})  # 8 of its 40 prompt tokens
    new = make_request("new", [1, 2, 3, 4], max_tokens=20)
    assert s.reserve_for_import(new) == 0
    s.commit_import("new", 5)  # a remote prefill joins as a decode
    out = s.schedule()
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("new", 1), ("old", 7)]
    s.update_from_output(out, {"new": 6})
    out = s.schedule()  # old needs 2 more blocks, 1 is free: the newer request gives its blocks back
    assert out.preempted == [new]
    assert [(x.request.request_id, x.num_new_tokens) for x in out.scheduled] == [("old", 7)]
    assert old.num_preemptions == 0
    bm.check_invariants(s.live_requests())


def test_a_hash_collision_with_another_prefix_is_not_reused() -> None:
    """Block names are xxh3 (fast, not collision-resistant): a block whose name and tokens match but
    whose KV was computed after another prefix must not be reused."""
    bm = BlockManager(8, 2)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), bm)
    a = make_request("a", [1, 2, 7, 8, 9], max_tokens=1)  # blocks [1 2] [7 8], cached
    c = make_request("c", [3, 4, 5, 6, 9], max_tokens=1)  # blocks [3 4] [5 6], cached
    for r in (a, c):
        s.add_request(r)
    out = s.schedule()
    c_head = c.block_ids[0]
    s.update_from_output(out, {"a": 1, "c": 1})  # both finish; their blocks stay cached
    b = make_request("b", [3, 4, 7, 8, 9], max_tokens=1)
    b.block_hashes = [c.block_hashes[0], a.block_hashes[1]]  # as if hash([3 4] then [7 8]) collided
    assert bm.find_cached_prefix(b) == [c_head]  # [7 8]'s KV was computed after [1 2]


def test_finish_and_held_kv_release() -> None:
    bm = BlockManager(8, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64, max_model_len=64), bm)
    r = make_request("p", list(range(9)), max_tokens=1, hold_kv_on_finish=True)
    s.add_request(r)
    out = s.schedule()
    finished = s.update_from_output(out, {"p": 5})
    assert finished == [r] and r.finish_reason is FinishReason.LENGTH
    assert "p" in s.held and bm.usage > 0
    s.release_held("p")
    assert bm.usage == 0


VOCAB = [1, 2, 3]  # a tiny alphabet makes shared prefixes (and cache hits) common


class SchedulerMachine(RuleBasedStateMachine):
    """Random adds, steps, aborts, imports and releases against the real scheduler and block manager."""

    @initialize(num_blocks=st.integers(4, 40), block_size=st.sampled_from([1, 2, 4]),
                budget=st.integers(1, 24), max_seqs=st.integers(1, 6), seed=st.integers(0, 1000))
    def setup(self, num_blocks: int, block_size: int, budget: int, max_seqs: int, seed: int) -> None:
        self.bm = BlockManager(num_blocks, block_size)
        self.s = Scheduler(SchedulerConfig(max_seqs, budget, max_model_len=10_000), self.bm)
        self.rng = random.Random(seed)
        self.requests: dict[str, Request] = {}
        self.n = 0

    def _new(self, hold: bool = False) -> Request | None:
        prompt_len = self.rng.randint(1, 12)
        max_tokens = self.rng.randint(1, 8)
        if self.bm.blocks_for_tokens(prompt_len + max_tokens - 1) > self.bm.num_blocks:
            return None  # the engine refuses such a request up front
        self.n += 1
        r = make_request(f"r{self.n}", [self.rng.choice(VOCAB) for _ in range(prompt_len)], max_tokens,
                         priority=self.rng.choice([0, 1]), hold_kv_on_finish=hold)
        self.requests[r.request_id] = r
        return r

    @rule(hold=st.booleans())
    def add(self, hold: bool) -> None:
        r = self._new(hold)
        if r is not None:
            self.s.add_request(r)

    @rule()
    def step(self) -> None:
        out = self.s.schedule()
        assert out.num_batched_tokens <= self.s.config.max_num_batched_tokens
        assert self.s.num_running <= self.s.config.max_num_seqs
        for x in out.scheduled:
            assert len(x.request.block_ids) * self.bm.block_size >= x.start + x.num_new_tokens
        for r in out.preempted:
            assert r.block_ids == [] and r.num_computed_tokens == 0
        self.s.update_from_output(out, {x.request.request_id: self.rng.choice(VOCAB)
                                        for x in out.scheduled if x.samples})

    @precondition(lambda self: any(not r.is_finished for r in self.requests.values()))
    @rule(data=st.data())
    def abort(self, data: st.DataObject) -> None:
        live = sorted(rid for rid, r in self.requests.items() if not r.is_finished)
        self.s.finish(self.requests[data.draw(st.sampled_from(live))], FinishReason.ABORT)

    @rule(commit=st.booleans())
    def remote_prefill(self, commit: bool) -> None:
        r = self._new()
        if r is None:
            return
        if self.s.reserve_for_import(r) is None:
            self.s.add_request(r)  # no room for an import now: the decode worker prefills locally
            return
        if commit:
            self.s.commit_import(r.request_id, self.rng.choice(VOCAB))
        else:
            self.s.fallback_to_local(r.request_id)

    @precondition(lambda self: bool(self.s.held))
    @rule()
    def release(self) -> None:
        self.s.release_held(next(iter(self.s.held)))

    @invariant()
    def blocks_are_consistent(self) -> None:
        if hasattr(self, "bm"):
            self.bm.check_invariants(self.s.live_requests())

    def teardown(self) -> None:
        if not hasattr(self, "bm"):
            return
        for _ in range(10_000):  # drain: everything must finish (no livelock), then usage is zero
            for rid in list(self.s.held):  # the prefill server releases held KV after export
                self.s.release_held(rid)
            if not self.s.has_work():
                break
            self.step()
        assert not self.s.has_work(), "requests left unfinished"
        self.bm.check_invariants([])
        assert self.bm.usage == 0 and self.bm.num_free_blocks == self.bm.num_blocks


TestSchedulerMachine = SchedulerMachine.TestCase
TestSchedulerMachine.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
