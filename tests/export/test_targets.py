"""Which llama.cpp architecture holds which output (export/targets.py), decided from the layout alone."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from rcpu_lite.export.layout import tensor_kind
from rcpu_lite.export.targets import ExportRefused, choose_target
from rcpu_lite.methods.allocation import LayerWidths

LINEARS = [f"{m}.weight" for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")]
LINEARS += [f"mlp.{m}.weight" for m in ("gate_proj", "up_proj", "down_proj")]
NORMS = ["input_layernorm.weight", "post_attention_layernorm.weight"]
QKV_BIAS = [f"self_attn.{m}.bias" for m in ("q_proj", "k_proj", "v_proj")]
QK_NORM = ["self_attn.q_norm.weight", "self_attn.k_norm.weight"]


def layout(model_type, widths, extra=(), head_dim=8, hidden=64):
    names = tuple(NORMS + LINEARS + list(extra))
    kinds = frozenset(tensor_kind(n) for n in names)
    return SimpleNamespace(
        model_type=model_type,
        widths=tuple(LayerWidths(*w) for w in widths),
        uniform=len(set(widths)) == 1,
        head_dim=head_dim,
        hidden_size=hidden,
        layer_tensor_kinds=kinds,
    )


@pytest.mark.parametrize(
    "model_type, widths, extra, arch",
    [
        ("llama", [(6, 6, 64)] * 2, [], "llama"),
        ("mistral", [(6, 2, 64)] * 2, [], "llama"),
        ("llama", [(6, 6, 64), (4, 4, 32)], [], "deci"),
        ("qwen2", [(8, 2, 64)] * 2, QKV_BIAS, "qwen2"),  # every query head kept: 8 x 8 = hidden
        ("qwen2", [(6, 2, 64)] * 2, QKV_BIAS, "llama"),  # heads removed: qwen2 sizes q as hidden x hidden
        ("qwen2", [(8, 2, 64)] * 2, QKV_BIAS + ["mlp.down_proj.bias"], "llama"),  # FLAP bias: qwen2 has none
        ("qwen2", [(8, 2, 64), (6, 2, 32)], QKV_BIAS, "deci"),
        ("qwen3", [(6, 2, 64)] * 2, QK_NORM, "qwen3"),
    ],
)
def test_choice(model_type, widths, extra, arch):
    assert choose_target(layout(model_type, widths, extra)).name == arch


@pytest.mark.parametrize(
    "model_type, widths, extra, words",
    [
        ("qwen3", [(6, 2, 64), (4, 2, 32)], QK_NORM, "layer 0's widths"),
        ("qwen3", [(6, 2, 64)] * 2, QK_NORM + ["self_attn.o_proj.bias"], "attn_output.bias"),
        ("gemma2", [(6, 2, 64)] * 2, [], "gemma2"),
        ("phi3", [(6, 2, 64)] * 2, [], "phi3"),
    ],
)
def test_refusal(model_type, widths, extra, words):
    with pytest.raises(ExportRefused, match=words):
        choose_target(layout(model_type, widths, extra))
