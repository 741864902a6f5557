"""Built-in texts: names per role (calibration, evaluation), the bundled files, and file paths winning over names."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from rcpu_lite import calibration
from rcpu_lite.calibration import CALIBRATION_TEXTS, EVALUATION_TEXTS, CalibrationError
from rcpu_lite.cli import app

# sha256 of the released files (also listed in the data folder's README beside dev checkouts).
WIKITEXT2_TEST_RAW_SHA256 = "4f3e427e4aff23acff917a8a51aeae21bf12832256e26914c8fc250dcef4103c"
WIKITEXT2_VALID_SHA256 = "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8"


def gunzip_sha256(path) -> str:
    return hashlib.sha256(gzip.decompress(path.read_bytes())).hexdigest()


def test_bundled_wikitext2_files_are_the_released_files():
    assert gunzip_sha256(EVALUATION_TEXTS["wikitext2"]) == WIKITEXT2_TEST_RAW_SHA256
    assert WIKITEXT2_TEST_RAW_SHA256.startswith("4f3e427e")
    assert gunzip_sha256(CALIBRATION_TEXTS["wikitext2"]) == WIKITEXT2_VALID_SHA256


def test_names_resolve_per_role():
    assert calibration.resolve_text("c4") == CALIBRATION_TEXTS["c4"]
    assert calibration.resolve_text("wikitext2") == CALIBRATION_TEXTS["wikitext2"]
    assert calibration.resolve_text("wikitext2", "evaluation") == EVALUATION_TEXTS["wikitext2"]
    assert all(p.is_file() for p in [*CALIBRATION_TEXTS.values(), *EVALUATION_TEXTS.values()])
    assert calibration.read_text("wikitext2").startswith(" \n = Homarus gammarus = \n")  # validation
    assert calibration.evaluation_text("wikitext2").startswith(" = Robert Boulter = \n\n Robert Boulter is")  # test
    assert "\r" not in calibration.evaluation_text("wikitext2")  # the raw split's CRLF is normalised


def test_calibration_never_reads_the_test_split():
    """Calibrating on the evaluation text would be contamination."""
    assert not set(EVALUATION_TEXTS.values()) & set(CALIBRATION_TEXTS.values())
    with pytest.raises(CalibrationError):
        calibration.resolve_text("wikitext2-test")


@pytest.mark.parametrize(
    "role, source, known",
    [
        ("calibration", "wikitext-2", "c4, wikitext2"),
        ("evaluation", "c4", "wikitext2"),  # c4 is a calibration text only
        ("evaluation", "no/such/file.txt", "wikitext2"),
    ],
)
def test_unknown_name_says_which_names_exist(role, source, known):
    with pytest.raises(CalibrationError) as e:
        calibration.read_text(source, role)
    assert str(e.value) == (
        f"{role} text {source!r} does not exist: it is neither a file nor a built-in name "
        f"(built-in {role} texts: {known})"
    )


def test_a_file_path_beats_a_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "wikitext2").write_text("my own text\nsecond line\n", encoding="utf-8")
    for role in ("calibration", "evaluation"):
        assert calibration.resolve_text("wikitext2", role) == Path("wikitext2")
        assert calibration.read_text("wikitext2", role) == "my own text\nsecond line\n"
    assert calibration.evaluation_text("wikitext2") == "my own text\n\nsecond line\n\n"


def test_cli_takes_the_names(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint("llama_gqa")
    runner = CliRunner()
    result = runner.invoke(
        app,
        [
            "eval",
            str(model),
            "--ppl",
            "wikitext2",
            "--seqlen",
            "16",
            "--max-windows",
            "2",
            "--device",
            "cpu",
            "--json",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout.strip())
    assert data["text"] == "wikitext2" and data["windows"] == 2
    result = runner.invoke(
        app,
        [
            "prune",
            str(model),
            "--out",
            str(tmp_path / "out"),
            "--calib",
            "wikitext2",
            "--nsamples",
            "4",
            "--seqlen",
            "16",
            "--device",
            "cpu",
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "rcpu_report.json").read_text())["settings"]["calib"] == "wikitext2"


def test_cli_unknown_ppl_name_is_a_one_line_error(tiny_checkpoint):
    result = CliRunner().invoke(app, ["eval", str(tiny_checkpoint("llama_gqa")), "--ppl", "wikitext", "--quiet"])
    assert result.exit_code == 2
    assert "built-in evaluation texts: wikitext2)" in result.output
