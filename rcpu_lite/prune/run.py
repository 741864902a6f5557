"""The streaming prune loop: read one layer -> statistics -> decide -> compensate -> write -> propagate.

The pipeline only moves data; the per-layer work is in layer.py, the algorithms in scoring.py,
compensation.py, auto.py and reconstruct.py, and every
architecture detail in arch.py. Peak memory is one layer, fixed-size statistics and the
calibration hidden states, whatever the number of layers (--reconstruct cross, cross.py: one more
compact layer, the stream entering it and its local targets).
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

from rcpu_lite import __version__
from rcpu_lite.families import arch
from rcpu_lite import calibration
from rcpu_lite import distributed
from rcpu_lite.methods import scoring
from rcpu_lite.methods import allocation
from rcpu_lite.checkpoint import CheckpointReader, ShardWriter, copy_side_files, fault_hook
from rcpu_lite.settings import PruneSettings
from rcpu_lite.models import load_tokenizer, resolve_model
from rcpu_lite.output.formats import (DiskFull, OutputError, OutputFormat, check_free_space, check_output, choose_format,
                     expected_shard_bytes, human_bytes, output_biases, publish, pruned_config_json, working_dir)
from rcpu_lite.output.manifest import Manifest, differences, fingerprint
from rcpu_lite.prune.strategies import CrossWindows
from rcpu_lite.display import PlainReporter, Reporter, StageCursor
from rcpu_lite.prune.step import dense_pass, propagate, prune_layer
from rcpu_lite.output.report import REPORT_NAME, LayerResult
from rcpu_lite.prune.streams import Streams
from rcpu_lite.methods.allocation import WidthPlan
from rcpu_lite.memory_plan import DEFAULT_BUDGET_FRACTION, MemoryPlan, parse_size
from rcpu_lite.memory_plan import plan as plan_memory
from rcpu_lite.runtime import (Placement, Stopwatch, current_rss_bytes, decomposition_device, peak_gpu_bytes, peak_rss_bytes,
                      pick_device, to_compute)

__all__ = ["prune", "Interrupted", "OutputError", "DiskFull", "working_dir", "REPORT_NAME"]
log = logging.getLogger("rcpu_lite")


class Interrupted(RuntimeError):
    """The run stopped at a layer boundary on SIGINT/SIGTERM; its finished work is kept."""

    exit_code = 75  # EX_TEMPFAIL: try again (with --resume)


def _check_finite(what: str, tensors: dict[str, torch.Tensor]) -> None:
    for name, t in tensors.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise ValueError(f"{what}: {name} contains NaN or Inf; the checkpoint is damaged or comes from a "
                             f"diverged model: use an intact copy")


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
    reporter: Reporter | None = None,
) -> dict:
    """Prune MODEL into the checkpoint directory OUT and return the run report (also written there).

    The run writes into OUT.partial and renames it to OUT when everything is written. After a
    crash or an interruption, the same call with resume=True continues from the last finished layer.
    `reporter` shows the progress (display.py); by default one log line per layer.

    Under torchrun or accelerate launch (WORLD_SIZE > 1) every process calls this: the calibration
    windows are split across them and their statistics summed (distributed.py); rank 0 writes.
    """
    settings = (settings or PruneSettings()).validate()
    started = time.perf_counter()  # the wall time includes joining the other processes
    group = distributed.from_env(distributed.local_device(pick_device(settings.device)))
    try:
        return _prune(model, out, settings, overwrite, resume, reporter or PlainReporter(), group, started)
    finally:
        group.close()


def _prune(model: str | os.PathLike, out: str | os.PathLike, settings: PruneSettings, overwrite: bool, resume: bool,
           reporter: Reporter, group: distributed.Group, started: float) -> dict:
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
    device = distributed.local_device(pick_device(settings.device))
    run, memory = _placement(settings, shape, device, group)  # a budget too small is refused before any work
    _check_split(settings, group)

    windows, n_real, holdout = _calibration_sets(settings, model_dir, reporter, group)
    fp = fingerprint(model_dir, settings, torch.cat([windows, holdout]) if holdout is not None else windows)
    manifest = _resumed_manifest(work, fp) if resume else None
    group.barrier()  # every rank has checked --out and read the manifest before rank 0 changes anything
    # This rank's contiguous share of the calibration windows (all of them in one process); the real
    # windows come first, so the share's real ones come first too. Held-out windows are not split: every
    # rank runs all of them (few), so held-out errors and auto's choices need no communication.
    calibration_tokens, share = int(windows.numel()), group.share(windows.shape[0])
    windows, n_real = windows[share], min(max(n_real - share.start, 0), share.stop - share.start)
    inputs = arch.layer_inputs(cfg, settings.seqlen, device, torch.float32)
    if manifest is not None and manifest.plan is not None:
        plan = WidthPlan.from_json(manifest.plan)
    else:
        plan = _width_plan(settings, cfg, reader, names, windows[:n_real], inputs, run, reporter)
    biases = output_biases(settings, plan, shape)
    fmt = choose_format(cfg, plan, biases)  # refuses early what could not be loaded
    _log_plan(plan, shape, costs, fmt)
    shard_bytes = expected_shard_bytes(reader, cfg, names, final_names, plan)
    check_free_space(work, sum(b for i, b in enumerate(shard_bytes) if not (manifest and manifest.done(i))))
    if manifest is None:  # every check passed: only now is anything created
        manifest = Manifest(work, fp, plan=plan.as_json())
        if group.is_main:
            if work.exists():
                shutil.rmtree(work)
            work.mkdir(parents=True)
            manifest.save()
    shards = _Shards(work, ShardWriter(work, n_layers + 2), manifest, shard_bytes, group.is_main)
    writer, write = shards.writer, shards.write

    # What the output stores too (a tied lm_head some checkpoints also store counts on neither side).
    params_before = sum(torch.Size(reader.shape(n)).numel() for n in needed)
    embed = _embeddings(reader)
    streams = Streams.start(lambda ids: arch.embed(cfg, embed, ids), windows, holdout, settings.targets == "dense",
                            n_real, lambda t: _placed(t, run, device))
    if not manifest.done(0):
        write(0, {arch.EMBED: embed})
    del embed

    first_todo = next((i for i in range(n_layers) if not manifest.done(i + 1)), n_layers)
    if first_todo:
        log.info("resuming: %d of %d layers were finished", first_todo, n_layers)

    def write_layer(i: int, written: dict[str, torch.Tensor], record: LayerResult) -> None:
        written.update(fmt.zero_biases(record.widths, shape))
        write(i + 1, {arch.layer_prefix(i) + k: v for k, v in written.items()}, record)
        reporter.advance(_layer_line(record, n_layers, shape))

    cross = CrossWindows(cfg, streams, inputs, settings, run, work, write_layer) if settings.reconstruct == "cross" \
        else None
    start = first_todo + 1 if cross and 0 < first_todo < n_layers else first_todo  # + the pending layer
    reporter.start("prune", n_layers, "layer", done=first_todo)
    if first_todo < n_layers:  # rebuild the streams by replaying the finished layers
        reporter.phase("replaying the finished layers")
        _replay(cfg, reader, names, writer, manifest, first_todo, streams, inputs, run, n_dense=start)
        if start > first_todo:
            cross.resume(first_todo)
    todo = list(range(start, n_layers))
    layer_reads = reader.layers(names, [arch.layer_prefix(i) for i in todo], background=device.type == "cuda")
    stages = StageCursor(_stage_order(settings.reconstruct), reporter.phase)
    with _StopFlag() as stop:
        for i in todo:
            t0 = time.perf_counter()
            reporter.position(f"layer {i + 1}/{n_layers}")
            stages.begin()
            watch = Stopwatch(device, on_lap=stages)
            # next() rather than zip/enumerate: those keep the previous item alive while the next is read
            stored = next(layer_reads)
            _check_finite(f"layer {i}", stored)
            watch.lap("read")
            if cross:  # writes layer i-1; layer i waits for its second window
                written, record = None, cross.step(i, stored, plan.layers[i], biases, watch)
            else:
                written, record = prune_layer(cfg, i, stored, streams, inputs, settings, plan.layers[i], biases, watch,
                                              run)
            del stored
            record.seconds = round(time.perf_counter() - t0, 3)
            record.seconds_by_stage = watch.seconds  # write() adds "write"
            record.rss_bytes = current_rss_bytes()
            if written is not None:
                write_layer(i, written, record)
            del written
            if group.any(stop.signal is not None):  # every rank stops after the same layer
                raise Interrupted(f"stopped by {stop.signal or 'a signal to another rank'} after layer {i + 1} of "
                                  f"{n_layers}; the finished layers are kept in {work}: rerun the same command with "
                                  f"--resume to continue")
            fault_hook("after_layer", i + 1)
    if cross:
        cross.finish()
    if not group.is_main:  # rank 0 writes the rest; the others return its report once it is published
        return group.from_main(lambda: None)  # (sent, not read back: OUT may be on rank 0's machine only)

    reporter.phase("write")
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
        from rcpu_lite.output import remote

        remote.install_code(work)
    layer_params = costs.layer * n_layers
    report = {
        "rcpu_lite_version": __version__,
        "model": str(model),
        "model_dir": str(model_dir),
        "settings": vars(settings),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "decomposition_device": str(run.decomposition),  # auto resolved
        "memory_plan": memory.as_dict() if memory else None,
        "peak_gpu_bytes": peak_gpu_bytes(device),
        "calibration_tokens": calibration_tokens,
        "processes": group.world,
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
    group.from_main(lambda: report)
    reporter.finish(_summary(report, out))
    return report


class _Shards:
    """Writes each shard and records it in the manifest; a full disk becomes DiskFull with the space needed."""

    def __init__(self, work: Path, writer: ShardWriter, manifest: Manifest, shard_bytes: list[int], main: bool = True):
        self.work, self.writer, self.manifest, self.shard_bytes = work, writer, manifest, shard_bytes
        self.main = main  # only rank 0 writes (distributed.py); the other ranks computed the same tensors

    def write(self, index: int, tensors: dict[str, torch.Tensor], record: LayerResult | None = None) -> None:
        if not self.main:
            return
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


def _placed(hidden: torch.Tensor, run: Placement, device: torch.device) -> torch.Tensor:
    """Where the run keeps its hidden states: on the GPU, in pinned host memory, or on the CPU."""
    return hidden.to(run.hidden_device) if run.hidden_device.type == "cuda" else (
        hidden.pin_memory() if device.type == "cuda" else hidden)  # pinned: copied to the GPU every layer


def _calibration_sets(settings: PruneSettings, model_dir: Path, reporter: Reporter,
                      group: distributed.Group = distributed.SINGLE) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The calibration windows (real ones first, then generated ones), how many are real, and the
    held-out windows (None when there are none): all of them, the same on every rank (generated
    windows by rank 0 alone, handed to the others)."""
    tokenizer = load_tokenizer(model_dir)
    real, holdout, n_real = None, None, settings.nsamples
    if settings.calib == "self":
        windows = group.from_main(lambda: _generated(settings, model_dir, settings.nsamples, reporter))
    else:
        tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.calib))
        starts = calibration.random_starts(tokens, settings.nsamples, settings.seqlen, settings.seed)
        real = windows = torch.stack([tokens[s:s + settings.seqlen] for s in starts])
        if settings.self_nsamples:
            windows = torch.cat([real, group.from_main(
                lambda: _generated(settings, model_dir, settings.self_nsamples, reporter))])
    if settings.holdout_nsamples and settings.holdout != "none":
        if settings.holdout:  # a text of its own
            held_tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.holdout))
            holdout = calibration.random_windows(held_tokens, settings.holdout_nsamples, settings.seqlen,
                                                 settings.seed + 1)
        elif real is not None:
            holdout = calibration.unused_windows(tokens, starts, settings.holdout_nsamples, settings.seqlen,
                                                 settings.seed + 1)
        else:  # --calib self: more generated windows, after the calibration ones
            holdout = group.from_main(lambda: _generated(settings, model_dir, settings.nsamples
                                                         + settings.holdout_nsamples, reporter)[settings.nsamples:])
    return windows, n_real, holdout


