"""methods/obs.py and --select obs: greedy structured OBS against direct computation in fp64."""

from __future__ import annotations

import pytest
import torch

from rcpu_lite.families.arch import LayerShape
from rcpu_lite.methods import compensation, obs, selection
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.methods.compensation import CompensationOptions
from rcpu_lite.methods.stats import InputStats

F64 = torch.float64


def _problem(d_out: int, d_in: int, tokens: int = 200, seed: int = 0) -> tuple[torch.Tensor, InputStats]:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d_in, d_in, generator=g, dtype=F64) / d_in**0.5 + torch.eye(d_in, dtype=F64)
    stats = InputStats(d_in, dtype=F64)
    stats.update(torch.randn(tokens, d_in, generator=g, dtype=F64) @ mix)  # correlated inputs
    return torch.randn(d_out, d_in, generator=g, dtype=F64), stats


def _ridge_refit(weight: torch.Tensor, stats: InputStats, kept: torch.Tensor, lam: float) -> torch.Tensor:
    return compensation.least_squares(weight, stats, kept, CompensationOptions(damp_abs=lam)).weight


def _direct_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, new: torch.Tensor, lam: float):
    diff = weight.clone()
    diff[:, kept] -= new
    mask = torch.ones(weight.shape[1], dtype=torch.bool)
    mask[kept] = False
    diff[:, mask] = weight[:, mask]
    h = gram + lam * torch.eye(gram.shape[0], dtype=F64)
    return float(((diff @ h) * diff).sum())


@pytest.mark.parametrize("unit, n_remove, step_fraction", [(1, 9, 0.0), (1, 9, 0.5), (4, 3, 0.0), (4, 3, 1.0)])
def test_the_repaired_weights_are_the_ridge_refit_of_the_removed_set(unit, n_remove, step_fraction):
    weight, stats = _problem(7, 24)
    result = obs.prune(weight, stats.gram, unit, n_remove, obs.ObsOptions(damp=0.01, step_fraction=step_fraction))
    assert result.removed.numel() == n_remove and len(set(result.removed.tolist())) == n_remove
    assert result.kept_columns.numel() == 24 - n_remove * unit
    lam = 0.01 * float(stats.gram.diagonal().mean())
    assert result.damp_used == pytest.approx(lam)
    refit = _ridge_refit(weight, stats, result.kept_columns, lam)
    torch.testing.assert_close(result.weight, refit, rtol=1e-9, atol=1e-9)


def test_one_at_a_time_is_the_greedy_choice_by_direct_computation():
    """Each step removes the unit whose removal (with the optimal refit of the rest) raises the damped error least."""
    weight, stats = _problem(5, 10, seed=3)
    lam = 1e-3
    result = obs.prune(weight, stats.gram, 1, 4, obs.ObsOptions(damp_abs=lam))
    alive = list(range(10))
    for removed in result.removed.tolist():
        errors = {}
        for j in alive:
            kept = torch.tensor([c for c in alive if c != j])
            errors[j] = _direct_error(weight, stats.gram, kept, _ridge_refit(weight, stats, kept, lam), lam)
        assert removed == min(errors, key=errors.get)
        alive.remove(removed)


def test_a_duplicated_column_goes_first_though_its_magnitude_is_the_largest():
    """OBS sees that a column copied from another costs nothing once the copy takes its weight; a score that
    looks at one column at a time (here RCPU's) keeps it."""
    weight, stats = _problem(6, 12, seed=1)
    x = torch.randn(300, 12, dtype=F64, generator=torch.Generator().manual_seed(5))
    x[:, 11] = x[:, 3]
    weight[:, 11] *= 5
    stats = InputStats(12, dtype=F64)
    stats.update(x)
    result = obs.prune(weight, stats.gram, 1, 1, obs.ObsOptions(damp_abs=1e-8))
    assert result.removed.tolist() in ([3], [11])
    from rcpu_lite.methods import scoring

    assert int(scoring.column_scores("rcpu", weight, stats).argmin()) not in (3, 11)


@pytest.mark.parametrize("unit", [1, 4])
def test_block_removal_equals_one_at_a_time_when_the_gram_is_block_diagonal(unit):
    g = torch.Generator().manual_seed(2)
    n_units = 8
    blocks = [torch.randn(unit, unit, generator=g, dtype=F64) for _ in range(n_units)]
    gram = torch.block_diag(*[b @ b.T + torch.eye(unit, dtype=F64) for b in blocks])
    weight = torch.randn(5, n_units * unit, generator=g, dtype=F64)
    one = obs.prune(weight, gram, unit, 5, obs.ObsOptions(damp=0.01, step_fraction=0.0))
    block = obs.prune(weight, gram, unit, 5, obs.ObsOptions(damp=0.01, step_fraction=1.0))
    assert sorted(one.removed.tolist()) == sorted(block.removed.tolist())
    torch.testing.assert_close(one.weight, block.weight, rtol=1e-12, atol=1e-12)


def test_the_same_number_of_query_heads_goes_from_every_key_value_group():
    shape = LayerShape(hidden_size=16, num_attention_heads=8, num_key_value_heads=2, head_dim=2, intermediate_size=12)
    weights, stats = {}, {}
    for name, d_in in (("o_proj", 16), ("down_proj", 12)):
        weights[name], stats[name] = _problem(16, d_in, seed=len(name))
    # Make group 0's heads cheap to remove: OBS alone would take them all.
    weights["o_proj"][:, :8] *= 1e-3
    kept = selection.select("obs", "rcpu", weights, stats, shape, LayerWidths(4, 2, 8), obs.ObsOptions())
    assert [int((kept.heads // 4 == g).sum()) for g in range(2)] == [2, 2]
    assert kept.kv_heads.tolist() == [0, 1] and kept.channels.numel() == 8
    assert kept.repaired["o_proj"].shape == (16, 8) and kept.repaired["down_proj"].shape == (16, 8)
    lam = 0.01 * float(stats["down_proj"].gram.diagonal().mean())
    torch.testing.assert_close(
        kept.repaired["down_proj"], _ridge_refit(weights["down_proj"], stats["down_proj"], kept.channels, lam)
    )


def test_multi_head_attention_drops_the_key_value_heads_with_their_queries():
    shape = LayerShape(hidden_size=16, num_attention_heads=4, num_key_value_heads=4, head_dim=4, intermediate_size=12)
    weights, stats = {}, {}
    for name, d_in in (("o_proj", 16), ("down_proj", 12)):
        weights[name], stats[name] = _problem(16, d_in, seed=len(name))
    kept = selection.select("obs", "rcpu", weights, stats, shape, LayerWidths(3, 3, 12))
    assert kept.heads.numel() == 3 and kept.kv_heads.tolist() == kept.heads.tolist()
    assert kept.channels.tolist() == list(range(12)) and "down_proj" not in kept.repaired


def test_an_indefinite_gram_is_damped_until_it_factors():
    gram = -torch.eye(4, dtype=F64)
    hinv, lam = obs.inverse_hessian(gram, 0.5)
    assert lam == pytest.approx(5.0)
    torch.testing.assert_close(hinv, torch.eye(4, dtype=F64) / 4)
