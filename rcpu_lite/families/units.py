"""Slicing one decoder layer's tensors down to the kept heads and MLP channels."""

from __future__ import annotations

import torch

from rcpu_lite.families.arch import LLAMA_UNITS, PROJECTIONS, LayerShape, UnitMap


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
    replaced = {"self_attn.o_proj.weight": o_proj, "mlp.down_proj.weight": down_proj}
    return {
        name: replaced[name].contiguous()
        if name in replaced
        else slice_tensor(name, t, shape, heads, kv_heads, channels)
        for name, t in tensors.items()
    }


def slice_tensor(
    name: str,
    t: torch.Tensor,
    shape: LayerShape,
    heads: torch.Tensor,
    kv_heads: torch.Tensor,
    channels: torch.Tensor,
    units: UnitMap = LLAMA_UNITS,
) -> torch.Tensor:
    """One tensor of a layer cut to the kept heads and channels, by the family's unit map (the compensated
    projections' weights excepted)."""
    module = name.rsplit(".", 1)[0]
    if module in units.query_rows:
        return _rows(t, heads, shape.head_dim)
    if module in units.kv_rows:
        return _rows(t, kv_heads, shape.head_dim)
    if module in units.channel_rows:
        return t[channels].contiguous()
    if name in (path + ".weight" for _, path in units.compensated):
        raise ValueError(f"{name} is replaced by its compensated weight, not sliced")
    # Norms and the o/down biases keep their shape. That includes Qwen3's and Gemma 3's q_norm / k_norm: the
    # issue expected a pruned head to lose "its norm slice", but in transformers (5.24) each is one RMSNorm of
    # size head_dim applied to every head alike (q_proj(x).view(..., -1, head_dim) then q_norm), so there is no
    # per-head slice: the kept heads keep the same shared weight.
    return t


def slice_kept(
    tensors: dict[str, torch.Tensor], shape: LayerShape, kept
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Cut every tensor of a layer to `kept` (a selection.Kept) except those of the compensated projections,
    whose weights the caller has taken already: returns the cut tensors, in the layer's order, and each
    compensated projection's own bias (None where it has none), which keeps its shape."""
    biases = {name: module + ".bias" for name, module in PROJECTIONS.items()}
    compact = {
        name: slice_tensor(name, tensors.pop(name), shape, kept.heads, kept.kv_heads, kept.channels)
        for name in list(tensors)
        if name not in biases.values()
    }
    return compact, {name: tensors.pop(bias, None) for name, bias in biases.items()}


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """o_proj input columns that belong to the given heads."""
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)