def _generated(settings: PruneSettings, model_dir: Path, n: int, reporter: Reporter) -> torch.Tensor:
    from rcpu_lite.selfgen import self_generated  # loads the whole model: only when asked for

    return self_generated(model_dir, n, settings.seqlen, settings.seed, device=settings.device,
                          quant=settings.gen_quant, reporter=reporter)


def _replay(cfg, reader: CheckpointReader, names: list[str], writer: ShardWriter, manifest: Manifest, n_done: int,
            streams: Streams, inputs: arch.LayerInputs, run: Placement, n_dense: int) -> None:
    """Resume: run the finished compact layers (as written) over the pruned streams, and the input's
    first n_dense dense layers over the dense streams."""
    reads = reader.layers(names, [arch.layer_prefix(i) for i in range(n_dense)]) if streams.dense is not None else None
    for i in range(n_dense):
        if reads is not None:
            dense = to_compute(next(reads), run.device, consume=True)
            propagate(cfg, i, dense, Streams(streams.dense, holdout=streams.holdout_dense), inputs, run)
            del dense
        if i >= n_done:
            continue
        prefix = arch.layer_prefix(i)
        written = {k[len(prefix):]: v for k, v in writer.read(i + 1).items()}
        widths = LayerResult.from_json(manifest.layers[i]).widths
        propagate(arch.pruned_config(cfg, widths.heads, widths.kv_heads, widths.channels), i, written,
                  Streams(streams.calib, holdout=streams.holdout), inputs, run)
        del written


