"""--compensate auto: least squares where tokens per dimension are plenty, the rotation where they are few."""

import pytest
import torch

from rcpu_lite.methods import auto, compensation
from rcpu_lite.methods.compensation import CompensationOptions, compensate
from rcpu_lite.methods.stats import FoldedStats, InputStats
from rcpu_lite.prune.step import HeldOut


def _problem(n_calib: int, seed: int = 0, d_out: int = 24, d_in: int = 48, noise: float = 0.6):
    """Inputs x with a low-dimensional signal plus wide noise; the held-out tokens come from the same law."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mix = torch.randn(6, d_in, generator=g, dtype=torch.float64)

    def draw(n):
        return torch.randn(n, 6, generator=g, dtype=torch.float64) @ mix + noise * torch.randn(
            n, d_in, generator=g, dtype=torch.float64
        )

    x, x_held = draw(n_calib), draw(2000)
    stats = InputStats(d_in, dtype=torch.float64)
    stats.update(x)
    held = HeldOut(w, [x_held], [x_held])
    return w, stats, held, torch.arange(0, d_in, 2)  # half the columns go


def _choose(n_calib, seed=0):
    w, stats, held, kept = _problem(n_calib, seed)
    return auto.choose(w, stats, kept, held, CompensationOptions(), False, refit=lambda s: None)


def test_auto_picks_least_squares_with_many_tokens_per_dimension():
    choice = _choose(n_calib=20_000)
    assert choice.label.startswith("lstsq"), choice.held_out_errors
    assert choice.held_out_error < choice.held_out_errors["rotation"]


def _rotation_problem(n_calib: int, seed: int = 1, d_out: int = 8, kept: int = 32):
    """The removed columns' contribution is, up to noise, a rotation of the kept ones': Y = Q W_K x_K.
    A rotation has d_out(d_out-1)/2 parameters and least squares d_out * |K|: with fewer tokens than
    kept columns, least squares cannot pin down W' while the rotation can."""
    g = torch.Generator().manual_seed(seed)
    w_k, w_r = (torch.randn(d_out, kept, generator=g, dtype=torch.float64) for _ in range(2))
    q, _ = torch.linalg.qr(torch.randn(d_out, d_out, generator=g, dtype=torch.float64))
    a = torch.linalg.pinv(w_r) @ (q - torch.eye(d_out, dtype=torch.float64)) @ w_k  # W_R A = (Q - I) W_K

    def draw(n):
        x_k = torch.randn(n, kept, generator=g, dtype=torch.float64)
        return torch.cat([x_k, x_k @ a.T + 0.05 * torch.randn(n, kept, generator=g, dtype=torch.float64)], 1)

    w = torch.cat([w_k, w_r], 1)
    x, x_held = draw(n_calib), draw(2000)
    stats = InputStats(2 * kept, dtype=torch.float64)
    stats.update(x)
    return w, stats, HeldOut(w, [x_held], [x_held]), torch.arange(kept)


def test_auto_picks_the_rotation_with_few_tokens_per_dimension():
    w, stats, held, kept = _rotation_problem(n_calib=16)
    choice = auto.choose(w, stats, kept, held, CompensationOptions(), False, refit=lambda s: None)
    assert choice.label.startswith(("rotation", "lstsq-rotation")), choice.held_out_errors
    plain_lstsq = [e for label, e in choice.held_out_errors.items() if label.startswith("lstsq(")]
    assert choice.held_out_errors[choice.label] < min(plain_lstsq)


def test_auto_refits_the_winner_after_adding_the_held_out_tokens():
    w, stats, held, kept = _problem(2000, seed=2)
    seen = []

    def refit(s):
        seen.append(s.count)
        s.update(held.x_hat[0])

    choice = auto.choose(w, stats, kept, held, CompensationOptions(), True, refit)
    assert seen == [2000] and stats.gram is None  # refit once, then the Gram is released
    assert choice.label.endswith("+bias") and choice.result.bias is not None
    assert set(choice.held_out_errors) == set(auto.candidates(True))


