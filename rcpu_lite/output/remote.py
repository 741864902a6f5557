"""The "remote code" output format: per-layer widths and compensating biases that stock classes cannot hold.

A uniform pruning is written as a plain checkpoint of the input's family. Layers of different widths
(adaptive or depth-rising allocations), or an o_proj / down_proj bias the family's class lacks (FLAP's bias
compensation), are written in this format instead: the base family's config.json (its own `model_type`, so
AutoTokenizer and AutoConfig never ask about remote code) with `base_model_type`, `architectures` and
`auto_map` naming rcpu_lite/modeling_rcpu.py (copied beside the weights), `layer_widths` and the
`o_proj_bias` / `down_proj_bias` flags. The weights are laid out as usual. Outputs written earlier have
`model_type` "rcpu_pruned"; they are read the same.

`layer_configs` turns either kind of checkpoint into the base family's config objects, one per layer, which
`arch.build_layer` and `arch.layer_inputs` take.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

from transformers import AutoConfig, PretrainedConfig

from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.output import modeling_rcpu

CODE_NAME = "modeling_rcpu.py"
BIASES = frozenset(arch.PROJECTIONS)  # the projections that may get a compensating bias


def is_remote(config: dict) -> bool:
    """Whether a config.json (as a dict) is in this format (either model_type)."""
    return config.get("model_type") == modeling_rcpu.MODEL_TYPE or (
        "base_model_type" in config and "layer_widths" in config
    )


def config_json(input_config: dict, layer_widths: list[LayerWidths], head_dim: int, biases: frozenset[str]) -> dict:
    """config.json of a pruned model in this format, from the input's config.json.

    `biases` names the projections (o_proj, down_proj) that carry a bias in every layer. The input's widths
    stay as they are (they pass the family's own config checks); each layer's are in `layer_widths`.
    """
    base = input_config.get("base_model_type") if is_remote(input_config) else input_config.get("model_type")
    if base not in arch.FAMILIES:
        raise arch.UnsupportedModel(
            f"model_type {base!r} is not supported; rcpu-lite prunes {', '.join(sorted(arch.FAMILIES))} models"
        )
    if not biases <= BIASES:
        raise ValueError(f"unknown biases {sorted(biases - BIASES)}; only {sorted(BIASES)} can be added")
    if len(layer_widths) != input_config["num_hidden_layers"]:
        raise ValueError(f"{len(layer_widths)} layer widths for {input_config['num_hidden_layers']} layers")
    for i, w in enumerate(layer_widths):
        if min(w.heads, w.kv_heads, w.channels) < 1 or w.heads % w.kv_heads:
            raise ValueError(
                f"layer {i}: {w} is not a valid layer (at least one of each unit, heads a multiple of kv_heads)"
            )
    config = {
        k: v for k, v in input_config.items() if k not in (*modeling_rcpu.OWN_KEYS, "auto_map", "quantization_config")
    }
    config_class, model_class = (c.__name__ for c in modeling_rcpu.CLASSES[base])
    module = Path(CODE_NAME).stem
    config.update(
        model_type=base,
        base_model_type=base,
        architectures=[model_class],
        auto_map={"AutoConfig": f"{module}.{config_class}", "AutoModelForCausalLM": f"{module}.{model_class}"},
        head_dim=head_dim,
        layer_widths=[asdict(w) for w in layer_widths],
        o_proj_bias="o_proj" in biases,
        down_proj_bias="down_proj" in biases,
    )
    return config


def install_code(out_dir: Path) -> None:
    """Copy the modelling file that config.json's auto_map names beside the weights."""
    shutil.copyfile(Path(modeling_rcpu.__file__), Path(out_dir) / CODE_NAME)


def read_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())


def classes(config: dict) -> tuple[type, type]:
    """modeling_rcpu's config and model classes for a config.json in this format."""
    base = config.get("base_model_type")
    if base not in modeling_rcpu.CLASSES:
        raise arch.UnsupportedModel(
            f"config.json has per-layer widths with base_model_type {base!r}; rcpu-lite knows {', '.join(sorted(modeling_rcpu.CLASSES))}"
        )
    return modeling_rcpu.CLASSES[base]


def layer_configs(model_dir: str | Path) -> tuple[PretrainedConfig, list[PretrainedConfig]]:
    """The compute config (arch.compute_config: sdpa, no cache) and one config per decoder layer.

    All are the base family's config class. A plain checkpoint gives its config for every layer; this format
    gives each layer its widths, and `o_proj_bias` / `down_proj_bias` attributes that layer_tensor_names reads.
    """
    raw = read_config(model_dir)
    if "per_layer_config" in raw:
        raise arch.UnsupportedModel(
            f"{model_dir}: config.json has transformers' per_layer_config, which rcpu-lite does not read"
        )
    if not is_remote(raw):
        arch.check_supported(SimpleNamespace(model_type=raw.get("model_type")))  # before AutoConfig's longer error
        config = arch.compute_config(AutoConfig.from_pretrained(model_dir))
        return config, [config] * config.num_hidden_layers
    pruned = classes(raw)[0].from_dict(raw)
    config = arch.compute_config(pruned.base_config())
    layers = []
    for i in range(config.num_hidden_layers):
        layer = arch.pruned_config(config, *pruned.widths(i))
        layer.o_proj_bias, layer.down_proj_bias = pruned.o_proj_bias, pruned.down_proj_bias
        layers.append(layer)
    return config, layers


def layer_tensor_names(config: PretrainedConfig) -> list[str]:
    """arch.layer_tensor_names, plus the o_proj / down_proj biases a layer config of this format flags."""
    names = arch.layer_tensor_names(config)
    for short, module in arch.PROJECTIONS.items():
        flag, name = short + "_bias", module + ".bias"
        if getattr(config, flag, False) and name not in names:
            names.append(name)
    return names
