"""Llama, Mistral, Qwen2, Qwen3, Gemma 2 and Gemma 3 (text) models whose decoder layers have different widths
(written by rcpu-lite).

Load with `AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)` (config.json's `auto_map`
names this file, copied beside the weights), or with `rcpu_lite.load_pruned(path)`. config.json's `model_type` is
the base family's, so the tokenizer and AutoConfig load with no remote code and no question; without
trust_remote_code, AutoModelForCausalLM builds the stock class and refuses the per-layer shapes (size mismatch).

config.json is the base family's own config (`base_model_type`: llama, mistral, qwen2, qwen3, gemma2 or
gemma3_text; `head_dim`
explicit; `num_attention_heads`, `num_key_value_heads` and `intermediate_size` those of the model before
pruning) plus:

- `layer_widths`: per decoder layer, `{"heads": kept query heads, "kv_heads": kept KV heads,
  "channels": kept MLP channels}`;
- `o_proj_bias`, `down_proj_bias`: every layer's o_proj / down_proj has a bias (a compensating bias, as
  FLAP adds), whether or not the family's class has one. Other biases are the family's own.

Every decoder layer is the family's own class, built from a copy of the config with that layer's widths;
everything else (embeddings, rotary tables, masks, sliding window, tied embeddings, generation) is the
family's own code. The KV cache is the default dynamic cache (a static cache sized from the global widths
would not fit). Self-contained on purpose: it imports torch and transformers only.
"""
import copy

from torch import nn
from transformers import (Gemma2Config, Gemma2ForCausalLM, Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig,
                          LlamaForCausalLM, MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM,
                          Qwen3Config, Qwen3ForCausalLM)
from transformers.models.gemma2.modeling_gemma2 import Gemma2DecoderLayer
from transformers.models.gemma3.modeling_gemma3 import Gemma3DecoderLayer
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.mistral.modeling_mistral import MistralDecoderLayer
from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer
from transformers.models.qwen3.modeling_qwen3 import Qwen3DecoderLayer

MODEL_TYPE = "rcpu_pruned"  # the model_type of outputs written before it became the base family's (still read)
# The keys this format adds to the base family's config.json.
OWN_KEYS = ("base_model_type", "layer_widths", "o_proj_bias", "down_proj_bias")
# flag -> (submodule, projection) of a decoder layer
BIASED = {"o_proj_bias": ("self_attn", "o_proj"), "down_proj_bias": ("mlp", "down_proj")}


class _PrunedConfig:
    """What the config classes add to their family's config (the fields are declared in each)."""

    base_class: type  # the family's config class
    _auto_class = "AutoConfig"  # save_pretrained copies this file and keeps auto_map, however the model was loaded

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.base_model_type != self.base_class.model_type:
            raise ValueError(f"{type(self).__name__} is for base_model_type {self.base_class.model_type!r}, "
                             f"config.json says {self.base_model_type!r}")
        if self.layer_widths is not None:
            if len(self.layer_widths) != self.num_hidden_layers:
                raise ValueError(f"layer_widths has {len(self.layer_widths)} entries for "
                                 f"{self.num_hidden_layers} layers")
            for i in range(self.num_hidden_layers):
                heads, kv_heads, channels = self.widths(i)
                if min(heads, kv_heads, channels) < 1 or heads % kv_heads:
                    raise ValueError(f"layer {i}: {heads} heads, {kv_heads} KV heads, {channels} channels is not a "
                                     f"valid layer (at least one of each, heads a multiple of KV heads)")

    def widths(self, index: int) -> tuple[int, int, int]:
        """Layer `index`'s kept query heads, KV heads and MLP channels."""
        if self.layer_widths is None:
            return self.num_attention_heads, self.num_key_value_heads, self.intermediate_size
        w = self.layer_widths[index]
        return int(w["heads"]), int(w["kv_heads"]), int(w["channels"])

    def layer_config(self, index: int):
        """A copy of this config with layer `index`'s widths (what the stock layer reads at construction).

        Only the global config must pass the family's checks: LlamaConfig refuses a head count that does not
        divide hidden_size, which a single layer may well keep.
        """
        config = copy.deepcopy(self)
        config.num_attention_heads, config.num_key_value_heads, config.intermediate_size = self.widths(index)
        return config

    def base_config(self):
        """The same model as the family's own config class would describe it (the global widths)."""
        fields = self.to_dict()
        for key in (*OWN_KEYS, "model_type", "auto_map", "architectures"):
            fields.pop(key, None)
        return self.base_class.from_dict(fields)