def _embeddings(reader: CheckpointReader) -> torch.Tensor:
    embed = reader.get(arch.EMBED)
    _check_finite("embeddings", {arch.EMBED: embed})
    return embed


def _width_plan(settings: PruneSettings, cfg, reader: CheckpointReader, names: list[str], windows: torch.Tensor,
                inputs: arch.LayerInputs, run: Placement, reporter: Reporter) -> WidthPlan:
    """The widths of every layer, decided before the first layer is cut."""
    shape, n_layers, costs = arch.layer_shape(cfg), cfg.num_hidden_layers, arch.unit_costs(cfg)
    if settings.allocation == "adaptive":
        # The embeddings are read again for the prune: only one layer's tensors are alive during the pass.
        hidden = _placed(arch.embed(cfg, _embeddings(reader), windows), run, run.device)
        o_columns, channels = _scoring_pass(settings, cfg, reader, names, hidden, inputs, run, reporter)
        del hidden
        return allocation.adaptive(shape, n_layers, settings.budget, costs, o_columns, channels)
    if settings.allocation == "depth":
        return allocation.depth(shape, n_layers, settings.budget, costs, settings.depth_spread)
    if settings.target_params:
        return allocation.target_params(shape, n_layers, settings.target_params, costs)
    return allocation.uniform(shape, n_layers, settings.ratio)


