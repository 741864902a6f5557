"""Shin et al. 2024 in the pipeline: dense targets, held-out errors, block reconstruction, generated
calibration windows and --compensate auto, end to end on tiny checkpoints (CPU, no network)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import assert_same_output, make_settings, read_shards

from rcpu_lite import calibration
from rcpu_lite.methods.auto import candidates
from rcpu_lite.prune.run import REPORT_NAME, prune


def _layers(report: dict) -> list[dict]:
    return report["layers"]


def test_ratio_zero_dense_targets_equal_local_targets(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("qwen2_gqa")
    outs = {t: tmp_path / t for t in ("local", "dense")}
    for targets, out in outs.items():
        prune(src, out, make_settings(calib_file, ratio=0.0, targets=targets, compensate="lstsq+bias"))
    before, local, dense = read_shards(src), read_shards(outs["local"]), read_shards(outs["dense"])
    assert local.keys() == dense.keys() == before.keys()
    for name in before:
        assert torch.equal(local[name], dense[name]) and torch.equal(local[name], before[name]), name


def test_dense_targets_differ_from_local_only_after_the_first_layer(tiny_checkpoint, calib_file, tmp_path):
    """Layer 0 sees the same inputs either way; from layer 1 on the pruned stream has drifted from the
    dense one, and the dense targets are the dense model's own outputs."""
    src = tiny_checkpoint("llama_mha", num_hidden_layers=3)
    local = prune(src, tmp_path / "local", make_settings(calib_file, ratio=0.5))
    dense = prune(src, tmp_path / "dense", make_settings(calib_file, ratio=0.5, targets="dense"))
    first_l, first_d = _layers(local)[0], _layers(dense)[0]
    assert first_l["kept_heads"] == first_d["kept_heads"] and first_l["kept_channels"] == first_d["kept_channels"]
    for key in ("o_proj_error_compensated", "down_proj_error_compensated", "block_error"):
        assert first_d[key] == pytest.approx(first_l[key], rel=1e-4), key
    later = [
        abs(a["down_proj_error_pruned"] - b["down_proj_error_pruned"])
        for a, b in zip(_layers(local)[1:], _layers(dense)[1:])
    ]
    assert max(later) > 1e-3  # the targets really differ


def test_every_layer_reports_calibration_and_held_out_errors(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_mha")
    report = prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.5, holdout_nsamples=4))
    for layer in _layers(report):
        for key in (
            "block_error_pruned",
            "block_error",
            "held_out_block_error_pruned",
            "held_out_block_error",
            "o_proj_held_out_error_pruned",
            "o_proj_held_out_error_compensated",
            "down_proj_held_out_error_pruned",
            "down_proj_held_out_error_compensated",
        ):
            assert isinstance(layer[key], float) and 0 < layer[key] < 10, key
        assert layer["block_error"] < layer["block_error_pruned"]  # the rotation helps on its own tokens
        assert layer["o_proj_error_compensated"] < layer["o_proj_error_pruned"]
    off = prune(src, tmp_path / "off", make_settings(calib_file, ratio=0.5, holdout="none"))
    assert all(layer["held_out_block_error"] is None for layer in _layers(off))
    assert read_shards(tmp_path / "off").keys() == read_shards(tmp_path / "out").keys()


def test_held_out_windows_share_no_token_with_the_calibration_windows():
    tokens = torch.arange(1000)
    starts = calibration.random_starts(tokens, 20, 16, seed=0)
    held = calibration.unused_windows(tokens, starts, 10, 16, seed=1)
    used = {int(t) for s in starts for t in tokens[s : s + 16]}
    seen = [int(t) for t in held.flatten()]
    assert held.shape == (10, 16) and not used & set(seen) and len(set(seen)) == len(seen)
    with pytest.raises(ValueError, match="room for only"):
        calibration.unused_windows(tokens, starts, 100, 16, seed=1)


