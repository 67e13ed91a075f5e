"""The per-layer math around attention: projections, RMSNorm with the residual add, rotary, SiLU-gate.

``LayerOps`` runs them with the compiled CPU kernels where the model's modules are the standard
ones they stand in for (checked per module), and with the model's own modules otherwise. The q/k/v
and the MLP's gate/up projections each run as one GEMM over stacked weights; the modules' own
weights become views into the stacked tensors, so no weight is stored twice and the model stays
usable as it was.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn


def _stack_linears(linears: list[nn.Linear]) -> tuple[torch.Tensor, torch.Tensor | None, list[int]]:
    """Stack the weights (and biases) of linears sharing an input; re-point each module at its rows."""
    weight = torch.cat([m.weight.detach() for m in linears])
    bias = torch.cat([m.bias.detach() for m in linears]) if all(m.bias is not None for m in linears) else None
    sizes = [m.out_features for m in linears]
    start = 0
    for m, n in zip(linears, sizes, strict=True):
        m.weight.data = weight[start:start + n]
        if bias is not None:
            m.bias.data = bias[start:start + n]
        start += n
    return weight, bias, sizes


def _is_rms_norm(module: Any) -> bool:
    """transformers' plain RMSNorm: ``weight * (x * rsqrt(mean(x^2) + variance_epsilon))``."""
    return (type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon")
            and isinstance(getattr(module, "weight", None), torch.Tensor) and module.weight.dim() == 1)


def _is_silu(module: Any) -> bool:
    return isinstance(module, nn.SiLU) or type(module).__name__ == "SiLUActivation"


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def swap_halves(x: torch.Tensor) -> torch.Tensor:
    """``x`` with the two halves of its last dimension exchanged (one copy kernel)."""
    return x.unflatten(-1, (2, -1)).flip(-2).flatten(-2)


@dataclass(frozen=True)
class RotaryTables:
    """A step's rotary cos/sin, shaped once for every layer.

    ``rotate_half(x) * sin`` equals ``swap_halves(x) * sin_signed`` bit for bit (the first half of
    ``sin_signed`` is negated, and negation is exact), in one op fewer per call than ``rotate_half``.
    """

    cos: torch.Tensor  # [T, D], the compiled kernel's form
    sin: torch.Tensor
    cos_heads: torch.Tensor  # [T, 1, D]
    sin_signed: torch.Tensor  # [T, 1, D]

    @classmethod
    def build(cls, cos: torch.Tensor, sin: torch.Tensor) -> RotaryTables:
        half = sin.shape[-1] // 2
        sin_signed = torch.cat((-sin[:, :half], sin[:, half:]), dim=-1)
        return cls(cos, sin, cos[:, None], sin_signed[:, None])


class Norm:
    """One of a layer's norms; whether the fused kernel can stand in for it is decided once, here."""

    def __init__(self, module: Any, kernels: Any | None) -> None:
        self.module = module
        self.kernels = kernels if kernels is not None and _is_rms_norm(module) else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernels is not None:
            return self.kernels.rms_norm(x, self.module.weight, self.module.variance_epsilon)
        return self.module(x)

    def add_then_norm(self, hidden: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The residual stream after adding ``delta`` (in place on the fused path), and its norm."""
        if self.kernels is not None:
            return hidden, self.kernels.add_rms_norm_(hidden, delta, self.module.weight, self.module.variance_epsilon)
        hidden = hidden + delta
        return hidden, self.module(hidden)


class LayerOps:
    """One decoder layer's non-attention math; ``kernels`` is the compiled module or None."""

    def __init__(self, layer: Any, kernels: Any | None) -> None:
        self.attn, self.mlp = layer.self_attn, layer.mlp
        self.input_norm = Norm(layer.input_layernorm, kernels)
        self.post_norm = Norm(layer.post_attention_layernorm, kernels)
        self.kernels = kernels
        self.qkv = self.gate_up = None
        qkv = [getattr(self.attn, n, None) for n in ("q_proj", "k_proj", "v_proj")]
        if all(isinstance(m, nn.Linear) for m in qkv) and len({m.bias is None for m in qkv}) == 1:
            self.qkv = _stack_linears(qkv)
        gate_up = [getattr(self.mlp, n, None) for n in ("gate_proj", "up_proj")]
        if (all(isinstance(m, nn.Linear) and m.bias is None for m in gate_up)
                and hasattr(self.mlp, "act_fn") and hasattr(self.mlp, "down_proj")):
            self.gate_up = _stack_linears(gate_up)
        self.fast_silu = (kernels is not None and self.gate_up is not None
                          and _is_silu(getattr(self.mlp, "act_fn", None)))

    def q_k_v(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if self.qkv is None:
            return self.attn.q_proj(x), self.attn.k_proj(x), self.attn.v_proj(x)
        weight, bias, sizes = self.qkv
        q, k, v = F.linear(x, weight, bias).split(sizes, dim=-1)
        return q, k, v

    def rotary(self, x: torch.Tensor, tables: RotaryTables) -> torch.Tensor:
        """``x [T, heads, D]`` rotated by the step's tables: ``x * cos + rotate_half(x) * sin``."""
        if self.kernels is not None:
            return self.kernels.rotary(x, tables.cos, tables.sin)
        return x * tables.cos_heads + swap_halves(x) * tables.sin_signed

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up is None:
            return self.mlp(x)
        weight, _, sizes = self.gate_up
        gate_up = F.linear(x, weight)
        if self.fast_silu:
            return self.mlp.down_proj(self.kernels.silu_mul(gate_up))
        gate, up = gate_up.split(sizes, dim=-1)
        return self.mlp.down_proj(self.mlp.act_fn(gate) * up)
