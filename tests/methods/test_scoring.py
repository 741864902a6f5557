"""Scores against their direct formulas, and the choice of kept channels / heads."""

import pytest
import torch

from rcpu_lite.families.arch import LayerShape
from rcpu_lite.methods import allocation, scoring
from rcpu_lite.methods.stats import InputStats


def _setup(seed=0, d_out=5, d_in=8, n=200):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = (
        torch.randn(n, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.2, 2.0, d_in, dtype=torch.float64)
        + 0.7
    )
    stats = InputStats(d_in, dtype=torch.float64)
    for chunk in torch.split(x, 64):
        stats.update(chunk)
    return w, x, stats


def _direct(method, w, x):
    d_out, d_in = w.shape
    n = x.shape[0]
    out = torch.empty(d_in, dtype=torch.float64)
    for j in range(d_in):
        col = w[:, j]
        xj = x[:, j]
        l2w = torch.sqrt((col**2).sum())
        l1w = col.abs().sum()
        mean = xj.sum() / n
        var = max(float(((xj - mean) ** 2).sum() / n), 0.0)
        e_abs = xj.abs().sum() / n
        l2x = torch.sqrt((xj**2).sum())
        out[j] = {
            "rcpu": l2w * e_abs * var,
            "rcpu-l2": l2w * l2x * var,
            "wanda-sp": l1w * e_abs,
            "flap": var * (col**2).sum(),  # FLAP's fluctuation (WIFV)
            "magnitude": l2w,
        }[method]
    return out


def test_score_names():
    assert set(scoring.SCORES) == {"rcpu", "rcpu-l2", "wanda-sp", "flap", "magnitude"}


@pytest.mark.parametrize("method", scoring.SCORES)
def test_column_scores_match_direct_formula(method):
    w, x, stats = _setup()
    got = scoring.column_scores(method, w, stats)
    assert got.shape == (w.shape[1],)
    torch.testing.assert_close(got, _direct(method, w, x), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", scoring.SCORES)
def test_column_scores_fp32_stats(method):
    w, x, _ = _setup(seed=3)
    stats = InputStats(x.shape[1])
    stats.update(x.float())
    got = scoring.column_scores(method, w.float(), stats)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), _direct(method, w, x), rtol=1e-4, atol=1e-5)


def test_unknown_score_raises():
    w, _, stats = _setup()
    with pytest.raises(ValueError):
        scoring.column_scores("flapp", w, stats)


def test_flap_head_score_sums_squared_column_scores():
    """FLAP squares the o_proj metric before a head sums its columns; the other scores sum them as they are."""
    w, x, stats = _setup(seed=4, d_in=8)
    columns = scoring.column_scores("flap", w, stats)
    direct = _direct("flap", w, x).reshape(2, 4)
    torch.testing.assert_close(scoring.head_scores(columns, 4, "flap"), direct.square().sum(1), rtol=1e-10, atol=0)
    torch.testing.assert_close(scoring.head_scores(columns, 4, "rcpu"), direct.sum(1), rtol=1e-10, atol=0)


