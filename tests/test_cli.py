"""The command line: presets with flag overrides, JSON eval output, one-line errors."""

from __future__ import annotations

import json

import pytest
from tiny import SPECS, build_checkpoint, save_unsupported, write_calibration
from typer.testing import CliRunner

from rcpu_lite.cli import app

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
    result = invoke(
        "prune",
        model,
        "--out",
        tmp_path / "out",
        "--config",
        preset,
        "--ratio",
        "0.25",
        "--calib",
        calib,
        "--device",
        "cpu",
        "--quiet",
    )
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


def test_method_is_a_preset_under_the_config_and_the_flags(tmp_path):
    from rcpu_lite.settings import METHODS, PruneSettings, SettingsError

    rcpu = PruneSettings.merged(None, "rcpu", compensate=None)
    assert (rcpu.score, rcpu.select, rcpu.compensate, rcpu.allocation) == ("rcpu", "topk", "rotation", "uniform")
    assert PruneSettings.merged(None, "rcpu", compensate="lstsq").compensate == "lstsq"  # a flag wins
    preset = tmp_path / "p.toml"
    preset.write_text('[prune]\nallocation = "log"\n')
    assert PruneSettings.merged(preset, "flap").allocation == "log"  # the file wins over the method
    assert PruneSettings.merged(None, "flap").compensate == "bias"
    assert set(METHODS) == {"rcpu", "flap", "wanda-sp"}
    with pytest.raises(SettingsError, match="--method must be one of rcpu, flap, wanda-sp, got 'obs'"):
        PruneSettings.merged(None, "obs")


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
    args = [
        str(model) if a == "MODEL" else str(calib) if a == "CALIB" else str(tmp_path / a) if a == "X" else a
        for a in args
    ]
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
    values = {
        "targets": "dense",
        "holdout": "none",
        "holdout_nsamples": "3",
        "reconstruct": "block",
        "recon_epochs": "2",
        "recon_lr": "0.01",
        "recon_micro_batch": "2",
        "recon_train": "out",
        "recon_norms": "train",
        "self_nsamples": "0",
        "gen_quant": "none",
        "damp": "0.05",
        "damp_abs": "0.001",
        "compensate_on": "o_proj",
        "allocation": "depth",
        "target_params": "0.3",
        "depth_spread": "0.25",
        "compensate": "lstsq+bias",
        "score": "flap",
        "decomposition_device": "auto",
    }
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


HAND_WRITTEN = {"method", "model", "out", "config", "overwrite", "resume", "quiet", "debug", "help"}  # not settings


def test_each_setting_is_exactly_one_prune_option_with_its_help_and_default():
    """The options come from PruneSettings' fields: the flag, the help and the default shown are the field's."""
    import dataclasses

    import typer

    from rcpu_lite.settings import PruneSettings, option_help

    command = typer.main.get_command(app).commands["prune"]
    options = [p for p in command.params if p.name not in HAND_WRITTEN]
    fields = dataclasses.fields(PruneSettings)
    assert sorted(p.name for p in options) == sorted(f.name for f in fields)  # one each, nothing else
    method, run = [f for f in fields if not f.metadata["run"]], [f for f in fields if f.metadata["run"]]
    assert [p.name for p in options] == [f.name for f in method + run]  # --help: the method's, then the run's
    by_name = {p.name: p for p in options}
    types = {"float": float, "int": int, "str": str}
    for field in fields:
        option = by_name[field.name]
        assert option.opts == [f"--{field.name.replace('_', '-')}"] and not option.secondary_opts, field.name
        assert option.default is None, field.name  # None: the preset's value, else the field's default
        assert option.help == option_help(field) and option.help.endswith(f"(default: {field.metadata['shown']})")
        shown = field.metadata["shown"]
        if " " not in shown:  # a default given as one value, not in words: the field's own
            assert types[field.type](shown) == field.default, field.name


def test_a_new_setting_becomes_an_option_without_other_edits():
    """A field added to the settings (here in a subclass) is an option with its help, and its value arrives."""
    import dataclasses

    import typer

    from rcpu_lite.cli import with_setting_options
    from rcpu_lite.settings import PruneSettings, knob

    @dataclasses.dataclass
    class Wider(PruneSettings):
        wobble: int = knob(3, "How far to wobble.")

    demo, seen = typer.Typer(), {}

    @demo.command()
    @with_setting_options(after="name", cls=Wider)
    def run(
        name: str = typer.Argument(..., help="A name."),
        loud: bool = typer.Option(False, "--loud", help="Louder."),
        **flags: object,
    ) -> None:
        seen.update(flags=flags, name=name, loud=loud)

    result = CliRunner().invoke(demo, ["x", "--wobble", "5", "--ratio", "0.3", "--loud"])
    assert result.exit_code == 0, result.output
    assert seen["name"] == "x" and seen["loud"] is True
    assert seen["flags"]["wobble"] == 5 and seen["flags"]["ratio"] == 0.3 and seen["flags"]["score"] is None
    settings = Wider.merged(None, **seen["flags"])
    assert settings.wobble == 5 and settings.ratio == 0.3 and settings.score == "rcpu"
    help_text = CliRunner().invoke(demo, ["--help"], terminal_width=200).output
    assert "--wobble" in help_text and "How far to wobble. (default: 3)" in help_text


def test_the_best_quality_preset_is_the_study_row_it_quotes():
    """configs/best-quality.toml quotes issue 24's 66.71 row; changing either without the other breaks the claim."""
    from pathlib import Path

    from rcpu_lite.settings import PruneSettings, tomllib

    root = Path(__file__).resolve().parents[1]
    sweep = tomllib.loads((root / "configs" / "quality-smollm2.toml").read_text())["sweep"]
    name = "least squares toward the rotation (damp 0.1), log allocation spread 0.8, 384x128 windows"
    (row,) = [m for m in sweep["method"] if m["name"] == name]
    flags = {k: v for k, v in row.items() if k not in ("name", "ratios")}
    study = PruneSettings.merged(None, ratio=row["ratios"][0], calib=sweep["calib"], seqlen=sweep["seqlen"], **flags)
    preset = PruneSettings.merged(root / "configs" / "best-quality.toml", calib="wikitext2", target_params=0.176)
    assert preset == study
