"""Everything rcpu-lite knows about model architectures lives here.

Supported: decoder layers of the form RMSNorm -> attention (q, k, v, o) -> RMSNorm -> gated MLP
(gate, up, down), as in transformers' Llama, Mistral and Qwen2 classes. One decoder layer is
built at a time from its tensors with transformers' own layer class; the rotary tables and the
attention masks are computed once and passed to it explicitly.
"""
from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

# model_type -> the class-name prefix used in transformers.models.<model_type>.modeling_<model_type>
FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}

EMBED = "model.embed_tokens.weight"
# The two projections rcpu-lite prunes the inputs of and compensates, by short name.
PROJECTIONS = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class UnsupportedModel(ValueError):
    pass


def check_supported(config: PretrainedConfig) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; rcpu-lite prunes {', '.join(sorted(FAMILIES))} models"
        )


def head_weight_name(config: PretrainedConfig) -> str:
    """The output projection: lm_head, or the input embeddings when they are tied."""
    return EMBED if getattr(config, "tie_word_embeddings", False) else LM_HEAD


def final_tensor_names(config: PretrainedConfig) -> list[str]:
    """Tensors after the last decoder layer (a tied lm_head is not stored, as transformers saves it)."""
    return [FINAL_NORM] + ([] if head_weight_name(config) == EMBED else [LM_HEAD])


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


@dataclass(frozen=True)
class LayerShape:
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int


def layer_shape(config: PretrainedConfig) -> LayerShape:
    heads = config.num_attention_heads
    return LayerShape(
        hidden_size=config.hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(config, "num_key_value_heads", None) or heads,
        head_dim=getattr(config, "head_dim", None) or config.hidden_size // heads,
        intermediate_size=config.intermediate_size,
    )


@dataclass(frozen=True)
class UnitCosts:
    """Parameters one prunable unit holds, and a whole decoder layer (for parameter budgets)."""

    query_head: int  # its q_proj rows (and bias) and o_proj columns
    kv_head: int  # its k_proj and v_proj rows (and biases)
    channel: int  # its gate_proj and up_proj rows (and biases) and down_proj column
    layer: int  # every parameter of one dense decoder layer


def unit_costs(config: PretrainedConfig) -> UnitCosts:
    shape = layer_shape(config)
    h, d = shape.hidden_size, shape.head_dim
    qkv_bias, mlp_bias = has_qkv_bias(config), bool(getattr(config, "mlp_bias", False))
    return UnitCosts(query_head=2 * h * d + (d if qkv_bias else 0), kv_head=2 * h * d + (2 * d if qkv_bias else 0),
                     channel=3 * h + (2 if mlp_bias else 0),
                     layer=sum(s.numel() for s in layer_tensor_shapes(config).values()))


