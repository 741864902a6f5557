"""The streaming prune loop: read one layer -> statistics -> decide -> compensate -> write -> propagate.

The pipeline only moves data; the algorithms live in scoring.py and compensation.py, and every
architecture detail in arch.py. Peak memory is one layer, fixed-size statistics and the
calibration hidden states, whatever the number of layers.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from transformers import AutoConfig

from . import __version__, arch, calibration, compensation, scoring, surgery
from .checkpoint import CheckpointReader, ShardWriter, copy_side_files
from .config import PruneSettings
from .models import load_tokenizer, resolve_model
from .output import (DiskFull, OutputError, check_free_space, check_output, expected_shard_bytes, human_bytes,
                     publish, pruned_config_json, working_dir)
from .progress import Manifest, differences, fingerprint
from .memory_plan import MemoryPlan, parse_size
from .memory_plan import plan as plan_memory
from .runtime import (Placement, Stopwatch, current_rss_bytes, peak_gpu_bytes, peak_rss_bytes, pick_device,
                      run_layer_batched, to_compute)
from .stats import InputStats

__all__ = ["prune", "prune_layer", "Interrupted", "OutputError", "DiskFull", "working_dir", "REPORT_NAME"]
log = logging.getLogger("rcpu_lite")
REPORT_NAME = "rcpu_report.json"


class Interrupted(RuntimeError):
    """The run stopped at a layer boundary on SIGINT/SIGTERM; its finished work is kept."""

    exit_code = 75  # EX_TEMPFAIL: try again (with --resume)


def _check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{what}: {name} contains NaN or Inf; the checkpoint is damaged or comes from a "
                             f"diverged model: use an intact copy")


def prune_layer(
    cfg,
    index: int,
    stored: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    inputs: arch.LayerInputs,
    settings: PruneSettings,
    watch: Stopwatch | None = None,
    placement: Placement | None = None,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Prune one decoder layer; return its compact tensors (on the host, in their stored dtypes) and a report.

    Order (DESIGN.md section 2): one dense fp32 pass on the compute device collects o_proj and
    down_proj input statistics; then score, select, compensate both projections, and slice.
    `stored` is consumed (emptied) so that the stored copy and the fp32 copy of the layer are
    never both resident, and each big intermediate is freed as soon as it has served.
    """
    shape = arch.layer_shape(cfg)
    run = placement or Placement(hidden.device, hidden.device, settings.micro_batch)
    watch = watch or Stopwatch(run.device)
    dtypes = {k: v.dtype for k, v in stored.items()}
    tensors = to_compute(stored, run.device, consume=True)
    o_stats = InputStats(shape.num_attention_heads * shape.head_dim, run.device)
    d_stats = InputStats(shape.intermediate_size, run.device)
    layer = arch.build_layer(cfg, index, tensors)
    layer.self_attn.o_proj.register_forward_pre_hook(o_stats.hook())
    layer.mlp.down_proj.register_forward_pre_hook(d_stats.hook())
    run_layer_batched(layer, hidden, inputs, cfg, index, run.micro_batch, update=False, device=run.device,
                      matmul=run.matmul)
    del layer
    watch.lap("statistics")
    for what, stats in (("o_proj", o_stats), ("down_proj", d_stats)):
        if not stats.is_finite():
            raise ValueError(f"layer {index}: the {what} input statistics contain NaN or Inf")

    w_o, w_d = tensors.pop("self_attn.o_proj.weight"), tensors.pop("mlp.down_proj.weight")
    heads_score = scoring.head_scores(scoring.column_scores(settings.score, w_o, o_stats), shape.head_dim)
    heads, kv_heads = scoring.kept_heads(heads_score, shape.num_key_value_heads, settings.ratio)
    channels = scoring.kept_channels(scoring.column_scores(settings.score, w_d, d_stats), settings.ratio)
    heads, kv_heads, channels = heads.cpu(), kv_heads.cpu(), channels.cpu()  # for the report
    on_device = [t.to(run.device) for t in (heads, kv_heads, channels, surgery.head_columns(heads, shape.head_dim))]
    watch.lap("scores")

    # Slice the other tensors first, one at a time back to the host in their own dtype.
    compact = {}
    for name in list(tensors):
        t = tensors.pop(name)
        compact[name] = surgery.slice_tensor(name, t, shape, *on_device[:3]).to("cpu", dtypes[name])
        del t
    report = {"layer": index}
    decomposition_seconds = 0.0
    channels_dev, o_cols = on_device[2:]
    # down_proj first: its Gram (11008^2 floats for Llama-7B) is then freed before o_proj's decomposition
    for module, w, stats, kept in (("mlp.down_proj", w_d, d_stats, channels_dev), ("self_attn.o_proj", w_o, o_stats,
                                                                                   o_cols)):
        if kept.numel() == w.shape[1]:  # nothing removed, nothing to repair
            result = compensation.Compensation(w, 0.0, 0.0)
        else:
            products = compensation.products(w, stats.gram, kept, with_m=settings.compensate != "none")
            stats.gram = None  # the largest statistic: freed before the decomposition
            result = compensation.compensate_products(products, settings.compensate, settings.decomposition)
            del products
        compact[module + ".weight"] = result.weight.to("cpu", dtypes[module + ".weight"])
        short = module.split(".")[1]
        report[f"{short}_error_pruned"] = result.error_pruned
        report[f"{short}_error_compensated"] = result.error_compensated
        decomposition_seconds += result.decomposition_seconds
        del w, result
    del w_o, w_d
    report.update(kept_heads=heads.tolist(), kept_kv_heads=kv_heads.tolist(), kept_channels=channels.tolist())
    watch.lap("compensation")
    watch.move("compensation", "decomposition", decomposition_seconds)
    return compact, report