def test_head_scores_sum_consecutive_columns():
    g = torch.Generator().manual_seed(1)
    cols = torch.rand(4 * 6, generator=g, dtype=torch.float64)
    got = scoring.head_scores(cols, 6)
    direct = torch.tensor([float(cols[h * 6 : (h + 1) * 6].sum()) for h in range(4)], dtype=torch.float64)
    assert got.shape == (4,)
    torch.testing.assert_close(got, direct, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("n,ratio", [(50, 0.3), (100, 0.29), (11008, 0.2), (7, 0.1), (10, 0.0), (33, 0.5)])
def test_kept_channels_drops_exactly_the_lowest(n, ratio):
    g = torch.Generator().manual_seed(n)
    scores = torch.randn(n, generator=g)
    kept = scoring.kept_channels(scores, n - int(ratio * n))
    n_drop = int(ratio * n)
    assert kept.numel() == n - n_drop
    expected = sorted(torch.argsort(scores.double())[n_drop:].tolist())
    assert kept.tolist() == expected
    assert kept.tolist() == sorted(kept.tolist())
    if n_drop and n_drop < n:  # every dropped score is below every kept one
        dropped = sorted(set(range(n)) - set(kept.tolist()))
        assert scores[dropped].max() <= scores[kept].min()


def test_kept_channels_paper_count():
    kept = scoring.kept_channels(
        torch.rand(11008, generator=torch.Generator().manual_seed(0)), _keep(11008, 11008, 0.2)
    )
    assert 11008 - kept.numel() == 2201


def _keep(n_heads, n_kv, ratio):
    """Query heads the uniform plan keeps (channels: n_heads = n_kv gives n - int(ratio * n))."""
    return allocation.heads_kept(LayerShape(64, n_heads, n_kv, 8, 96), ratio)[0]


def test_kept_heads_gqa_refuses_uneven_groups():
    with pytest.raises(ValueError, match="evenly"):
        scoring.kept_heads(torch.randn(8), 2, 5)


def test_kept_heads_mha():
    g = torch.Generator().manual_seed(5)
    scores = torch.randn(32, generator=g)
    heads, kv = scoring.kept_heads(scores, 32, _keep(32, 32, 0.2))
    assert 32 - heads.numel() == int(0.2 * 32) == 6
    assert heads.tolist() == sorted(torch.argsort(scores)[6:].tolist())
    assert kv.tolist() == heads.tolist()


def _direct_gqa(scores, n_kv, ratio):
    n_heads = scores.numel()
    per = n_heads // n_kv
    drop = int(ratio * n_heads) // n_kv
    kept = []
    for grp in range(n_kv):
        s = scores[grp * per : (grp + 1) * per]
        order = torch.argsort(s.double()).tolist()
        kept += sorted(grp * per + i for i in order[drop:])
    return kept, drop


@pytest.mark.parametrize(
    "n_heads,n_kv,ratio,per_group_drop",
    [(32, 8, 0.3, 1), (9, 3, 0.2, 0), (32, 8, 0.5, 2), (14, 2, 0.3, 2), (24, 4, 0.25, 1)],
)
def test_kept_heads_gqa_even_within_groups(n_heads, n_kv, ratio, per_group_drop):
    g = torch.Generator().manual_seed(n_heads * 100 + n_kv)
    scores = torch.randn(n_heads, generator=g)
    heads, kv = scoring.kept_heads(scores, n_kv, _keep(n_heads, n_kv, ratio))
    expected, drop = _direct_gqa(scores, n_kv, ratio)
    assert drop == per_group_drop
    assert heads.tolist() == expected
    assert heads.tolist() == sorted(heads.tolist())
    per = n_heads // n_kv
    counts = [sum(1 for h in heads.tolist() if h // per == grp) for grp in range(n_kv)]
    assert counts == [per - per_group_drop] * n_kv
    assert kv.tolist() == list(range(n_kv))


def test_kept_heads_gqa_not_global_lowest():
    # all the globally lowest heads sit in group 0; the removal must still be one per group
    scores = torch.tensor([0.0, 0.1, 0.2, 0.3, 5.0, 6.0, 7.0, 8.0])
    heads, kv = scoring.kept_heads(scores, 2, _keep(8, 2, 0.25))  # int(2) // 2 = 1 per group
    assert heads.tolist() == [1, 2, 3, 5, 6, 7]
    assert kv.tolist() == [0, 1]


def test_kept_heads_gqa_nothing_removed():
    scores = torch.randn(9, generator=torch.Generator().manual_seed(0))
    heads, kv = scoring.kept_heads(scores, 3, _keep(9, 3, 0.2))
    assert heads.tolist() == list(range(9))
    assert kv.tolist() == [0, 1, 2]


@pytest.mark.parametrize("unit, step", [(1, 1), (4, 1), (4, 2)])
def test_error_curve_is_the_direct_error_of_every_prefix(unit, step):
    g = torch.Generator().manual_seed(0)
    d_in = 16
    x = torch.randn(50, d_in, generator=g, dtype=torch.float64)
    weight = torch.randn(5, d_in, generator=g, dtype=torch.float64)
    gram = x.T @ x
    order = torch.randperm(d_in // unit, generator=g)
    curve = scoring.error_curve(weight, gram, order, unit, step)
    total = float((x @ weight.T).square().sum())
    assert curve.numel() == d_in // unit // step + 1 and curve[0] == 0
    for k in range(curve.numel()):
        units = order[: k * step]
        cols = (units[:, None] * unit + torch.arange(unit)).reshape(-1)
        direct = float((x[:, cols] @ weight[:, cols].T).square().sum()) / total
        assert float(curve[k]) == pytest.approx(direct, rel=1e-9, abs=1e-12)
    against_residual = scoring.error_curve(weight, gram, order, unit, step, reference=2 * total)
    torch.testing.assert_close(against_residual, curve / 2)
