"""Compensation of a pruned linear layer y = W x from the Gram matrix of its inputs.

Y = W X is the dense output and Z = W_K X_K the pruned one on the same inputs X; with the Gram
C = X X^T every quantity below needs only W, C and the kept columns K. Products run in the dtype
they are given (fp32 in the pipeline); the decomposition of the d_out x d_out matrix M runs in
fp64 on the device CompensationOptions.decomposition_device names (the CPU by default: consumer GPUs
run fp64 at 1/32 to 1/64 of their fp32 rate, and M is small next to the products), and Q comes back
to M's device and dtype.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from rcpu_lite.methods import metrics
from rcpu_lite.methods.registry import Entry, registrar

if TYPE_CHECKING:
    from rcpu_lite.methods.stats import InputStats

_GATHER_ROWS = 1024  # rows of C gathered at a time: bounds the temporary to 1024 x d_in


def cross_product(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """M = Y Z^T = W C[:, K] W_K^T  (d_out x d_out)."""
    return weight @ _gram_times_kept(weight, gram, kept)


def procrustes(m: torch.Tensor, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal Q maximising tr(Q^T M) (reflections allowed), and M's singular values, by SVD.

    The reference: one fp64 SVD on `device`, M = U S V^T, Q = U V^T, returned on M's device and dtype.
    """
    u, s, vh = torch.linalg.svd(m.detach().to(device, torch.float64))
    return (u @ vh).to(m.device, m.dtype), s.to(m.device, m.dtype)


