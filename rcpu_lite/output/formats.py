"""How an output is written: a stock checkpoint of the input's family, or rcpu-lite's remote-code format
(output/remote.py), chosen from the width plan and the biases; and the output's config.json."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths, WidthPlan
from rcpu_lite.methods.compensation import has_bias

log = logging.getLogger("rcpu_lite")


def output_biases(settings, plan: WidthPlan, shape: arch.LayerShape) -> frozenset[str]:
    """The projections that get a compensating bias in every layer: those compensated with '+bias' (or
    'bias') whose inputs lose a unit somewhere. Nothing removed, no bias: ratio 0 writes the input as is."""
    with_bias = has_bias(settings.compensate)
    removes = {"o_proj": plan.removes_heads(shape), "down_proj": plan.removes_channels(shape)}
    return frozenset(p for p in settings.compensated_projections if with_bias and removes[p])


@dataclass(frozen=True)
class OutputFormat:
    """How the output is written: a stock checkpoint of `model_type`, or rcpu-lite's remote-code format."""

    remote: bool
    model_type: str
    config_updates: tuple[tuple[str, object], ...] = ()
    zero_bias_modules: tuple[str, ...] = ()  # stock Llama + bias: the biases the flags add, all zero

    def zero_biases(self, widths: LayerWidths, shape: arch.LayerShape) -> dict[str, torch.Tensor]:
        """The zero biases a stock Llama needs beside a compensating one (attention_bias and mlp_bias give
        every projection of the block a bias)."""
        units = arch.LLAMA_UNITS  # only a stock Llama gets these
        rows = {
            **{m: widths.heads * shape.head_dim for m in units.query_rows},
            **{m: widths.kv_heads * shape.head_dim for m in units.kv_rows},
            **{m: widths.channels for m in units.channel_rows},
        }
        return {m + ".bias": torch.zeros(rows[m]) for m in self.zero_bias_modules}


def _remote_format() -> OutputFormat:
    from rcpu_lite.output.modeling_rcpu import MODEL_TYPE  # the remote-code format (remote.py writes its config)

    return OutputFormat(True, MODEL_TYPE)


def choose_format(cfg, plan: WidthPlan, biases: frozenset[str]) -> OutputFormat:
    """Stock whenever the family's own classes can hold the result; otherwise the remote-code format
    (per-layer widths, or biases Mistral / Qwen2 cannot hold, or a Llama shape LlamaConfig refuses)."""
    if not plan.uniform:
        return _remote_format()
    heads = plan.layers[0].heads
    if not biases:
        try:
            return OutputFormat(False, arch.saved_model_type(cfg, heads))
        except arch.UnsupportedModel:
            return _remote_format()
    if cfg.model_type != "llama" or cfg.hidden_size % heads:
        return _remote_format()
    updates, zeros = [], []
    units = arch.LLAMA_UNITS
    if "o_proj" in biases and not getattr(cfg, "attention_bias", False):
        updates.append(("attention_bias", True))
        zeros += [*units.query_rows, *units.kv_rows]
    if "down_proj" in biases and not getattr(cfg, "mlp_bias", False):
        updates.append(("mlp_bias", True))
        zeros += list(units.channel_rows)
    return OutputFormat(False, "llama", tuple(updates), tuple(zeros))


def pruned_config_json(
    model_dir: Path, layer_widths: list[LayerWidths], shape: arch.LayerShape, fmt: OutputFormat, biases: frozenset[str]
) -> dict:
    """The output's config.json: the input's with the new widths and an explicit head_dim (stock), or
    the remote-code format's (per-layer widths, compensating biases)."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if fmt.remote:
        from rcpu_lite.output import remote

        return remote.config_json(config, layer_widths, shape.head_dim, biases)
    widths = set(layer_widths)
    if len(widths) != 1:
        raise RuntimeError(f"layers ended with different widths {sorted(widths)}; a stock output needs uniform ones")
    w = widths.pop()
    config.update(
        num_attention_heads=w.heads,
        num_key_value_heads=w.kv_heads,
        intermediate_size=w.channels,
        head_dim=shape.head_dim,
        **dict(fmt.config_updates),
    )
    if fmt.model_type != config["model_type"]:
        log.warning(
            "writing this pruned %s as model_type %r: %d heads do not divide hidden_size %d, which "
            "transformers' LlamaConfig refuses; the computation is identical",
            config["model_type"],
            fmt.model_type,
            w.heads,
            shape.hidden_size,
        )
        for llama_only in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(llama_only, None)
        config.update(
            model_type=fmt.model_type,
            architectures=[arch.FAMILIES[fmt.model_type].class_prefix + "ForCausalLM"],
            sliding_window=None,
        )
    return config
