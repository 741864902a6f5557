"""Everything rcpu-lite knows about model architectures lives here.

Supported: decoder layers of the form RMSNorm -> attention (q, k, v, o) -> RMSNorm -> gated MLP
(gate, up, down), as in transformers' Llama, Mistral, Qwen2 and Qwen3 classes, and Gemma 2 / Gemma 3
(text) with their extra norms around attention and MLP. One decoder layer is built at a time from its
tensors with transformers' own layer class; the rotary tables and the attention masks are computed
once and passed to it explicitly (per layer type where the family has several).

What a family needs beyond Llama, each in one place below:
- Qwen3: q_norm / k_norm (per head_dim, shared by every head: nothing to slice); layer_tensor_names.
- Gemma 2 / 3: the embeddings are scaled by sqrt(hidden_size) in the model's forward (embed);
  sliding-window layers alternate with global ones (layer_inputs, LayerInputs.kwargs); lm_head logits are
  soft-capped by final_logit_softcapping (lm_logits); Gemma 2's attention soft-caps its scores, which
  sdpa cannot, so its layers run eager (compute_config); Gemma 3 has one rotary table per layer type
  (local layers: rope_local_base_freq, in config.rope_parameters["sliding_attention"]) (layer_inputs).
  Gemma's RMSNorm scales by (1 + weight): the family's own norm class does it (build_layer, final_norm).
"""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from transformers import PretrainedConfig
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask


@dataclass(frozen=True)
class UnitMap:
    """Which tensors a prunable unit owns, by module path under the layer prefix.

    A query head owns its rows (and bias rows) of `query_rows`; a key/value head its rows of `kv_rows`; an MLP
    channel its row of each of `channel_rows`; and the units are the input columns of the `compensated`
    projections (short name -> module), whose outputs are repaired.
    """

    query_rows: tuple[str, ...] = ("self_attn.q_proj",)
    kv_rows: tuple[str, ...] = ("self_attn.k_proj", "self_attn.v_proj")
    channel_rows: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    compensated: tuple[tuple[str, str], ...] = (("o_proj", "self_attn.o_proj"), ("down_proj", "mlp.down_proj"))


LLAMA_UNITS = UnitMap()


@dataclass(frozen=True)
class Family:
    """Everything rcpu-lite needs to know about one architecture, as data."""

    model_type: str
    class_prefix: str  # transformers.models.<module>.modeling_<module>.<prefix>DecoderLayer, ...
    module: str
    units: UnitMap = LLAMA_UNITS
    qkv_bias_always: bool = False  # q/k/v biases without an attention_bias flag (Qwen2)
    scaled_embeddings: bool = False  # the model forward multiplies the embeddings by sqrt(hidden_size) (Gemma)
    rope_per_layer_type: bool = False  # one rotary table per layer type (Gemma 3: local vs global theta)
    heads_must_divide_hidden: bool = False  # the config class refuses hidden_size % num_attention_heads != 0


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "Llama", "llama", heads_must_divide_hidden=True),
        Family("mistral", "Mistral", "mistral"),
        Family("qwen2", "Qwen2", "qwen2", qkv_bias_always=True),
        Family("qwen3", "Qwen3", "qwen3"),
        Family("gemma2", "Gemma2", "gemma2", scaled_embeddings=True, heads_must_divide_hidden=True),
        Family(
            "gemma3_text",
            "Gemma3",
            "gemma3",
            scaled_embeddings=True,
            rope_per_layer_type=True,
            heads_must_divide_hidden=True,
        ),
    )
}
# model_type -> why it is refused, for families close to a supported one.
REFUSED = {
    "gemma3": "it is Gemma 3 with a vision tower (Gemma3ForConditionalGeneration); rcpu-lite prunes the text-only "
    "Gemma 3 checkpoints (model_type gemma3_text, Gemma3ForCausalLM, such as gemma-3-1b)",
}

EMBED = "model.embed_tokens.weight"
# The two projections rcpu-lite prunes the inputs of and compensates, by short name (every supported family
# shares the Llama unit map; a family with other module names gives its own UnitMap).
PROJECTIONS = dict(LLAMA_UNITS.compensated)
FINAL_NORM = "model.norm.weight"
LM_HEAD = "lm_head.weight"


class UnsupportedModel(ValueError):
    pass


