"""The streaming prune loop: read one layer -> statistics -> decide -> compensate -> write -> propagate.

The pipeline only moves data; the algorithms live in scoring.py and compensation.py, and every
architecture detail in arch.py. Peak memory is one layer, fixed-size statistics and the
calibration hidden states, whatever the number of layers.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from . import __version__, arch, calibration, compensation, scoring, surgery
from .checkpoint import CheckpointReader, ShardWriter, copy_side_files
from .config import PruneSettings
from .models import resolve_model
from .runtime import current_rss_bytes, peak_rss_bytes, pick_device, run_layer_batched
from .stats import InputStats

log = logging.getLogger("rcpu_lite")
REPORT_NAME = "rcpu_report.json"


class OutputError(ValueError):
    pass


def prepare_output(out: Path, model_dir: Path, overwrite: bool) -> Path:
    """Check --out and return the sibling working directory the run writes into."""
    if out.resolve() == model_dir.resolve():
        raise OutputError(f"--out {out} is the input checkpoint; choose another directory")
    if out.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    work = out.parent / (out.name + ".partial")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    return work


def _check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{what}: {name} contains NaN or Inf")


def prune_layer(
    cfg,
    index: int,
    tensors: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    inputs: arch.LayerInputs,
    settings: PruneSettings,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune one decoder layer in fp32 on hidden's device; return its compact fp32 tensors and a report.

    Order (DESIGN.md section 2): one dense pass collects o_proj and down_proj input statistics;
    then score, select, compensate both projections, and slice.
    """
    shape = arch.layer_shape(cfg)
    layer = arch.build_layer(cfg, index, tensors)
    o_stats = InputStats(shape.num_attention_heads * shape.head_dim, hidden.device)
    d_stats = InputStats(shape.intermediate_size, hidden.device)
    hooks = [
        layer.self_attn.o_proj.register_forward_pre_hook(o_stats.hook()),
        layer.mlp.down_proj.register_forward_pre_hook(d_stats.hook()),
    ]
    run_layer_batched(layer, hidden, inputs, cfg, index, settings.micro_batch, update=False)
    for h in hooks:
        h.remove()
    for what, stats in (("o_proj", o_stats), ("down_proj", d_stats)):
        if not stats.is_finite():
            raise ValueError(f"layer {index}: the {what} input statistics contain NaN or Inf")

    w_o = tensors["self_attn.o_proj.weight"]
    w_d = tensors["mlp.down_proj.weight"]
    heads_score = scoring.head_scores(scoring.column_scores(settings.score, w_o, o_stats), shape.head_dim)
    heads, kv_heads = scoring.kept_heads(heads_score, shape.num_key_value_heads, settings.ratio)
    channels = scoring.kept_channels(scoring.column_scores(settings.score, w_d, d_stats), settings.ratio)
    o_cols = surgery.head_columns(heads, shape.head_dim).to(w_o.device)
    channels_dev = channels.to(w_d.device)

    report = {"layer": index}
    new = {}
    for name, w, gram, kept in (("o_proj", w_o, o_stats.gram, o_cols), ("down_proj", w_d, d_stats.gram, channels_dev)):
        new[name] = compensation.compensate(w, gram, kept, settings.compensate)
        report[f"{name}_error_pruned"] = compensation.relative_error(w, gram, kept, w[:, kept])
        report[f"{name}_error_compensated"] = compensation.relative_error(w, gram, kept, new[name])
    compact = surgery.slice_layer(tensors, shape, heads.to(w_o.device), kv_heads.to(w_o.device), channels_dev,
                                  new["o_proj"], new["down_proj"])
    report.update(kept_heads=heads.tolist(), kept_kv_heads=kv_heads.tolist(), kept_channels=channels.tolist())
    return compact, report


