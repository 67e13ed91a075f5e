"""The compiled CPU kernels against plain torch: paged decode attention, RMSNorm, rotary, SiLU-gate.

Where a C++ compiler is present the kernels must build (a silent fall-back to the torch path would
hide a broken kernel behind the oracle tests, which pass on either path).
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F

from disagg_worker.engine.cpu_kernels import kernels_enabled, load_cpu_kernels
from disagg_worker.engine.layer_ops import rotate_half
from tests.conftest import HAVE_COMPILER


@pytest.fixture(scope="module")
def kernels() -> Any:
    k = load_cpu_kernels()
    if k is None:
        if HAVE_COMPILER and kernels_enabled():
            pytest.fail("a C++ compiler is present but the CPU kernels did not build")
        pytest.skip("no C++ compiler here: the engine runs the torch path")
    return k


def reference_decode(q: torch.Tensor, k_blocks: torch.Tensor, v_blocks: torch.Tensor, tables: torch.Tensor,
                     lens: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    kvh = k_blocks.shape[2]
    groups = q.shape[1] // kvh
    out = []
    for b in range(q.shape[0]):
        n = int(lens[b])
        first = max(0, n - window) if window else 0
        keys = k_blocks[tables[b]].reshape(-1, kvh, k_blocks.shape[3])[first:n].repeat_interleave(groups, 1)
        vals = v_blocks[tables[b]].reshape(-1, kvh, v_blocks.shape[3])[first:n].repeat_interleave(groups, 1)
        weights = torch.einsum("hd,thd->ht", q[b].float() * scale, keys.float()).softmax(-1)
        out.append(torch.einsum("ht,thd->hd", weights, vals.float()))
    return torch.stack(out)


# head dims 32/64/128 x groups 1/2/4/8 take the AVX2 path on x86; 48 and a group of 3 the generic one
@pytest.mark.parametrize(("head_dim", "groups"), [(32, 4), (48, 4), (64, 4), (32, 1), (64, 2), (128, 8), (32, 3)])
@pytest.mark.parametrize("window", [0, 20])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_paged_decode_attention(kernels: Any, head_dim: int, groups: int, window: int, dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(head_dim + window + groups)
    bs, kvh, seqs, blocks = 16, 2, 5, 40
    heads = kvh * groups
    k_blocks = torch.randn(blocks, bs, kvh, head_dim, generator=gen).to(dtype)
    v_blocks = torch.randn(blocks, bs, kvh, head_dim, generator=gen).to(dtype)
    lens = torch.tensor([1, 15, 16, 17, 90])
    tables = torch.randperm(blocks, generator=gen)[: seqs * 6].view(seqs, 6)  # blocks anywhere in the pool
    q = torch.randn(seqs, heads, head_dim, generator=gen).to(dtype)
    got = kernels.paged_decode_attention(q, k_blocks, v_blocks, tables, lens, 0.3, window)
    want = reference_decode(q, k_blocks, v_blocks, tables, lens, 0.3, window)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


@pytest.mark.parametrize("block_size", [1, 8, 64, 80])  # 80: above the AVX2 path's largest block
def test_paged_decode_attention_block_sizes(kernels: Any, block_size: int) -> None:
    gen = torch.Generator().manual_seed(block_size)
    kvh, heads, head_dim, blocks = 2, 8, 32, 64
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1])
    width = -(-int(lens.max()) // block_size)
    k_blocks = torch.randn(blocks, block_size, kvh, head_dim, generator=gen)
    v_blocks = torch.randn(blocks, block_size, kvh, head_dim, generator=gen)
    tables = torch.randperm(blocks, generator=gen)[: len(lens) * width].view(len(lens), width)
    q = torch.randn(len(lens), heads, head_dim, generator=gen)
    for window in (0, 5):
        got = kernels.paged_decode_attention(q, k_blocks, v_blocks, tables, lens, 0.3, window)
        torch.testing.assert_close(got, reference_decode(q, k_blocks, v_blocks, tables, lens, 0.3, window),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_and_fused_residual_add(kernels: Any, dtype: torch.dtype) -> None:
    x, delta, w = torch.randn(33, 96).to(dtype), torch.randn(33, 96).to(dtype), torch.randn(96).to(dtype)

    def ref(h: torch.Tensor) -> torch.Tensor:
        hf = h.float()
        return w * (hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)

    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kernels.rms_norm(x, w, 1e-6), ref(x), atol=tol, rtol=tol)
    residual = x.clone()
    normed = kernels.add_rms_norm_(residual, delta, w, 1e-6)
    torch.testing.assert_close(residual, x + delta)  # updated in place
    torch.testing.assert_close(normed, ref(x + delta), atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rotary_on_a_strided_view(kernels: Any, dtype: torch.dtype) -> None:
    fused = torch.randn(9, 12 * 32).to(dtype)  # q, k and v side by side, as the fused projection returns
    q = fused[:, : 8 * 32].reshape(9, 8, 32)  # a view with a token stride of 384
    cos, sin = torch.randn(9, 32).to(dtype), torch.randn(9, 32).to(dtype)
    want = q * cos[:, None] + rotate_half(q) * sin[:, None]
    torch.testing.assert_close(kernels.rotary(q, cos, sin), want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(kernels: Any, dtype: torch.dtype) -> None:
    gate_up = (torch.randn(17, 2 * 40) * 4).to(dtype)
    want = F.silu(gate_up[:, :40]) * gate_up[:, 40:]
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(kernels.silu_mul(gate_up), want, atol=tol, rtol=tol)


def test_bad_shapes_are_clear_errors(kernels: Any) -> None:
    with pytest.raises(RuntimeError, match="rms_norm"):
        kernels.rms_norm(torch.randn(3, 8), torch.randn(4), 1e-6)
    with pytest.raises(RuntimeError, match="silu_mul"):
        kernels.silu_mul(torch.randn(3, 7))
