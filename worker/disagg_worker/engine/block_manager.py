"""Paged KV block accounting and the prefix cache. Ints, dicts and an ordered free list; no tensors.

Blocks are fixed-size slots of KV; a request owns a block table (``Request.block_ids``). A full block
gets a chained hash name (see ``prefix_hash``) and stays findable after its last owner leaves, until
it is evicted least-recently-used. Queries never mutate; ``allocate_slots`` either succeeds fully or
changes nothing, so "out of blocks" is a return value the scheduler acts on.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from disagg_worker.engine.prefix_hash import ROOT_HASH, block_hashes
from disagg_worker.engine.request import Request, SamplingParams

_PROBE_PARAMS = SamplingParams()


@dataclass
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: bytes | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit
    parent_hash: bytes | None = None  # the previous block's name: its KV depends on the whole prefix


def _parent(request: Request, i: int) -> bytes:
    """The name block ``i`` of ``request`` is chained to (its KV depends on everything before it)."""
    return request.block_hashes[i - 1] if i else ROOT_HASH


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_count 0, least recently used first. Cached ones stay findable until popped.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[bytes, int] = {}
        self.prefix_queries_tokens = 0
        self.prefix_hit_tokens = 0
        self.num_evictions = 0

    # ---- queries (no mutation) -------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        """Fraction of blocks referenced by live requests (cached-but-free blocks count as free)."""
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def prefix_hit_ratio(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queries_tokens if self.prefix_queries_tokens else 0.0

    def cached_hashes(self) -> list[bytes]:
        return list(self._cached)

    def blocks_for_tokens(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def find_cached_prefix(self, request: Request, max_tokens: int | None = None) -> list[int]:
        """Block ids of the longest cached, token-verified prefix of ``request``.

        At most ``num_tokens - 1`` tokens are ever reused so that the last token is computed and
        yields logits (``max_tokens`` can lower the cap further).
        """
        if not self.enable_prefix_caching:
            return []
        tokens = request.all_token_ids
        request.block_hashes = block_hashes(tokens, self.block_size, known=request.block_hashes)
        cap = request.num_tokens - 1 if max_tokens is None else min(max_tokens, request.num_tokens - 1)
        bs = self.block_size
        hits: list[int] = []
        for i in range(max(cap, 0) // bs):
            bid = self._cached.get(request.block_hashes[i])
            if bid is None:
                break
            block = self.blocks[bid]
            if block.token_ids != tuple(tokens[i * bs:(i + 1) * bs]) or block.parent_hash != _parent(request, i):
                break  # a hash collision: never reuse KV of different tokens or of another prefix
            hits.append(bid)
        return hits

    def cached_prefix_tokens(self, token_ids: Sequence[int]) -> int:
        """How many leading tokens of ``token_ids`` a new request would reuse (a read-only estimate)."""
        probe = Request("probe", list(token_ids), _PROBE_PARAMS)
        return len(self.find_cached_prefix(probe)) * self.block_size

    def num_new_blocks_needed(self, request: Request, num_new_tokens: int, hit_blocks: Sequence[int] = ()) -> int:
        total = request.num_computed_tokens + len(hit_blocks) * self.block_size + num_new_tokens
        return max(0, self.blocks_for_tokens(total) - len(request.block_ids) - len(hit_blocks))

    def num_tokens_that_fit(self, request: Request, wanted: int) -> int:
        """How many of ``wanted`` next tokens of ``request`` fit in its blocks plus the free ones."""
        room = (len(request.block_ids) + self.num_free_blocks) * self.block_size - request.num_computed_tokens
        return max(0, min(wanted, room))

    def can_allocate(self, request: Request, num_new_tokens: int, hit_blocks: Sequence[int] = (),
                     keep_free: int = 0) -> bool:
        """Whether the allocation fits while leaving ``keep_free`` blocks for others."""
        # Hit blocks that are free now leave the free list when they are taken.
        free_hits = sum(1 for b in hit_blocks if self.blocks[b].ref_count == 0)
        needed = self.num_new_blocks_needed(request, num_new_tokens, hit_blocks)
        return needed + keep_free <= len(self._free) - free_hits

    # ---- commands --------------------------------------------------------------------------
    def allocate_slots(self, request: Request, num_new_tokens: int, hit_blocks: Sequence[int] = ()) -> bool:
        """Give ``request`` room for ``num_new_tokens`` more tokens (after the hit prefix, if any).

        Returns False and changes nothing when there are not enough free blocks.
        """
        if hit_blocks and request.block_ids:
            raise ValueError("prefix hits can only be taken by a request that holds no blocks")
        if not self.can_allocate(request, num_new_tokens, hit_blocks):
            return False
        num_new = self.num_new_blocks_needed(request, num_new_tokens, hit_blocks)
        for bid in hit_blocks:
            self._take(bid)
        request.block_ids.extend(hit_blocks)
        request.block_ids.extend(self._pop_free() for _ in range(num_new))
        return True

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        self.prefix_queries_tokens += num_tokens
        self.prefix_hit_tokens += num_hit_tokens

    def cache_full_blocks(self, request: Request) -> None:
        """Offer the request's newly completed blocks to the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = min(request.num_computed_tokens // bs, len(request.block_ids))
        if num_full <= request.num_registered_blocks:
            return
        tokens = request.all_token_ids
        if len(request.block_hashes) < num_full:
            request.block_hashes = block_hashes(tokens[:num_full * bs], bs, known=request.block_hashes)
        for i in range(request.num_registered_blocks, num_full):
            block = self.blocks[request.block_ids[i]]
            h = request.block_hashes[i]
            if block.block_hash is None and h not in self._cached:
                self._cached[h] = block.block_id
                block.block_hash = h
                block.token_ids = tuple(tokens[i * bs:(i + 1) * bs])
                block.parent_hash = _parent(request, i)
        request.num_registered_blocks = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; tail blocks first so they are evicted before shared heads."""
        for bid in reversed(request.block_ids):
            block = self.blocks[bid]
            block.ref_count -= 1
            if block.ref_count < 0:
                raise AssertionError(f"block {bid} freed twice")
            if block.ref_count == 0:
                self._free[bid] = None
                if block.block_hash is None:
                    self._free.move_to_end(bid, last=False)  # holds nothing reusable: recycle first
        request.block_ids = []
        request.num_registered_blocks = 0

    def reset_prefix_cache(self) -> int:
        """Forget every cached block that no request holds; returns how many were dropped."""
        dropped = 0
        for bid in list(self._free):
            block = self.blocks[bid]
            if block.block_hash is not None:
                self._uncache(block)
                dropped += 1
        return dropped

    # ---- internals -------------------------------------------------------------------------
    def _take(self, bid: int) -> None:
        block = self.blocks[bid]
        if block.ref_count == 0:
            del self._free[bid]
        block.ref_count += 1

    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        block = self.blocks[bid]
        if block.block_hash is not None:
            self._uncache(block)
            self.num_evictions += 1
        block.ref_count = 1
        return bid

    def _uncache(self, block: Block) -> None:
        if self._cached.get(block.block_hash) == block.block_id:  # type: ignore[arg-type]
            del self._cached[block.block_hash]  # type: ignore[arg-type]
        block.block_hash = None
        block.token_ids = None
        block.parent_hash = None

    # ---- invariants (tests call this after every operation) -------------------------------
    def check_invariants(self, live_requests: Iterable[Request]) -> None:
        refs = [0] * self.num_blocks
        for req in live_requests:
            if len(set(req.block_ids)) != len(req.block_ids):
                raise AssertionError(f"request {req.request_id} holds a block twice: {req.block_ids}")
            for bid in req.block_ids:
                refs[bid] += 1
        for block in self.blocks:
            if block.ref_count != refs[block.block_id]:
                raise AssertionError(
                    f"block {block.block_id}: ref_count {block.ref_count} but {refs[block.block_id]} holders")
            if (block.ref_count == 0) != (block.block_id in self._free):
                raise AssertionError(f"block {block.block_id}: free list disagrees with ref_count")
            if block.block_hash is not None and self._cached.get(block.block_hash) != block.block_id:
                raise AssertionError(f"block {block.block_id}: hash not indexed")
        for h, bid in self._cached.items():
            if self.blocks[bid].block_hash != h:
                raise AssertionError(f"cache index points {h.hex()} at block {bid} with another hash")
