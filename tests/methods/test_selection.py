"""methods/selection.py and methods/registry.py: the selection registry and the one registry shape."""

from __future__ import annotations

import pytest
import torch

from rcpu_lite.families.arch import LayerShape
from rcpu_lite.methods import compensation, scoring, selection
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.methods.registry import registrar
from rcpu_lite.methods.stats import InputStats

SHAPE = LayerShape(hidden_size=16, num_attention_heads=4, num_key_value_heads=2, head_dim=4, intermediate_size=12)


def _layer(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    weights = {"o_proj": torch.randn(16, 16, generator=g), "down_proj": torch.randn(16, 12, generator=g)}
    stats = {"o_proj": InputStats(16), "down_proj": InputStats(12)}
    stats["o_proj"].update(torch.randn(40, 16, generator=g))
    stats["down_proj"].update(torch.randn(40, 12, generator=g))
    return weights, stats


def test_topk_keeps_the_highest_scores_per_group_and_channel():
    weights, stats = _layer()
    kept = selection.select("topk", "rcpu", weights, stats, SHAPE, LayerWidths(2, 2, 9))
    heads = scoring.head_scores(scoring.column_scores("rcpu", weights["o_proj"], stats["o_proj"]), 4)
    expected_heads = [int(g * 2 + heads[g * 2 : g * 2 + 2].argmax()) for g in range(2)]
    assert kept.heads.tolist() == expected_heads and kept.kv_heads.tolist() == [0, 1]
    channels = scoring.column_scores("rcpu", weights["down_proj"], stats["down_proj"])
    assert kept.channels.tolist() == sorted(channels.argsort(descending=True)[:9].tolist())
    assert kept.columns("o_proj").tolist() == [c for h in expected_heads for c in range(h * 4, h * 4 + 4)]
    assert kept.as_lists() == (kept.heads.tolist(), kept.kv_heads.tolist(), kept.channels.tolist())


def test_a_registered_selection_is_what_select_runs(monkeypatch):
    table = dict(selection.SELECTIONS)
    monkeypatch.setattr(selection, "SELECTIONS", table)
    first = selection.Kept(torch.tensor([0, 2]), torch.tensor([0, 1]), torch.arange(9), 4)
    registrar(table)("first", "keeps the first units")(lambda *args: first)
    weights, stats = _layer()
    assert selection.select("first", "rcpu", weights, stats, SHAPE, LayerWidths(2, 2, 9)) is first
    with pytest.raises(ValueError, match="unknown selection 'greedy'; choose one of topk, obs, first"):
        selection.select("greedy", "rcpu", weights, stats, SHAPE, LayerWidths(2, 2, 9))


def test_a_name_registered_twice_is_refused():
    table = {}
    register = registrar(table)
    register("a", "the first")(len)
    with pytest.raises(ValueError, match="registered twice"):
        register("a", "the second")(len)
    assert table["a"].fn is len and table["a"].help == "the first"


def test_auto_is_a_registered_chooser_and_a_compensate_value():
    assert "auto" in compensation.CHOOSERS and "auto" not in compensation.COMPENSATIONS
    assert compensation.chooser_names() == ["auto", "auto+bias", "lstsq-cv", "lstsq-cv+bias"]
