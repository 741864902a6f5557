"""arch: the model_type written for pruned models whose head count does not divide hidden_size; the families
of issue 12 (refusals, Qwen3 / Gemma 3's shared q/k norms, Gemma 3's per-layer-type rotary tables)."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen2Config

from rcpu_lite.families import arch
from rcpu_lite.families.arch import (
    UnsupportedModel,
    check_supported,
    compute_config,
    layer_inputs,
    layer_shape,
    layer_tensor_names,
    layer_tensor_shapes,
    saved_model_type,
)
from rcpu_lite.families.units import slice_tensor


def llama(**kw) -> LlamaConfig:
    return LlamaConfig(
        hidden_size=4096,
        num_attention_heads=32,
        num_key_value_heads=32,
        intermediate_size=11008,
        num_hidden_layers=1,
        **kw,
    )


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


# ---------------------------------------------------------------------------------------------
# Qwen3, Gemma 2, Gemma 3 (text)


def gemma2(**kw):
    from transformers import Gemma2Config

    return Gemma2Config(
        hidden_size=64,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=96,
        num_hidden_layers=2,
        **kw,
    )


def test_gemma_with_awkward_heads_has_no_stock_twin():
    # Gemma2Config (like LlamaConfig) refuses 64 % 6 != 0; choose_format then writes the remote-code format.
    assert saved_model_type(gemma2(), 4) == "gemma2"
    with pytest.raises(UnsupportedModel, match="6 heads"):
        saved_model_type(gemma2(), 6)


def test_multimodal_gemma3_is_refused_with_the_reason():
    from transformers import Gemma3Config

    with pytest.raises(UnsupportedModel, match="vision tower.*gemma3_text"):
        check_supported(Gemma3Config())


def test_bidirectional_gemma_is_refused():
    with pytest.raises(UnsupportedModel, match="use_bidirectional_attention"):
        check_supported(gemma2(use_bidirectional_attention=True))


def test_qwen3_and_gemma3_norms_are_per_head_dim_and_kept_whole():
    """q_norm / k_norm hold head_dim weights shared by all heads: slicing heads leaves them as they are."""
    from transformers import Gemma3TextConfig, Qwen3Config

    for config in (
        Qwen3Config(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            num_hidden_layers=1,
        ),
        Gemma3TextConfig(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            num_hidden_layers=1,
        ),
    ):
        shapes = layer_tensor_shapes(config)
        assert shapes["self_attn.q_norm.weight"] == shapes["self_attn.k_norm.weight"] == (16,)
        assert set(layer_tensor_names(config)) == set(shapes)
        norm = torch.randn(16)
        kept = slice_tensor(
            "self_attn.q_norm.weight",
            norm,
            layer_shape(config),
            torch.tensor([0, 3]),
            torch.tensor([0]),
            torch.arange(48),
        )
        assert torch.equal(kept, norm)


def test_gemma3_layer_inputs_give_each_layer_type_its_rotary_table():
    from transformers import Gemma3TextConfig
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RotaryEmbedding

    rope = {
        "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
        "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
    }
    config = compute_config(
        Gemma3TextConfig(
            hidden_size=64,
            num_attention_heads=8,
            num_key_value_heads=2,
            head_dim=16,
            intermediate_size=96,
            num_hidden_layers=2,
            sliding_window=4,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters=rope,
        )
    )
    inputs = layer_inputs(config, 12, torch.device("cpu"), torch.float32)
    rotary = Gemma3RotaryEmbedding(config)
    positions = torch.arange(12).unsqueeze(0)
    for index, layer_type in enumerate(config.layer_types):
        kwargs = inputs.kwargs(config, index, batch=1)
        want = rotary(torch.zeros(1, 12, 64), positions, layer_type)
        assert all(torch.equal(a, b) for a, b in zip(kwargs["position_embeddings"], want)), layer_type
        assert kwargs["attention_mask"] is inputs.masks[layer_type]
    assert not torch.equal(
        inputs.position_embeddings["sliding_attention"][0], inputs.position_embeddings["full_attention"][0]
    )


def test_every_family_is_one_table_entry_and_the_shipped_modeling_file_agrees():
    """The remote-code file ships beside the weights and imports nothing of rcpu_lite: its projection table
    must be the families' one."""
    from rcpu_lite.output import modeling_rcpu

    assert {flag: f"{parent}.{name}" for flag, (parent, name) in modeling_rcpu.BIASED.items()} == {
        short + "_bias": module for short, module in arch.PROJECTIONS.items()
    }
    for model_type, family in arch.FAMILIES.items():
        assert family.model_type == model_type
        assert set(dict(family.units.compensated)) == set(arch.PROJECTIONS)


def test_a_family_with_other_module_names_slices_by_its_own_unit_map():
    import torch

    from rcpu_lite.families.units import slice_tensor

    shape = arch.LayerShape(8, 2, 2, 4, 6)
    units = arch.UnitMap(
        query_rows=("attn.wq",),
        kv_rows=("attn.wk", "attn.wv"),
        channel_rows=("ffn.w1", "ffn.w3"),
        compensated=(("o_proj", "attn.wo"), ("down_proj", "ffn.w2")),
    )
    heads, channels = torch.tensor([1]), torch.tensor([0, 5])
    q = torch.arange(8 * 8.0).reshape(8, 8)
    assert torch.equal(slice_tensor("attn.wq.weight", q, shape, heads, heads, channels, units), q[4:8])
    w1 = torch.arange(6 * 8.0).reshape(6, 8)
    assert torch.equal(slice_tensor("ffn.w1.weight", w1, shape, heads, heads, channels, units), w1[[0, 5]])
    with pytest.raises(ValueError, match="compensated"):
        slice_tensor("ffn.w2.weight", w1, shape, heads, heads, channels, units)
