"""Chained hashes of full KV blocks: the names under which the prefix cache stores blocks.

Block ``i`` of a token sequence is named ``H(name of block i-1, token ids of block i)``, so equal names
mean equal prefixes. The router computes the same names to estimate how much of a prompt each decode
worker has cached, which is why this module is pure and torch-free.
"""

from __future__ import annotations

from array import array
from collections.abc import Sequence

import xxhash

ROOT_HASH = b"disagg-prefix-v1"


def hash_block(parent: bytes, token_ids: Sequence[int]) -> bytes:
    """128-bit name of one block given its parent's name (collisions are also guarded by a token check)."""
    h = xxhash.xxh3_128()
    h.update(parent)
    h.update(array("q", token_ids).tobytes())
    return h.digest()


def block_hashes(token_ids: Sequence[int], block_size: int, known: Sequence[bytes] = ()) -> list[bytes]:
    """Names of every full block of ``token_ids``; ``known`` are already-computed leading names."""
    out = list(known)
    parent = out[-1] if out else ROOT_HASH
    num_full = len(token_ids) // block_size
    for i in range(len(out), num_full):
        parent = hash_block(parent, token_ids[i * block_size:(i + 1) * block_size])
        out.append(parent)
    return out


def shared_prefix_blocks(prompt_hashes: Sequence[bytes], cached: set[bytes] | frozenset[bytes]) -> int:
    """How many leading blocks of a prompt a worker holds, given the set of names it reports."""
    n = 0
    for h in prompt_hashes:
        if h not in cached:
            break
        n += 1
    return n