def _scoring_pass(settings: PruneSettings, cfg, reader: CheckpointReader, names: list[str], hidden: torch.Tensor,
                  inputs: arch.LayerInputs, run: Placement, reporter: Reporter
                  ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Every layer's o_proj column and MLP channel scores on the dense model, one layer resident at a time (FLAP's
    global allocation needs all of them before the first layer is cut)."""
    n_layers = cfg.num_hidden_layers
    o_columns, channels = [], []
    layer_reads = reader.layers(names, [arch.layer_prefix(i) for i in range(n_layers)],
                                background=run.device.type == "cuda")
    reporter.start("scoring pass", n_layers, "layer")
    for i in range(n_layers):
        reporter.position(f"layer {i + 1}/{n_layers}")
        reporter.phase("read")
        stored = next(layer_reads)
        _check_finite(f"layer {i}", stored)
        tensors = to_compute(stored, run.device, consume=True)
        reporter.phase("statistics")
        stats = dense_pass(cfg, i, tensors, Streams(hidden), inputs, run, keep_targets=False).stats
        for name, s in stats.items():
            s.release()  # scores need only the per-column sums
            columns = scoring.column_scores(settings.score, tensors[arch.PROJECTIONS[name] + ".weight"], s).cpu()
            (o_columns if name == "o_proj" else channels).append(columns)
        propagate(cfg, i, tensors, Streams(hidden), inputs, run)
        del tensors, stored, stats
        reporter.advance(f"scoring pass: layer {i + 1}/{n_layers}")
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


def _placement(settings: PruneSettings, shape: arch.LayerShape, device: torch.device,
               group: distributed.Group = distributed.SINGLE) -> tuple[Placement, MemoryPlan | None]:
    """On CUDA, plan the micro-batch and the hidden states' place within the GPU memory budget (planned
    for all the windows, a safe bound for one rank's share)."""
    matmul = "tf32" if settings.matmul == "tf32" else "ieee"
    decomposition = decomposition_device(settings.decomposition_device, device)
    if device.type != "cuda":
        if settings.max_gpu_memory:
            log.warning("--max-gpu-memory only applies to a CUDA device; this run is on the CPU")
        return Placement(device, device, settings.micro_batch, matmul, group, decomposition), None
    budget = (parse_size(settings.max_gpu_memory) if settings.max_gpu_memory
              else int(DEFAULT_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0]))
    on_gpu = decomposition == device  # the fp64 M takes room too
    memory = plan_memory(shape, settings.nsamples, settings.seqlen, budget, settings.micro_batch, on_gpu)
    log.info("GPU budget %.2f GiB: micro-batch %d, calibration hidden states on the %s", budget / 2**30,
             memory.micro_batch, "GPU" if memory.hidden_on_device else "host (they do not fit)")
    torch.cuda.reset_peak_memory_stats(device)
    return Placement(device, device if memory.hidden_on_device else torch.device("cpu"), memory.micro_batch,
                     matmul, group, decomposition), memory


