"""--compensate auto: per projection, the compensation that generalises, chosen by held-out error.

Which closed-form repair generalises depends on how many calibration tokens there are per input
dimension: least squares fits best when tokens are plenty and overfits when they are few; the
rotation is constrained and holds up. Every candidate is fitted on the calibration statistics and
scored on one half of the held-out windows; the winner's error on the other half, which the choice never
saw, is what the report gives as its held-out error. The winner is then refitted on all tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from rcpu_lite.methods import compensation as _compensation
from rcpu_lite.methods.compensation import Compensation, CompensationOptions, Repaired, compensate

DAMP_GRID = (1e-4, 1e-3, 1e-2, 1e-1)  # least squares: lambda = damp * mean(diag C_KK)
PRIOR_GRID = (1e-2, 1e-1, 1.0)  # least squares toward the rotation: larger is closer to the rotation


def candidates(with_bias: bool) -> dict[str, tuple[str, float | None]]:
    """Label -> (method, relative damping or None)."""
    suffix = "+bias" if with_bias else ""
    out = {m + suffix: (m + suffix, None) for m in ("rotation", "rotation-scale")}
    out["none" + suffix if with_bias else "none"] = ("bias" if with_bias else "none", None)
    for damp in DAMP_GRID:
        out[f"lstsq(damp={damp:g}){suffix}"] = ("lstsq" + suffix, damp)
    for damp in PRIOR_GRID:
        out[f"lstsq-rotation(damp={damp:g}){suffix}"] = ("lstsq-rotation" + suffix, damp)
    return out


@dataclass
class Choice:
    label: str  # e.g. "rotation" or "lstsq(damp=0.01)+bias"
    result: Compensation  # the winner refitted on every token
    held_out_error: float  # the winner's error on the held-out half the choice never saw (fitted on calibration)
    held_out_errors: dict[str, float]  # every candidate's on the half the choice was made on


def choose(
    weight: torch.Tensor,
    stats,
    kept: torch.Tensor,
    held_out,
    options: CompensationOptions,
    with_bias: bool,
    refit: Callable[[object], None],
) -> Choice:
    """Fit every candidate on `stats`, choose by its error on one half of the held-out tokens, report the winner's
    error on the other half, and refit it after refit(stats) has added the held-out tokens to the statistics."""
    if not held_out.x:
        raise ValueError(
            "--compensate auto chooses by held-out error: it needs held-out windows (--holdout-nsamples at least 1)"
        )
    choose_on, report_on = held_out.halves()
    errors, unseen, fitted = {}, {}, {}
    for label, (method, damp) in candidates(with_bias).items():
        opts = options if damp is None else replace(options, damp=damp, damp_abs=0.0)
        result = compensate(weight, stats, kept, method, opts)
        errors[label] = choose_on.error(kept, result.weight, result.bias)
        unseen[label] = report_on.error(kept, result.weight, result.bias)
        fitted[label] = (method, opts)
        del result
    best = min(errors, key=errors.get)
    refit(stats)
    method, opts = fitted[best]
    return Choice(best, compensate(weight, stats, kept, method, opts, release=True), unseen[best], errors)


@_compensation.register_chooser(
    "auto",
    "per layer and projection, the lowest error on half the held-out windows among rotation, rotation-scale, none, "
    "lstsq and lstsq-rotation over damping grids, refitted on every token (the report's held-out error is the other "
    "half's)",
)
def choose_and_refit(
    weight: torch.Tensor, stats, kept: torch.Tensor, options: CompensationOptions, with_bias: bool, held_out
) -> Repaired:
    choice = choose(weight, stats, kept, held_out, options, with_bias, refit=held_out.add_to)
    return Repaired(choice.label, choice.result, choice.held_out_error)


CV_GRID = DAMP_GRID + (1.0,)  # lstsq-cv's candidate dampings (relative to mean(diag C_KK))


def cross_validated_damp(weight: torch.Tensor, stats, kept: torch.Tensor, options: CompensationOptions) -> dict:
    """Each candidate damping's k-fold error: for every fold, least squares fitted on the other folds' Gram and
    measured on this fold's, ||(W - W') X_f||^2 summed over folds over sum ||W X_f||^2. Returns {damp: error}."""
    from types import SimpleNamespace

    folds = [f for f in stats.fold_grams if float(f.diagonal().sum()) > 0]
    if len(folds) < 2:
        raise ValueError(
            f"lstsq-cv: only {len(folds)} of the {len(stats.fold_grams)} folds got calibration windows (micro-batches "
            "go to the folds in turn): use fewer --cv-folds, more --nsamples or a smaller --micro-batch"
        )
    err, ref = dict.fromkeys(CV_GRID, 0.0), 0.0
    for fold in folds:  # the training Gram and the fold's reference energy once per fold, not once per damping
        train = SimpleNamespace(gram=stats.gram - fold, output_cross=None, target_energy=None, paired=False)
        ref += float(((weight @ fold) * weight).sum(dtype=torch.float64))
        for damp in CV_GRID:
            fit = compensate(weight, train, kept, "lstsq", replace(options, damp=damp, damp_abs=0.0))
            diff = weight.clone()
            diff[:, kept] -= fit.weight
            err[damp] += float(((diff @ fold) * diff).sum(dtype=torch.float64))
        del train
    errors = {damp: e / ref if ref > 0 else 0.0 for damp, e in err.items()}
    return errors


@_compensation.register_chooser(
    "lstsq-cv",
    "least squares with its damping chosen by k-fold cross-validation over the calibration windows "
    "(--cv-folds; costs that many more Gram matrices), refitted on every calibration token",
)
def least_squares_cross_validated(
    weight: torch.Tensor, stats, kept: torch.Tensor, options: CompensationOptions, with_bias: bool, held_out
) -> Repaired:
    if stats.paired or not getattr(stats, "fold_grams", None):
        raise ValueError("lstsq-cv needs local targets and fold statistics (the pipeline keeps them for it)")
    errors = cross_validated_damp(weight, stats, kept, options)
    best = min(errors, key=errors.get)
    method = "lstsq+bias" if with_bias else "lstsq"
    result = compensate(weight, stats, kept, method, replace(options, damp=best, damp_abs=0.0), release=True)
    label = f"lstsq(damp={best:g})" + ("+bias" if with_bias else "")
    return Repaired(label, result, held_out.error(kept, result.weight, result.bias) if held_out.x else None)


METHODS = tuple(_compensation.chooser_names())  # the --compensate values that choose (auto, lstsq-cv, each +bias)
