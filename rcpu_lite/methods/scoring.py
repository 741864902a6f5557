"""Importance scores for the input columns of o_proj / down_proj, and the choice of what to keep.

Pure functions of a weight matrix (d_out x d_in) and InputStats (formulas: docs/methods.md). Every
score is one entry of SCORES, which also feeds validation and --help.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcpu_lite.methods.stats import InputStats


@dataclass(frozen=True)
class Score:
    name: str
    columns: Callable[[torch.Tensor, InputStats], torch.Tensor]  # (W, stats) -> one score per input column
    help: str
    # A head's score from its head_dim column scores (the sum, unless the method says otherwise).
    head: Callable[[torch.Tensor], torch.Tensor] = lambda cols: cols.sum(-1)


def _rcpu(w, s):  # the official code's form: ||W_:,j||_2 * E|x_j| * Var_j
    return w.norm(dim=0) * s.mean_abs * s.variance


def _rcpu_l2(w, s):  # the paper text's form: ||W_:,j||_2 * ||X_j||_2 * Var_j
    return w.norm(dim=0) * s.l2_norm * s.variance


def _wanda_sp(w, s):  # RCPU's baseline: ||W_:,j||_1 * E|x_j|
    return w.abs().sum(0) * s.mean_abs


def _flap(w, s):  # FLAP's fluctuation metric (WIFV): Var_j * ||W_:,j||^2
    return s.variance * w.square().sum(0)


def _magnitude(w, s):
    return w.norm(dim=0)


SCORES: dict[str, Score] = {
    score.name: score
    for score in (
        Score(
            "rcpu", _rcpu, "||W[:,j]||_2 * E|x_j| * Var(x_j), RCPU's variance-aware score (the official code's form)"
        ),
        Score("rcpu-l2", _rcpu_l2, "||W[:,j]||_2 * ||X_j||_2 * Var(x_j) (the RCPU paper text's form)"),
        Score("wanda-sp", _wanda_sp, "||W[:,j]||_1 * E|x_j|, RCPU's Wanda-sp baseline"),
        # FLAP squares the o_proj metric before summing a head's columns.
        Score(
            "flap",
            _flap,
            "Var(x_j) * ||W[:,j]||_2^2, FLAP's fluctuation; a head sums its squared column scores",
            head=lambda cols: cols.square().sum(-1),
        ),
        Score("magnitude", _magnitude, "||W[:,j]||_2"),
    )
}


def _score(method: str) -> Score:
    if method not in SCORES:
        raise ValueError(f"unknown score {method!r}; choose one of {', '.join(SCORES)}")
    return SCORES[method]


def column_scores(method: str, weight: torch.Tensor, stats: InputStats) -> torch.Tensor:
    """Score of every input column j of `weight`; higher means more important."""
    return _score(method).columns(weight.to(stats.sum.dtype), stats)


def head_scores(columns: torch.Tensor, head_dim: int, method: str = "rcpu") -> torch.Tensor:
    """A head's score from its head_dim column scores (the sum for every score but flap)."""
    return _score(method).head(columns.reshape(-1, head_dim))


def n_removed(ratio: float, n: int) -> int:
    """The paper's count: int(ratio * n) units per layer."""
    return int(ratio * n)


def drop_lowest(scores: torch.Tensor, n_drop: int) -> torch.Tensor:
    """Sorted indices that survive when the n_drop lowest scores go.

    A stable sort makes ties go to the lower index, identically on every run and device.
    """
    order = torch.argsort(scores.double().cpu(), stable=True)
    return torch.sort(order[n_drop:]).values


def kept_channels(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Sorted indices of the `keep` highest-scoring MLP channels."""
    return drop_lowest(scores, scores.numel() - keep)


def kept_heads(scores: torch.Tensor, n_kv_heads: int, keep: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sorted indices of the `keep` surviving query heads and of the key/value heads.

    Multi-head attention (as many KV heads as query heads): the lowest heads go with their k/v
    rows. Grouped-query attention: Hugging Face needs the same number of query heads per KV head,
    so `keep` must be a multiple of n_kv_heads, each group keeps keep // n_kv_heads of its own
    heads (its highest), and all KV heads stay.
    """
    n_heads = scores.numel()
    if n_kv_heads == n_heads:
        kept = kept_channels(scores, keep)
        return kept, kept.clone()
    if keep % n_kv_heads:
        raise ValueError(f"{keep} query heads cannot be split evenly over {n_kv_heads} key/value groups")
    per_group = n_heads // n_kv_heads
    groups = scores.reshape(n_kv_heads, per_group)
    kept = [drop_lowest(groups[g], per_group - keep // n_kv_heads) + g * per_group for g in range(n_kv_heads)]
    return torch.cat(kept), torch.arange(n_kv_heads)


def error_curve(
    weight: torch.Tensor,
    gram: torch.Tensor,
    order: torch.Tensor,
    unit: int = 1,
    step: int = 1,
    reference: float | None = None,
) -> torch.Tensor:
    """curve[k] = ||W_R X_R||^2 / ||W X||^2 with R the first k*step units of `order` (a unit: `unit` consecutive
    input columns), in fp64: the relative output error of removing them with no repair, for k = 0 .. len/step.
    With `reference`, the error is relative to that energy instead (e.g. the residual stream's, ||H||^2).

    With B = (W^T W) o C summed over unit blocks, ||W_R X_R||^2 is the sum of B over R x R, so every prefix comes
    from one pass of cumulative sums."""
    b = (weight.T @ weight).double().mul_(gram.double())
    n = weight.shape[1] // unit
    if unit > 1:
        b = b.reshape(n, unit, n, unit).sum((1, 3))
    total = float(b.sum())
    b = b[order][:, order]
    added = 2 * torch.triu(b, 1).sum(0) + b.diagonal()  # what the k-th unit adds to the prefix sum
    curve = torch.cat([torch.zeros(1, dtype=torch.float64), added.cumsum(0)])[::step]
    scale = reference if reference is not None else total
    return curve / scale if scale > 0 else curve
