"""Builds rcpu-lite remote-code outputs by hand (the reference the tests check the package against)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import AutoConfig

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.output import remote
from rcpu_lite.output.writer import ShardWriter, copy_side_files

W = LayerWidths
# name -> (tiny spec, overrides, widths per layer, biases added)
CASES = {
    # 3 heads do not divide hidden_size 64, which LlamaConfig refuses as a global head count
    "llama_mha_biases": ("llama_mha", {}, [W(3, 3, 80), W(2, 2, 50)], {"o_proj", "down_proj"}),
    # one layer left whole, one that loses a whole KV group; tied embeddings
    "llama_gqa_tied": ("llama_gqa_tied", {"num_hidden_layers": 3}, [W(8, 2, 96), W(6, 2, 70), W(2, 1, 40)], set()),
    "qwen2_o_bias": ("qwen2_gqa", {}, [W(4, 2, 60), W(6, 2, 90)], {"o_proj"}),
    # explicit head_dim (8 x 16 != 64)
    "mistral_down_bias": ("mistral_gqa", {}, [W(4, 1, 50), W(8, 2, 30)], {"down_proj"}),
}
SEQLEN = 24
PROJECTIONS = {"o_proj": "self_attn.o_proj", "down_proj": "mlp.down_proj"}


def kept_units(shape: arch.LayerShape, w: LayerWidths, g: torch.Generator) -> tuple[list[int], list[int], list[int]]:
    """Random kept query heads, KV heads and channels: w.heads // w.kv_heads query heads in each kept group."""
    group = shape.num_attention_heads // shape.num_key_value_heads
    kv = sorted(torch.randperm(shape.num_key_value_heads, generator=g)[: w.kv_heads].tolist())
    heads = [
        k * group + j for k in kv for j in sorted(torch.randperm(group, generator=g)[: w.heads // w.kv_heads].tolist())
    ]
    channels = sorted(torch.randperm(shape.intermediate_size, generator=g)[: w.channels].tolist())
    return heads, kv, channels


def slice_layer(
    tensors: dict[str, torch.Tensor], shape: arch.LayerShape, w: LayerWidths, biases: set[str], g: torch.Generator
) -> dict[str, torch.Tensor]:
    heads, kv, channels = kept_units(shape, w, g)
    d = shape.head_dim
    rows = lambda units: torch.tensor([u * d + t for u in units for t in range(d)])  # noqa: E731
    q, k, c = rows(heads), rows(kv), torch.tensor(channels)
    out = {}
    for name, t in tensors.items():
        if name.startswith("self_attn.q_proj."):
            t = t[q]
        elif name.startswith(("self_attn.k_proj.", "self_attn.v_proj.")):
            t = t[k]
        elif name == "self_attn.o_proj.weight":
            t = t[:, q]
        elif name.startswith(("mlp.gate_proj.", "mlp.up_proj.")):
            t = t[c]
        elif name == "mlp.down_proj.weight":
            t = t[:, c]
        out[name] = t.clone()
    for bias in sorted(biases):
        out[PROJECTIONS[bias] + ".bias"] = 0.2 * torch.randn(shape.hidden_size, generator=g)
    return out


def write_output(
    src: Path, out: Path, widths: list[LayerWidths], biases: set[str], remote_format: bool = True, seed: int = 0
) -> list[dict[str, torch.Tensor]]:
    """A pruned output of `src` with the given widths; returns each layer's tensors as written."""
    config = AutoConfig.from_pretrained(src)
    shape = arch.layer_shape(config)
    reader = CheckpointReader(src)
    n = config.num_hidden_layers
    out.mkdir(parents=True)
    writer = ShardWriter(out, n + 2)
    writer.write(0, {arch.EMBED: reader.get(arch.EMBED)})
    g = torch.Generator().manual_seed(seed)
    layers = []
    for i, w in enumerate(widths):
        tensors = slice_layer(
            reader.get_many(arch.layer_tensor_names(config), arch.layer_prefix(i)), shape, w, biases, g
        )
        writer.write(i + 1, {arch.layer_prefix(i) + k: v for k, v in tensors.items()})
        layers.append(tensors)
    writer.write(n + 1, {name: reader.get(name) for name in arch.final_tensor_names(config)})
    writer.finish()
    raw = json.loads((src / "config.json").read_text())
    if remote_format:
        written = remote.config_json(raw, widths, shape.head_dim, frozenset(biases))
        remote.install_code(out)
    else:  # uniform, as the pipeline writes it
        assert len(set(widths)) == 1 and not biases
        written = dict(
            raw,
            num_attention_heads=widths[0].heads,
            num_key_value_heads=widths[0].kv_heads,
            intermediate_size=widths[0].channels,
            head_dim=shape.head_dim,
        )
    (out / "config.json").write_text(json.dumps(written, indent=2) + "\n")
    copy_side_files(src, out)
    return layers


@torch.no_grad()
def reference_logits(
    src: Path, widths: list[LayerWidths], layers: list[dict[str, torch.Tensor]], ids: torch.Tensor
) -> torch.Tensor:
    """The pruned model assembled by hand: stock decoder layers, each with a config of its own widths."""
    config = arch.compute_config(AutoConfig.from_pretrained(src))
    reader = CheckpointReader(src)
    inputs = arch.layer_inputs(config, ids.shape[1], torch.device("cpu"), torch.float32)
    hidden = reader.get(arch.EMBED)[ids]
    for i, (w, tensors) in enumerate(zip(widths, layers)):
        layer = arch.build_layer(arch.pruned_config(config, w.heads, w.kv_heads, w.channels), i, dict(tensors))
        hidden = arch.run_layer(layer, hidden, inputs, config, i)
    norm = arch.final_norm(config, reader.get(arch.FINAL_NORM))
    return norm(hidden) @ reader.get(arch.head_weight_name(config)).T


def token_ids(vocab: int, batch: int = 2, seqlen: int = SEQLEN, seed: int = 3) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def model_logits(model, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


def assert_clean_load(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        assert not info.get(key), f"{key}: {info[key]}"
