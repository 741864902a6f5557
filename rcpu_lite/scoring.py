"""Importance scores for the input columns of o_proj / down_proj, and the choice of what to keep.

Pure functions of a weight matrix (d_out x d_in) and InputStats; see DESIGN.md section 2.
"""
from __future__ import annotations

import torch

from .stats import InputStats

SCORES = ("rcpu", "rcpu-l2", "wanda-sp", "magnitude")


def column_scores(method: str, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Score of every input column j of `weight`; higher means more important."""
    w = weight.to(stats.gram.dtype)
    if method == "rcpu":  # the official code's form: ||W_:,j||_2 * E|x_j| * Var_j
        return w.norm(dim=0) * stats.mean_abs * stats.variance
    if method == "rcpu-l2":  # the paper text's form: ||W_:,j||_2 * ||X_j||_2 * Var_j
        return w.norm(dim=0) * stats.l2_norm * stats.variance
    if method == "wanda-sp":  # RCPU's baseline: ||W_:,j||_1 * E|x_j|
        return w.abs().sum(0) * stats.mean_abs
    if method == "magnitude":
        return w.norm(dim=0)
    raise ValueError(f"unknown score {method!r}; choose one of {', '.join(SCORES)}")


def head_scores(columns: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A head's score is the sum of its head_dim column scores."""
    return columns.reshape(-1, head_dim).sum(1)


def n_removed(ratio: float, n: int) -> int:
    """The paper's count: int(ratio * n) units per layer."""
    return int(ratio * n)


def drop_lowest(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Sorted indices that survive when the n_drop lowest scores go.

    A stable sort makes ties go to the lower index, identically on every run and device.
    """
    order = torch.argsort(scores.double().cpu(), stable=True)
    return torch.sort(order[n_drop:]).values


def kept_channels(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Sorted indices of the MLP channels that survive."""
    return drop_lowest(scores, n_removed(ratio, scores.numel()))


def kept_heads(scores: torch.Tensor, n_kv_heads: int, ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the surviving query heads and key/value heads.

    Multi-head attention (as many KV heads as query heads): int(ratio * n_heads) heads go, with
    their k/v rows. Grouped-query attention: Hugging Face needs the same number of query heads per
    KV head, so int(ratio * n_heads) // n_kv_heads query heads go from *every* group (floor, so
    the achieved ratio can be lower than asked) and all KV heads stay.
    """
    n_heads = scores.numel()
    if n_kv_heads == n_heads:
        kept = kept_channels(scores, ratio)
        return kept, kept.clone()
    per_group = n_heads // n_kv_heads
    drop = n_removed(ratio, n_heads) // n_kv_heads
    groups = scores.reshape(n_kv_heads, per_group)
    kept = [drop_lowest(groups[g], drop) + g * per_group for g in range(n_kv_heads)]
    return torch.cat(kept), torch.arange(n_kv_heads)