def polar_eigh(m: torch.Tensor, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """The same Q as procrustes() from one symmetric eigendecomposition of M^T M (about 2x cheaper).

    M^T M = V L V^T gives M = U S V^T with S = sqrt(L) and U = M V / S, so Q = U V^T. Squaring
    squares the condition number: directions with s_i < eps^(1/4) s_max (fp64: 1.2e-4 s_max) come
    out with U slightly non-orthogonal, so those columns are re-orthonormalised against the
    accurate ones (Gram-Schmidt by QR; they carry under 1.2e-4 of tr(Q^T M) each). Directions with
    s_i <= d eps s_max are M's numerical null space, where every completion is optimal: the SVD's
    is arbitrary, this one is the orthonormal frame closest to V there (the closest to the
    identity), so it is deterministic. If that completion is ill-posed the SVD is used. Everything
    runs in fp64 on `device`; Q and S come back on M's device and dtype.
    """
    m64 = m.detach().to(device, torch.float64)
    d = m64.shape[0]
    eps = torch.finfo(torch.float64).eps
    eigenvalues, v = torch.linalg.eigh(m64.T @ m64)  # (M^T M is freed at once: d^2 fp64 bytes each)
    eigenvalues = eigenvalues.flip(0).clamp_min(0)  # descending
    v = v.flip(1)
    nonzero = int((eigenvalues > eigenvalues[0] * d * eps).sum())
    accurate = int((eigenvalues > eigenvalues[0] * eps**0.5).sum())
    singular = eigenvalues.sqrt()
    singular[nonzero:] = 0
    v_r, v_0 = v[:, :nonzero], v[:, nonzero:]
    u_r = (m64 @ v_r) / singular[:nonzero]
    del m64
    if accurate < nonzero:
        u_r[:, accurate:] = _orthonormalised(u_r[:, accurate:], against=u_r[:, :accurate])
    q = u_r @ v_r.T
    if nonzero < d:
        # The cheaper of two equivalent constructions: in the (d - r)-dim null space, or in span[V_r, U_r].
        completion = (_completion_in_null_space if d - nonzero <= 2 * nonzero else _completion_in_span)(u_r, v_r, v_0)
        if completion is None:  # part of V_0 lies inside span(U_r): no unique closest frame
            return procrustes(m, device)
        q += completion
    return q.to(m.device, m.dtype), singular.to(m.device, m.dtype)


def _completion_in_null_space(u_r: torch.Tensor, v_r: torch.Tensor, v_0: torch.Tensor) -> torch.Tensor | None:
    """U_0 V_0^T with U_0 the orthonormal frame in the complement of span(U_r) closest to V_0: the
    polar factor of B = V_0 - U_r U_r^T V_0, from the eigendecomposition of B^T B ((d - r) x (d - r))."""
    b = v_0 - u_r @ (u_r.T @ v_0)
    b_eig, b_vec = torch.linalg.eigh(b.T @ b)
    if b_eig[0] < 1e-12:  # a cosine below 1e-6: the frame is not determined
        return None
    return (b @ (b_vec / b_eig.sqrt()) @ b_vec.T) @ v_0.T


def _completion_in_span(u_r: torch.Tensor, v_r: torch.Tensor, v_0: torch.Tensor) -> torch.Tensor | None:
    """The same completion for a small rank r: (I - U_r U_r^T)(I - V_r V_r^T) is the identity outside
    E = span[V_r, U_r], so its polar factor is too, and inside E it is a problem of size <= 2r."""
    d, r = v_r.shape
    e, _ = torch.linalg.qr(torch.cat([v_r, u_r], 1))  # orthonormal, contains both spans
    a = torch.linalg.qr(e.T @ v_r, mode="complete")[0][:, r:]  # E minus span(V_r), in E's coordinates
    b = torch.linalg.qr(e.T @ u_r, mode="complete")[0][:, r:]  # E minus span(U_r)
    u, s, vh = torch.linalg.svd(b.T @ a)
    if s.numel() and s[-1] < 1e-6:
        return None
    completion = (e @ b @ (u @ vh)) @ (e @ a).T
    completion.addmm_(e, e.T, alpha=-1)  # in place: these are d x d fp64 (134 MB each at d = 4096)
    completion.diagonal().add_(1)
    return completion


def _orthonormalised(columns: torch.Tensor, against: torch.Tensor) -> torch.Tensor:
    """Gram-Schmidt of `columns` (in order) against the orthonormal `against` and among themselves."""
    for _ in range(2):  # twice is enough (Kahan)
        columns = columns - against @ (against.T @ columns)
    q, r = torch.linalg.qr(columns)
    one = torch.ones((), dtype=r.dtype, device=r.device)
    return q * r.diagonal().sign().where(r.diagonal() != 0, one)  # keep each direction


# --decomposition: how the polar factor Q of M is found, (M, device) -> (Q, singular values).
DECOMPOSE: dict[str, Callable[..., tuple[torch.Tensor, torch.Tensor]]] = {"eigh": polar_eigh, "svd": procrustes}
DECOMPOSITIONS = tuple(DECOMPOSE)


@dataclass
class Products:
    """What compensation needs from the Gram matrix; the Gram itself can be freed once these exist."""

    m: torch.Tensor | None  # M = W C[:, K] W_K^T, d_out x d_out (None when no rotation is asked for)
    w_kept: torch.Tensor  # W_K
    y_energy: float  # ||Y||^2
    z_energy: float  # ||Z||^2 = tr(W_K C_KK W_K^T)
    removed_energy: float  # ||Y - Z||^2 = tr(W_R C_RR W_R^T)


@dataclass
class Compensation:
    """The compact d_out x |K| weight (and the bias it needs, if any), its relative errors
    ||Y - Z'|| / ||Y|| before and after compensation on the calibration inputs, the seconds spent
    in the decomposition, and the ridge damping actually used (least squares only)."""

    weight: torch.Tensor
    error_pruned: float
    error_compensated: float
    decomposition_seconds: float = 0.0
    bias: torch.Tensor | None = None
    damp_used: float | None = None
    y_energy: float = 0.0  # ||Y||^2, so that a bias step can update the error


@dataclass(frozen=True)
class CompensationOptions:
    """Knobs of the compensation methods (each method reads the ones it needs)."""

    decomposition: str = "eigh"  # rotation: how the polar factor is found
    decomposition_device: str = "cpu"  # rotation: where the fp64 decomposition runs ("cpu", "cuda", "cuda:1", ...)
    damp: float = 0.1  # least squares: lambda = damp * mean(diag C_KK), as GPTQ damps
    damp_abs: float = 0.0  # least squares: an absolute lambda on the summed Gram instead (0: use damp)
    max_damp_retries: int = 6  # least squares: each failed Cholesky retries with 10x the damping


# A method: (W, statistics, kept columns, options, release) -> Compensation. The statistics give the
# Gram (and, for dense targets, W times the cross-Gram, the target's energy and mean; see stats.py). With
# `release` the method drops them as soon as it no longer needs them (the largest temporaries).
CompensationFn = Callable[[torch.Tensor, "InputStats", torch.Tensor, CompensationOptions, bool], Compensation]


COMPENSATIONS: dict[str, Entry[CompensationFn]] = {}
BIAS_SUFFIX = "+bias"
register = registrar(COMPENSATIONS)


def _from_products(method: str):
    def fn(weight, stats, kept, options, release):
        p = products(weight, stats, kept, with_m=method != "none")
        if release:
            stats.release()  # freed before the decomposition
        return compensate_products(p, method, options.decomposition, options.decomposition_device)

    return fn


register("none", "no repair: W_K as it is")(_from_products("none"))
register("rotation", "W_K <- Q W_K, Q the orthogonal polar factor of M = W C[:,K] W_K^T (RCPU)")(
    _from_products("rotation")
)
register("rotation-scale", "rotation, then x tr(S)/||Z||^2 (RCPU)")(_from_products("rotation-scale"))


@register("lstsq", "ridge least squares W_K <- (W C[:,K] + l W_K)(C_KK + l I)^-1, l from --damp or --damp-abs")
def least_squares(
    weight: torch.Tensor,
    stats,
    kept: torch.Tensor,
    options: CompensationOptions,
    release: bool = False,
    rotation: torch.Tensor | None = None,
) -> Compensation:
    """Ridge least squares by a Cholesky factorisation of C_KK + lambda I (never an explicit inverse).

    The ridge pulls W' toward the prior Q W_K (Q = `rotation`, d_out x d_out; default the identity):
    min ||Y - W' X_K||^2 + lambda ||W' - prior||^2, so W' (C_KK + lambda I) = W C[:, K] + lambda prior. The prior is
    formed once the Gram is released, so that the two are never held together.

    If the factorisation fails, lambda grows tenfold (up to max_damp_retries times); the lambda used
    is reported. Errors: ||Y - W' X_K||^2 = ||Y||^2 - 2 <W', H> + tr(W' C_KK W'^T) with H = W C[:, K].
    With dense targets H = W C_cross[:, K] (C_cross = sum x x_hat^T, accumulated as W C_cross) and C_KK
    is the pruned stream's.
    """
    gram, output_cross = stats.gram, stats.output_cross
    removed = _complement(kept, weight.shape[1])
    if not stats.paired:
        h = _weight_times_gram_columns(weight, gram, kept)  # W C[:, K]
        removed_energy = _quadratic(weight[:, removed], gram, removed)
    else:
        h, removed_energy = output_cross.index_select(1, kept), 0.0
    a = _principal_submatrix(gram, kept)
    del gram, output_cross
    if release:
        stats.release()
    w_kept = weight[:, kept]
    z_energy = _sum64((w_kept @ a) * w_kept)
    if not stats.paired:  # local targets: ||Y||^2 from the Gram
        y_energy = 2 * _sum64(h * w_kept) - z_energy + removed_energy
    else:  # dense targets: ||Y||^2 was accumulated; ||Y - W_K X_K||^2 = ||Y||^2 - 2 <W_K, H> + ||Z||^2
        y_energy = stats.target_energy
        removed_energy = y_energy - 2 * _sum64(h * w_kept) + z_energy
    lam = options.damp_abs if options.damp_abs > 0 else options.damp * float(a.diagonal().mean())
    lam = max(lam, torch.finfo(a.dtype).tiny)
    prior = rotation @ w_kept if rotation is not None else None
    toward = w_kept if prior is None else prior  # what the ridge pulls toward
    del w_kept, rotation
    # In place from here (Llama-7B's down_proj: each d_out x |K| copy is 150 MB, C_KK 370 MB): a holds
    # C_KK + added * I, and h becomes the right-hand side W C[:,K] + added * W_K, then the solution.
    rhs, added = h, 0.0
    del h
    for _ in range(options.max_damp_retries + 1):
        a.diagonal().add_(lam - added)
        rhs.add_(toward if toward is not None else weight[:, kept], alpha=lam - added)
        added = lam
        if prior is None:
            toward = None  # a retry (rare) gathers W_K again
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info) == 0:
            break
        factor = None  # freed before the next try
        lam *= 10
    else:
        raise ValueError(
            f"least squares: C_KK + lambda I is not positive definite even at lambda {added:.3g}; the "
            f"calibration statistics are degenerate (use more calibration windows or --compensate rotation)"
        )
    del a  # from here on A = C_KK + l I = L L^T is used only through its factor
    # W' A = R with A = L L^T: solve Y L^T = R, then W' L = Y, both in place (cholesky_solve would copy L).
    new = torch.linalg.solve_triangular(factor.mT, rhs, upper=True, left=False, out=rhs)
    new = torch.linalg.solve_triangular(factor, new, upper=False, left=False, out=new)
    # ||Y - W' X_K||^2 = ||Y||^2 - 2 <W', H> + tr(W' C_KK W'^T), where H = R - l W_K, W' A = R:
    # <W', R> = tr(W' A W'^T) = ||W' L||^2, so the error is ||Y||^2 - ||W' L||^2 + 2 l <W', W_K> - l ||W'||^2.
    quadratic = _sum64((new @ factor).square())
    del factor
    inner_prior = _sum64(new * prior) if prior is not None else _inner_kept(new, weight, kept)  # <W', prior>
    error = y_energy - quadratic + 2 * lam * inner_prior - lam * _sum64(new.square())
    return Compensation(
        new, _ratio(removed_energy, y_energy), _ratio(error, y_energy), damp_used=lam, y_energy=y_energy
    )