def _check_split(settings: PruneSettings, group: distributed.Group) -> None:
    """Refuse, before any work, a split of the calibration windows the ranks cannot share."""
    if group.world == 1:
        return
    n = settings.nsamples + (settings.self_nsamples if settings.calib != "self" else 0)
    if n < group.world:
        raise ValueError(f"{n} calibration windows cannot be split across {group.world} processes: give at least "
                         f"one window per process (--nsamples)")
    if settings.reconstruct != "none" and n % group.world:
        raise ValueError(f"--reconstruct {settings.reconstruct} with {group.world} processes needs a number of "
                         f"calibration windows ({n}) divisible by {group.world}: every rank must take the same "
                         f"number of optimiser steps, whose gradients are averaged")


def _layer_line(record: LayerResult, n_layers: int, shape: arch.LayerShape) -> str:
    o, d = record.projections["o_proj"], record.projections["down_proj"]
    return (f"layer {record.layer + 1}/{n_layers}  heads {shape.num_attention_heads}->{len(record.kept_heads)}  "
            f"channels {shape.intermediate_size}->{len(record.kept_channels)}  "
            f"o_proj err {o.error_pruned:.4f}->{o.error_compensated:.4f}  "
            f"down_proj err {d.error_pruned:.4f}->{d.error_compensated:.4f}  {record.seconds:.1f}s")


def _stage_order(reconstruct: str) -> list[str]:
    """The Stopwatch laps of one layer in the order they come (layer.py, and cross.py's window after it)."""
    middle = {"none": ["propagate"], "block": ["reconstruction", "propagate"],
              "cross": ["propagate", "reconstruction", "propagate"]}[reconstruct]
    return ["read", "statistics", "scores", "compensation", *middle, "write"]


def _summary(report: dict, out: Path) -> list[str]:
    """The end of a run: parameters before and after, time, peak memory and where everything went."""
    gpu = report["peak_gpu_bytes"]
    return [
        f"wrote {out}: {report['params_before']} -> {report['params_after']} parameters "
        f"({100 * report['param_reduction']:.1f}% fewer) in {report['wall_seconds']:.0f}s",
        f"peak memory {human_bytes(report['peak_rss_bytes'])} resident"
        + (f", {human_bytes(gpu)} on the GPU" if gpu is not None else "")
        + f"; report: {out / REPORT_NAME} (rcpu-lite inspect {out})",
    ]


def _resumed_manifest(work: Path, fp: dict) -> Manifest:
    manifest = Manifest.load(work)
    diff = differences(manifest.fingerprint, fp)
    if diff:
        raise OutputError(f"cannot resume the run in {work}: {'; '.join(diff)}; rerun without --resume and with "
                          f"--overwrite to start over")
    return manifest