def test_auto_reports_the_winner_on_held_out_tokens_its_choice_never_saw():
    """The choice is made on the first half of the held-out tokens; the error reported is the second half's."""
    w, stats, held, kept = _problem(300, seed=3)
    choice = auto.choose(w, stats, kept, held, CompensationOptions(), False, refit=lambda s: None)
    first, second = held.halves()
    assert first.x_hat[0].shape[0] == second.x_hat[0].shape[0] == 1000
    method, damp = auto.candidates(False)[choice.label]
    from dataclasses import replace

    from rcpu_lite.methods.compensation import compensate

    opts = CompensationOptions() if damp is None else replace(CompensationOptions(), damp=damp)
    fit = compensate(w, _problem(300, seed=3)[1], kept, method, opts)  # the same calibration statistics, unreleased
    assert choice.held_out_errors[choice.label] == first.error(kept, fit.weight)
    assert choice.held_out_error == second.error(kept, fit.weight)
    assert choice.held_out_errors[choice.label] == min(choice.held_out_errors.values())


def _ridge_problem(n: int, seed: int = 0, d_out: int = 16, kept: int = 24, removed: int = 24):
    """The removed inputs are a linear map of the kept ones plus noise: least squares learns the map from n tokens,
    so few tokens want heavy damping and many want little. Returns W, folded statistics, 100k test tokens, K."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, kept + removed, generator=g, dtype=torch.float64)
    a = torch.randn(removed, kept, generator=g, dtype=torch.float64) / kept**0.5

    def draw(m):
        x_k = torch.randn(m, kept, generator=g, dtype=torch.float64)
        return torch.cat([x_k, x_k @ a.T + torch.randn(m, removed, generator=g, dtype=torch.float64)], 1)

    stats = FoldedStats(kept + removed, dtype=torch.float64, folds=4)
    for chunk in draw(n).split(n // 8):  # eight micro-batches, two per fold
        stats.update(chunk)
    return w, stats, draw(100_000), torch.arange(kept)


@pytest.mark.parametrize("n, planted", [(40, 1.0), (200, 0.1), (2000, 0.01)])
def test_cross_validation_picks_the_damping_that_is_best_on_new_tokens(n, planted):
    w, stats, x_test, kept = _ridge_problem(n)
    test_error = {}
    for damp in auto.CV_GRID:
        fit = compensate(w, stats, kept, "lstsq", CompensationOptions(damp=damp))
        diff = w.clone()
        diff[:, kept] -= fit.weight
        test_error[damp] = float((x_test @ diff.T).square().sum() / (x_test @ w.T).square().sum())
    assert min(test_error, key=test_error.get) == planted  # the planted answer, measured on 100k new tokens
    cv = auto.cross_validated_damp(w, stats, kept, CompensationOptions())
    assert min(cv, key=cv.get) == planted


def test_folded_statistics_sum_to_the_whole_and_lstsq_cv_refits_on_everything():
    w, stats, _, kept = _ridge_problem(200)
    torch.testing.assert_close(sum(stats.fold_grams), stats.gram)
    held = HeldOut(w)
    repaired = compensation.CHOOSERS["lstsq-cv"].fn(w, stats, kept, CompensationOptions(), False, held)
    assert repaired.label == "lstsq(damp=0.1)" and repaired.result.damp_used is not None
    assert stats.gram is None and stats.fold_grams == []  # released once used


def test_lstsq_cv_needs_two_folds_with_windows():
    w, stats, _, kept = _ridge_problem(200)
    stats.fold_grams = [stats.gram.clone(), torch.zeros_like(stats.gram)]
    with pytest.raises(ValueError, match="only 1 of the 2 folds"):
        auto.cross_validated_damp(w, stats, kept, CompensationOptions())