def prune(
    model: str | os.PathLike,
    out: str | os.PathLike,
    settings: PruneSettings | None = None,
    overwrite: bool = False,
) -> dict:
    """Prune MODEL into the checkpoint directory OUT and return the run report (also written there)."""
    settings = (settings or PruneSettings()).validate()
    started = time.perf_counter()
    model_dir = resolve_model(model)
    reader = CheckpointReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch.check_supported(config)
    out = Path(out)
    work = prepare_output(out, model_dir, overwrite)
    device = pick_device(settings.device)
    torch.manual_seed(settings.seed)

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.calib))
    windows = calibration.random_windows(tokens, settings.nsamples, settings.seqlen, settings.seed)

    cfg = arch.compute_config(config)
    shape = arch.layer_shape(cfg)
    heads_after = scoring.kept_heads(torch.zeros(shape.num_attention_heads), shape.num_key_value_heads,
                                     settings.ratio)[0].numel()
    model_type_after = arch.saved_model_type(cfg, heads_after)  # refuses early what could not be loaded
    inputs = arch.layer_inputs(cfg, settings.seqlen, device, torch.float32)
    n_layers = cfg.num_hidden_layers
    names = arch.layer_tensor_names(cfg)
    writer = ShardWriter(work, n_layers + 2)
    params_before = sum(torch.Size(reader.shape(n)).numel() for n in reader.weight_map)

    embed = reader.get(arch.EMBED)
    _check_finite("embeddings", {arch.EMBED: embed})
    hidden = embed[windows].to(device=device, dtype=torch.float32)
    writer.write({arch.EMBED: embed})
    del embed

    layers = []
    for i in range(n_layers):
        t0 = time.perf_counter()
        prefix = arch.layer_prefix(i)
        stored = reader.get_many(names, prefix)
        _check_finite(f"layer {i}", stored)
        out_dtype = stored["self_attn.q_proj.weight"].dtype
        tensors = {k: v.to(device=device, dtype=torch.float32) for k, v in stored.items()}
        del stored
        compact, report = prune_layer(cfg, i, tensors, hidden, inputs, settings)
        del tensors
        # Propagate through the weights exactly as written, so layer i+1 sees what the saved model computes.
        written = {k: v.to(out_dtype) for k, v in compact.items()}
        del compact
        writer.write({prefix + k: v for k, v in written.items()})
        pruned_cfg = arch.pruned_config(cfg, len(report["kept_heads"]), len(report["kept_kv_heads"]),
                                        len(report["kept_channels"]))
        layer = arch.build_layer(pruned_cfg, i, {k: v.float() for k, v in written.items()})
        run_layer_batched(layer, hidden, inputs, pruned_cfg, i, settings.micro_batch)
        del layer, written
        report["seconds"] = round(time.perf_counter() - t0, 3)
        report["rss_bytes"] = current_rss_bytes()
        layers.append(report)
        log.info(
            "layer %d/%d  heads %d->%d  channels %d->%d  o_proj err %.4f->%.4f  down_proj err %.4f->%.4f  %.1fs",
            i + 1, n_layers, shape.num_attention_heads, len(report["kept_heads"]), shape.intermediate_size,
            len(report["kept_channels"]), report["o_proj_error_pruned"], report["o_proj_error_compensated"],
            report["down_proj_error_pruned"], report["down_proj_error_compensated"], report["seconds"],
        )

    final = {arch.FINAL_NORM: reader.get(arch.FINAL_NORM)}
    if arch.LM_HEAD in reader:
        final[arch.LM_HEAD] = reader.get(arch.LM_HEAD)
    _check_finite("final norm / lm_head", final)
    writer.write(final)
    del final
    writer.finish()
    reader.close()

    new_config = _pruned_config_json(model_dir, layers, shape, model_type_after)
    (work / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    copy_side_files(model_dir, work)
    report = {
        "rcpu_lite_version": __version__,
        "model": str(model),
        "model_dir": str(model_dir),
        "settings": vars(settings),
        "device": str(device),
        "calibration_tokens": int(windows.numel()),
        "params_before": params_before,
        "params_after": writer.total_params,
        "param_reduction": 1 - writer.total_params / params_before,
        "shape_before": vars(shape),
        "shape_after": {k: new_config[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
        "model_type_after": new_config["model_type"],
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        # Most bytes of checkpoint tensors alive at once (tracked by the reader), independent of depth.
        "peak_weight_bytes": reader.peak_live_bytes,
        "layers": layers,
    }
    (work / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    log.info("wrote %s: %d -> %d parameters (%.1f%% fewer) in %.0fs", out, params_before, writer.total_params,
             100 * report["param_reduction"], report["wall_seconds"])
    return report


def _pruned_config_json(model_dir: Path, layers: list[dict], shape: arch.LayerShape, model_type: str) -> dict:
    """The input's config.json with the new (uniform) widths, an explicit head_dim, and the model_type
    chosen by arch.saved_model_type."""
    config = json.loads((model_dir / "config.json").read_text())
    widths = {(len(r["kept_heads"]), len(r["kept_kv_heads"]), len(r["kept_channels"])) for r in layers}
    if len(widths) != 1:
        raise RuntimeError(f"layers ended with different widths {sorted(widths)}; uniform pruning expected")
    heads, kv_heads, channels = widths.pop()
    config.pop("quantization_config", None)
    config.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=channels,
                  head_dim=shape.head_dim)
    if model_type != config["model_type"]:
        log.warning("writing this pruned %s as model_type %r: %d heads do not divide hidden_size %d, which "
                    "transformers' LlamaConfig refuses; the computation is identical", config["model_type"],
                    model_type, heads, shape.hidden_size)
        for llama_only in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(llama_only, None)
        config.update(model_type=model_type, architectures=[arch.FAMILIES[model_type] + "ForCausalLM"],
                      sliding_window=None)
    return config
