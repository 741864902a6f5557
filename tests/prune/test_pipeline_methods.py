"""The methods beside RCPU's, end to end on tiny checkpoints: ratio 0 is the identity for each of them,
the parameter budgets hold, biases and per-layer widths load and compute what the pipeline computed."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from helpers import make_settings, read_shards
from transformers import AutoModelForCausalLM, AutoTokenizer

from rcpu_lite import calibration, load_pruned
from rcpu_lite.evaluate.perplexity import perplexity
from rcpu_lite.methods.compensation import method_names
from rcpu_lite.prune.run import prune

ALL_METHODS = method_names()


def _same_weights(src: Path, out: Path) -> None:
    before, after = read_shards(src), read_shards(out)
    assert sorted(after) == sorted(before), "ratio 0 added or dropped tensors"
    for name, t in before.items():
        assert torch.equal(after[name], t), f"{name} changed at ratio 0"


@pytest.mark.parametrize("compensate", ALL_METHODS)
def test_ratio_zero_writes_the_input_weights_for_every_compensation(tiny_checkpoint, calib_file, tmp_path, compensate):
    src = tiny_checkpoint("qwen2_gqa")  # q/k/v biases: they must come through untouched too
    prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.0, compensate=compensate, score="flap"))
    _same_weights(src, tmp_path / "out")


@pytest.mark.parametrize("allocation", ["adaptive", "depth", "log", "errors"])
def test_ratio_zero_writes_the_input_weights_for_every_allocation(tiny_checkpoint, calib_file, tmp_path, allocation):
    src = tiny_checkpoint("llama_mha")
    report = prune(
        src, tmp_path / "out", make_settings(calib_file, ratio=0.0, allocation=allocation, compensate="lstsq+bias")
    )
    _same_weights(src, tmp_path / "out")
    assert report["output_format"] == "stock"


@pytest.mark.parametrize("target", [0.2, 0.35])
def test_target_params_removes_that_share_of_the_decoder_layers(tiny_checkpoint, calib_file, tmp_path, target):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=3)  # 8 query heads in 2 groups
    report = prune(src, tmp_path / "out", make_settings(calib_file, target_params=target))
    hidden = report["shape_before"]["hidden_size"]
    channel_share = 3 * hidden / (report["decoder_layer_params_before"] / 3)
    assert abs(report["decoder_layer_param_reduction"] - target) <= channel_share / 2 + 1e-9
    assert report["output_format"] == "stock"


def test_compensate_on_one_projection_leaves_the_other_pruned_only(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_mha")
    both = prune(src, tmp_path / "both", make_settings(calib_file, ratio=0.3))
    only_o = prune(src, tmp_path / "o", make_settings(calib_file, ratio=0.3, compensate_on="o_proj"))
    for layer in only_o["layers"]:
        assert layer["down_proj_method"] == "none" and layer["o_proj_method"] == "rotation"
        assert layer["down_proj_error_compensated"] == layer["down_proj_error_pruned"]
    # Layer 0 sees the same inputs in both runs: its o_proj repair is the same.
    assert only_o["layers"][0]["o_proj_error_compensated"] == pytest.approx(
        both["layers"][0]["o_proj_error_compensated"], rel=1e-5
    )


def _ppl_of_loaded(model, tokenizer_dir: Path, text: Path, seqlen: int, windows: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = calibration.consecutive_windows(
        calibration.tokenize(tokenizer, calibration.evaluation_text(text)), seqlen, windows
    )
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1]
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    return math.exp(float(nll))


def _assert_loads_and_matches(out: Path, calib_file: Path, stock: bool) -> None:
    """Every way of loading the output gives the perplexity rcpu-lite's own streamed evaluation gives."""
    streamed = perplexity(out, calib_file, seqlen=32, max_windows=4, device="cpu")["ppl"]
    loaders = [
        lambda: load_pruned(out, dtype=torch.float32),
        lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, trust_remote_code=True),
    ]
    if stock:
        loaders.append(lambda: AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32))
    else:  # the stock class at the global widths: transformers refuses the shapes (never a wrong model)
        with pytest.raises((RuntimeError, ValueError, OSError, KeyError)):
            AutoModelForCausalLM.from_pretrained(out)
    for load in loaders:
        model = load().eval()
        assert _ppl_of_loaded(model, out, calib_file, 32, 4) == pytest.approx(streamed, rel=1e-4)


@pytest.mark.parametrize(
    "spec,ratio,compensate,stock",
    [
        ("llama_mha", 0.5, "rotation+bias", True),  # 2 heads divide hidden 64: a stock Llama with attention/mlp bias
        ("llama_mha", 0.3, "bias", False),  # 3 heads do not: LlamaConfig refuses, the Mistral twin has no bias
        ("qwen2_gqa", 0.3, "lstsq+bias", False),  # Qwen2 has no o_proj / down_proj bias: the remote-code format
    ],
)
def test_bias_outputs_load_and_compute_what_the_pipeline_computed(
    tiny_checkpoint, calib_file, tmp_path, spec, ratio, compensate, stock
):
    src = tiny_checkpoint(spec)
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=ratio, compensate=compensate))
    assert report["output_format"] == ("stock" if stock else "remote-code")
    assert report["biases"] == ["down_proj", "o_proj"]  # every spec loses heads and channels here
    _assert_loads_and_matches(out, calib_file, stock)