def test_block_reconstruction_lowers_the_block_error_and_keeps_the_widths(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_mha")
    base = make_settings(calib_file, ratio=0.5, holdout_nsamples=4)
    plain = prune(src, tmp_path / "plain", base)
    trained = prune(
        src,
        tmp_path / "trained",
        make_settings(
            calib_file,
            ratio=0.5,
            holdout_nsamples=4,
            reconstruct="block",
            recon_epochs=8,
            recon_lr=1e-2,
            recon_micro_batch=4,
        ),
    )
    first_p, first_t = _layers(plain)[0], _layers(trained)[0]
    assert first_t["block_error"] < 0.9 * first_p["block_error"]  # same inputs and targets for layer 0
    assert first_t["reconstruct_seconds"] > 0
    a, b = read_shards(tmp_path / "plain"), read_shards(tmp_path / "trained")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert torch.equal(a["model.layers.0.input_layernorm.weight"], b["model.layers.0.input_layernorm.weight"])


def test_generated_windows_feed_compensation_but_not_the_scores(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_mha")
    real = prune(src, tmp_path / "real", make_settings(calib_file, ratio=0.5))
    mixed = prune(src, tmp_path / "mixed", make_settings(calib_file, ratio=0.5, self_nsamples=4))
    assert mixed["calibration_tokens"] == real["calibration_tokens"] + 4 * 32
    first_r, first_m = _layers(real)[0], _layers(mixed)[0]
    assert first_r["kept_heads"] == first_m["kept_heads"] and first_r["kept_channels"] == first_m["kept_channels"]
    assert first_r["o_proj_error_compensated"] != first_m["o_proj_error_compensated"]


def test_auto_reports_its_choice_per_layer_and_projection(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_mha")
    report = prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.5, compensate="auto", holdout_nsamples=4))
    labels = set(candidates(False))
    for layer in _layers(report):
        assert layer["o_proj_method"] in labels and layer["down_proj_method"] in labels


def test_dense_targets_sigkill_then_resume_matches_an_uninterrupted_run(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=4)
    settings = make_settings(calib_file, targets="dense", holdout_nsamples=4)
    prune(src, tmp_path / "reference", settings)
    out = tmp_path / "out"
    args = [
        "prune",
        str(src),
        "--out",
        str(out),
        "--ratio",
        str(settings.ratio),
        "--calib",
        str(calib_file),
        "--nsamples",
        str(settings.nsamples),
        "--seqlen",
        str(settings.seqlen),
        "--micro-batch",
        str(settings.micro_batch),
        "--device",
        "cpu",
        "--multiple-of",
        str(settings.multiple_of),
        "--compensate",
        settings.compensate,
        "--targets",
        "dense",
        "--holdout-nsamples",
        "4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", RCPU_LITE_FAULT="before_shard:3:kill")  # dies before layer 2
    proc = subprocess.run([sys.executable, "-m", "rcpu_lite.cli", *args], env=env, capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    env.pop("RCPU_LITE_FAULT")
    proc = subprocess.run(
        [sys.executable, "-m", "rcpu_lite.cli", *args, "--resume"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / REPORT_NAME).read_text())["resumed_at_layer"] == 2
    assert_same_output(tmp_path / "reference", out)


CROSS = dict(reconstruct="cross", recon_epochs=8, recon_lr=1e-2, recon_micro_batch=4)


def test_cross_reconstruction_lowers_every_window_error_and_holds_one_layer(tiny_checkpoint, calib_file, tmp_path):
    """With dense targets a layer's block error is the pruned model's stream against the dense one after it,
    whichever the reconstruction: each window (j-1, j) lowers it at layer j. The reader still holds one
    layer (the two compact layers of a window are copies), and the output loads with the planned shapes."""
    from transformers import AutoModelForCausalLM

    src = tiny_checkpoint("llama_mha", num_hidden_layers=4)
    plain = prune(src, tmp_path / "plain", make_settings(calib_file, ratio=0.5, targets="dense", holdout_nsamples=4))
    cross = prune(
        src, tmp_path / "cross", make_settings(calib_file, ratio=0.5, targets="dense", holdout_nsamples=4, **CROSS)
    )
    for p, c in zip(_layers(plain)[1:], _layers(cross)[1:]):
        assert c["block_error"] < 0.9 * p["block_error"] and c["reconstruct_seconds"] > 0, c["layer"]
        assert c["held_out_block_error"] < p["held_out_block_error"], c["layer"]
    assert _layers(cross)[0]["reconstruct_seconds"] is None  # layer 0 is trained only in window (0, 1)
    assert cross["peak_weight_bytes"] == plain["peak_weight_bytes"]
    a, b = read_shards(tmp_path / "plain"), read_shards(tmp_path / "cross")
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert all(not torch.equal(a[k], b[k]) for k in a if k.startswith("model.layers.") and k.endswith("proj.weight"))
    files = [sorted(p.name for p in (tmp_path / name).iterdir()) for name in ("plain", "cross")]
    assert files[0] == files[1]  # no side file is left
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "cross", dtype=torch.float32)
    for layer, widths in zip(model.model.layers, cross["width_plan"]["layers"]):
        assert layer.mlp.down_proj.weight.shape[1] == widths["channels"]
        assert layer.self_attn.o_proj.weight.shape[1] == widths["heads"] * model.config.head_dim


def test_cross_reconstruction_at_ratio_zero_changes_nothing(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=3)
    report = prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.0, **CROSS))
    before, after = read_shards(src), read_shards(tmp_path / "out")
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(layer["reconstruct_seconds"] is None for layer in _layers(report))


