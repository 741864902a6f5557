"""rcpu-lite inspect: a pruned output's report as a table, as JSON, as a plot; one-line errors."""

from __future__ import annotations

import json
import shutil
import struct

import pytest
from helpers import make_settings
from typer.testing import CliRunner

from rcpu_lite.cli import app
from rcpu_lite.evaluate.inspection import (
    PLOT_DPI,
    PLOT_EXTRA_HINT,
    PLOT_SIZE_INCHES,
    InspectReport,
    format_table,
    inspect_output,
)
from rcpu_lite.output.report import REPORT_NAME
from rcpu_lite.prune.run import prune

runner = CliRunner()
LAYERS = 3


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, calib_file, tmp_path_factory):
    """A 3-layer tiny MHA model (4 heads, 96 channels) pruned by half with --compensate auto."""
    out = tmp_path_factory.mktemp("inspect") / "out"
    settings = make_settings(calib_file, ratio=0.5, compensate="auto", holdout_nsamples=4)
    prune(tiny_checkpoint("llama_mha", num_hidden_layers=LAYERS), out, settings)
    return out


def table_rows(table: str) -> list[list[str]]:
    """The per-layer rows: the lines that start with a layer index (headers and totals start with words)."""
    return [line.split() for line in table.splitlines() if line.split() and line.split()[0].isdigit()]


def test_one_row_per_layer_with_the_kept_widths_and_the_chosen_methods(pruned):
    report = inspect_output(pruned)
    written = json.loads((pruned / REPORT_NAME).read_text())["layers"]
    assert [(r.heads, r.kv_heads, r.channels) for r in report.layers] == [(2, 2, 48)] * LAYERS
    assert [r.heads for r in report.layers] == [len(layer["kept_heads"]) for layer in written]

    table = format_table(report)
    rows = table_rows(table)
    assert [row[:4] for row in rows] == [[str(i), "2/4", "2/4", "48/96"] for i in range(LAYERS)]
    for row, layer in zip(rows, report.layers):  # auto's choice, per projection
        assert {layer.projections["o_proj"].method, layer.projections["down_proj"].method} <= set(row)
    header = table.splitlines()[1].split()
    assert header.count("ho") == 6  # held-out pruned/compensated for both projections and the block
    assert "parameters" in table and "compensate=auto" in table and "peak memory" in table

    result = invoke("inspect", pruned)
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == table.strip()


def test_json_is_the_same_report_and_round_trips(pruned):
    result = invoke("inspect", pruned, "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    report = inspect_output(pruned)
    assert data == report.to_json()
    assert InspectReport.from_json(data) == report
    assert data["params_after"] < data["params_before"] and 0 < data["param_reduction"] < 1
    assert data["layers"][0]["projections"]["o_proj"]["held_out_error_compensated"] is not None


def test_columns_without_values_are_left_out(pruned, tmp_path):
    """A run without held-out windows has None there: no held-out columns, None in the JSON."""
    data = json.loads((pruned / REPORT_NAME).read_text())
    for layer in data["layers"]:
        for key in layer:
            if key.startswith("held_out") or "_held_out" in key:
                layer[key] = None
    (tmp_path / REPORT_NAME).write_text(json.dumps(data))
    report = inspect_output(tmp_path)
    assert "ho" not in format_table(report).splitlines()[1].split()
    assert len(table_rows(format_table(report))) == LAYERS
    assert report.to_json()["layers"][0]["held_out_block_error"] is None


def test_plot_writes_a_png_of_the_planned_size(pruned, tmp_path):
    png = tmp_path / "widths.png"
    result = invoke("inspect", pruned, "--plot", png)
    assert result.exit_code == 0, result.output
    head = png.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR"
    width, height = struct.unpack(">II", head[16:24])
    assert (width, height) == (round(PLOT_SIZE_INCHES[0] * PLOT_DPI), round(PLOT_SIZE_INCHES[1] * PLOT_DPI))


def test_plot_without_matplotlib_names_the_extra(pruned, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "matplotlib", None)  # `import matplotlib` now fails
    result = invoke("inspect", pruned, "--plot", tmp_path / "p.png")
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and PLOT_EXTRA_HINT in lines[0]
    assert not (tmp_path / "p.png").exists()


@pytest.mark.parametrize(
    "case, words",
    [
        ("empty", f"has no {REPORT_NAME}"),
        ("missing", "does not exist"),
        ("partial", "--resume"),
        ("broken", "not a readable"),
    ],
)
def test_no_report_is_one_line_and_exit_2(pruned, tmp_path, case, words):
    target = tmp_path / "out"
    if case in ("empty", "partial"):
        target.mkdir()
    if case == "partial":
        shutil.copytree(pruned, tmp_path / "out.partial")
    if case == "broken":
        target.mkdir()
        (target / REPORT_NAME).write_text('{"layers": []}')
    result = invoke("inspect", target)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
