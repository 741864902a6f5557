"""rcpu-lite export on tiny models, checked in real llama.cpp: it loads every output, and its logits and greedy
tokens match transformers' (load_pruned) within each type's tolerance."""

from __future__ import annotations

import errno
import json
import shutil

import gguf
import numpy as np
import pytest
import torch
from helpers import make_settings
from llama_cpp_run import convert_with_llama_cpp, greedy, llama_cpp, logits
from typer.testing import CliRunner

from rcpu_lite.cli import app
from rcpu_lite.export import ExportError, to_gguf, unquantised_weights
from rcpu_lite.export import gguf_file as gguf_module
from rcpu_lite.loading import load_pruned
from rcpu_lite.output import checks
from rcpu_lite.prune import prune

PROMPT = [5, 17, 40, 99, 120, 7, 8, 250, 33, 64, 2, 180]
# rms(llama.cpp - transformers) / rms(transformers) over the prompt's logits, per type. f32 with an f32 KV cache
# differs only by float32 summation order. q8_0 rounds each weight to 1/127 of its block's largest (about 0.5 %
# of a weight's spread), compounded over 3 layers and the LM head: a few %. q4_k_m on rows of 64 (no whole
# 256-block, so llama.cpp falls back to 5-bit blocks of 32 for most matrices) is about 4x coarser.
TOLERANCE = {"f32": 1e-5, "q8_0": 0.08, "q4_k_m": 0.3}

CASES = {
    # name: (tiny spec, prune settings, the llama.cpp architecture expected)
    "llama-uniform": ("llama_mha", dict(ratio=0.25), "llama"),
    "llama-gqa-uniform": ("llama_gqa", dict(ratio=0.25), "llama"),
    "llama-gqa-tied-plain": ("llama_gqa_tied", dict(ratio=0.0), "llama"),
    "mistral-head_dim": ("mistral_gqa", dict(ratio=0.25), "llama"),
    "qwen2-heads-removed": ("qwen2_gqa", dict(ratio=0.25), "llama"),
    "qwen2-plain": ("qwen2_gqa", dict(ratio=0.0), "qwen2"),
    "qwen3-uniform": ("qwen3_gqa", dict(ratio=0.25), "qwen3"),
    "llama-gqa-per-layer": ("llama_gqa", dict(ratio=0.35, allocation="depth"), "deci"),
    "qwen2-per-layer": ("qwen2_gqa", dict(ratio=0.35, allocation="depth"), "deci"),
}


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, calib_file, tmp_path_factory):
    """Factory: the pruned output of a CASES entry (3 layers, byte-level tokenizer), built once."""
    root, made = tmp_path_factory.mktemp("pruned"), {}

    def make(case: str):
        if case not in made:
            spec, settings, _ = CASES[case]
            src = tiny_checkpoint(spec, num_hidden_layers=3, tokenizer="bytelevel")
            out = root / case
            prune(src, out, make_settings(calib_file, **settings))
            made[case] = out
        return made[case]

    return make


