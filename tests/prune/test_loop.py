"""prune/loop.py and prune/strategies.py: the loop writes whatever a strategy finishes, whenever it finishes it."""

from __future__ import annotations

import pytest
from helpers import digests, make_settings

from rcpu_lite.output.report import REPORT_NAME
from rcpu_lite.prune import prune, strategies
from rcpu_lite.settings import SettingsError


class HoldEverything(strategies.Plain):
    """A strategy registered from outside: it finishes no layer until the end, then all of them."""

    name = "hold"

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.held = []

    def step(self, i, stored, widths, watch):
        record, finished = super().step(i, stored, widths, watch)
        self.held += list(finished)
        return record, []

    def finish(self):
        yield from self.held
        self.held = []


def test_a_registered_strategy_runs_and_the_loop_writes_what_it_finishes(
    tiny_checkpoint, calib_file, tmp_path, monkeypatch
):
    model = tiny_checkpoint("llama_gqa", num_hidden_layers=3)
    with pytest.raises(SettingsError, match="--reconstruct must be one of none, block, cross, got 'hold'"):
        make_settings(calib_file, reconstruct="hold").validate()
    monkeypatch.setitem(strategies.STRATEGIES, "hold", HoldEverything)
    held = prune(model, tmp_path / "held", make_settings(calib_file, reconstruct="hold"))
    plain = prune(model, tmp_path / "plain", make_settings(calib_file))
    shards = {k: v for k, v in digests(tmp_path / "held").items() if k != REPORT_NAME}
    assert shards == {k: v for k, v in digests(tmp_path / "plain").items() if k != REPORT_NAME}
    assert [r["layer"] for r in held["layers"]] == [0, 1, 2]
    assert [r["kept_channels"] for r in held["layers"]] == [r["kept_channels"] for r in plain["layers"]]
