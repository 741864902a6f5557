"""Progress a person can read: a rich bar in a terminal, one plain line per layer elsewhere, nothing with --quiet."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import make_settings
from rich.console import Console

from rcpu_lite import cli
from rcpu_lite.display import PlainReporter, RichReporter, StageCursor
from rcpu_lite.prune.run import prune

ROOT = Path(__file__).resolve().parents[1]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class Recorder:
    """A reporter that remembers every call."""

    def __init__(self):
        self.calls: list[tuple] = []

    def start(self, task, total, unit, done=0):
        self.calls.append(("start", task, total, unit, done))

    def position(self, where):
        self.calls.append(("position", where))

    def phase(self, name):
        self.calls.append(("phase", name))

    def advance(self, line, steps=1):
        self.calls.append(("advance", line, steps))

    def finish(self, summary):
        self.calls.append(("finish", list(summary)))


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama_mha", num_hidden_layers=3)


def run_cli(*args) -> subprocess.CompletedProcess:
    """The real command with stderr a pipe, as under CI or nohup (CliRunner shares pytest's logging setup)."""
    env = dict(
        os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
    )
    return subprocess.run(
        [sys.executable, "-m", "rcpu_lite.cli", *map(str, args)], env=env, capture_output=True, text=True
    )


def prune_args(model: Path, out: Path, calib: Path) -> list:
    return ["prune", model, "--out", out, "--calib", calib, "--nsamples", 4, "--seqlen", 16, "--device", "cpu"]


def test_without_a_terminal_each_layer_is_one_plain_line_and_the_summary_ends_the_run(model, calib_file, tmp_path):
    out = tmp_path / "out"
    proc = run_cli(*prune_args(model, out, calib_file))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    layer_lines = [line for line in lines if line.startswith("layer ")]
    assert [line.split()[1] for line in layer_lines] == ["1/3", "2/3", "3/3"], proc.stderr
    assert all("heads" in line and "o_proj err" in line for line in layer_lines)
    assert "\x1b[" not in proc.stderr and "━" not in proc.stderr  # no bar, no escape codes in a log
    wrote = next(line for line in lines if line.startswith("wrote "))
    assert str(out) in wrote and re.search(r"\d+ -> \d+ parameters", wrote)
    assert re.search(r"peak memory .* resident; report: .*rcpu_report.json", lines[-1]), proc.stderr


def test_quiet_prints_nothing_on_stderr(model, calib_file, tmp_path):
    proc = run_cli(*prune_args(model, tmp_path / "out", calib_file), "--quiet")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr


def test_prune_reports_layers_phases_and_a_summary(model, calib_file, tmp_path):
    recorder = Recorder()
    report = prune(model, tmp_path / "out", make_settings(calib_file), reporter=recorder)
    assert ("start", "prune", 3, "layer", 0) in recorder.calls
    assert [c[1] for c in recorder.calls if c[0] == "position"] == ["layer 1/3", "layer 2/3", "layer 3/3"]
    first_layer = recorder.calls[recorder.calls.index(("position", "layer 1/3")) :]
    first_layer = first_layer[: next(k for k, c in enumerate(first_layer) if c[0] == "advance")]
    assert [c[1] for c in first_layer if c[0] == "phase"] == [
        "read",
        "statistics",
        "scores",
        "compensation",
        "propagate",
        "write",
    ]
    assert sum(1 for c in recorder.calls if c[0] == "advance") == 3
    summary = recorder.calls[-1]
    assert summary[0] == "finish"
    text = "\n".join(summary[1])
    assert f"{report['params_before']} -> {report['params_after']} parameters" in text
    assert str(tmp_path / "out") in text


def test_cross_reconstruction_reports_its_window_and_every_layer_once(model, calib_file, tmp_path):
    recorder = Recorder()
    prune(model, tmp_path / "out", make_settings(calib_file, reconstruct="cross", recon_epochs=1), reporter=recorder)
    phases = [c[1] for c in recorder.calls if c[0] == "phase"]
    assert "reconstruction" in phases and phases.count("write") >= 2
    assert [c[1].split()[1] for c in recorder.calls if c[0] == "advance"] == ["1/3", "2/3", "3/3"]


def test_eval_counts_windows_and_their_steps_add_up(model, calib_file):
    from rcpu_lite.evaluate.perplexity import perplexity

    recorder = Recorder()
    perplexity(model, calib_file, seqlen=16, max_windows=5, device="cpu", reporter=recorder)
    assert ("start", "eval", 5, "windows", 0) in recorder.calls
    advances = [c for c in recorder.calls if c[0] == "advance"]
    assert [c[1] for c in advances] == [f"windows 1-5 of 5: layer {i}/3" for i in (1, 2, 3)]  # the plain lines
    assert sum(c[2] for c in advances) == pytest.approx(5)
    assert ("position", "windows 1-5 of 5, layer 2/3") in recorder.calls
    assert recorder.calls[-1] == ("finish", [])


def test_the_stage_cursor_names_the_stage_that_runs_and_skips_one_that_does_not():
    seen = []
    cursor = StageCursor(["read", "statistics", "propagate", "reconstruction", "propagate", "write"], seen.append)
    cursor.begin()
    for lap in ("read", "statistics", "propagate", "propagate"):  # no reconstruction this time
        cursor(lap)
    assert seen == ["read", "statistics", "propagate", "reconstruction", "write"]
    cursor("decomposition")  # booked, not lapped: no change
    assert seen[-1] == "write"


def rendered(console: Console) -> str:
    return ANSI.sub("", console.file.getvalue())


def test_the_rich_bar_shows_the_layer_the_phase_and_the_times():
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    with RichReporter(console) as reporter:
        reporter.start("prune", 3, "layer")
        reporter.position("layer 1/3")
        reporter.phase("statistics")
        reporter.advance("layer 1/3  heads 4->3")
        reporter.position("layer 2/3")
        reporter.phase("compensation")
        reporter.progress.refresh()
        text = rendered(console)
        reporter.advance("layer 2/3")
        reporter.advance("layer 3/3")
        reporter.finish(["wrote out: 100 -> 80 parameters (20.0% fewer) in 1s"])
    assert "prune" in text and "layer 2/3" in text and "compensation" in text
    assert "elapsed" in text and "ETA" in text
    assert "heads 4->3" not in rendered(console)  # the per-layer log line is for logs; the bar replaces it
    assert "wrote out: 100 -> 80 parameters" in rendered(console)


def test_fractional_steps_finish_the_bar():
    console = Console(file=io.StringIO(), force_terminal=True, width=140)
    with RichReporter(console) as reporter:
        reporter.start("eval", 7, "windows")
        for _ in range(3):
            reporter.advance("a layer", steps=7 / 3)
        task = reporter.progress.tasks[0]
        assert task.finished and task.completed == 7


def test_the_command_line_picks_the_bar_only_for_a_terminal_and_not_when_quiet(monkeypatch):
    monkeypatch.setattr(logging.root, "handlers", list(logging.root.handlers))  # whatever _reporter sets up goes

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stderr", Terminal())
    assert isinstance(cli._reporter(quiet=False), RichReporter)
    assert isinstance(cli._reporter(quiet=True), PlainReporter)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert isinstance(cli._reporter(quiet=False), PlainReporter)
