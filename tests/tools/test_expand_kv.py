"""tools/expand_kv.py: a GQA checkpoint becomes a multi-head one with the same logits (tiny models only)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rcpu_lite.families import arch

ROOT = Path(__file__).resolve().parents[2]
TOOL = ROOT / "tools" / "expand_kv.py"
IDS = torch.tensor([[1, 5, 17, 42, 99, 250, 3, 7, 64, 128, 200, 11, 300, 2, 31, 8]])


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("expand_kv", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


def tensor_dtypes(path: Path) -> dict[str, torch.dtype]:
    out = {}
    for file in path.glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            out.update({k: f.get_tensor(k).dtype for k in f.keys()})
    return out


@pytest.mark.parametrize("name", ["llama_gqa", "llama_gqa_tied", "qwen2_gqa", "mistral_gqa"])
def test_expanded_checkpoint_is_multi_head_with_the_same_logits(tool, tiny_checkpoint, tmp_path, name):
    src = tiny_checkpoint(name)
    out = tool.expand_kv(src, tmp_path / "mha")
    assert out == tmp_path / "mha"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha"]  # no temporary folder left beside it

    dense, expanded = load(src), load(out)
    cfg = expanded.config
    assert cfg.num_key_value_heads == cfg.num_attention_heads == dense.config.num_attention_heads
    assert dense.config.num_key_value_heads < cfg.num_attention_heads
    config_json = json.loads((out / "config.json").read_text())
    head_dim = arch.layer_shape(dense.config).head_dim
    assert config_json["head_dim"] == head_dim  # explicit, even where the input left it out
    assert (out / "tokenizer.json").is_file() and (out / "tokenizer_config.json").is_file()
    k_rows = cfg.num_attention_heads * head_dim
    layer = expanded.model.layers[0].self_attn
    assert layer.k_proj.weight.shape[0] == layer.v_proj.weight.shape[0] == k_rows
    if name.startswith("qwen2"):
        assert layer.k_proj.bias.shape == layer.v_proj.bias.shape == (k_rows,)
    with torch.no_grad():
        a, b = dense(IDS).logits, expanded(IDS).logits
    assert (a - b).abs().max().item() <= 1e-5


def test_dtypes_are_kept(tool, tiny_checkpoint, tmp_path):
    bf16 = tmp_path / "bf16"
    src = tiny_checkpoint("qwen2_gqa")
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.bfloat16).save_pretrained(bf16)
    out = tool.expand_kv(bf16, tmp_path / "mha")
    before, after = tensor_dtypes(bf16), tensor_dtypes(out)
    assert set(before.values()) == {torch.bfloat16}
    assert after == before


def test_repeated_rows_follow_transformers_pairing_of_query_and_kv_heads(tool):
    from transformers.models.llama.modeling_llama import repeat_kv

    kv_heads, group, head_dim, hidden, seq = 3, 4, 2, 5, 6
    weight, inputs = torch.randn(kv_heads * head_dim, hidden), torch.randn(1, seq, hidden)
    direct = (inputs @ tool.repeat_kv_rows(weight, kv_heads, group).T).view(1, seq, kv_heads * group, head_dim)
    expected = repeat_kv((inputs @ weight.T).view(1, seq, kv_heads, head_dim).transpose(1, 2), group)
    torch.testing.assert_close(direct.transpose(1, 2), expected)  # the same numbers up to matmul rounding
    bias = torch.arange(kv_heads * head_dim, dtype=torch.float32)
    assert tool.repeat_kv_rows(bias, kv_heads, group).view(kv_heads * group, head_dim)[:, 0].tolist() == [
        0,
        0,
        0,
        0,
        2,
        2,
        2,
        2,
        4,
        4,
        4,
        4,
    ]


def test_multi_head_input_is_refused_with_one_line_and_exit_2(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("llama_mha")
    out = tmp_path / "mha"
    result = subprocess.run([sys.executable, str(TOOL), str(src), "--out", str(out)], capture_output=True, text=True)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "already has multi-head attention" in lines[0], result.stderr
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_existing_out_is_refused_unless_overwrite(tool, tiny_checkpoint, tmp_path, capsys):
    src = tiny_checkpoint("llama_gqa")
    out = tmp_path / "mha"
    out.mkdir()
    (out / "keep.txt").write_text("not ours")
    with pytest.raises(SystemExit) as exit_info:
        tool.main([str(src), "--out", str(out)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists; pass --overwrite" in err[0]
    assert (out / "keep.txt").read_text() == "not ours"

    tool.main([str(src), "--out", str(out), "--overwrite"])
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mha"]  # the replaced folder is gone too
    assert load(out).config.num_key_value_heads == 8


def test_out_may_not_be_the_input(tool, tiny_checkpoint):
    src = tiny_checkpoint("llama_gqa")
    with pytest.raises(ValueError, match="input checkpoint"):
        tool.expand_kv(src, src, overwrite=True)


def test_a_crash_leaves_nothing_under_out(tool, tiny_checkpoint, tmp_path, monkeypatch):
    src = tiny_checkpoint("llama_gqa")
    calls = []

    def fail_on_second_layer(tensor, kv_heads, group):
        calls.append(1)
        if len(calls) > 2:  # k and v of layer 0 pass, layer 1 fails
            raise RuntimeError("simulated crash")
        return original(tensor, kv_heads, group)

    original = tool.repeat_kv_rows
    monkeypatch.setattr(tool, "repeat_kv_rows", fail_on_second_layer)
    with pytest.raises(RuntimeError, match="simulated crash"):
        tool.expand_kv(src, tmp_path / "mha")
    assert list(tmp_path.iterdir()) == []
