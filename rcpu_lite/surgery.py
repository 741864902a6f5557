"""Slicing one decoder layer's tensors down to the kept heads and MLP channels."""
from __future__ import annotations

import torch

from .arch import LayerShape


def _rows(t: torch.Tensor, kept_units: torch.Tensor, unit: int) -> torch.Tensor:
    """Keep whole blocks of `unit` rows (a head's rows) of a weight or bias."""
    blocks = t.reshape(-1, unit, *t.shape[1:])
    return blocks[kept_units].reshape(-1, *t.shape[1:]).contiguous()


def slice_layer(
    tensors: dict[str, torch.Tensor],
    shape: LayerShape,
    heads: torch.Tensor,
    kv_heads: torch.Tensor,
    channels: torch.Tensor,
    o_proj: torch.Tensor,
    down_proj: torch.Tensor,
) -> dict[str, torch.Tensor]:
    """The compact tensors of a layer. o_proj / down_proj come already compact (compensated)."""
    out = {}
    for name, t in tensors.items():
        module = name.rsplit(".", 1)[0]
        if module == "self_attn.q_proj":
            out[name] = _rows(t, heads, shape.head_dim)
        elif module in ("self_attn.k_proj", "self_attn.v_proj"):
            out[name] = _rows(t, kv_heads, shape.head_dim)
        elif module in ("mlp.gate_proj", "mlp.up_proj"):
            out[name] = t[channels].contiguous()
        elif name == "self_attn.o_proj.weight":
            out[name] = o_proj.contiguous()
        elif name == "mlp.down_proj.weight":
            out[name] = down_proj.contiguous()
        else:  # norms and the o/down biases keep their shape
            out[name] = t
    return out


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input columns that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