class PrunedLlamaConfig(_PrunedConfig, LlamaConfig):
    model_type = "llama"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = LlamaConfig
    base_model_type: str = "llama"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class PrunedMistralConfig(_PrunedConfig, MistralConfig):
    model_type = "mistral"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = MistralConfig
    base_model_type: str = "mistral"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class PrunedQwen2Config(_PrunedConfig, Qwen2Config):
    model_type = "qwen2"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = Qwen2Config
    base_model_type: str = "qwen2"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class PrunedQwen3Config(_PrunedConfig, Qwen3Config):
    model_type = "qwen3"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = Qwen3Config
    base_model_type: str = "qwen3"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class PrunedGemma2Config(_PrunedConfig, Gemma2Config):
    model_type = "gemma2"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = Gemma2Config
    base_model_type: str = "gemma2"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class PrunedGemma3Config(_PrunedConfig, Gemma3TextConfig):
    model_type = "gemma3_text"  # the base family's: tokenizers and AutoConfig load without remote code
    base_class = Gemma3TextConfig
    base_model_type: str = "gemma3_text"
    layer_widths: list | None = None
    o_proj_bias: bool = False
    down_proj_bias: bool = False


class _PrunedForCausalLM:
    """The family's ForCausalLM with its decoder layers rebuilt at their own widths."""

    layer_class: type  # the family's decoder layer
    _auto_class = "AutoModelForCausalLM"

    def __init__(self, config):
        # The family's model at the global widths first (on the meta device under from_pretrained: no memory);
        # its decoder layers are then replaced.
        super().__init__(config)
        self.model.layers = nn.ModuleList(self._layer(config, i) for i in range(config.num_hidden_layers))
        self.post_init()

    def _layer(self, config, index: int) -> nn.Module:
        layer = self.layer_class(config.layer_config(index), index)
        for flag, (parent, name) in BIASED.items():
            linear = getattr(getattr(layer, parent), name)
            if getattr(config, flag) and linear.bias is None:
                setattr(getattr(layer, parent), name, nn.Linear(linear.in_features, linear.out_features, bias=True))
        return layer

    def set_attn_implementation(self, attn_implementation):
        # The layers hold their own config copies: keep them on the model's attention implementation.
        super().set_attn_implementation(attn_implementation)
        for layer in self.model.layers:
            layer.self_attn.config._attn_implementation_internal = self.config._attn_implementation_internal


class PrunedLlamaForCausalLM(_PrunedForCausalLM, LlamaForCausalLM):
    config_class = PrunedLlamaConfig
    layer_class = LlamaDecoderLayer


class PrunedMistralForCausalLM(_PrunedForCausalLM, MistralForCausalLM):
    config_class = PrunedMistralConfig
    layer_class = MistralDecoderLayer


class PrunedQwen2ForCausalLM(_PrunedForCausalLM, Qwen2ForCausalLM):
    config_class = PrunedQwen2Config
    layer_class = Qwen2DecoderLayer


class PrunedQwen3ForCausalLM(_PrunedForCausalLM, Qwen3ForCausalLM):
    config_class = PrunedQwen3Config
    layer_class = Qwen3DecoderLayer


class PrunedGemma2ForCausalLM(_PrunedForCausalLM, Gemma2ForCausalLM):
    config_class = PrunedGemma2Config
    layer_class = Gemma2DecoderLayer


class PrunedGemma3ForCausalLM(_PrunedForCausalLM, Gemma3ForCausalLM):
    config_class = PrunedGemma3Config
    layer_class = Gemma3DecoderLayer


# base_model_type -> (config class, model class)
CLASSES = {
    "llama": (PrunedLlamaConfig, PrunedLlamaForCausalLM),
    "mistral": (PrunedMistralConfig, PrunedMistralForCausalLM),
    "qwen2": (PrunedQwen2Config, PrunedQwen2ForCausalLM),
    "qwen3": (PrunedQwen3Config, PrunedQwen3ForCausalLM),
    "gemma2": (PrunedGemma2Config, PrunedGemma2ForCausalLM),
    "gemma3_text": (PrunedGemma3Config, PrunedGemma3ForCausalLM),
}