class _StopFlag:
    """SIGINT/SIGTERM ask the run to stop after the current layer; a second signal aborts at once."""

    def __init__(self):
        self.signal: str | None = None
        self._previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        log.warning("%s received: finishing the current layer, then stopping (send it again to abort now)",
                    self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def prune(
    model: str | os.PathLike,
    out: str | os.PathLike,
    settings: PruneSettings | None = None,
    overwrite: bool = False,
    resume: bool = False,
) -> dict:
    """Prune MODEL into the checkpoint directory OUT and return the run report (also written there).

    The run writes into OUT.partial and renames it to OUT when everything is written. After a
    crash or an interruption, the same call with resume=True continues from the last finished layer.
    """
    settings = (settings or PruneSettings()).validate()
    started = time.perf_counter()
    model_dir = resolve_model(model)
    reader = CheckpointReader(model_dir)
    config = AutoConfig.from_pretrained(model_dir)
    arch.check_supported(config)
    cfg = arch.compute_config(config)
    shape = arch.layer_shape(cfg)
    n_layers = cfg.num_hidden_layers
    names = arch.layer_tensor_names(cfg)
    final_names = arch.final_tensor_names(cfg)
    needed = [arch.EMBED, *final_names, *(arch.layer_prefix(i) + n for i in range(n_layers) for n in names)]
    reader.require(needed)
    heads_after, kv_after, channels_after = _widths_after(shape, settings.ratio)
    model_type_after = arch.saved_model_type(cfg, heads_after)  # refuses early what could not be loaded
    out = Path(out)
    work = check_output(out, model_dir, overwrite, resume)
    device = pick_device(settings.device)
    run, memory = _placement(settings, shape, device)  # a budget too small is refused before any work

    tokenizer = load_tokenizer(model_dir)
    tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.calib))
    windows = calibration.random_windows(tokens, settings.nsamples, settings.seqlen, settings.seed)
    fp = fingerprint(model_dir, settings, windows)
    manifest = _resumed_manifest(work, fp) if resume else None
    shard_bytes = expected_shard_bytes(reader, cfg, names, final_names, heads_after, kv_after, channels_after)
    check_free_space(work, sum(b for i, b in enumerate(shard_bytes) if not (manifest and manifest.done(i))))
    if manifest is None:  # every check passed: only now is anything created
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        manifest = Manifest(work, fp)
        manifest.save()
    shards = _Shards(work, ShardWriter(work, n_layers + 2), manifest, shard_bytes)
    writer, write = shards.writer, shards.write

    # What the output stores too (a tied lm_head some checkpoints also store counts on neither side).
    params_before = sum(torch.Size(reader.shape(n)).numel() for n in needed)
    inputs = arch.layer_inputs(cfg, settings.seqlen, device, torch.float32)
    embed = reader.get(arch.EMBED)
    _check_finite("embeddings", {arch.EMBED: embed})
    hidden = embed[windows].to(dtype=torch.float32)
    hidden = hidden.to(run.hidden_device) if run.hidden_device.type == "cuda" else (
        hidden.pin_memory() if device.type == "cuda" else hidden)  # pinned: copied to the GPU every layer
    if not manifest.done(0):
        write(0, {arch.EMBED: embed})
    del embed

    first_todo = next((i for i in range(n_layers) if not manifest.done(i + 1)), n_layers)
    if first_todo:
        log.info("resuming: %d of %d layers were finished", first_todo, n_layers)
    if first_todo < n_layers:  # rebuild the hidden states by replaying the finished compact layers
        for i in range(first_todo):
            prefix = arch.layer_prefix(i)
            written = {k[len(prefix):]: v for k, v in writer.read(i + 1).items()}
            _propagate(cfg, i, written, manifest.layers[i], hidden, inputs, run)
    todo = list(range(first_todo, n_layers))
    layer_reads = reader.layers(names, [arch.layer_prefix(i) for i in todo], background=device.type == "cuda")
    with _StopFlag() as stop:
        for i in todo:
            t0 = time.perf_counter()
            watch = Stopwatch(device)
            # next() rather than zip/enumerate: those keep the previous item alive while the next is read
            stored = next(layer_reads)
            prefix = arch.layer_prefix(i)
            _check_finite(f"layer {i}", stored)
            watch.lap("read")
            written, report = prune_layer(cfg, i, stored, hidden, inputs, settings, watch, run)
            del stored
            # Propagate through the weights exactly as written, so layer i+1 sees what the saved model computes.
            _propagate(cfg, i, written, report, hidden, inputs, run)
            watch.lap("propagate")
            report["seconds"] = round(time.perf_counter() - t0, 3)
            report["seconds_by_stage"] = watch.seconds  # write() adds "write"
            report["rss_bytes"] = current_rss_bytes()
            write(i + 1, {prefix + k: v for k, v in written.items()}, report)
            del written
            _log_layer(report, n_layers, shape)
            if stop.signal:
                raise Interrupted(f"stopped by {stop.signal} after layer {i + 1} of {n_layers}; the finished layers "
                                  f"are kept in {work}: rerun the same command with --resume to continue")

    if not manifest.done(n_layers + 1):
        final = {n: reader.get(n) for n in final_names}
        _check_finite("final norm / lm_head", final)
        write(n_layers + 1, final)
        del final
    params_after = writer.finish()
    reader.close()

    new_config = pruned_config_json(model_dir, manifest.layers, shape, model_type_after)
    (work / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    copy_side_files(model_dir, work)
    report = {
        "rcpu_lite_version": __version__,
        "model": str(model),
        "model_dir": str(model_dir),
        "settings": vars(settings),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "memory_plan": memory.as_dict() if memory else None,
        "peak_gpu_bytes": peak_gpu_bytes(device),
        "calibration_tokens": int(windows.numel()),
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "shape_before": vars(shape),
        "shape_after": {k: new_config[k] for k in ("num_attention_heads", "num_key_value_heads", "intermediate_size")},
        "model_type_after": new_config["model_type"],
        "resumed_at_layer": first_todo if resume else None,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
        # Most bytes of checkpoint tensors alive at once (tracked by the reader), independent of depth.
        "peak_weight_bytes": reader.peak_live_bytes,
        "layers": manifest.layers,
    }
    (work / REPORT_NAME).write_text(json.dumps(report, indent=2) + "\n")
    publish(work, out.resolve())
    log.info("wrote %s: %d -> %d parameters (%.1f%% fewer) in %.0fs", out, params_before, params_after,
             100 * report["param_reduction"], report["wall_seconds"])
    return report


class _Shards:
    """Writes each shard and records it in the manifest; a full disk becomes DiskFull with the space needed."""

    def __init__(self, work: Path, writer: ShardWriter, manifest: Manifest, shard_bytes: list[int]):
        self.work, self.writer, self.manifest, self.shard_bytes = work, writer, manifest, shard_bytes

    def write(self, index: int, tensors: dict[str, torch.Tensor], layer_report: dict | None = None) -> None:
        started = time.perf_counter()
        try:
            size = self.writer.write(index, tensors)
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise
            needed = sum(b for i, b in enumerate(self.shard_bytes) if i >= index)
            raise DiskFull(errno.ENOSPC, f"the disk holding {self.work} filled up while writing "
                           f"{self.writer.path(index).name}; about {human_bytes(needed)} more are needed: free "
                           f"space and rerun the same command with --resume") from None
        if layer_report is not None:
            seconds = time.perf_counter() - started
            layer_report["seconds_by_stage"]["write"] = round(seconds, 4)
            layer_report["seconds"] = round(layer_report["seconds"] + seconds, 3)
        self.manifest.record(index, size, layer_report)


def _widths_after(shape: arch.LayerShape, ratio: float) -> tuple[int, int, int]:
    """Query heads, KV heads and MLP channels every layer keeps (known before any work)."""
    heads, kv_heads = (t.numel() for t in scoring.kept_heads(
        torch.zeros(shape.num_attention_heads), shape.num_key_value_heads, ratio))
    if ratio > 0 and heads == shape.num_attention_heads:
        per_group = shape.num_attention_heads // shape.num_key_value_heads
        log.warning("ratio %.2f removes no attention heads: with %d query heads per key/value group, a group "
                    "loses a head only from ratio %.3f up; only MLP channels are pruned", ratio, per_group,
                    shape.num_key_value_heads / shape.num_attention_heads)
    return heads, kv_heads, shape.intermediate_size - scoring.n_removed(ratio, shape.intermediate_size)


def _propagate(cfg, index: int, written: dict[str, torch.Tensor], report: dict, hidden: torch.Tensor,
               inputs: arch.LayerInputs, run: Placement) -> None:
    """Run the compact layer (widths from its report) over the hidden states, in place."""
    pruned_cfg = arch.pruned_config(cfg, len(report["kept_heads"]), len(report["kept_kv_heads"]),
                                    len(report["kept_channels"]))
    layer = arch.build_layer(pruned_cfg, index, to_compute(written, run.device))
    run_layer_batched(layer, hidden, inputs, pruned_cfg, index, run.micro_batch, device=run.device, matmul=run.matmul)


def _placement(settings: PruneSettings, shape: arch.LayerShape, device: torch.device
               ) -> tuple[Placement, MemoryPlan | None]:
    """On CUDA, plan the micro-batch and the hidden states' place within the GPU memory budget."""
    matmul = "tf32" if settings.matmul == "tf32" else "ieee"
    if device.type != "cuda":
        if settings.max_gpu_memory:
            log.warning("--max-gpu-memory only applies to a CUDA device; this run is on the CPU")
        return Placement(device, device, settings.micro_batch, matmul), None
    budget = (parse_size(settings.max_gpu_memory) if settings.max_gpu_memory
              else int(0.9 * torch.cuda.mem_get_info(device)[0]))
    memory = plan_memory(shape, settings.nsamples, settings.seqlen, budget, settings.micro_batch)
    log.info("GPU budget %.2f GiB: micro-batch %d, calibration hidden states on the %s", budget / 2**30,
             memory.micro_batch, "GPU" if memory.hidden_on_device else "host (they do not fit)")
    torch.cuda.reset_peak_memory_stats(device)
    return Placement(device, device if memory.hidden_on_device else torch.device("cpu"), memory.micro_batch,
                     matmul), memory


def _log_layer(report: dict, n_layers: int, shape: arch.LayerShape) -> None:
    log.info(
        "layer %d/%d  heads %d->%d  channels %d->%d  o_proj err %.4f->%.4f  down_proj err %.4f->%.4f  %.1fs",
        report["layer"] + 1, n_layers, shape.num_attention_heads, len(report["kept_heads"]),
        shape.intermediate_size, len(report["kept_channels"]), report["o_proj_error_pruned"],
        report["o_proj_error_compensated"], report["down_proj_error_pruned"], report["down_proj_error_compensated"],
        report["seconds"],
    )


def _resumed_manifest(work: Path, fp: dict) -> Manifest:
    manifest = Manifest.load(work)
    diff = differences(manifest.fingerprint, fp)
    if diff:
        raise OutputError(f"cannot resume the run in {work}: {'; '.join(diff)}; rerun without --resume and with "
                          f"--overwrite to start over")
    return manifest
