"""KV chunk planning, encoding and verification (pure, no servers)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from disagg_worker.engine.kv_cache import KVLayout
from disagg_worker.rpc import pb
from disagg_worker.transfer.chunks import ChunkSpec, TransferError, plan_chunks
from disagg_worker.transfer.grpc_stream import (
    Coverage,
    ReceivedChunk,
    chunk_message,
    decode_chunk,
    encode_chunk,
    read_prefill_response,
)

LAYOUT = KVLayout(num_layers=4, block_size=16, num_kv_heads=2, head_dim=32, dtype=torch.float32)
PER_BLOCK_LAYER = LAYOUT.bytes_per_block // LAYOUT.num_layers


@given(first=st.integers(0, 20), n=st.integers(0, 60), layers=st.integers(1, 8),
       per=st.integers(1, 5000), budget=st.integers(1, 100_000))
def test_plan_covers_every_cell_once_and_respects_the_budget(first: int, n: int, layers: int, per: int,
                                                             budget: int) -> None:
    specs = plan_chunks(first, n, layers, per, budget)
    cov = Coverage(first, n, layers)
    for i, s in enumerate(specs):
        assert s.seq == i
        cov.add(s.first_block, s.num_blocks, s.layer_start, s.num_layers)
        assert s.num_blocks * s.num_layers * per <= max(budget, per)  # one cell is the smallest unit
    assert cov.complete


def kv(blocks: int, layers: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    shape = (layers, blocks, LAYOUT.block_size, LAYOUT.num_kv_heads, LAYOUT.head_dim)
    return torch.randn(shape), torch.randn(shape)


def received(message: bytes) -> ReceivedChunk:
    chunk = read_prefill_response(message)
    assert isinstance(chunk, ReceivedChunk)
    return chunk


def test_round_trip_is_exact() -> None:
    k, v = kv(3)
    k2, v2 = decode_chunk(received(encode_chunk("r", ChunkSpec(0, 5, 3, 0, 4), k, v)), LAYOUT, "r")
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_bf16_round_trip() -> None:
    layout = KVLayout(2, 16, 2, 32, torch.bfloat16)
    k, v = (t.to(torch.bfloat16) for t in kv(2, layers=2))
    k2, v2 = decode_chunk(received(encode_chunk("r", ChunkSpec(0, 0, 2, 0, 2), k, v)), layout, "r")
    assert torch.equal(k, k2) and torch.equal(v, v2)


def test_a_chunk_message_is_the_protobuf_encoding_of_its_fields() -> None:
    """The hand-joined message is what protobuf writes for the same fields (any reader parses it), and
    a chunk that protobuf serialized reads back the same: the proto contract is unchanged."""
    k, v = kv(2)
    spec = ChunkSpec(3, 4, 2, 0, 4)
    message = encode_chunk("req-1", spec, k, v)
    parsed = pb.PrefillResponse.FromString(message)
    mine = received(message)
    assert parsed.HasField("chunk") and parsed.chunk.k == k.numpy().tobytes() and parsed.chunk.v == v.numpy().tobytes()
    assert (parsed.chunk.request_id, parsed.chunk.seq, parsed.chunk.first_block, parsed.chunk.num_blocks,
            parsed.chunk.layer_start, parsed.chunk.num_layers, parsed.chunk.dtype, tuple(parsed.chunk.shape),
            parsed.chunk.checksum) == ("req-1", 3, 4, 2, 0, 4, "float32", tuple(k.shape), mine.checksum)
    assert parsed.SerializeToString(deterministic=True) == message  # field by field, the same bytes
    theirs = received(parsed.SerializeToString())
    assert theirs == mine and bytes(theirs.k) == bytes(mine.k)
    done = pb.PrefillResponse(done=pb.PrefillDone(first_token=7, num_chunks=1))
    assert read_prefill_response(done.SerializeToString()) == done.done


def test_a_chunk_in_two_parts_or_with_fields_reordered_reads_as_protobuf_reads_it() -> None:
    k, v = kv(1)
    full = pb.PrefillResponse.FromString(encode_chunk("r", ChunkSpec(0, 0, 1, 0, 4), k, v))
    head = pb.PrefillResponse(chunk=pb.KvChunk(request_id="r", k=full.chunk.k))
    tail = pb.PrefillResponse(chunk=full.chunk)
    tail.chunk.ClearField("k")
    merged = received(head.SerializeToString() + tail.SerializeToString())  # protobuf merges the two
    k2, v2 = decode_chunk(merged, LAYOUT, "r")
    assert torch.equal(k, k2) and torch.equal(v, v2)
    # v before k, the header last: the same chunk
    body = full.chunk.SerializeToString()
    reordered = pb.KvChunk(k=full.chunk.k).SerializeToString() + body
    k3, _ = decode_chunk(received(b"\x0a" + bytes([0x80 | len(reordered) & 0x7F]) + _rest_of_varint(len(reordered))
                                  + reordered), LAYOUT, "r")
    assert torch.equal(k, k3)


def _rest_of_varint(n: int) -> bytes:
    n >>= 7
    out = bytearray()
    while True:
        out.append(n & 0x7F | (0x80 if n >= 0x80 else 0))
        if n < 0x80:
            return bytes(out)
        n >>= 7


@pytest.mark.parametrize("message", [
    b"", b"\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x05abc",
    b"\x0a\x02\x4a\x09", b"\x0b", b"\x0a\x01\x00", b"\xff" * 12, b"\x12\x03\x08",
])
def test_malformed_messages_are_a_transfer_error(message: bytes) -> None:
    with pytest.raises(TransferError):
        read_prefill_response(message)


def test_chunk_message_joins_scattered_parts() -> None:
    k, v = kv(2)
    spec = ChunkSpec(0, 0, 2, 0, 4)
    kb, vb = k.numpy().tobytes(), v.numpy().tobytes()
    parts = chunk_message("r", spec, [kb[:100], memoryview(kb)[100:]], [vb[:7], vb[7:5000], vb[5000:]],
                          torch.float32, k.shape)
    assert parts == encode_chunk("r", spec, k, v)


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda c: setattr(c, "k", bytes([c.k[0] ^ 1]) + c.k[1:]), "checksum"),
    (lambda c: setattr(c, "first_block", 1), "checksum"),  # intact bytes, garbled placement
    (lambda c: setattr(c, "layer_start", 1), "checksum"),
    (lambda c: setattr(c, "request_id", "other"), "arrived on the transfer"),
    (lambda c: c.shape.__setitem__(2, 8), "shape"),
    (lambda c: setattr(c, "dtype", "float16"), "dtype"),
    (lambda c: setattr(c, "dtype", "int8"), "unsupported KV dtype"),
])
def test_corrupt_or_misshapen_chunks_are_refused(mutate, match: str) -> None:  # type: ignore[no-untyped-def]
    k, v = kv(1)
    chunk = pb.PrefillResponse.FromString(encode_chunk("r", ChunkSpec(0, 0, 1, 0, 4), k, v)).chunk
    mutate(chunk)
    with pytest.raises(TransferError, match=match):
        decode_chunk(received(pb.PrefillResponse(chunk=chunk).SerializeToString()), LAYOUT, "r")


def test_coverage_refuses_duplicates_and_strays() -> None:
    cov = Coverage(2, 3, 4)
    cov.add(2, 1, 0, 4)
    with pytest.raises(TransferError, match="twice"):
        cov.add(2, 1, 1, 1)
    with pytest.raises(TransferError, match="outside"):
        cov.add(1, 1, 0, 4)
    assert not cov.complete


def test_pool_sink_writes_a_whole_chunk_into_scattered_blocks() -> None:
    from disagg_worker.engine.kv_cache import PagedKVCache
    from disagg_worker.transfer.sinks import PoolSink

    reserved = [7, 3, 4, 0]
    k, v = kv(2, layers=2)
    spec = ChunkSpec(0, 1, 2, 2, 2)  # blocks 1-2 of the reservation, layers 2-3
    got, want = PagedKVCache(LAYOUT, 8, torch.device("cpu")), PagedKVCache(LAYOUT, 8, torch.device("cpu"))
    PoolSink(got, reserved).write(spec, k.numpy().tobytes(), v.numpy().tobytes())
    want.import_blocks([3, 4], k, v, layer_start=2)
    assert torch.equal(got.k, want.k) and torch.equal(got.v, want.v)
    with pytest.raises(TransferError, match="different size"):
        PoolSink(got, reserved).write(spec, k.numpy().tobytes()[:-4], v.numpy().tobytes())
    with pytest.raises(TransferError, match="exceed the reservation"):
        PoolSink(got, reserved).write(ChunkSpec(1, 3, 2, 0, 2), b"", b"")