@register(
    "lstsq-rotation",
    "ridge least squares pulled toward the rotation: W_K <- (W C[:,K] + l Q W_K)(C_KK + l I)^-1 with Q the rotation's; "
    "l from --damp or --damp-abs moves it from least squares (small) to the rotation (large)",
)
def least_squares_toward_rotation(
    weight: torch.Tensor, stats, kept: torch.Tensor, options: CompensationOptions, release: bool = False
) -> Compensation:
    # Only M is needed here (least_squares computes the energies itself): no W_K copy, no tr(W_R C_RR W_R^T).
    m = (
        _columns_times_kept(stats.output_cross, weight, kept)
        if stats.paired
        else cross_product(weight, stats.gram, kept)
    )
    started = time.perf_counter()
    q, _ = DECOMPOSE[options.decomposition](m, options.decomposition_device)
    seconds = time.perf_counter() - started
    del m
    result = least_squares(weight, stats, kept, options, release, rotation=q)
    result.decomposition_seconds = seconds
    return result


def add_bias(result: Compensation, weight: torch.Tensor, stats, kept: torch.Tensor) -> Compensation:
    """FLAP's bias: b = mean(Y - W' X_K) = W mu - W' mu_K, which for W' = W_K is W[:, not K] mu_not K
    (dense targets: mu is the dense stream's input mean, mu_K the pruned stream's).

    The residual then loses its mean: ||R - b 1^T||^2 = ||R||^2 - N ||b||^2.
    """
    bias = weight @ stats.target_mean.to(weight.dtype) - result.weight @ stats.mean.to(weight.dtype)[kept]
    energy = (result.error_compensated**2) * result.y_energy - stats.count * _sum64(bias.square())
    result.bias = bias
    result.error_compensated = _ratio(energy, result.y_energy)
    return result


