"""What an exporter needs to know of a checkpoint (pruned or not), read from its config.json and tensor index
without loading a weight: the family, each layer's widths and tensors, and the shared tensors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from transformers import PretrainedConfig

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths, dense_widths
from rcpu_lite.output import remote

# Hugging Face module path inside a decoder layer -> the tensor kind llama.cpp's loaders name (blk.N.<kind>).
LAYER_KINDS = {
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def tensor_kind(relative_name: str) -> str:
    """'self_attn.q_proj.bias' -> 'attn_q.bias'; a module llama.cpp has no name for keeps its own."""
    module, suffix = relative_name.rsplit(".", 1)
    return f"{LAYER_KINDS.get(module, module)}.{suffix}"


@dataclass(frozen=True)
class Layout:
    model_dir: Path
    reader: CheckpointReader  # the checkpoint's tensors, read one at a time
    model_type: str  # the base family (a per-layer-width output's base_model_type)
    config: PretrainedConfig  # the base family's config (global widths of the input)
    widths: tuple[LayerWidths, ...]
    layer_tensors: tuple[tuple[str, ...], ...]  # per layer, names relative to the layer prefix
    head_dim: int
    hidden_size: int
    tied: bool

    @property
    def uniform(self) -> bool:
        return len(set(self.widths)) == 1

    @property
    def layer_tensor_kinds(self) -> frozenset[str]:
        return frozenset(tensor_kind(n) for names in self.layer_tensors for n in names)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size


def read_layout(model_dir: str | Path) -> Layout:
    """The layout of the checkpoint in `model_dir`; CheckpointError / UnsupportedModel if it is none we read."""
    model_dir = Path(model_dir)
    reader = CheckpointReader(model_dir)  # refuses a folder without config.json or safetensors
    config, layer_configs = remote.layer_configs(model_dir)
    names = tuple(tuple(remote.layer_tensor_names(c)) for c in layer_configs)
    reader.require(
        [arch.EMBED, *arch.final_tensor_names(config)]
        + [arch.layer_prefix(i) + n for i, layer in enumerate(names) for n in layer]
    )
    shape = arch.layer_shape(layer_configs[0])
    return Layout(
        model_dir=model_dir,
        reader=reader,
        model_type=config.model_type,
        config=config,
        widths=tuple(dense_widths(arch.layer_shape(c)) for c in layer_configs),
        layer_tensors=names,
        head_dim=shape.head_dim,
        hidden_size=shape.hidden_size,
        tied=arch.head_weight_name(config) == arch.EMBED,
    )
