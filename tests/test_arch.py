"""arch: the model_type written for pruned Llamas whose head count does not divide hidden_size."""
from __future__ import annotations

import pytest
from transformers import LlamaConfig, Qwen2Config

from rcpu_lite.arch import UnsupportedModel, saved_model_type


def llama(**kw) -> LlamaConfig:
    return LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, intermediate_size=11008,
                       num_hidden_layers=1, **kw)


def test_llama_keeps_its_type_when_heads_divide_hidden():
    assert saved_model_type(llama(), 16) == "llama"


def test_llama_7b_at_20_percent_is_written_as_mistral():
    assert saved_model_type(llama(), 26) == "mistral"  # 4096 % 26 != 0: LlamaConfig would refuse to load it


def test_llama_with_biases_and_awkward_heads_is_refused_before_work_starts():
    with pytest.raises(UnsupportedModel, match="26 heads"):
        saved_model_type(llama(attention_bias=True), 26)


def test_other_families_keep_their_type():
    cfg = Qwen2Config(hidden_size=64, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=1)
    assert saved_model_type(cfg, 6) == "qwen2"