def check_supported(config: PretrainedConfig) -> None:
    model_type = getattr(config, "model_type", None)
    if model_type in REFUSED:
        raise UnsupportedModel(f"model_type {model_type!r} is not supported: {REFUSED[model_type]}")
    if model_type not in FAMILIES:
        raise UnsupportedModel(
            f"model_type {model_type!r} is not supported; rcpu-lite prunes {', '.join(sorted(FAMILIES))} models"
        )
    if getattr(config, "use_bidirectional_attention", False):
        # EmbeddingGemma-style encoders: the masks layer_inputs builds are causal.
        raise UnsupportedModel(
            f"model_type {model_type!r} with use_bidirectional_attention is not supported; "
            f"rcpu-lite prunes causal language models"
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


# Published model shapes by name (config.json field names): what tools/make_synthetic.py writes and what
# memory_plan's tables plan for. Llama-2-13B is multi-head (40/40); the 8B and 70B models are GQA (x/8).
# model_type and dtype, where given, say what the checkpoint is beyond the shape (default: llama, fp16).
NAMED_SHAPES = {
    "llama-7b": dict(
        hidden_size=4096,
        intermediate_size=11008,
        num_attention_heads=32,
        num_key_value_heads=32,
        num_hidden_layers=32,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=2048,
    ),
    "llama-2-13b": dict(
        hidden_size=5120,
        intermediate_size=13824,
        num_attention_heads=40,
        num_key_value_heads=40,
        num_hidden_layers=40,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "llama-3-8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_attention_heads=32,
        num_key_value_heads=8,
        num_hidden_layers=32,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    "llama-2-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        num_hidden_layers=80,
        vocab_size=32000,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    "llama-3-70b": dict(
        hidden_size=8192,
        intermediate_size=28672,
        num_attention_heads=64,
        num_key_value_heads=8,
        num_hidden_layers=80,
        vocab_size=128256,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    # Qwen2-1.5B as it is often stored: fp32, q/k/v biases, GQA 12/2, an untied head over a 152k vocabulary
    # (0.93 GB each in fp32: more than a decoder layer's 0.23 GB)
    "qwen2-1.5b-fp32": dict(
        hidden_size=1536,
        intermediate_size=8960,
        num_attention_heads=12,
        num_key_value_heads=2,
        num_hidden_layers=28,
        vocab_size=151936,
        rope_theta=1000000.0,
        max_position_embeddings=32768,
        model_type="qwen2",
        dtype="float32",
    ),
}


def named_layer_shape(name: str) -> LayerShape:
    """The LayerShape of a NAMED_SHAPES entry."""
    if name not in NAMED_SHAPES:
        raise ValueError(f"unknown shape {name!r}; known: {', '.join(NAMED_SHAPES)}")
    return layer_shape(SimpleNamespace(**NAMED_SHAPES[name]))


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
    return UnitCosts(
        query_head=2 * h * d + (d if qkv_bias else 0),
        kv_head=2 * h * d + (2 * d if qkv_bias else 0),
        channel=3 * h + (2 if mlp_bias else 0),
        layer=sum(s.numel() for s in layer_tensor_shapes(config).values()),
    )


def layer_tensor_names(config: PretrainedConfig) -> list[str]:
    """Names, relative to the layer prefix, of every tensor one decoder layer owns: those of the family's own
    layer class (the biases its config flags, Gemma's four norms, Qwen3 / Gemma 3's q_norm and k_norm)."""
    return list(layer_tensor_shapes(config))


def has_qkv_bias(config: PretrainedConfig) -> bool:
    # Qwen2 always has q/k/v biases; the other families only with attention_bias.
    return FAMILIES[config.model_type].qkv_bias_always or bool(getattr(config, "attention_bias", False))


def saved_model_type(config: PretrainedConfig, heads: int) -> str:
    """The model_type to write for a pruned layer stack with `heads` query heads.

    transformers 5.x's LlamaConfig refuses hidden_size % num_attention_heads != 0 even when head_dim
    is explicit (Llama-7B at 20 % keeps 26 of 32 heads). MistralConfig has no such check, and a
    Mistral without a sliding window computes exactly what a Llama without biases does, so such a
    Llama is written as a Mistral. A Llama with biases has no such twin and is refused up front, and
    so are Gemma 2 / 3, whose configs check the same and have no twin (output.choose_format then
    writes the remote-code format, whose global config keeps the input's widths).
    """
    if not family(config).heads_must_divide_hidden or config.hidden_size % heads == 0:
        return config.model_type
    if config.model_type != "llama":
        raise UnsupportedModel(
            f"keeping {heads} heads with hidden_size {config.hidden_size} gives a {config.model_type} config that "
            f"transformers refuses to load (it needs hidden_size % num_attention_heads == 0)"
        )
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise UnsupportedModel(
            f"keeping {heads} heads with hidden_size {config.hidden_size} gives a Llama config that transformers "
            f"refuses to load (it needs hidden_size % num_attention_heads == 0); choose a ratio that keeps a "
            f"divisor of {config.hidden_size} heads"
        )
    return "mistral"


def family(config: PretrainedConfig) -> Family:
    return FAMILIES[config.model_type]


def _modeling(config: PretrainedConfig, name: str):
    f = family(config)
    module = importlib.import_module(f"transformers.models.{f.module}.modeling_{f.module}")
    return getattr(module, f.class_prefix + name)


def compute_config(config: PretrainedConfig) -> PretrainedConfig:
    """A copy of the config set up for layer-by-layer calibration: sdpa attention (eager where the family's
    classes refuse sdpa: Gemma 2, whose attention soft-caps its scores), no KV cache."""
    config = copy.deepcopy(config)
    config._attn_implementation = "sdpa" if _modeling(config, "PreTrainedModel")._supports_sdpa else "eager"
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
                setattr(
                    layer.get_submodule(parent),
                    child,
                    torch.nn.Linear(linear.in_features, linear.out_features, bias=True),
                )
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
    """What every decoder layer needs besides the hidden states, computed once per batch size.

    Both are keyed by layer type (attention_type): each layer gets its type's mask and rotary table.
    The families with one rotary table give every layer type the same one.
    """

    position_embeddings: dict[str, tuple[torch.Tensor, torch.Tensor]]
    masks: dict[str, torch.Tensor | None]

    def kwargs(self, config: PretrainedConfig, index: int, batch: int) -> dict:
        layer_type = attention_type(config, index)
        cos, sin = self.position_embeddings[layer_type]
        return {
            "position_embeddings": (cos.expand(batch, -1, -1), sin.expand(batch, -1, -1)),
            "attention_mask": self.masks[layer_type],
        }

    def map(self, fn) -> "LayerInputs":
        """The same inputs with `fn` applied to every tensor (a mask may be None)."""
        return LayerInputs(
            {k: (fn(cos), fn(sin)) for k, (cos, sin) in self.position_embeddings.items()},
            {k: fn(m) for k, m in self.masks.items()},
        )


def attention_type(config: PretrainedConfig, index: int) -> str:
    layer_types = getattr(config, "layer_types", None)
    if layer_types:
        return layer_types[index]
    return "sliding_attention" if getattr(config, "sliding_window", None) else "full_attention"


def layer_inputs(config: PretrainedConfig, seqlen: int, device: torch.device, dtype: torch.dtype) -> LayerInputs:
    """Rotary tables and causal masks for windows of `seqlen` tokens starting at position 0, per layer type."""
    rotary = _modeling(config, "RotaryEmbedding")(config).to(device)
    dummy = torch.zeros(1, seqlen, config.hidden_size, device=device, dtype=dtype)
    positions = torch.arange(seqlen, device=device).unsqueeze(0)
    # The cache goes positionally: transformers 5.24 renamed `past_key_values` to `cache`.
    args = (config, dummy, None, None)  # config, inputs_embeds, attention_mask, no cache
    masks = {"full_attention": create_causal_mask(*args, position_ids=positions)}
    if getattr(config, "sliding_window", None):
        masks["sliding_attention"] = create_sliding_window_causal_mask(*args, position_ids=positions)
    layer_types = {attention_type(config, i) for i in range(config.num_hidden_layers)}
    if layer_types - set(masks):  # chunked attention, or sliding layers without a sliding_window
        raise UnsupportedModel(
            f"layer types {sorted(layer_types - set(masks))} in config.layer_types are not "
            f"supported; rcpu-lite runs full_attention and sliding_attention layers"
        )
    if family(config).rope_per_layer_type:  # the rotary module holds one table per type in layer_types
        tables = {t: rotary(dummy, positions, t) for t in layer_types}
    else:
        shared = rotary(dummy, positions)
        tables = {t: shared for t in masks}
    return LayerInputs(tables, masks)


def run_layer(layer: torch.nn.Module, hidden: torch.Tensor, inputs: LayerInputs, config, index: int) -> torch.Tensor:
    out = layer(hidden, **inputs.kwargs(config, index, hidden.shape[0]))
    return out[0] if isinstance(out, tuple) else out


def embed(config: PretrainedConfig, weight: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The fp32 hidden states entering the first decoder layer for token `ids`.

    Gemma's model forward scales the embeddings by sqrt(hidden_size), in the weight's dtype (as transformers
    does: its bf16 scale is rounded); the stored weight itself is not scaled.
    """
    rows = weight[ids]
    if family(config).scaled_embeddings:
        rows = rows * torch.tensor(config.hidden_size**0.5, dtype=rows.dtype)
    return rows.to(dtype=torch.float32)


def lm_logits(config: PretrainedConfig, normed: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
    """Logits from final-norm outputs and the LM head weight, soft-capped where the family does (Gemma)."""
    logits = normed @ head.T
    cap = getattr(config, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def final_norm(config: PretrainedConfig, weight: torch.Tensor) -> torch.nn.Module:
    """The model's final RMSNorm holding `weight`; the LM head is then a plain matmul."""
    with torch.device("meta"):
        norm = _modeling(config, "RMSNorm")(config.hidden_size, eps=config.rms_norm_eps)
    norm.load_state_dict({"weight": weight}, assign=True)
    return norm.eval().requires_grad_(False)
