"""Greedy structured OBS (the selection of ZipLM and SlimGPT), as a pure function of W and the Gram.

For y = W x with the damped Hessian H = C + lambda I (C = sum x x^T), removing a unit U (a set of input
columns: a head's head_dim columns, or one MLP channel) and moving the other columns optimally raises

    E = tr((W - W') H (W - W')^T)   by   tr(W_U [H^-1]_UU^-1 W_U^T),

and the optimal move is W <- W - W_U [H^-1]_UU^-1 [H^-1]_U,: (the OBS update). After it, the inverse Hessian of
the columns left is the Schur complement H^-1 - [H^-1]_:,U [H^-1]_UU^-1 [H^-1]_U,: (zero in U's rows and columns),
so the next unit is chosen the same way. For a fixed removed set the result is the ridge least-squares refit
W_K' = W H_:,K H_KK^-1 = (W C_:,K + lambda W_K)(C_KK + lambda I)^-1, i.e. compensation.least_squares with
damp_abs = lambda.

Units are removed one at a time, or a block of the cheapest at a time (SlimGPT's shrinking groups: each step
takes a fraction of what is still to go), with one joint update per block. The big products run in the dtype
given (fp32 in the pipeline); the small |U| x |U| inverses run in fp64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ObsOptions:
    damp: float = 0.01  # lambda = damp * mean(diag C)
    damp_abs: float = 0.0  # an absolute lambda instead (0: use damp)
    step_fraction: float = 0.0  # each step removes this fraction of the units still to go (at least one); 0: one
    keep_repaired: bool = True  # return W repaired on the kept columns (the pipeline repairs with --compensate)


@dataclass
class ObsResult:
    removed: torch.Tensor  # unit indices in the order they went
    kept: torch.Tensor  # sorted unit indices left
    kept_columns: torch.Tensor  # sorted input columns left
    weight: torch.Tensor | None  # W repaired on the kept columns (d_out x |K|), unless not asked for
    damp_used: float


def damping(gram: torch.Tensor, options: ObsOptions) -> float:
    lam = options.damp_abs if options.damp_abs > 0 else options.damp * float(gram.diagonal().mean())
    return max(lam, torch.finfo(gram.dtype).tiny)


def inverse_hessian(gram: torch.Tensor, lam: float, retries: int = 6) -> tuple[torch.Tensor, float]:
    """(C + lambda I)^-1 by Cholesky, in C's dtype, in one d x d buffer besides C (factor and inverse in place:
    485 MB each at Llama-7B's down_proj); a failed factorisation retries with 10x lambda."""
    h = torch.empty_like(gram)
    info = torch.empty((), dtype=torch.int32, device=gram.device)
    # H is symmetric, so h.mT holds the same matrix in column-major order, which LAPACK factors in place (a
    # row-major h would be copied first: another d x d buffer).
    column_major = h.mT
    for _ in range(retries + 1):
        h.copy_(gram).diagonal().add_(lam)
        torch.linalg.cholesky_ex(column_major, upper=True, out=(column_major, info))
        if int(info) == 0:
            torch.cholesky_inverse(column_major, upper=True, out=column_major)
            return h, lam
        lam *= 10
    raise ValueError(f"OBS: C + lambda I is not positive definite even at lambda {lam / 10:.3g}")


def remove_units(
    weight: torch.Tensor,
    hinv: torch.Tensor,
    unit: int,
    n_remove: int,
    groups: torch.Tensor | None = None,
    per_group: int = 0,
    step_fraction: float = 0.0,
) -> torch.Tensor:
    """Remove `n_remove` units of `unit` consecutive columns from W (d_out x d_in) greedily, updating W and H^-1
    in place; return the removed unit indices in order. With `groups` (the group of every unit), exactly
    `per_group` units go from every group (grouped-query attention: the same number of query heads from every
    key/value group), one at a time."""
    n_units = weight.shape[1] // unit
    alive = torch.ones(n_units, dtype=torch.bool)
    taken = torch.zeros(int(groups.max()) + 1 if groups is not None else 1, dtype=torch.long)
    removed: list[int] = []
    while len(removed) < n_remove:
        cost = unit_costs(weight, hinv, unit, alive)
        eligible = alive.clone()
        if groups is not None:
            eligible &= taken[groups] < per_group
        cost[~eligible] = math.inf
        left = n_remove - len(removed)
        block = 1 if groups is not None else max(1, min(left, math.ceil(step_fraction * left)))
        chosen = torch.sort(torch.argsort(cost, stable=True)[:block]).values
        _obs_update(weight, hinv, _columns(chosen, unit).to(weight.device))
        alive[chosen] = False
        if groups is not None:
            taken[groups[chosen]] += 1
        removed += chosen.tolist()
    return torch.tensor(removed, dtype=torch.long)