def layer_tensor_names(config: PretrainedConfig) -> list[str]:
    """Names, relative to the layer prefix, of every tensor one decoder layer owns."""
    names = [f"self_attn.{p}.weight" for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    names += [f"mlp.{p}.weight" for p in ("gate_proj", "up_proj", "down_proj")]
    names += ["input_layernorm.weight", "post_attention_layernorm.weight"]
    if has_qkv_bias(config):
        names += [f"self_attn.{p}.bias" for p in ("q_proj", "k_proj", "v_proj")]
    if getattr(config, "attention_bias", False):
        names.append("self_attn.o_proj.bias")
    if getattr(config, "mlp_bias", False):
        names += [f"mlp.{p}.bias" for p in ("gate_proj", "up_proj", "down_proj")]
    return names


def has_qkv_bias(config: PretrainedConfig) -> bool:
    # Qwen2 always has q/k/v biases; Llama and Mistral only with attention_bias.
    return config.model_type == "qwen2" or bool(getattr(config, "attention_bias", False))


def saved_model_type(config: PretrainedConfig, heads: int) -> str:
    """The model_type to write for a pruned layer stack with `heads` query heads.

    transformers 5.x's LlamaConfig refuses hidden_size % num_attention_heads != 0 even when head_dim
    is explicit (Llama-7B at 20 % keeps 26 of 32 heads). MistralConfig has no such check, and a
    Mistral without a sliding window computes exactly what a Llama without biases does, so such a
    Llama is written as a Mistral. A Llama with biases has no such twin and is refused up front.
    """
    if config.model_type != "llama" or config.hidden_size % heads == 0:
        return config.model_type
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedModel(
            f"keeping {heads} heads with hidden_size {config.hidden_size} gives a Llama config that transformers "
            f"refuses to load (it needs hidden_size % num_attention_heads == 0); choose a ratio that keeps a "
            f"divisor of {config.hidden_size} heads"
        )
    return "mistral"


def _modeling(config: PretrainedConfig, name: str):
    module = importlib.import_module(f"transformers.models.{config.model_type}.modeling_{config.model_type}")
    return getattr(module, FAMILIES[config.model_type] + name)


def compute_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of the config set up for layer-by-layer calibration: sdpa attention, no KV cache."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa"
    config.use_cache = False
    return config


def pruned_config(config: PretrainedConfig, heads: int, kv_heads: int, intermediate: int) -> PretrainedConfig:
    """The config of a layer with the given widths (head_dim stays explicit)."""
    shape = layer_shape(config)
    config = copy.deepcopy(config)
    config.head_dim = shape.head_dim
    config.num_attention_heads = heads
    config.num_key_value_heads = kv_heads
    config.intermediate_size = intermediate
    return config


def build_layer(config: PretrainedConfig, index: int, tensors: dict[str, torch.Tensor]) -> torch.nn.Module:
    """transformers' own decoder layer for `config`, holding exactly `tensors` (no copies).

    A compensating bias of o_proj or down_proj (FLAP) where the family's class has none is given a
    biased Linear of the same shape; every other module is the library's own.
    """
    with torch.device("meta"):
        layer = _modeling(config, "DecoderLayer")(config, index)
        for path in PROJECTIONS.values():
            linear = layer.get_submodule(path)
            if path + ".bias" in tensors and linear.bias is None:
                parent, child = path.rsplit(".", 1)
                setattr(layer.get_submodule(parent), child,
                        torch.nn.Linear(linear.in_features, linear.out_features, bias=True))
    layer.load_state_dict(tensors, strict=True, assign=True)
    return layer.eval().requires_grad_(False)


def projection(layer: torch.nn.Module, name: str) -> torch.nn.Linear:
    """o_proj or down_proj of a built decoder layer, by short name."""
    return layer.get_submodule(PROJECTIONS[name])


def layer_tensor_shapes(config: PretrainedConfig) -> dict[str, torch.Size]:
    """Shapes of one decoder layer's tensors for `config` (built on the meta device: no memory)."""
    with torch.device("meta"):
        layer = _modeling(config, "DecoderLayer")(config, 0)
    return {k: v.shape for k, v in layer.state_dict().items()}


@dataclass
class LayerInputs:
    """What every decoder layer needs besides the hidden states, computed once per batch size."""

    position_embeddings: tuple[torch.Tensor, torch.Tensor]
    masks: dict[str, torch.Tensor | None]

    def kwargs(self, config: PretrainedConfig, index: int, batch: int) -> dict:
        cos, sin = self.position_embeddings
        return {
            "position_embeddings": (cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
            "attention_mask": self.masks[attention_type(config, index)],
        }


def attention_type(config: PretrainedConfig, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def layer_inputs(config: PretrainedConfig, seqlen: int, device: torch.device, dtype: torch.dtype) -> LayerInputs:
    """Rotary tables and causal masks for windows of `seqlen` tokens starting at position 0."""
    rotary = _modeling(config, "RotaryEmbedding")(config).to(device)
    dummy = torch.zeros(1, seqlen, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seqlen, device=device).unsqueeze(0)
    cos, sin = rotary(dummy, positions)
    # The cache goes positionally: transformers 5.24 renamed `past_key_values` to `cache`.
    args = (config, dummy, None, None)  # config, inputs_embeds, attention_mask, no cache
    masks = {"full_attention": create_causal_mask(*args, position_ids=positions)}
    if getattr(config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(*args, position_ids=positions)
    return LayerInputs((cos, sin), masks)


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, inputs: LayerInputs, config, index: int) -> torch.Tensor:
    out = layer(hidden, **inputs.kwargs(config, index, hidden.shape[0]))
    return out[0] if isinstance(out, tuple) else out


def final_norm(config: PretrainedConfig, weight: torch.Tensor) -> torch.nn.Module:
    """The model's final RMSNorm holding `weight`; the LM head is then a plain matmul."""
    with torch.device("meta"):
        norm = _modeling(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": weight}, assign=True)
    return norm.eval().requires_grad_(False)