@dataclass
class Repaired:
    """What the pipeline writes for one projection: the method's label (a chooser names what it chose), the
    compensation, and its error on the held-out windows (None without held-out windows)."""

    label: str
    result: Compensation
    held_out_error: float | None


# A chooser: (W, statistics, kept columns, options, with_bias, held-out inputs) -> Repaired. It picks among the
# closed-form methods by held-out error (auto.py); registered by name like the methods themselves.
ChooserFn = Callable[..., Repaired]
CHOOSERS: dict[str, Entry[ChooserFn]] = {}
register_chooser = registrar(CHOOSERS)


def chooser_names() -> list[str]:
    """The --compensate values that choose a method per projection (each, and each + bias)."""
    return [n for c in CHOOSERS for n in (c, c + BIAS_SUFFIX)]


def repair(
    weight: torch.Tensor, stats, kept: torch.Tensor, method: str, options: CompensationOptions, held_out
) -> Repaired:
    """Compensate one projection with `method` (a method, a method + bias, or a chooser such as auto), freeing
    the statistics as soon as they are used; `held_out` (step.HeldOut) measures the held-out error."""
    base = method[: -len(BIAS_SUFFIX)] if method.endswith(BIAS_SUFFIX) else method
    if base in CHOOSERS:
        return CHOOSERS[base].fn(weight, stats, kept, options, method.endswith(BIAS_SUFFIX), held_out)
    result = compensate(weight, stats, kept, method, options, release=True)
    return Repaired(method, result, held_out.error(kept, result.weight, result.bias) if held_out.x else None)


