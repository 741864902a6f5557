"""output/runtimes.py: the one-line warning for widths llama.cpp cannot quantise, at the end of prune and in inspect."""

from __future__ import annotations

from helpers import make_settings
from typer.testing import CliRunner

from rcpu_lite.cli import app
from rcpu_lite.methods.allocation import LayerWidths as W
from rcpu_lite.output.runtimes import quantisation_warning
from rcpu_lite.prune import prune

DENSE = W(9, 3, 1536)  # SmolLM2-135M, head_dim 64


def test_the_default_smollm2_widths_get_one_line_and_aligned_ones_none():
    line = quantisation_warning([W(9, 3, 1229)] * 30, DENSE, 64)
    assert "1229" in line and "no multiple of 32" in line and "--multiple-of 32" in line and "\n" not in line
    # 19 x 64: every type quantises it (the K-quants in a 32-block type, as llama.cpp does for the dense 576 too)
    assert quantisation_warning([W(9, 3, 1216)] * 30, DENSE, 64) is None
    assert quantisation_warning([W(9, 3, 1280)] * 30, DENSE, 64) is None
    assert quantisation_warning([DENSE] * 30, DENSE, 64) is None  # nothing pruned: nothing to warn about


def test_attention_widths_count_too():
    assert "240" in quantisation_warning([W(6, 6, 1536)], W(8, 8, 1536), 40)  # 6 heads x 40
    assert quantisation_warning([W(4, 4, 1536)], W(8, 8, 1536), 64) is None  # 256


def test_prune_and_inspect_warn_when_a_width_cannot_be_quantised(tiny_checkpoint, calib_file, tmp_path):
    model = tiny_checkpoint("qwen2_gqa", num_hidden_layers=2)
    prune(model, tmp_path / "plain", make_settings(calib_file, ratio=0.3))  # 68 channels: no multiple of 32
    table = CliRunner().invoke(app, ["inspect", str(tmp_path / "plain")]).output
    assert table.strip().splitlines()[-1].startswith("warning: llama.cpp cannot quantise") and "68" in table
    prune(model, tmp_path / "aligned", make_settings(calib_file, ratio=0.3, multiple_of=32))
    aligned = CliRunner().invoke(app, ["inspect", str(tmp_path / "aligned")]).output
    assert "llama.cpp" not in aligned


def test_the_end_of_prune_says_it_in_one_line_before_the_summary(tiny_checkpoint, calib_file, tmp_path):
    from rcpu_lite.display import PlainReporter

    class Recorder(PlainReporter):
        def finish(self, summary):
            self.summary = list(summary)

    recorder = Recorder()
    prune(
        tiny_checkpoint("qwen2_gqa", num_hidden_layers=2),
        tmp_path / "out",
        make_settings(calib_file, ratio=0.3),
        reporter=recorder,
    )
    assert recorder.summary[0].startswith("llama.cpp cannot quantise") and recorder.summary[1].startswith("wrote ")
