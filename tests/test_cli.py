"""The command line: presets with flag overrides, JSON eval output, one-line errors."""
from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from rcpu_lite.cli import app
from tiny import SPECS, build_checkpoint, save_unsupported, write_calibration

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    calib = write_calibration(root / "calib.txt")
    return build_checkpoint(root / "model", SPECS["llama_gqa"]), calib


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_preset_values_apply_and_flags_override_them(tiny, tmp_path):
    model, calib = tiny
    preset = tmp_path / "preset.toml"
    preset.write_text('[prune]\nscore = "wanda-sp"\ncompensate = "none"\nratio = 0.5\nnsamples = 4\nseqlen = 16\n')
    result = invoke("prune", model, "--out", tmp_path / "out", "--config", preset, "--ratio", "0.25",
                    "--calib", calib, "--device", "cpu", "--quiet")
    assert result.exit_code == 0, result.output
    settings = json.loads((tmp_path / "out" / "rcpu_report.json").read_text())["settings"]
    assert settings["score"] == "wanda-sp" and settings["compensate"] == "none"  # from the file
    assert settings["ratio"] == 0.25 and settings["nsamples"] == 4  # flag wins; file fills the rest
    assert not (tmp_path / "out.partial").exists()


def test_every_shipped_preset_is_valid():
    from pathlib import Path

    from rcpu_lite.settings import PruneSettings

    presets = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.toml"))
    methods = set()
    for preset in presets:
        if "sweep" in preset.read_text():
            continue
        s = PruneSettings.merged(preset)
        methods.add((s.score, s.compensate))
    assert {("rcpu", "rotation"), ("rcpu", "rotation-scale"), ("rcpu", "none"), ("wanda-sp", "none")} <= methods


def test_eval_json_prints_one_object_with_ppl(tiny):
    model, calib = tiny
    result = invoke("eval", model, "--ppl", calib, "--seqlen", "16", "--max-windows", "4", "--json", "--quiet")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip())
    assert data["ppl"] > 1 and data["windows"] == 4 and data["tokens"] == 4 * 15


@pytest.mark.parametrize(
    "args, words",
    [
        (["prune", "/no/such/model", "--out", "X"], "does not exist"),
        (["prune", "MODEL", "--out", "X", "--ratio", "1.0"], "--ratio"),
        (["prune", "MODEL", "--out", "X", "--score", "bogus"], "--score"),
        (["prune", "MODEL", "--out", "MODEL"], "input checkpoint"),
        (["prune", "MODEL", "--out", "X", "--calib", "/no/such/text"], "does not exist"),
        (["eval", "/no/such/model", "--ppl", "CALIB"], "does not exist"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tiny, tmp_path, args, words):
    model, calib = tiny
    args = [str(model) if a == "MODEL" else str(calib) if a == "CALIB" else str(tmp_path / a) if a == "X" else a
            for a in args]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
    assert "Traceback" not in result.output


def test_existing_output_needs_overwrite(tiny, tmp_path):
    model, calib = tiny
    (tmp_path / "out").mkdir()
    result = invoke("prune", model, "--out", tmp_path / "out", "--calib", calib, "--nsamples", "2", "--seqlen", "16")
    assert result.exit_code == 2 and "--overwrite" in result.stderr


def test_unsupported_architecture_names_its_model_type(tmp_path):
    model = save_unsupported(tmp_path / "gpt2", "gpt2")
    result = invoke("prune", model, "--out", tmp_path / "out")
    assert result.exit_code == 2
    assert "'gpt2'" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_every_setting_has_a_prune_option_that_reaches_it(tiny, tmp_path, monkeypatch):
    """Each PruneSettings field is a --flag of `rcpu-lite prune`, and a value given there arrives."""
    import dataclasses

    from rcpu_lite.prune import run
    from rcpu_lite.settings import PruneSettings

    seen = {}
    monkeypatch.setattr(run, "prune", lambda model, out, settings, **kw: seen.setdefault("s", settings))
    values = {"targets": "dense", "holdout": "none", "holdout_nsamples": "3", "reconstruct": "block",
              "recon_epochs": "2", "recon_lr": "0.01", "recon_micro_batch": "2", "recon_train": "out",
              "recon_norms": "train", "self_nsamples": "0", "gen_quant": "none", "damp": "0.05", "damp_abs": "0.001",
              "compensate_on": "o_proj", "allocation": "depth", "target_params": "0.3", "depth_spread": "0.25",
              "compensate": "lstsq+bias", "score": "flap", "decomposition_device": "auto"}
    args = ["prune", str(tiny), "--out", str(tmp_path / "o")]
    for name, value in values.items():
        args += [f"--{name.replace('_', '-')}", value]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    settings = seen["s"]
    for name, value in values.items():
        assert str(getattr(settings, name)) == value, name
    help_text = CliRunner().invoke(app, ["prune", "--help"], terminal_width=200).output
    for field in dataclasses.fields(PruneSettings):
        assert f"--{field.name.replace('_', '-')}" in help_text, field.name