def parse_method(method: str) -> tuple[str, bool]:
    """'rotation+bias' -> ('rotation', True); 'bias' -> ('none', True); unknown names raise ValueError."""
    base, with_bias = method, False
    if method == "bias":
        base, with_bias = "none", True
    elif method.endswith(BIAS_SUFFIX):
        base, with_bias = method[: -len(BIAS_SUFFIX)], True
    if base not in COMPENSATIONS or method == "none" + BIAS_SUFFIX:
        raise ValueError(f"unknown compensation {method!r}; choose one of {', '.join(method_names())}")
    return base, with_bias


def has_bias(method: str) -> bool:
    """Whether a --compensate value writes a compensating bias ('bias', or any method + bias)."""
    return method == "bias" or method.endswith(BIAS_SUFFIX)


def method_names() -> list[str]:
    """Every accepted --compensate value: each registered method, 'bias', and each method + bias."""
    return [*COMPENSATIONS, "bias", *(m + BIAS_SUFFIX for m in COMPENSATIONS if m != "none")]


def compensate(
    weight: torch.Tensor,
    stats,
    kept: torch.Tensor,
    method: str,
    options: CompensationOptions | None = None,
    release: bool = False,
) -> Compensation:
    """Prune W to the columns K and repair it with `method` (a registered name, optionally + bias)."""
    base, with_bias = parse_method(method)
    options = options or CompensationOptions()
    if options.decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {options.decomposition!r}; choose one of {', '.join(DECOMPOSITIONS)}")
    # Nothing removed, nothing to repair (with dense targets too, so that ratio 0 writes the input as is).
    if kept.numel() == weight.shape[1]:
        if release:
            stats.release()
        return Compensation(weight[:, kept].clone(), 0.0, 0.0)
    result = COMPENSATIONS[base].fn(weight, stats, kept, options, release)
    return add_bias(result, weight, stats, kept) if with_bias else result