def transformers_logits(out, ids: list[int]) -> np.ndarray:
    model = load_pruned(out, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def relative_rms(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(((a - b) ** 2).mean() / (b**2).mean()))


def test_settings_names_exist():
    """CASES uses real settings fields (a typo would silently prune with the defaults)."""
    for _, settings, _ in CASES.values():
        make_settings("x", **settings)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("type_", ["f32", "q8_0", "q4_k_m"])
def test_llama_cpp_matches_transformers(pruned, tmp_path, case, type_):
    llama_cpp()
    out = pruned(case)
    result = to_gguf(out, tmp_path / "m.gguf", type=type_)
    assert result.architecture == CASES[case][2]
    expected = transformers_logits(out, PROMPT)
    got = logits(result.file, PROMPT)
    assert relative_rms(got, expected) < TOLERANCE[type_]
    if type_ == "f32":
        assert np.abs(got - expected).max() < 1e-3 * np.abs(expected).max()
        model = load_pruned(out, dtype=torch.float32)
        ids = model.generate(torch.tensor([PROMPT]), max_new_tokens=8, do_sample=False)[0, len(PROMPT) :].tolist()
        assert greedy(result.file, PROMPT, 8) == ids
    assert not list(tmp_path.glob("*.partial"))


def test_per_layer_widths_reach_llama_cpp(pruned, tmp_path):
    """Every layer has its own widths, and the deci file says so per layer (arrays)."""
    out = pruned("llama-gqa-per-layer")
    widths = [tuple(w.values()) for w in json.loads((out / "config.json").read_text())["layer_widths"]]
    assert len(set(widths)) == len(widths) == 3, widths
    file = to_gguf(out, tmp_path / "m.gguf", type="f32").file
    reader = gguf.GGUFReader(str(file))
    heads = reader.fields["deci.attention.head_count"]
    ffn = reader.fields["deci.feed_forward_length"]
    assert [int(heads.parts[i][0]) for i in heads.data] == [w[0] for w in widths]
    assert [int(ffn.parts[i][0]) for i in ffn.data] == [w[2] for w in widths]
    assert reader.fields["deci.attention.key_length"].parts[-1][0] == 8


def test_permute_rotary_matches_pairwise_rope():
    """Rotating HF's halves of a head equals rotating llama.cpp's pairs after the permutation (fp64)."""
    d, heads = 8, 3
    x = torch.randn(heads * d, dtype=torch.float64)
    theta = torch.rand(d // 2, dtype=torch.float64)
    cos, sin = torch.cos(theta), torch.sin(theta)
    halves = x.view(heads, 2, d // 2)
    hf = torch.stack((halves[:, 0] * cos - halves[:, 1] * sin, halves[:, 1] * cos + halves[:, 0] * sin), 1)
    pairs = gguf_module.permute_rotary(x, heads).view(heads, d // 2, 2)
    cpp = torch.stack((pairs[..., 0] * cos - pairs[..., 1] * sin, pairs[..., 1] * cos + pairs[..., 0] * sin), -1)
    assert torch.allclose(gguf_module.permute_rotary(hf.reshape(-1), heads), cpp.reshape(-1))


def test_q8_0_names_the_matrices_it_cannot_quantise(pruned, tmp_path):
    """Rows of 48 (3 heads x 16, 72 channels) are no multiple of 32: those stay F16, and the result lists them."""
    result = to_gguf(pruned("llama-uniform"), tmp_path / "m.gguf", type="q8_0")
    assert result.unquantised and all(n.endswith(("attn_output.weight", "ffn_down.weight")) for n in result.unquantised)
    assert unquantised_weights(result.file) == result.unquantised


# -- bad input: one line, exit 2, no file -------------------------------------------------------------------------


def run_cli(*args):
    return CliRunner().invoke(app, ["export", *map(str, args)])


def assert_refused(result, *words):
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.output
    for word in words:
        assert word in lines[0], lines[0]


def test_refuses_a_folder_that_is_no_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    assert_refused(run_cli(tmp_path / "notes", "--gguf", tmp_path / "m.gguf"), "config.json")
    assert not list(tmp_path.glob("m.gguf*"))


def test_refuses_a_family_it_does_not_export(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("gemma2_gqa", tokenizer="bytelevel")
    assert_refused(run_cli(src, "--gguf", tmp_path / "m.gguf"), "gemma2")
    assert not list(tmp_path.glob("m.gguf*"))


def test_refuses_per_layer_qwen3(tiny_checkpoint, calib_file, tmp_path):
    """deci has no q_norm / k_norm, and qwen3 reads layer 0's widths: no architecture holds it."""
    out = tmp_path / "out"
    prune(tiny_checkpoint("qwen3_gqa", tokenizer="bytelevel"), out, make_settings(calib_file, allocation="depth"))
    assert_refused(run_cli(out, "--gguf", tmp_path / "m.gguf"), "not qwen3", "layer 0")


def test_refuses_an_existing_file(pruned, tmp_path):
    target = tmp_path / "m.gguf"
    target.write_bytes(b"mine")
    assert_refused(run_cli(pruned("llama-uniform"), "--gguf", target), "--overwrite")
    assert target.read_bytes() == b"mine"
    assert run_cli(pruned("llama-uniform"), "--gguf", target, "--overwrite", "-q").exit_code == 0
    assert target.read_bytes()[:4] == b"GGUF"


def test_refuses_an_unknown_tokenizer(tiny_checkpoint, tmp_path):
    """The whitespace-split tiny tokenizer matches none of llama.cpp's splittings: refused, unless named."""
    src = tiny_checkpoint("llama_mha")
    assert_refused(run_cli(src, "--gguf", tmp_path / "m.gguf"), "--pre-tokenizer")
    assert run_cli(src, "--gguf", tmp_path / "m.gguf", "--pre-tokenizer", "gpt-2", "-q").exit_code == 0


def test_refuses_when_the_disk_is_too_small(pruned, tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checks.shutil, "disk_usage", lambda _: usage._replace(free=1000))
    assert_refused(run_cli(pruned("llama-uniform"), "--gguf", tmp_path / "m.gguf"), "free", "--gguf")
    assert not list(tmp_path.glob("m.gguf*"))


def test_a_disk_that_fills_up_leaves_no_file(pruned, tmp_path, monkeypatch):
    def full(self, tensor, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensor_data", full)
    assert_refused(run_cli(pruned("llama-uniform"), "--gguf", tmp_path / "m.gguf"), "filled up")
    assert not list(tmp_path.iterdir())


def test_k_quants_without_llama_cpp_say_how_to_get_it(pruned, tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_llama_cpp(name, *args, **kwargs):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_llama_cpp)
    assert_refused(run_cli(pruned("llama-uniform"), "--gguf", tmp_path / "m.gguf", "--type", "q4_k_m"), "pip install")
    assert not list(tmp_path.iterdir())


def test_unknown_type_is_refused(pruned, tmp_path):
    with pytest.raises(ExportError, match="q4_k_m"):
        to_gguf(pruned("llama-uniform"), tmp_path / "m.gguf", type="q3")


def test_tensors_equal_llama_cpps_own_converter(pruned, tmp_path):
    """A uniform Llama output: names, shapes, types and bytes of every tensor, and the architecture's keys, as
    llama.cpp's convert_hf_to_gguf.py writes them."""
    out = pruned("llama-gqa-uniform")
    reference = gguf.GGUFReader(str(convert_with_llama_cpp(out, tmp_path / "reference.gguf")))
    ours = gguf.GGUFReader(str(to_gguf(out, tmp_path / "ours.gguf", type="f32").file))
    theirs = {t.name: t for t in reference.tensors}
    assert sorted(theirs) == sorted(t.name for t in ours.tensors)
    for t in ours.tensors:
        r = theirs[t.name]
        assert (list(t.shape), t.tensor_type) == (list(r.shape), r.tensor_type), t.name
        assert np.array_equal(np.asarray(t.data), np.asarray(r.data)), t.name
    for key, field in reference.fields.items():
        if key.startswith("llama."):
            assert ours.fields[key].parts[-1].tolist() == field.parts[-1].tolist(), key


def with_rope_scaling(tiny_checkpoint, tmp_path, **scaling):
    """A copy of a tiny Llama whose config.json asks for a rope scaling (the weights unchanged)."""
    src = tmp_path / scaling["rope_type"]
    shutil.copytree(tiny_checkpoint("llama_gqa", num_hidden_layers=2, tokenizer="bytelevel"), src)
    config = json.loads((src / "config.json").read_text())
    config.pop("rope_parameters", None)
    config.update(rope_theta=10000.0, rope_scaling=scaling)
    (src / "config.json").write_text(json.dumps(config))
    return src


def test_llama3_rope_scaling_becomes_rope_freqs(tiny_checkpoint, tmp_path):
    """Llama 3.1's rope scaling: llama.cpp's rope_freqs (frequency divisors) reproduce transformers' scaled table.
    The tiny context makes it bite: original context 16, so every wavelength above 4 positions is rescaled."""
    scaling = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=16)
    src = with_rope_scaling(tiny_checkpoint, tmp_path, rope_type="llama3", **scaling)
    result = to_gguf(src, tmp_path / "m.gguf", type="f32")
    assert "rope_freqs.weight" in {t.name for t in gguf.GGUFReader(str(result.file)).tensors}
    assert relative_rms(logits(result.file, PROMPT), transformers_logits(src, PROMPT)) < TOLERANCE["f32"]


def test_other_rope_scalings_are_refused(tiny_checkpoint, tmp_path):
    src = with_rope_scaling(
        tiny_checkpoint, tmp_path, rope_type="yarn", factor=4.0, original_max_position_embeddings=16
    )
    assert_refused(run_cli(src, "--gguf", tmp_path / "m.gguf"), "yarn")
