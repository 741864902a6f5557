"""Bad input to `rcpu-lite prune`, driven through the command line.

Every bad input must give ONE line on stderr that names the problem and the fix, exit code 2,
no traceback (unless --debug), and leave the input checkpoint directory byte-for-byte untouched
(same files, same sha256, same mtimes). Run with -s to print the table of messages seen.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import traceback
from pathlib import Path

import pytest
import tiny
import torch
from safetensors.torch import load_file, save_file
from typer.testing import CliRunner

import rcpu_lite.prune.run as pipeline
import rcpu_lite.prune.step as step_module
from rcpu_lite.cli import app
from rcpu_lite.output.manifest import MANIFEST_NAME

runner = CliRunner()
MESSAGES: list[tuple[str, str, int]] = []  # (bad input, stderr, exit code), printed at the end with -s
ENOSPC_AT_SHARD_2 = "before_shard:2:enospc"  # shard 0 = embeddings, 1 = layer 0, 2 = layer 1


@pytest.fixture(scope="module", autouse=True)
def message_table():
    yield
    if MESSAGES:
        print("\n\n| bad input | message shown | exit code |\n|---|---|---|")
        for case, message, code in MESSAGES:
            shown = "<br>".join(message.strip().splitlines()) or "(nothing)"
            print(f"| {case} | `{shown}` | {code} |")


@pytest.fixture(autouse=True)
def no_fault(monkeypatch):
    monkeypatch.delenv("RCPU_LITE_FAULT", raising=False)


@pytest.fixture
def model(tiny_checkpoint) -> Path:
    """A shared read-only tiny checkpoint (GQA, 3 layers)."""
    return tiny_checkpoint("llama_gqa", num_hidden_layers=3)


@pytest.fixture
def model_copy(model, tmp_path) -> Path:
    """A private copy of the tiny checkpoint, to damage."""
    return Path(shutil.copytree(model, tmp_path / "model"))


# --- helpers -------------------------------------------------------------------------------------


def snapshot(root: Path) -> dict:
    """Every file and folder under root: sha256, size and mtime (folder mtimes catch files created and removed)."""
    root = Path(root)
    state = {".": ("dir", root.stat().st_mtime_ns)}
    for path in sorted(root.rglob("*")):
        st = path.stat()
        rel = str(path.relative_to(root))
        if path.is_dir():
            state[rel] = ("dir", st.st_mtime_ns)
        else:
            state[rel] = (hashlib.sha256(path.read_bytes()).hexdigest(), st.st_size, st.st_mtime_ns)
    return state


def sha256_of_weights(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(root).glob("*.safetensors"))}


def small(seqlen: int = 16) -> list[str]:
    return ["--nsamples", "4", "--seqlen", str(seqlen), "--device", "cpu", "--quiet"]


def prune(model, out, calib, *extra, seqlen: int = 16):
    args = ["prune", str(model), "--out", str(out)]
    if calib is not None:
        args += ["--calib", str(calib)]
    return runner.invoke(app, args + small(seqlen) + [str(a) for a in extra])


def describe(result) -> str:
    text = f"exit {result.exit_code}\nstderr:\n{result.stderr}\nstdout:\n{result.stdout}"
    if result.exc_info and not isinstance(result.exception, SystemExit):
        text += "\n" + "".join(traceback.format_exception(*result.exc_info))
    return text


def assert_one_line_error(result, case: str, problem: list[str], fix: list[str]) -> str:
    """Exit 2, no traceback, exactly one stderr line "error: ..." containing every `problem` word and
    at least one of the `fix` phrases. Returns the line."""
    MESSAGES.append((case, result.stderr, result.exit_code))
    assert result.exception is None or isinstance(result.exception, SystemExit), describe(result)
    assert result.exit_code == 2, describe(result)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, describe(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, describe(result)
    line = lines[0]
    assert line.startswith("error: "), line
    for word in problem:
        assert word in line, f"the message does not name the problem ({word!r}): {line}"
    assert any(f in line for f in fix), f"the message does not name the fix (one of {fix}): {line}"
    return line


def assert_no_output(out: Path) -> None:
    """A run refused before any work leaves neither OUT nor OUT.partial behind."""
    assert not out.exists()
    assert not pipeline.working_dir(out).exists(), sorted(p.name for p in pipeline.working_dir(out).iterdir())


def interrupted_run(model, out, calib, monkeypatch, *extra):
    """A run stopped by a full disk just before shard 2; returns its result."""
    monkeypatch.setenv("RCPU_LITE_FAULT", ENOSPC_AT_SHARD_2)
    result = prune(model, out, calib, *extra)
    monkeypatch.delenv("RCPU_LITE_FAULT")
    return result


# --- 1, 2: the model argument ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["absolute", "relative"])
def test_model_path_does_not_exist(tmp_path, calib_file, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    # "models/llama-7b" (one slash, relative) is also how a hub id looks.
    missing = tmp_path / "no" / "such-model" if name == "absolute" else Path("models") / "llama-7b"
    result = prune(missing, tmp_path / "out", calib_file)
    assert_one_line_error(
        result,
        f"model path does not exist ({name}: {missing.name})",
        [str(missing)],
        ["give a checkpoint directory", "give the path of a checkpoint directory", "pass a", "check the path"],
    )
    assert not missing.exists() and not missing.parent.exists()
    assert_no_output(tmp_path / "out")


def test_directory_without_config_json(model_copy, tmp_path, calib_file):
    (model_copy / "config.json").unlink()
    before = snapshot(model_copy)
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(result, "directory without config.json", ["config.json"], ["pass a Hugging Face checkpoint"])
    assert snapshot(model_copy) == before
    assert_no_output(tmp_path / "out")


# --- 3, 4: damaged safetensors ---------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_damaged_safetensors(model_copy, tmp_path, calib_file, damage):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
    else:
        garbage = b"\xde\xad\xbe\xef garbage!"
        weights.write_bytes(garbage + data[len(garbage) :])
    before = snapshot(model_copy)
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(
        result,
        f"{damage} model.safetensors",
        ["model.safetensors", "truncated or corrupted"],
        ["download or convert it again"],
    )
    assert snapshot(model_copy) == before
    assert_no_output(tmp_path / "out")


def test_tensor_missing_from_checkpoint(model_copy, tmp_path, calib_file):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, weights, metadata={"format": "pt"})
    before = snapshot(model_copy)
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(
        result,
        "tensor missing (model.layers.1.mlp.up_proj.weight)",
        ["model.layers.1.mlp.up_proj.weight", "missing"],
        ["download", "convert", "again", "re-save", "resave"],
    )
    assert snapshot(model_copy) == before
    assert_no_output(tmp_path / "out")


# --- 5, 6: what cannot be pruned ------------------------------------------------------------------


@pytest.mark.parametrize("model_type", ["gpt2", "phi3"])
def test_unsupported_model_type(tmp_path, calib_file, model_type):
    model = tiny.save_unsupported(tmp_path / model_type, model_type)
    before = snapshot(model)
    result = prune(model, tmp_path / "out", calib_file)
    assert_one_line_error(
        result,
        f"unsupported model_type ({model_type})",
        [f"model_type {model_type!r}", "not supported"],
        ["rcpu-lite prunes gemma2, gemma3_text, llama, mistral, qwen2, qwen3"],
    )
    assert snapshot(model) == before
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize("ratio", ["-0.1", "1.0", "1.5"])
def test_ratio_outside_range(model, tmp_path, calib_file, ratio):
    before = snapshot(model)
    result = prune(model, tmp_path / "out", calib_file, "--ratio", ratio)
    assert_one_line_error(result, f"--ratio {ratio}", ["--ratio", ratio], ["must be in [0, 1)"])
    assert snapshot(model) == before
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    "args, words, fix",
    [
        (["--max-gpu-memory", "lots"], ["--max-gpu-memory", "lots"], ["must look like"]),
        (["--max-gpu-memory", "4TB"], ["--max-gpu-memory", "4TB"], ["unit must be"]),
        (["--matmul", "bf16"], ["--matmul", "bf16"], ["must be one of"]),
        (["--decomposition", "qr"], ["--decomposition", "qr"], ["must be one of"]),
        (["--decomposition-device", "gpu"], ["--decomposition-device", "gpu"], ["must be one of"]),
    ],
)
def test_bad_gpu_and_decomposition_options(model, tmp_path, calib_file, args, words, fix):
    result = prune(model, tmp_path / "out", calib_file, *args)
    assert_one_line_error(result, " ".join(args), words, fix)
    assert_no_output(tmp_path / "out")


def test_decomposition_on_cuda_without_cuda_is_refused_up_front(model, tmp_path, calib_file, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    result = prune(model, tmp_path / "out", calib_file, "--decomposition-device", "cuda")
    assert_one_line_error(
        result, "--decomposition-device cuda without CUDA", ["--decomposition-device cuda"], ["use cpu"]
    )
    assert_no_output(tmp_path / "out")


# --- 7, 8: calibration text -----------------------------------------------------------------------


def bad_calibration(tmp_path: Path, kind: str) -> Path:
    path = tmp_path / f"{kind}.txt"
    if kind == "short":
        path.write_text("The lobster grows.\n", encoding="utf-8")
    elif kind == "binary":
        path.write_bytes(bytes(range(256)) * 8)
    else:  # latin-1
        path.write_bytes(b"caf\xe9 " * 500)
    return path


CALIB_CASES = {
    "short": (
        "calibration text too short (3 words, --seqlen 64)",
        ["calibration text has", "windows of 64"],
        ["give more text"],
    ),
    "binary": ("binary calibration file (NUL bytes)", ["looks binary"], ["give a UTF-8 text or .jsonl file"]),
    "latin1": ("non-UTF-8 calibration file (latin-1)", ["not UTF-8"], ["convert it to UTF-8"]),
}


@pytest.mark.parametrize("kind", list(CALIB_CASES))
def test_bad_calibration_text(model, tmp_path, kind):
    calib = bad_calibration(tmp_path, kind)
    case, problem, fix = CALIB_CASES[kind]
    before, calib_before = snapshot(model), calib.read_bytes()
    result = prune(model, tmp_path / "out", calib, seqlen=64 if kind == "short" else 16)
    assert_one_line_error(result, case, [str(calib), *problem] if kind != "short" else problem, fix)
    assert snapshot(model) == before and calib.read_bytes() == calib_before
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", list(CALIB_CASES))
def test_after_bad_calibration_the_fixed_command_runs(model, tmp_path, calib_file, kind):
    """The message says "give more text" / "convert it to UTF-8": doing so and running the same
    command again must work, not trip over what the refused run left behind."""
    calib = bad_calibration(tmp_path, kind)
    out = tmp_path / "out"
    seqlen = 64 if kind == "short" else 16
    assert prune(model, out, calib, seqlen=seqlen).exit_code == 2
    calib.write_bytes(calib_file.read_bytes())  # the fix: good UTF-8 text, long enough
    result = prune(model, out, calib, seqlen=seqlen)
    assert result.exit_code == 0, describe(result)
    assert (out / "rcpu_report.json").is_file() and not pipeline.working_dir(out).exists()


# --- 9: weights -----------------------------------------------------------------------------------


def test_nan_in_weights_names_the_layer(model_copy, tmp_path, calib_file):
    weights = model_copy / "model.safetensors"
    tensors = load_file(weights)
    tensors["model.layers.1.self_attn.q_proj.weight"][3, 5] = float("nan")
    save_file(tensors, weights, metadata={"format": "pt"})
    before = snapshot(model_copy)
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(
        result,
        "NaN in model.layers.1.self_attn.q_proj.weight",
        ["layer 1", "NaN"],
        ["download", "convert", "again", "check the checkpoint", "fix the checkpoint", "use an intact copy"],
    )
    assert snapshot(model_copy) == before
    assert not (tmp_path / "out").exists()


# --- 10, 11: disk space ---------------------------------------------------------------------------


def test_disk_fills_during_shard_write_then_resume_matches_uninterrupted(model, tmp_path, calib_file, monkeypatch):
    before = snapshot(model)
    out = tmp_path / "out"
    partial = pipeline.working_dir(out)
    result = interrupted_run(model, out, calib_file, monkeypatch)
    assert_one_line_error(
        result,
        f"disk fills while writing shard 2 (RCPU_LITE_FAULT={ENOSPC_AT_SHARD_2})",
        ["KiB more are needed", "model-00003-of-00005.safetensors"],
        ["--resume"],
    )
    assert not out.exists() and partial.is_dir()
    manifest = json.loads((partial / MANIFEST_NAME).read_text())
    assert sorted(manifest["shards"]) == ["0", "1"]
    assert sorted(p.name for p in partial.glob("*.safetensors*")) == [
        "model-00001-of-00005.safetensors",
        "model-00002-of-00005.safetensors",
    ]  # no half-written shard
    assert snapshot(model) == before

    resumed = prune(model, out, calib_file, "--resume")
    assert resumed.exit_code == 0, describe(resumed)
    assert not partial.exists() and (out / "rcpu_report.json").is_file()
    assert json.loads((out / "rcpu_report.json").read_text())["resumed_at_layer"] == 1

    reference = prune(model, tmp_path / "reference", calib_file)
    assert reference.exit_code == 0, describe(reference)
    resumed_weights = sha256_of_weights(out)
    assert len(resumed_weights) == 5
    assert resumed_weights == sha256_of_weights(tmp_path / "reference")
    assert snapshot(model) == before


def _no_free_space(path):
    return shutil._ntuple_diskusage(10**12, 10**12 - 1000, 1000)


def test_disk_space_is_checked_before_starting(model, tmp_path, calib_file, monkeypatch):
    before = snapshot(model)
    out = tmp_path / "out"
    monkeypatch.setattr("rcpu_lite.output.checks.shutil.disk_usage", _no_free_space)
    result = prune(model, out, calib_file)
    assert_one_line_error(
        result,
        "not enough free disk space (1000 bytes free)",
        ["KiB", "1000 B are free"],
        ["free space", "choose another --out"],
    )
    assert not out.exists()
    assert not list(pipeline.working_dir(out).glob("*.safetensors*"))  # refused before any shard
    assert snapshot(model) == before


def test_after_disk_space_refusal_the_same_command_runs(model, tmp_path, calib_file, monkeypatch):
    """The message says "free space or choose another --out": once space is freed, the same command works."""
    out = tmp_path / "out"
    monkeypatch.setattr("rcpu_lite.output.checks.shutil.disk_usage", _no_free_space)
    assert prune(model, out, calib_file).exit_code == 2
    monkeypatch.undo()  # space freed
    result = prune(model, out, calib_file)
    assert result.exit_code == 0, describe(result)
    assert (out / "rcpu_report.json").is_file()


# --- 12: out of memory ----------------------------------------------------------------------------


def _oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")


def test_cuda_out_of_memory(model, tmp_path, calib_file, monkeypatch):
    before = snapshot(model)
    monkeypatch.setattr(step_module.LayerStep, "prune", _oom)
    result = prune(model, tmp_path / "out", calib_file)
    line = assert_one_line_error(
        result, "CUDA out of memory while pruning a layer", ["out of memory"], ["--micro-batch"]
    )
    assert "--device cpu" in line
    assert snapshot(model) == before


def test_after_out_of_memory_the_suggested_resume_runs(model, tmp_path, calib_file, monkeypatch):
    """The message says "use a smaller --micro-batch (now 16) ... then rerun with --resume"; doing
    exactly that must continue the run."""
    out = tmp_path / "out"
    monkeypatch.setattr(step_module.LayerStep, "prune", _oom)
    assert prune(model, out, calib_file).exit_code == 2
    monkeypatch.undo()
    result = prune(model, out, calib_file, "--micro-batch", "2", "--resume")
    assert result.exit_code == 0, describe(result)
    assert (out / "rcpu_report.json").is_file()


# --- --debug --------------------------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path, calib_file):
    from rcpu_lite.models import ModelNotFound

    result = prune(tmp_path / "no-such-model", tmp_path / "out", calib_file, "--debug")
    MESSAGES.append(
        (
            "model path does not exist, with --debug",
            "(the exception propagates: Python prints "
            f"its traceback) {type(result.exception).__name__}: {result.exception}",
            result.exit_code,
        )
    )
    assert result.exit_code != 0
    assert isinstance(result.exception, ModelNotFound), describe(result)  # not turned into a one-line exit
    shown = "".join(traceback.format_exception(*result.exc_info))
    assert shown.startswith("Traceback (most recent call last)") and "resolve_model" in shown


# --- 13, 14, 15: the output directory -------------------------------------------------------------


@pytest.mark.parametrize("overwrite", [False, True])
def test_output_directory_is_the_input(model_copy, calib_file, overwrite):
    before = snapshot(model_copy)
    result = prune(model_copy, model_copy, calib_file, *(["--overwrite"] if overwrite else []))
    assert_one_line_error(
        result,
        "--out is the input directory" + (" (with --overwrite)" if overwrite else ""),
        ["is the input checkpoint"],
        ["choose another directory"],
    )
    assert snapshot(model_copy) == before
    assert not pipeline.working_dir(model_copy).exists()


def test_existing_output_without_overwrite(model, tmp_path, calib_file):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    before, out_before = snapshot(model), snapshot(out)
    result = prune(model, out, calib_file)
    assert_one_line_error(result, "--out exists, no --overwrite", ["already exists"], ["pass --overwrite"])
    assert snapshot(model) == before and snapshot(out) == out_before
    assert not pipeline.working_dir(out).exists()


def test_leftover_partial_without_resume_or_overwrite(model, tmp_path, calib_file, monkeypatch):
    out = tmp_path / "out"
    assert interrupted_run(model, out, calib_file, monkeypatch).exit_code == 2
    partial = pipeline.working_dir(out)
    before, partial_before = snapshot(model), snapshot(partial)
    result = prune(model, out, calib_file)
    assert_one_line_error(result, "leftover OUT.partial, no --resume/--overwrite", ["interrupted run"], ["--resume"])
    assert snapshot(model) == before and snapshot(partial) == partial_before
    assert not out.exists()


def test_resume_with_nothing_to_resume(model, tmp_path, calib_file):
    out = tmp_path / "out"
    before = snapshot(model)
    result = prune(model, out, calib_file, "--resume")
    assert_one_line_error(
        result, "--resume with nothing to resume", ["no interrupted run to resume"], ["run without --resume"]
    )
    assert snapshot(model) == before
    assert_no_output(out)


def test_resume_with_different_settings(model, tmp_path, calib_file, monkeypatch):
    out = tmp_path / "out"
    assert interrupted_run(model, out, calib_file, monkeypatch).exit_code == 2
    partial = pipeline.working_dir(out)
    before, partial_before = snapshot(model), snapshot(partial)
    result = prune(model, out, calib_file, "--resume", "--ratio", "0.5")
    assert_one_line_error(
        result,
        "--resume with a different --ratio (0.2 then, 0.5 now)",
        ["setting ratio"],
        ["--overwrite to start over"],
    )
    assert snapshot(model) == before and snapshot(partial) == partial_before
    assert not out.exists()


# --- found in review: --out that would destroy something, an untied model without lm_head, eval options ---


@pytest.mark.parametrize("where", ["parent_of_input", "inside_input", "cwd", "dot"])
def test_output_that_overwrite_would_destroy_is_refused(model_copy, tmp_path, calib_file, monkeypatch, where):
    before = snapshot(model_copy)
    elsewhere = tmp_path / "elsewhere" / "deeper"  # the current directory, away from the input
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    out = {
        "parent_of_input": tmp_path,
        "inside_input": model_copy / "pruned",
        "cwd": elsewhere.parent,
        "dot": Path("."),
    }[where]
    result = prune(model_copy, out, calib_file, "--overwrite")
    assert_one_line_error(
        result,
        f"--out {where} with --overwrite",
        ["--out"],
        ["choose a directory", "choose another directory", "give a new directory"],
    )
    assert snapshot(model_copy) == before
    assert not (model_copy / "pruned").exists()


def test_output_that_is_a_file_is_refused(model, tmp_path, calib_file):
    (tmp_path / "out").write_text("not a directory")
    result = prune(model, tmp_path / "out", calib_file, "--overwrite")
    assert_one_line_error(result, "--out is a file", ["is a file"], ["give a directory path"])
    assert (tmp_path / "out").read_text() == "not a directory"


def test_untied_model_without_lm_head_is_refused(model_copy, tmp_path, calib_file):
    tensors = load_file(model_copy / "model.safetensors")
    del tensors["lm_head.weight"]
    save_file(tensors, str(model_copy / "model.safetensors"), metadata={"format": "pt"})
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(
        result, "untied model without lm_head", ["lm_head.weight", "missing"], ["download or convert it again"]
    )
    result = runner.invoke(app, ["eval", str(model_copy), "--ppl", str(calib_file), "--seqlen", "16", "--quiet"])
    assert_one_line_error(result, "eval: untied model without lm_head", ["lm_head.weight"], ["again"])


def test_checkpoint_without_tokenizer(model_copy, tmp_path, calib_file):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model_copy / name).unlink(missing_ok=True)
    result = prune(model_copy, tmp_path / "out", calib_file)
    assert_one_line_error(result, "no tokenizer", ["tokenizer"], ["copy the original model's tokenizer files"])
    assert_no_output(tmp_path / "out")


@pytest.mark.parametrize(
    "args, words",
    [
        (["--device", "gpu"], "--device"),
        (["--seqlen", "1"], "--seqlen"),
        (["--micro-batch", "0"], "--micro-batch"),
        (["--max-windows", "0"], "--max-windows"),
    ],
)
def test_eval_bad_options(model, calib_file, args, words):
    result = runner.invoke(app, ["eval", str(model), "--ppl", str(calib_file), "--quiet", *args])
    assert_one_line_error(result, f"eval {' '.join(args)}", [words], ["must be"])


@pytest.mark.parametrize(
    "text, words",
    [
        ('ratio = "0.2"\n', "setting ratio must be a float"),
        ("[prun]\nratio = 0.3\n", "[prun]"),
        ("ratio = 0.3\nbogus = 1\n", "unknown setting"),
    ],
)
def test_bad_preset(model, tmp_path, calib_file, text, words):
    preset = tmp_path / "preset.toml"
    preset.write_text(text)
    result = prune(model, tmp_path / "out", calib_file, "--config", preset)
    assert_one_line_error(result, f"preset {text.strip()!r}", [words], ["must be", "under [prune]", "known:"])


def test_jsonl_with_a_non_string_text(model, tmp_path):
    calib = tmp_path / "calib.jsonl"
    calib.write_text('{"text": "fine"}\n{"text": null}\n')
    result = prune(model, tmp_path / "out", calib)
    assert_one_line_error(result, "jsonl text null", ["calib.jsonl:2"], ['"text" string'])


def test_second_interrupt_aborts_with_130_and_says_resume(model, tmp_path, calib_file, monkeypatch):
    def abort(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(step_module.LayerStep, "prune", abort)
    result = prune(model, tmp_path / "out", calib_file)
    assert result.exit_code == 130
    assert result.stderr.strip().startswith("aborted") and "--resume" in result.stderr
    assert "Traceback" not in result.stderr
