"""Never lose work: atomic output, resume after SIGKILL, graceful SIGINT/SIGTERM, determinism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Timings and memory legitimately differ between runs; everything else in the report must not.
from helpers import VOLATILE, assert_same_output, cli_args, digests, make_settings, stable_report  # noqa: E402,F401
from typer.testing import CliRunner

from rcpu_lite.cli import app
from rcpu_lite.output.manifest import MANIFEST_NAME
from rcpu_lite.prune.run import REPORT_NAME, prune


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return tiny_checkpoint("llama_gqa", num_hidden_layers=5)


@pytest.fixture(scope="module")
def reference(model, calib_file, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    prune(model, out, make_settings(calib_file))
    return out


def test_same_input_and_seed_give_byte_identical_output(model, calib_file, reference, tmp_path):
    before = digests(model)
    prune(model, tmp_path / "again", make_settings(calib_file))
    assert_same_output(reference, tmp_path / "again")
    assert digests(model) == before  # the input checkpoint is never written to


def test_sigkill_at_three_layers_then_resume_matches_uninterrupted_run(model, calib_file, reference, tmp_path):
    out = tmp_path / "out"
    args = cli_args(model, out, calib_file)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    # Shard k holds layer k-1: the run dies before writing layers 1, 2 and 4, resuming each time.
    for shard, resume in ((2, False), (3, True), (5, True)):
        env["RCPU_LITE_FAULT"] = f"before_shard:{shard}:kill"
        proc = subprocess.run(
            [sys.executable, "-m", "rcpu_lite.cli", *args, *(["--resume"] if resume else [])],
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == -9, proc.stderr
        manifest = json.loads((out.parent / "out.partial" / MANIFEST_NAME).read_text())
        assert sorted(map(int, manifest["shards"])) == list(range(shard))  # every finished shard, nothing more
        assert not out.exists()  # nothing that looks complete
    env.pop("RCPU_LITE_FAULT")
    proc = subprocess.run(
        [sys.executable, "-m", "rcpu_lite.cli", *args, "--resume"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "resuming: 4 of 5 layers were finished" in proc.stderr
    assert json.loads((out / REPORT_NAME).read_text())["resumed_at_layer"] == 4
    assert not (out.parent / "out.partial").exists() and not (out / MANIFEST_NAME).exists()
    assert_same_output(reference, out)


@pytest.mark.parametrize("sig", ["sigint", "sigterm"])
def test_signal_stops_after_the_layer_with_distinct_exit_code_and_resumes(
    model, calib_file, reference, tmp_path, monkeypatch, sig
):
    out = tmp_path / "out"
    monkeypatch.setenv("RCPU_LITE_FAULT", f"before_shard:2:{sig}")
    result = CliRunner().invoke(app, cli_args(model, out, calib_file))
    assert result.exit_code == 75, result.output
    assert "--resume" in result.stderr and sig.upper() in result.stderr
    manifest = json.loads((out.parent / "out.partial" / MANIFEST_NAME).read_text())
    assert sorted(map(int, manifest["shards"])) == [0, 1, 2]  # the layer in flight was finished, then it stopped
    monkeypatch.delenv("RCPU_LITE_FAULT")
    result = CliRunner().invoke(app, cli_args(model, out, calib_file) + ["--resume"])
    assert result.exit_code == 0, result.output
    assert_same_output(reference, out)


def test_resume_refuses_a_changed_input(model, calib_file, tmp_path, monkeypatch):
    import shutil

    src = tmp_path / "src"
    shutil.copytree(model, src)
    out = tmp_path / "out"
    monkeypatch.setenv("RCPU_LITE_FAULT", "before_shard:2:enospc")
    assert CliRunner().invoke(app, cli_args(src, out, calib_file)).exit_code == 2
    monkeypatch.delenv("RCPU_LITE_FAULT")
    os.utime(src / "model.safetensors", ns=(1, 1))
    result = CliRunner().invoke(app, cli_args(src, out, calib_file) + ["--resume"])
    assert result.exit_code == 2
    assert "model.safetensors" in result.stderr and "input files changed" in result.stderr


def test_every_shard_is_fsynced_before_the_manifest_declares_it(model, calib_file, tmp_path, monkeypatch):
    import rcpu_lite.output.fsutil as fsutil
    from rcpu_lite.output.manifest import Manifest
    from rcpu_lite.output.writer import shard_name

    synced: list[str] = []
    real_fsync = fsutil.os.fsync

    def recording_fsync(fd):
        synced.append(Path(os.readlink(f"/proc/self/fd/{fd}")).name)
        real_fsync(fd)

    declared: list[int] = []
    real_record = Manifest.record

    def checking_record(self, shard, size, layer_report=None):
        name = shard_name(shard, 5 + 2)
        assert name + ".tmp" in synced, f"{name} declared finished before it was fsynced"
        declared.append(shard)
        real_record(self, shard, size, layer_report)

    monkeypatch.setattr(fsutil.os, "fsync", recording_fsync)
    monkeypatch.setattr(Manifest, "record", checking_record)
    prune(model, tmp_path / "out", make_settings(calib_file))
    assert declared == list(range(7))


@pytest.mark.parametrize(
    "key, old, new, words",
    [
        ("rcpu_lite_version", "0.0.9", "0.1.0", "rcpu_lite_version"),
        ("calibration_sha256", "aa", "bb", "calibration tokens differ"),
        ("settings", {"ratio": 0.2, "seed": 0}, {"ratio": 0.2, "seed": 1}, "setting seed"),
        ("input_files", {"a.safetensors": {"size": 1}}, {"a.safetensors": {"size": 2}}, "a.safetensors"),
    ],
)
def test_fingerprint_differences_say_what_changed(key, old, new, words):
    from rcpu_lite.output.manifest import differences

    assert differences({key: old}, {key: old}) == []
    diff = differences({key: old}, {key: new})
    assert len(diff) == 1 and words in diff[0]


def test_device_and_micro_batch_do_not_block_resume(model, calib_file):
    from rcpu_lite.output.manifest import fingerprint

    windows = torch.zeros(2, 4, dtype=torch.long)
    a = fingerprint(model, make_settings(calib_file, micro_batch=3, device="cpu"), windows)
    b = fingerprint(model, make_settings(calib_file, micro_batch=1, device="auto"), windows)
    c = fingerprint(model, make_settings(calib_file, seed=5), windows)
    assert a == b and a != c