@pytest.mark.parametrize("allocation", ["adaptive", "depth", "log", "errors"])
def test_per_layer_widths_load_three_ways(tiny_checkpoint, calib_file, tmp_path, allocation):
    src = tiny_checkpoint("llama_mha", num_hidden_layers=3)
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.3, allocation=allocation, score="flap"))
    layers = report["width_plan"]["layers"]
    assert len({(w["heads"], w["channels"]) for w in layers}) > 1, "the plan came out uniform"
    assert report["output_format"] == "remote-code"
    for planned, done in zip(layers, report["layers"]):
        assert (planned["heads"], planned["channels"]) == (len(done["kept_heads"]), len(done["kept_channels"]))
    _assert_loads_and_matches(out, calib_file, stock=False)


def test_eval_of_a_remote_code_output_prints_only_its_json(tiny_checkpoint, calib_file, tmp_path):
    """No trust_remote_code prompt (transformers asks on stdout when a config names custom code)."""
    import json
    import subprocess
    import sys

    out = tmp_path / "out"
    prune(
        tiny_checkpoint("llama_mha", num_hidden_layers=3), out, make_settings(calib_file, ratio=0.3, allocation="depth")
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "rcpu_lite.cli",
            "eval",
            str(out),
            "--ppl",
            str(calib_file),
            "--seqlen",
            "32",
            "--max-windows",
            "2",
            "--json",
            "--quiet",
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["windows"] == 2
    assert "custom code" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("obs_gram", ["calibration", "all", "held-out", "calibration+held-out"])
def test_select_obs_runs_end_to_end_on_every_gram(tiny_checkpoint, calib_file, tmp_path, obs_gram):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=2)  # 8 query heads in 2 groups
    settings = make_settings(
        calib_file, ratio=0.5, select="obs", obs_gram=obs_gram, compensate="lstsq", holdout_nsamples=2
    )
    report = prune(src, tmp_path / "out", settings)
    assert report["settings"]["select"] == "obs" and report["settings"]["obs_gram"] == obs_gram
    for layer in report["layers"]:
        assert [h // 4 for h in layer["kept_heads"]] == [0, 0, 1, 1]  # two from every key/value group
    _assert_loads_and_matches(tmp_path / "out", calib_file, stock=True)


def test_select_obs_lowers_the_calibration_error_of_the_least_squares_repair(tiny_checkpoint, calib_file, tmp_path):
    """OBS picks the units whose removal the refit repairs best on the calibration Gram: in the first layer (the
    same inputs in both runs) its calibration error is below the one-shot score's."""
    src = tiny_checkpoint("llama_mha")
    runs = {
        select: prune(
            src,
            tmp_path / select,
            make_settings(calib_file, ratio=0.4, select=select, compensate="lstsq", obs_step=0.0),
        )["layers"][0]
        for select in ("topk", "obs")
    }
    assert runs["obs"]["down_proj_error_compensated"] < runs["topk"]["down_proj_error_compensated"]
    assert runs["obs"]["o_proj_error_compensated"] <= runs["topk"]["o_proj_error_compensated"] * (1 + 1e-6)
    assert runs["obs"]["kept_channels"] != runs["topk"]["kept_channels"]


def test_errors_allocation_on_grouped_queries_removes_heads_group_by_group(tiny_checkpoint, calib_file, tmp_path):
    src = tiny_checkpoint("llama_gqa", num_hidden_layers=3)  # 8 query heads in 2 groups
    report = prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.4, allocation="errors"))
    for planned, done in zip(report["width_plan"]["layers"], report["layers"]):
        assert planned["heads"] % 2 == 0 and planned["kv_heads"] == 2
        assert len(done["kept_heads"]) == planned["heads"]
    assert abs(report["decoder_layer_param_reduction"] - 0.4) < 0.05
    _assert_loads_and_matches(tmp_path / "out", calib_file, stock=not report["output_format"] == "remote-code")


def test_lstsq_cv_chooses_a_damping_per_projection_and_refuses_dense_targets(tiny_checkpoint, calib_file, tmp_path):
    from rcpu_lite.methods.auto import CV_GRID
    from rcpu_lite.settings import SettingsError

    src = tiny_checkpoint("qwen2_gqa")
    report = prune(src, tmp_path / "out", make_settings(calib_file, ratio=0.4, compensate="lstsq-cv", cv_folds=3))
    labels = {layer[f"{p}_method"] for layer in report["layers"] for p in ("o_proj", "down_proj")}
    assert labels <= {f"lstsq(damp={d:g})" for d in CV_GRID}, labels
    _assert_loads_and_matches(tmp_path / "out", calib_file, stock=True)
    with pytest.raises(SettingsError, match="local targets only"):
        make_settings(calib_file, compensate="lstsq-cv", targets="dense").validate()