def unit_costs(weight: torch.Tensor, hinv: torch.Tensor, unit: int, alive: torch.Tensor) -> torch.Tensor:
    """tr(W_U [H^-1]_UU^-1 W_U^T) for every unit (inf for units already removed), in fp64."""
    cost = torch.full((alive.numel(),), math.inf, dtype=torch.float64)
    index = alive.nonzero().squeeze(1)
    if unit == 1:
        # Over every column (removed ones are zero): no gathered d_out x |alive| copy (180 MB at Llama-7B).
        # (fp32 round-off can leave a tiny or negative diagonal: clamped, such a column is simply dear to remove)
        diagonal = hinv.diagonal().double().clamp_min(torch.finfo(torch.float64).tiny)
        norms = torch.linalg.vector_norm(weight, dim=0).double().square() / diagonal
        cost[index] = norms.cpu()[index]
        return cost
    for u in index.tolist():  # heads: few, each a head_dim x head_dim block
        cols = slice(u * unit, (u + 1) * unit)
        w = weight[:, cols].double()
        cost[u] = float((torch.linalg.solve(hinv[cols, cols].double(), w.T) * w.T).sum())
    return cost


def _obs_update(weight: torch.Tensor, hinv: torch.Tensor, columns: torch.Tensor) -> None:
    """Remove `columns` jointly: W -= W_U S^-1 [H^-1]_U,: and H^-1 -= [H^-1]_:,U S^-1 [H^-1]_U,: with S = [H^-1]_UU;
    both become exactly zero in those columns."""
    rows = hinv.index_select(0, columns)  # [H^-1]_U,:  (|U| x d_in)
    s = rows[:, columns].double()
    factor, info = torch.linalg.cholesky_ex(s)
    # fp32 round-off can leave a nearly singular block slightly indefinite: then the pseudo-inverse
    s_inv = torch.cholesky_inverse(factor) if int(info) == 0 else torch.linalg.pinv(s, hermitian=True)
    weight.addmm_((weight[:, columns].double() @ s_inv).to(weight.dtype), rows, alpha=-1)
    hinv.addmm_((rows.T.double() @ s_inv).to(hinv.dtype), rows, alpha=-1)
    weight[:, columns] = 0
    hinv[columns, :] = 0
    hinv[:, columns] = 0


def _columns(units: torch.Tensor, unit: int) -> torch.Tensor:
    return (units[:, None] * unit + torch.arange(unit)).reshape(-1)


def prune(
    weight: torch.Tensor,
    gram: torch.Tensor,
    unit: int,
    n_remove: int,
    options: ObsOptions,
    groups: torch.Tensor | None = None,
    per_group: int = 0,
) -> ObsResult:
    """Greedy OBS on copies of W and (C + lambda I)^-1: which units go, and W repaired on the columns left."""
    hinv, lam = inverse_hessian(gram, damping(gram, options))
    w = weight.clone()
    removed = remove_units(w, hinv, unit, n_remove, groups, per_group, options.step_fraction)
    del hinv
    keep = torch.ones(weight.shape[1] // unit, dtype=torch.bool)
    keep[removed] = False
    kept = keep.nonzero().squeeze(1)
    kept_columns = _columns(kept, unit)
    repaired = w[:, kept_columns.to(w.device)] if options.keep_repaired else None
    return ObsResult(removed, kept, kept_columns, repaired, lam)
