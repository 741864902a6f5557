"""tools/make_synthetic.py: a loadable, prunable checkpoint with a real tokenizer cut to the vocabulary."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rcpu_lite.models import resolve_model
from rcpu_lite.prune.run import prune
from rcpu_lite.settings import PruneSettings

TOOL = Path(__file__).resolve().parents[2] / "tools" / "make_synthetic.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("make_synthetic", TOOL)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_synthetic_checkpoint_loads_tokenizes_within_vocab_and_prunes(tool, tmp_path, monkeypatch):
    smol = resolve_model("smollm2-135m")  # the real tokenizer the tool cuts down
    monkeypatch.setitem(
        tool.SHAPES,
        "tiny",
        dict(
            tool.SHAPES["llama-7b"],
            hidden_size=64,
            intermediate_size=96,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=1000,
        ),
    )
    out = tool.make_synthetic("tiny", 3, tmp_path / "synthetic", tokenizer=smol)

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert model.dtype == torch.float16 and model.config.num_hidden_layers == 3
    assert len(list(out.glob("*.safetensors"))) == 3 + 2  # one shard per layer, plus embeddings and head

    tokenizer = AutoTokenizer.from_pretrained(out)
    text = "The quick brown fox jumps over the lazy dog. Llamas are pruned, one layer at a time."
    ids = tokenizer(text)["input_ids"]
    assert max(ids) < 1000 and tokenizer.decode(ids) == text  # byte-level BPE still covers any text
    assert len(ids) > len(AutoTokenizer.from_pretrained(smol)(text)["input_ids"])  # fewer merges, more tokens

    calib = tmp_path / "calib.txt"
    calib.write_text(text * 40)
    report = prune(
        out,
        tmp_path / "pruned",
        PruneSettings(ratio=0.25, calib=str(calib), nsamples=4, seqlen=16, device="cpu", multiple_of=1),
    )
    assert report["shape_after"]["num_attention_heads"] == 3


def test_real_shapes_are_the_published_ones(tool):
    assert tool.SHAPES["llama-7b"]["intermediate_size"] == 11008
    assert (tool.SHAPES["llama-3-8b"]["num_attention_heads"], tool.SHAPES["llama-3-8b"]["num_key_value_heads"]) == (
        32,
        8,
    )


def test_a_qwen2_fp32_shape_is_written_as_qwen2_with_biases_in_fp32(tool, tmp_path, monkeypatch):
    shape = dict(tool.SHAPES["qwen2-1.5b-fp32"], hidden_size=64, intermediate_size=96, vocab_size=1000)
    monkeypatch.setitem(tool.SHAPES, "tiny-qwen2", dict(shape, num_attention_heads=4, num_key_value_heads=2))
    out = tool.make_synthetic("tiny-qwen2", 2, tmp_path / "qwen2", tokenizer=resolve_model("smollm2-135m"))
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(model).__name__ == "Qwen2ForCausalLM" and model.dtype == torch.float32
    assert model.model.layers[0].self_attn.k_proj.bias.abs().sum() > 0
