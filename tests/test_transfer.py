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
    flip_payload_byte,
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
    """The hand-joined message is byte for byte what protobuf writes for the same fields, so any reader
    parses it: the proto contract is unchanged."""
    k, v = kv(2)
    spec = ChunkSpec(3, 4, 2, 0, 4)
    message = encode_chunk("req-1", spec, k, v)
    parsed = pb.PrefillResponse.FromString(message)
    assert parsed.chunk.k == k.numpy().tobytes() and parsed.chunk.v == v.numpy().tobytes()
    assert (parsed.chunk.request_id, parsed.chunk.seq, parsed.chunk.first_block, parsed.chunk.num_blocks,
            parsed.chunk.layer_start, parsed.chunk.num_layers, parsed.chunk.dtype, tuple(parsed.chunk.shape),
            parsed.chunk.checksum) == ("req-1", 3, 4, 2, 0, 4, "float32", tuple(k.shape), received(message).checksum)
    assert parsed.SerializeToString(deterministic=True) == message
    empty = chunk_message("r", ChunkSpec(0, 0, 0, 0, 4), [b""], [], torch.float32, (4, 0, 16, 2, 32))
    assert pb.PrefillResponse.FromString(empty).SerializeToString(deterministic=True) == empty  # no k, no v
    done = pb.PrefillResponse(done=pb.PrefillDone(first_token=7, num_chunks=1))
    assert read_prefill_response(done.SerializeToString()) == done.done


def _len_field(field: int, payload: bytes, length_bytes: bytes | None = None) -> bytes:
    """A length-delimited field written by hand: key, length (a given, non-minimal one if asked), payload."""
    def varint(n: int) -> bytes:
        out = bytearray()
        while n >= 0x80:
            out.append(n & 0x7F | 0x80)
            n >>= 7
        return bytes(out + bytes([n]))
    return varint(field << 3 | 2) + (length_bytes or varint(len(payload))) + payload


def test_a_chunk_written_any_other_valid_way_reads_as_protobuf_reads_it() -> None:
    """What another protobuf writer may send: fields in any order, a field twice (the last wins), an
    unpacked repeated field, unknown fields, a non-minimal length, a chunk in two parts (merged)."""
    k, v = kv(1)
    full = pb.PrefillResponse.FromString(encode_chunk("r", ChunkSpec(0, 0, 1, 0, 4), k, v)).chunk
    header = pb.KvChunk()
    header.CopyFrom(full)
    header.ClearField("k")
    header.ClearField("v")
    kb, vb = full.k, full.v
    unpacked_shape = b"".join(bytes([8 << 3]) + bytes([d]) for d in full.shape)  # shape as 5 varint fields
    header_unpacked = header.SerializeToString().replace(_len_field(8, bytes(full.shape)), unpacked_shape)
    assert header_unpacked != header.SerializeToString()
    unknown = _len_field(12, b"from a newer sender") + bytes([13 << 3 | 5]) + b"\x01\x02\x03\x04"
    bodies = [
        _len_field(10, vb) + _len_field(9, kb) + header.SerializeToString(),  # v, k, then the rest
        _len_field(9, b"garbage" * 9) + header_unpacked + _len_field(10, vb) + unknown + _len_field(9, kb),
        header.SerializeToString() + _len_field(9, kb, b"\x80\x80\x81\x80\x00") + _len_field(10, vb),
    ]
    assert len(kb) == 1 << 14  # the non-minimal length above spells 16,384
    for body in bodies:
        message = _len_field(1, body)
        theirs = pb.PrefillResponse.FromString(message).chunk
        assert theirs.k == kb and theirs.v == vb and theirs.checksum == full.checksum
        k2, v2 = decode_chunk(received(message), LAYOUT, "r")
        assert torch.equal(k, k2) and torch.equal(v, v2)
    two_parts = _len_field(1, _len_field(9, kb)) + _len_field(1, header.SerializeToString() + _len_field(10, vb))
    k3, v3 = decode_chunk(received(two_parts), LAYOUT, "r")
    assert torch.equal(k, k3) and torch.equal(v, v3)


@pytest.mark.parametrize("message", [
    b"", b"\x0a", b"\x0a\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", b"\x0a\x05abc",
    b"\x0a\x02\x4a\x09", b"\x0b", b"\x0a\x02\x00\x00", b"\xff" * 12, b"\x12\x03\x08",
    b"\x0a\x03\x0a\x01\xff",  # a request id that is not UTF-8: protobuf's DecodeError
    b"\x0a\x02\x4b\x00",  # a group start inside the chunk
])
def test_malformed_messages_are_a_transfer_error(message: bytes) -> None:
    with pytest.raises(TransferError):
        read_prefill_response(message)


def test_the_fault_injection_flips_a_payload_byte_that_the_checksum_catches() -> None:
    k, v = kv(1)
    chunk = received(flip_payload_byte(encode_chunk("r", ChunkSpec(0, 0, 1, 0, 4), k, v)))
    assert bytes(chunk.k)[0] != k.numpy().tobytes()[0]
    assert bytes(chunk.k)[1:] == k.numpy().tobytes()[1:] and bytes(chunk.v) == v.numpy().tobytes()
    with pytest.raises(TransferError, match="checksum"):
        decode_chunk(chunk, LAYOUT, "r")


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
