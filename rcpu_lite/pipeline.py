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

from . import __version__, arch, calibration, compensation, scoring, surgery, widths
from .compensation import CompensationOptions
from .checkpoint import CheckpointReader, ShardWriter, copy_side_files
from .config import PruneSettings
from .models import load_tokenizer, resolve_model
from .output import (DiskFull, OutputError, OutputFormat, check_free_space, check_output, choose_format,
                     expected_shard_bytes, human_bytes, output_biases, publish, pruned_config_json, working_dir)
from .progress import Manifest, differences, fingerprint
from .records import LayerResult, ProjectionResult
from .widths import LayerWidths, WidthPlan
from .widths import uniform as uniform_widths
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


def collect_stats(cfg, index: int, tensors: dict[str, torch.Tensor], hidden: torch.Tensor, inputs: arch.LayerInputs,
                  run: Placement) -> dict[str, InputStats]:
    """One dense fp32 pass of the layer over the calibration windows, accumulating the input statistics
    of o_proj and down_proj (no activations kept)."""
    shape = arch.layer_shape(cfg)
    stats = {"o_proj": InputStats(shape.num_attention_heads * shape.head_dim, run.device),
             "down_proj": InputStats(shape.intermediate_size, run.device)}
    layer = arch.build_layer(cfg, index, tensors)
    for name, s in stats.items():
        arch.projection(layer, name).register_forward_pre_hook(s.hook())
    run_layer_batched(layer, hidden, inputs, cfg, index, run.micro_batch, update=False, device=run.device,
                      matmul=run.matmul)
    del layer
    for name, s in stats.items():
        if not s.is_finite():
            raise ValueError(f"layer {index}: the {name} input statistics contain NaN or Inf")
    return stats


