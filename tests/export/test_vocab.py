"""Identifying how a tokenizer splits text, as llama.cpp names it (tokenizer.ggml.pre)."""

from __future__ import annotations

import json

import gguf
import pytest

from rcpu_lite.export import vocab
from rcpu_lite.models import resolve_model


def byte_level(use_regex: bool = True) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


@pytest.mark.parametrize(
    "pre_tokenizer, name",
    [
        (byte_level(), "gpt-2"),
        (
            {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True}, byte_level()]},
            "smollm",
        ),
        ({"type": "Sequence", "pretokenizers": [split(vocab._LLAMA3_SPLIT), byte_level(False)]}, "llama-bpe"),
        ({"type": "Sequence", "pretokenizers": [split(vocab._QWEN2_SPLIT), byte_level(False)]}, "qwen2"),
        ({"type": "Sequence", "pretokenizers": [split(r"\p{N}{1,2}"), byte_level(False)]}, None),
        ({"type": "Whitespace"}, None),
    ],
)
def test_detect_pre_tokenizer(pre_tokenizer, name):
    assert vocab.detect_pre_tokenizer({"pre_tokenizer": pre_tokenizer}) == name


def test_the_two_regexes_differ_only_in_digit_runs():
    """Llama 3 keeps runs of up to three digits together, Qwen2 splits every digit: the one difference."""
    assert vocab._LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}") == vocab._QWEN2_SPLIT


def test_smollm2_copy_is_gpt2_split_and_padded_to_the_embedding():
    """The SmolLM2 copy that transformers rebuilt from the packaged GGUF splits as GPT-2 (its Digits step is gone),
    and its 49,152 tokens fill the embedding exactly; special tokens are CONTROL."""
    path = resolve_model("smollm2-135m")
    data = json.loads((path / "tokenizer.json").read_text())
    assert vocab.detect_pre_tokenizer(data) == "gpt-2"
    v = vocab.read_vocabulary(path, 49152)
    assert (v.model, v.pre, len(v.tokens)) == ("gpt2", "gpt-2", 49152)
    assert v.tokens[0] == b"<|endoftext|>" and v.types[0] == gguf.TokenType.CONTROL
    assert v.types[1000] == gguf.TokenType.NORMAL


def test_padding_and_too_many_tokens(tiny_checkpoint):
    src = tiny_checkpoint("llama_mha", tokenizer="bytelevel")  # 300 tokens, 320 embedding rows
    v = vocab.read_vocabulary(src, 320)
    assert len(v.tokens) == 320 and v.tokens[-1] == b"[PAD319]" and v.types[-1] == gguf.TokenType.UNUSED
    with pytest.raises(vocab.TokenizerError, match="300 tokens"):
        vocab.read_vocabulary(src, 299)