@pytest.mark.parametrize("targets", ["local", "dense"])
def test_cross_sigkill_then_resume_matches_an_uninterrupted_run(tiny_checkpoint, calib_file, tmp_path, targets):
    """Killed before layer 1's shard (layer 2 pending), then before the last layer's (written after its last
    window): each resume rebuilds the pending layer, its inputs and its targets and ends byte-identical."""
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=4)
    settings = make_settings(calib_file, targets=targets, holdout_nsamples=4, **CROSS)
    prune(src, tmp_path / "reference", settings)
    out = tmp_path / "out"
    args = [
        "prune",
        str(src),
        "--out",
        str(out),
        "--ratio",
        str(settings.ratio),
        "--calib",
        str(calib_file),
        "--nsamples",
        str(settings.nsamples),
        "--seqlen",
        str(settings.seqlen),
        "--micro-batch",
        str(settings.micro_batch),
        "--device",
        "cpu",
        "--multiple-of",
        str(settings.multiple_of),
        "--compensate",
        settings.compensate,
        "--targets",
        targets,
        "--holdout-nsamples",
        "4",
        "--reconstruct",
        "cross",
        "--recon-epochs",
        "8",
        "--recon-lr",
        "1e-2",
        "--recon-micro-batch",
        "4",
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for shard, resume in ((3, False), (4, True)):  # shard k holds layer k-1
        env["RCPU_LITE_FAULT"] = f"before_shard:{shard}:kill"
        proc = subprocess.run(
            [sys.executable, "-m", "rcpu_lite.cli", *args, *(["--resume"] if resume else [])],
            env=env,
            capture_output=True,
            text=True,
        )
        assert proc.returncode == -9, proc.stderr
    env.pop("RCPU_LITE_FAULT")
    proc = subprocess.run(
        [sys.executable, "-m", "rcpu_lite.cli", *args, "--resume"], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / REPORT_NAME).read_text())["resumed_at_layer"] == 3
    assert all(layer["reconstruct_seconds"] > 0 for layer in json.loads((out / REPORT_NAME).read_text())["layers"][1:])
    assert_same_output(tmp_path / "reference", out)  # reconstruct_seconds is a timing: stable_report drops it