def products(weight: torch.Tensor, stats, kept: torch.Tensor, with_m: bool = True) -> Products:
    """M and the energies from one product G = C[:, K] W_K^T (d_in x d_out):

      M = W G,  ||Z||^2 = <W_K, G_K^T>,  ||Y - Z||^2 = tr(W_R C_RR W_R^T)  (R: removed columns),
      ||Y||^2 = ||Z||^2 + 2 <W_R, G_R^T> + ||Y - Z||^2.

    This costs d_out*d_in*(|K| + d_out) multiply-adds instead of the 3*d_out*d_in^2 of evaluating
    the quadratic forms of relative_error() directly (Llama-7B down_proj: 1.2 instead of 6 TFLOP).
    Dense targets (stats.output_cross = W C_cross set, C_cross = sum x x_hat^T): M = (W C_cross)[:, K] W_K^T,
    ||Z||^2 = tr(W_K C_KK W_K^T) from the pruned stream's Gram, ||Y||^2 accumulated, and
    ||Y - Z||^2 = ||Y||^2 - 2 tr(M) + ||Z||^2.
    """
    gram, output_cross = stats.gram, stats.output_cross
    if not stats.paired:
        removed = _complement(kept, weight.shape[1])
        g = _gram_times_kept(weight, gram, kept)
        z_energy = _inner(weight, g, kept)
        removed_energy = _quadratic(weight[:, removed], gram, removed)
        y_energy = z_energy + 2 * _inner(weight, g, removed) + removed_energy
        m = weight @ g if with_m else None  # only a rotation needs M (d_out^2 * d_in multiply-adds)
        del g  # before W_K is gathered: the two never meet (Llama-3-8B's down_proj: 235 and 188 MB)
    else:
        m = _columns_times_kept(output_cross, weight, kept)  # (W C_cross)[:, K] W_K^T
        z_energy = _quadratic(weight[:, kept], gram, kept)
        y_energy = stats.target_energy
        removed_energy = y_energy - 2 * float(m.diagonal().sum(dtype=torch.float64)) + z_energy
        m = m if with_m else None
    return Products(m, weight[:, kept], y_energy, z_energy, removed_energy)


def compensate_products(
    p: Products, method: str, decomposition: str = "eigh", device: str | torch.device = "cpu"
) -> Compensation:
    """The repaired W_K, and its errors from ||Y - s Q Z||^2 = ||Y||^2 - 2 s tr(Q^T M) + s^2 ||Z||^2."""
    if method not in ("none", "rotation", "rotation-scale"):
        raise ValueError(f"compensate_products handles none, rotation and rotation-scale, not {method!r}")
    if decomposition not in DECOMPOSITIONS:
        raise ValueError(f"unknown decomposition {decomposition!r}; choose one of {', '.join(DECOMPOSITIONS)}")
    error_pruned = _ratio(p.removed_energy, p.y_energy)
    if method == "none":
        return Compensation(p.w_kept, error_pruned, error_pruned, y_energy=p.y_energy)
    started = time.perf_counter()
    q, _ = DECOMPOSE[decomposition](p.m, device)
    seconds = time.perf_counter() - started
    aligned = _sum64(q * p.m)  # tr(Q^T M), the sum of M's singular values at the optimum
    scale = aligned / p.z_energy if method == "rotation-scale" else 1.0
    new = q @ p.w_kept
    if method == "rotation-scale":
        new *= scale
    error = _ratio(p.y_energy - 2 * scale * aligned + scale * scale * p.z_energy, p.y_energy)
    return Compensation(new, error_pruned, error, seconds, y_energy=p.y_energy)


def relative_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, new_weight: torch.Tensor) -> float:
    """||Y - Z'||_F / ||Y||_F with Z' = new_weight X_K, from the Gram, in the inputs' dtype.

    The reference for compensate()'s errors: Y - Z' = D X with D = W less new_weight in the kept
    columns, so ||Y - Z'||^2 = tr(D C D^T), one quadratic form without cancellation, but it costs
    d_out * d_in^2. A bias, unchanged by pruning, cancels in Y - Z'.
    """
    diff = weight.clone()
    diff[:, kept] -= new_weight
    return float((_energy(diff, gram) / _energy(weight, gram)).clamp_min(0).sqrt())


