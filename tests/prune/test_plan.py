"""prune/plan.py: the width plan a run uses, with --multiple-of applied to whatever the allocation planned."""

from __future__ import annotations

import pytest
from helpers import make_settings, read_shards

import rcpu_lite
from rcpu_lite.prune import prune


@pytest.mark.parametrize("allocation", ["uniform", "depth"])
def test_multiple_of_aligns_every_written_width_and_the_output_loads(tiny_checkpoint, calib_file, tmp_path, allocation):
    model = tiny_checkpoint("qwen2_gqa", num_hidden_layers=3)
    report = prune(model, tmp_path / "out", make_settings(calib_file, multiple_of=16, allocation=allocation))
    widths = report["width_plan"]["layers"]
    assert all(w["channels"] % 16 == 0 and (w["heads"] * 8) % 16 == 0 for w in widths), widths
    shards = read_shards(tmp_path / "out")
    for i, w in enumerate(widths):
        assert shards[f"model.layers.{i}.mlp.down_proj.weight"].shape[1] == w["channels"]
        assert shards[f"model.layers.{i}.self_attn.o_proj.weight"].shape[1] == w["heads"] * 8
    assert report["settings"]["multiple_of"] == 16
    rcpu_lite.load_pruned(tmp_path / "out")  # every output loads (per-layer widths too)


def test_without_multiple_of_the_plan_is_the_allocations(tiny_checkpoint, calib_file, tmp_path):
    model = tiny_checkpoint("qwen2_gqa", num_hidden_layers=2)
    report = prune(model, tmp_path / "out", make_settings(calib_file, ratio=0.3))
    assert report["width_plan"]["layers"][0]["channels"] % 16 != 0  # the tiny width is no multiple here