def prune_layer(
    cfg,
    index: int,
    stored: dict[str, torch.Tensor],
    hidden: torch.Tensor,
    inputs: arch.LayerInputs,
    settings: PruneSettings,
    widths: LayerWidths | None = None,
    biases: frozenset[str] = frozenset(),
    watch: Stopwatch | None = None,
    placement: Placement | None = None,
) -> tuple[dict[str, torch.Tensor], LayerResult]:
    """Prune one decoder layer to `widths` (default: the uniform plan of settings.ratio); return its
    compact tensors (on the host, in their stored dtypes) and its record.

    Order (DESIGN.md section 2): one dense fp32 pass collects the o_proj and down_proj input
    statistics; then score, select, compensate both projections, and slice. `stored` is consumed so
    that the stored and the fp32 copy of the layer are never both resident; each compensation frees
    its Gram as soon as it can. `biases` names the projections that get a bias in every layer.
    """
    shape = arch.layer_shape(cfg)
    widths = widths or uniform_widths(shape, 1, settings.ratio).layers[0]
    run = placement or Placement(hidden.device, hidden.device, settings.micro_batch)
    watch = watch or Stopwatch(run.device)
    dtypes = {k: v.dtype for k, v in stored.items()}
    tensors = to_compute(stored, run.device, consume=True)
    stats = collect_stats(cfg, index, tensors, hidden, inputs, run)
    watch.lap("statistics")

    weights = {name: tensors.pop(arch.PROJECTIONS[name] + ".weight") for name in stats}
    heads, kv_heads, channels = scoring.select(settings.score, weights, stats, shape, widths)
    on_device = [t.to(run.device) for t in (heads, kv_heads, channels)]
    kept_columns = {"o_proj": surgery.head_columns(heads, shape.head_dim).to(run.device), "down_proj": on_device[2]}
    watch.lap("scores")

    # Slice the other tensors first, one at a time back to the host in their own dtype.
    compact = {}
    for name in list(tensors):
        if name in (arch.PROJECTIONS[p] + ".bias" for p in stats):
            continue  # an output bias keeps its shape; a compensating bias is added to it below
        t = tensors.pop(name)
        compact[name] = surgery.slice_tensor(name, t, shape, *on_device).to("cpu", dtypes[name])
        del t
    options = CompensationOptions(settings.decomposition, settings.damp, settings.damp_abs)
    projections, decomposition_seconds = {}, 0.0
    # down_proj first: its Gram (11008^2 floats for Llama-7B) is then freed before o_proj's decomposition
    for name in ("down_proj", "o_proj"):
        module = arch.PROJECTIONS[name]
        method = settings.compensate if name in settings.compensated_projections else "none"
        w = weights.pop(name)
        result = compensation.compensate(w, stats[name], kept_columns[name], method, options, release=True)
        compact[module + ".weight"] = result.weight.to("cpu", dtypes[module + ".weight"])
        bias = tensors.pop(module + ".bias", None)
        if name in biases or bias is not None:
            total = torch.zeros(w.shape[0], device=w.device) if bias is None else bias
            if result.bias is not None:
                total = total + result.bias
            compact[module + ".bias"] = total.to("cpu", dtypes.get(module + ".bias", dtypes[module + ".weight"]))
        projections[name] = ProjectionResult(result.error_pruned, result.error_compensated, method,
                                             result.damp_used, result.bias is not None)
        decomposition_seconds += result.decomposition_seconds
        del w, result
    watch.lap("compensation")
    watch.move("compensation", "decomposition", decomposition_seconds)
    record = LayerResult(index, heads.tolist(), kv_heads.tolist(), channels.tolist(),
                         {name: projections[name] for name in ("o_proj", "down_proj")})
    return compact, record


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
    costs = arch.unit_costs(cfg)
    out = Path(out)
    work = check_output(out, model_dir, overwrite, resume)
    device = pick_device(settings.device)
    run, memory = _placement(settings, shape, device)  # a budget too small is refused before any work

    tokenizer = load_tokenizer(model_dir)
    tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.calib))
    windows = calibration.random_windows(tokens, settings.nsamples, settings.seqlen, settings.seed)
    fp = fingerprint(model_dir, settings, windows)
    manifest = _resumed_manifest(work, fp) if resume else None
    inputs = arch.layer_inputs(cfg, settings.seqlen, device, torch.float32)
    if manifest is not None and manifest.plan is not None:
        plan = WidthPlan.from_json(manifest.plan)
    else:
        plan = _width_plan(settings, cfg, reader, names, windows, inputs, run)
    biases = output_biases(settings, plan, shape)
    fmt = choose_format(cfg, plan, biases)  # refuses early what could not be loaded
    _log_plan(plan, shape, costs, fmt)
    shard_bytes = expected_shard_bytes(reader, cfg, names, final_names, plan)
    check_free_space(work, sum(b for i, b in enumerate(shard_bytes) if not (manifest and manifest.done(i))))
    if manifest is None:  # every check passed: only now is anything created
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
        manifest = Manifest(work, fp, plan=plan.as_json())
        manifest.save()
    shards = _Shards(work, ShardWriter(work, n_layers + 2), manifest, shard_bytes)
    writer, write = shards.writer, shards.write

    # What the output stores too (a tied lm_head some checkpoints also store counts on neither side).
    params_before = sum(torch.Size(reader.shape(n)).numel() for n in needed)
    embed = _embeddings(reader)
    hidden = _hidden_states(embed, windows, run, device)
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
            _propagate(cfg, i, written, LayerResult.from_json(manifest.layers[i]).widths, hidden, inputs, run)
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
            written, record = prune_layer(cfg, i, stored, hidden, inputs, settings, plan.layers[i], biases, watch, run)
            del stored
            # Propagate through the weights exactly as written, so layer i+1 sees what the saved model computes.
            _propagate(cfg, i, written, record.widths, hidden, inputs, run)
            watch.lap("propagate")
            record.seconds = round(time.perf_counter() - t0, 3)
            record.seconds_by_stage = watch.seconds  # write() adds "write"
            record.rss_bytes = current_rss_bytes()
            written.update(fmt.zero_biases(record.widths, shape))
            write(i + 1, {prefix + k: v for k, v in written.items()}, record)
            del written
            _log_layer(record, n_layers, shape)
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

    results = [LayerResult.from_json(r) for r in manifest.layers]
    new_config = pruned_config_json(model_dir, [r.widths for r in results], shape, fmt, biases)
    (work / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    copy_side_files(model_dir, work)
    if fmt.remote:
        from . import remote

        remote.install_code(work)
    layer_params = costs.layer * n_layers
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
        "decoder_layer_params_before": layer_params,
        "decoder_layer_param_reduction": (params_before - params_after) / layer_params,
        "width_plan": plan.as_json(),
        "biases": sorted(biases),
        "output_format": "remote-code" if fmt.remote else "stock",
        "shape_before": vars(shape),
        "shape_after": _shape_after(plan),
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

    def write(self, index: int, tensors: dict[str, torch.Tensor], record: LayerResult | None = None) -> None:
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
        if record is not None:
            seconds = time.perf_counter() - started
            record.seconds_by_stage["write"] = round(seconds, 4)
            record.seconds = round(record.seconds + seconds, 3)
        self.manifest.record(index, size, record.to_json() if record is not None else None)


def _propagate(cfg, index: int, written: dict[str, torch.Tensor], layer_widths: LayerWidths, hidden: torch.Tensor,
               inputs: arch.LayerInputs, run: Placement) -> None:
    """Run the compact layer (of the given widths) over the hidden states, in place."""
    pruned_cfg = arch.pruned_config(cfg, layer_widths.heads, layer_widths.kv_heads, layer_widths.channels)
    layer = arch.build_layer(pruned_cfg, index, to_compute(written, run.device))
    run_layer_batched(layer, hidden, inputs, pruned_cfg, index, run.micro_batch, device=run.device, matmul=run.matmul)


def _hidden_states(embed: torch.Tensor, windows: torch.Tensor, run: Placement, device: torch.device) -> torch.Tensor:
    """The calibration windows' embeddings in fp32, where the run keeps its hidden states."""
    hidden = embed[windows].to(dtype=torch.float32)
    return hidden.to(run.hidden_device) if run.hidden_device.type == "cuda" else (
        hidden.pin_memory() if device.type == "cuda" else hidden)  # pinned: copied to the GPU every layer


def _embeddings(reader: CheckpointReader) -> torch.Tensor:
    embed = reader.get(arch.EMBED)
    _check_finite("embeddings", {arch.EMBED: embed})
    return embed


def _width_plan(settings: PruneSettings, cfg, reader: CheckpointReader, names: list[str], windows: torch.Tensor,
                inputs: arch.LayerInputs, run: Placement) -> WidthPlan:
    """The widths of every layer, decided before the first layer is cut."""
    shape, n_layers, costs = arch.layer_shape(cfg), cfg.num_hidden_layers, arch.unit_costs(cfg)
    if settings.allocation == "adaptive":
        # The embeddings are read again for the prune: only one layer's tensors are alive during the pass.
        hidden = _hidden_states(_embeddings(reader), windows, run, run.device)
        o_columns, channels = _scoring_pass(settings, cfg, reader, names, hidden, inputs, run)
        del hidden
        return widths.adaptive(shape, n_layers, settings.budget, costs, o_columns, channels)
    if settings.allocation == "depth":
        return widths.depth(shape, n_layers, settings.budget, costs, settings.depth_spread)
    if settings.target_params:
        return widths.target_params(shape, n_layers, settings.target_params, costs)
    return widths.uniform(shape, n_layers, settings.ratio)


def _scoring_pass(settings: PruneSettings, cfg, reader: CheckpointReader, names: list[str], hidden: torch.Tensor,
                  inputs: arch.LayerInputs, run: Placement) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's o_proj column and MLP channel scores on the dense model, one layer resident at a time (FLAP's
    global allocation needs all of them before the first layer is cut)."""
    n_layers = cfg.num_hidden_layers
    o_columns, channels = [], []
    layer_reads = reader.layers(names, [arch.layer_prefix(i) for i in range(n_layers)],
                                background=run.device.type == "cuda")
    for i in range(n_layers):
        stored = next(layer_reads)
        _check_finite(f"layer {i}", stored)
        tensors = to_compute(stored, run.device, consume=True)
        stats = collect_stats(cfg, i, tensors, hidden, inputs, run)
        for name, s in stats.items():
            s.gram = None  # scores need only the per-column sums
            columns = scoring.column_scores(settings.score, tensors[arch.PROJECTIONS[name] + ".weight"], s).cpu()
            (o_columns if name == "o_proj" else channels).append(columns)
        layer = arch.build_layer(cfg, i, tensors)
        run_layer_batched(layer, hidden, inputs, cfg, i, run.micro_batch, device=run.device, matmul=run.matmul)
        del layer, tensors, stored
        log.info("scoring pass: layer %d/%d", i + 1, n_layers)
    return o_columns, channels


def _log_plan(plan: WidthPlan, shape: arch.LayerShape, costs: arch.UnitCosts, fmt: OutputFormat) -> None:
    removed = plan.params_removed(shape, costs) / (costs.layer * len(plan.layers))
    heads = sorted({w.heads for w in plan.layers})
    channels = sorted({w.channels for w in plan.layers})
    log.info("width plan (%s): heads %d -> %s, channels %d -> %s; %.1f%% of the decoder-layer parameters go; "
             "output: %s", plan.allocation, shape.num_attention_heads, _span(heads), shape.intermediate_size,
             _span(channels), 100 * removed, "remote code (per-layer widths or biases the stock class cannot hold)"
             if fmt.remote else "stock transformers checkpoint")
    if not plan.removes_heads(shape) and removed > 0 and shape.num_key_value_heads < shape.num_attention_heads:
        log.warning("no attention heads are removed: with %d query heads per key/value group, a group loses a head "
                    "only from ratio %.3f up; only MLP channels are pruned (--target-params gives the heads' "
                    "share of the budget to the channels)", shape.num_attention_heads // shape.num_key_value_heads,
                    shape.num_key_value_heads / shape.num_attention_heads)


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _shape_after(plan: WidthPlan) -> dict:
    """Uniform widths as the config names them; per-layer lists when they differ."""
    keys = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "intermediate_size": "channels"}
    values = {k: [getattr(w, f) for w in plan.layers] for k, f in keys.items()}
    return {k: v[0] if plan.uniform else v for k, v in values.items()}


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


def _log_layer(record: LayerResult, n_layers: int, shape: arch.LayerShape) -> None:
    o, d = record.projections["o_proj"], record.projections["down_proj"]
    log.info(
        "layer %d/%d  heads %d->%d  channels %d->%d  o_proj err %.4f->%.4f  down_proj err %.4f->%.4f  %.1fs",
        record.layer + 1, n_layers, shape.num_attention_heads, len(record.kept_heads), shape.intermediate_size,
        len(record.kept_channels), o.error_pruned, o.error_compensated, d.error_pruned, d.error_compensated,
        record.seconds,
    )


def _resumed_manifest(work: Path, fp: dict) -> Manifest:
    manifest = Manifest.load(work)
    diff = differences(manifest.fingerprint, fp)
    if diff:
        raise OutputError(f"cannot resume the run in {work}: {'; '.join(diff)}; rerun without --resume and with "
                          f"--overwrite to start over")
    return manifest