def _energy(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(A C A^T) = ||A X||_F^2."""
    return ((a @ gram) * a).sum()


def _gram_times_kept(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """G = C[:, K] W_K^T, gathering C's kept rows a block at a time (C is symmetric, rows are contiguous)."""
    g = torch.zeros(gram.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, kept.numel(), _GATHER_ROWS):
        block = kept[start : start + _GATHER_ROWS]
        g.addmm_(gram.index_select(0, block).T, weight[:, block].T)
    return g


def _columns_times_kept(a: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """A[:, K] W_K^T (d_out x d_out), a block of columns at a time (no d_out x |K| copy)."""
    out = torch.zeros(a.shape[0], weight.shape[0], dtype=weight.dtype, device=weight.device)
    for start in range(0, kept.numel(), _GATHER_ROWS):
        block = kept[start : start + _GATHER_ROWS]
        out.addmm_(a.index_select(1, block), weight[:, block].T)
    return out


def _weight_times_gram_columns(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """H = W C[:, K] (d_out x |K|), gathering C's kept rows a block at a time (C is symmetric)."""
    h = torch.empty(weight.shape[0], kept.numel(), dtype=weight.dtype, device=weight.device)
    for start in range(0, kept.numel(), _GATHER_ROWS):
        block = kept[start : start + _GATHER_ROWS]
        h[:, start : start + block.numel()] = weight @ gram.index_select(0, block).T
    return h


def _quadratic(w_part: torch.Tensor, gram: torch.Tensor, columns: torch.Tensor) -> float:
    """tr(W_J C_JJ W_J^T) for the columns J (W_J given), C_JJ gathered a block of rows at a time."""
    total = 0.0
    for start in range(0, columns.numel(), _GATHER_ROWS):
        rows = gram.index_select(0, columns[start : start + _GATHER_ROWS]).index_select(1, columns)
        total += _sum64((rows @ w_part.T) * w_part[:, start : start + _GATHER_ROWS].T)
    return total


def _principal_submatrix(gram: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """C_JJ, gathered a block of rows at a time (no |J| x d_in temporary: 388 MB at Llama-7B's down_proj)."""
    out = torch.empty(columns.numel(), columns.numel(), dtype=gram.dtype, device=gram.device)
    for start in range(0, columns.numel(), _GATHER_ROWS):
        out[start : start + _GATHER_ROWS] = gram.index_select(0, columns[start : start + _GATHER_ROWS]).index_select(
            1, columns
        )
    return out


def _inner(weight: torch.Tensor, g: torch.Tensor, columns: torch.Tensor) -> float:
    """<W[:, J], G[J]^T> for the columns J, a block at a time (no full-size gathered copy)."""
    total = 0.0
    for start in range(0, columns.numel(), _GATHER_ROWS):
        block = columns[start : start + _GATHER_ROWS]
        total += _sum64(weight[:, block] * g.index_select(0, block).T)
    return total


def _inner_kept(new_weight: torch.Tensor, weight: torch.Tensor, kept: torch.Tensor) -> float:
    """<W', W_K>, a block of columns at a time (no gathered copy of W_K)."""
    total = 0.0
    for start in range(0, kept.numel(), _GATHER_ROWS):
        block = kept[start : start + _GATHER_ROWS]
        total += _sum64(new_weight[:, start : start + block.numel()] * weight[:, block])
    return total


def _complement(kept: torch.Tensor, n: int) -> torch.Tensor:
    mask = torch.ones(n, dtype=torch.bool, device=kept.device)
    mask[kept] = False
    return mask.nonzero().squeeze(1)


def _sum64(t: torch.Tensor) -> float:
    return float(t.sum(dtype=torch.float64))


_ratio = metrics.relative_error  # ||Y - Z|| / ||Y|| from the squared norms (methods/metrics.py)


from rcpu_lite.methods import auto  # noqa: E402,F401  (registers the auto chooser)
