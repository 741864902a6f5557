"""prune(): the orchestrator of a run. It resolves the input, plans the widths, opens the output, runs the layer
loop (loop.py) with the strategy the settings name (strategies.py), and publishes the output with its report.

Peak memory is one layer, fixed-size statistics and the calibration hidden states, whatever the number of
layers (cross-block reconstruction: one more compact layer, the stream entering it and its local targets).
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite import __version__, distributed
from rcpu_lite.display import PlainReporter, Reporter
from rcpu_lite.families import arch
from rcpu_lite.memory_plan import DEFAULT_BUDGET_FRACTION, MemoryPlan, parse_size
from rcpu_lite.memory_plan import plan as plan_memory
from rcpu_lite.methods.allocation import WidthPlan, dense_widths
from rcpu_lite.output import remote
from rcpu_lite.output.checks import (
    DiskFull,
    OutputError,
    check_free_space,
    check_output,
    expected_shard_bytes,
    working_dir,
)
from rcpu_lite.output.formats import OutputFormat, choose_format, output_biases, pruned_config_json
from rcpu_lite.output.fsutil import publish
from rcpu_lite.output.manifest import MANIFEST_NAME, Manifest, differences, fingerprint
from rcpu_lite.output.report import REPORT_NAME, LayerResult, shape_after, summary
from rcpu_lite.output.runtimes import quantisation_warning
from rcpu_lite.output.writer import ShardWriter
from rcpu_lite.peak_memory import StageMemory
from rcpu_lite.prune.loop import Interrupted, LayerLoop, replay
from rcpu_lite.prune.plan import log_plan, width_plan
from rcpu_lite.prune.source import Source
from rcpu_lite.prune.step import LayerStep
from rcpu_lite.prune.strategies import STRATEGIES
from rcpu_lite.prune.streams import Streams
from rcpu_lite.prune.windows import calibration_sets
from rcpu_lite.runtime import Placement, decomposition_device, pick_device
from rcpu_lite.settings import PruneSettings

__all__ = ["prune", "Interrupted", "OutputError", "DiskFull", "working_dir", "REPORT_NAME"]
log = logging.getLogger("rcpu_lite")


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
        return _prune(model, Path(out), settings, overwrite, resume, reporter or PlainReporter(), group, started)
    finally:
        group.close()


@dataclass
class _Run:
    """What the stages of one run share."""

    source: Source
    settings: PruneSettings
    work: Path
    run: Placement
    memory: MemoryPlan | None
    group: distributed.Group
    reporter: Reporter
    stages: StageMemory  # peak memory by stage
    manifest: Manifest | None = None
    fingerprint: dict | None = None
    calibration_tokens: int = 0

    def place(self, hidden: torch.Tensor) -> torch.Tensor:
        """Where the run keeps its hidden states: on the GPU, in pinned host memory, or on the CPU."""
        run = self.run
        return (
            hidden.to(run.hidden_device)
            if run.hidden_device.type == "cuda"
            else (hidden.pin_memory() if run.device.type == "cuda" else hidden)
        )  # pinned: copied to the GPU every layer


def _prune(
    model: str | os.PathLike,
    out: Path,
    settings: PruneSettings,
    overwrite: bool,
    resume: bool,
    reporter: Reporter,
    group: distributed.Group,
    started: float,
) -> dict:
    source = Source.open(model)
    work = check_output(out, source.model_dir, overwrite, resume)
    device = distributed.local_device(pick_device(settings.device))
    run, memory = _placement(settings, source.shape, device, group)  # a budget too small is refused before any work
    _check_split(settings, group)
    r = _Run(source, settings, work, run, memory, group, reporter, StageMemory(device))
    try:
        return _prune_stages(r, model, out, resume, started)
    finally:
        r.stages.close()


def _prune_stages(r: _Run, model, out: Path, resume: bool, started: float) -> dict:
    """The stages of a run, each marked in r.stages (peak memory by stage)."""
    source, settings, run, group, reporter = r.source, r.settings, r.run, r.group, r.reporter
    device = run.device
    streams_windows, n_real, holdout = _windows(r, resume)
    r.stages.mark("windows")
    inputs = arch.layer_inputs(source.cfg, settings.seqlen, device, torch.float32)
    plan = (
        WidthPlan.from_json(r.manifest.plan)
        if r.manifest is not None and r.manifest.plan is not None
        else width_plan(settings, source, streams_windows[:n_real], inputs, run, reporter, r.place)
    )
    biases = output_biases(settings, plan, source.shape)
    fmt = choose_format(source.cfg, plan, biases)  # refuses early what could not be loaded
    log_plan(plan, source.shape, arch.unit_costs(source.cfg), fmt)
    writer = _open_output(r, plan)
    r.stages.mark("plan")
    params_before = source.params()
    streams = Streams.start(
        source.embedder(streams_windows, holdout),
        streams_windows,
        holdout,
        settings.targets == "dense",
        n_real,
        r.place,
    )
    if not writer.done(0):
        writer.write(0, {arch.EMBED: source.chunked(arch.EMBED)})
    r.stages.mark("embeddings")
    writer.memory = r.stages  # from here each layer's record gets its write's peak
    strategy_class = STRATEGIES[settings.reconstruct]
    step = LayerStep(source.cfg, streams, inputs, settings, run, biases, trains=strategy_class.trains)
    strategy = strategy_class(step, r.work)
    first_todo, start = _resume_layers(r, strategy, writer, streams, inputs)
    LayerLoop(source, strategy, writer, plan, fmt, reporter, r.stages).layers(start)
    if not group.is_main:  # rank 0 writes the rest; the others return its report once it is published
        return group.from_main(lambda: None)  # (sent, not read back: OUT may be on rank 0's machine only)
    report = _finish(r, writer, plan, fmt, biases, params_before, first_todo if resume else None, model, started)
    publish(r.work, out.resolve(), remove_last=MANIFEST_NAME)
    group.from_main(lambda: report)
    warning = quantisation_warning(plan.layers, dense_widths(source.shape), source.shape.head_dim)
    reporter.finish(([warning] if warning else []) + summary(report, out))  # the summary ends the run
    return report


def _windows(r: _Run, resume: bool) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """This rank's calibration windows, how many of them are real, and the held-out windows; also reads the
    manifest of the run to resume (its fingerprint covers every window)."""
    windows, n_real, holdout = calibration_sets(r.settings, r.source.model_dir, r.reporter, r.group)
    fp = fingerprint(r.source.model_dir, r.settings, torch.cat([windows, holdout]) if holdout is not None else windows)
    r.manifest = _resumed_manifest(r.work, fp) if resume else None
    r.fingerprint = fp
    r.group.barrier()  # every rank has checked --out and read the manifest before rank 0 changes anything
    # This rank's contiguous share of the calibration windows (all of them in one process); the real
    # windows come first, so the share's real ones come first too. Held-out windows are not split: every
    # rank runs all of them (few), so held-out errors and auto's choices need no communication.
    r.calibration_tokens, share = int(windows.numel()), r.group.share(windows.shape[0])
    return windows[share], min(max(n_real - share.start, 0), share.stop - share.start), holdout


def _open_output(r: _Run, plan: WidthPlan) -> ShardWriter:
    """Check the disk space, then (only now is anything created) the working folder and its manifest."""
    source, manifest = r.source, r.manifest
    shard_bytes = expected_shard_bytes(source.reader, source.cfg, source.names, source.final_names, plan)
    check_free_space(r.work, sum(b for i, b in enumerate(shard_bytes) if not (manifest and manifest.done(i))))
    if manifest is None:
        r.manifest = manifest = Manifest(r.work, r.fingerprint, plan=plan.as_json())
        if r.group.is_main:
            if r.work.exists():
                shutil.rmtree(r.work)
            r.work.mkdir(parents=True)
            manifest.save()
    return ShardWriter(r.work, source.n_layers + 2, manifest, shard_bytes, r.group.is_main)


def _resume_layers(
    r: _Run, strategy, writer: ShardWriter, streams: Streams, inputs: arch.LayerInputs
) -> tuple[int, int]:
    """The first layer not written yet, and the first the loop runs (past a layer the strategy held pending);
    on resume, the streams are rebuilt up to the latter."""
    n_layers = r.source.n_layers
    first_todo = next((i for i in range(n_layers) if not r.manifest.done(i + 1)), n_layers)
    if first_todo:
        log.info("resuming: %d of %d layers were finished", first_todo, n_layers)
    pending = strategy.pending_after(first_todo, n_layers)
    r.reporter.start("prune", n_layers, "layer", done=first_todo)
    if first_todo < n_layers:  # rebuild the streams by replaying the finished layers
        r.reporter.phase("replaying the finished layers")
        results = [LayerResult.from_json(d) for d in r.manifest.layers[:first_todo]]
        replay(r.source, writer, results, streams, inputs, r.run, n_dense=first_todo + pending)
        if pending:
            strategy.resume(first_todo)
        if first_todo:
            r.stages.mark("replay")
    return first_todo, first_todo + pending


def _finish(
    r: _Run,
    writer: ShardWriter,
    plan: WidthPlan,
    fmt: OutputFormat,
    biases: frozenset[str],
    params_before: int,
    resumed_at: int | None,
    model,
    started: float,
) -> dict:
    """Write the final tensors, the index, config.json, the side files and the report into OUT.partial."""
    source = r.source
    r.reporter.phase("write")
    if not writer.done(source.n_layers + 1):
        writer.write(source.n_layers + 1, {n: source.chunked(n) for n in source.final_names})
    r.stages.mark("head")
    params_after = writer.finish()
    source.reader.close()
    results = [LayerResult.from_json(d) for d in r.manifest.layers]
    new_config = pruned_config_json(source.model_dir, [x.widths for x in results], source.shape, fmt, biases)
    writer.write_json("config.json", new_config)
    writer.copy_side_files(source.model_dir)
    if fmt.remote:
        remote.install_code(r.work)
    r.stages.mark("finish")
    report = _report(r, plan, fmt, biases, params_before, params_after, new_config, resumed_at, model, started)
    writer.write_json(REPORT_NAME, report)
    return report


def _report(
    r: _Run,
    plan: WidthPlan,
    fmt: OutputFormat,
    biases: frozenset[str],
    params_before: int,
    params_after: int,
    new_config: dict,
    resumed_at: int | None,
    model,
    started: float,
) -> dict:
    """The run report; its keys and their order are part of the output format (rcpu-lite inspect reads it)."""
    source, run, device = r.source, r.run, r.run.device
    layer_params = arch.unit_costs(source.cfg).layer * source.n_layers
    return {
        "rcpu_lite_version": __version__,
        "model": str(model),
        "model_dir": str(source.model_dir),
        "settings": vars(r.settings),
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "decomposition_device": str(run.decomposition),  # auto resolved
        "memory_plan": r.memory.as_dict() if r.memory else None,
        "peak_gpu_bytes": r.stages.peak_gpu_bytes(),
        "calibration_tokens": r.calibration_tokens,
        "processes": r.group.world,
        "params_before": params_before,
        "params_after": params_after,
        "param_reduction": 1 - params_after / params_before,
        "decoder_layer_params_before": layer_params,
        "decoder_layer_param_reduction": (params_before - params_after) / layer_params,
        "width_plan": plan.as_json(),
        "biases": sorted(biases),
        "output_format": "remote-code" if fmt.remote else "stock",
        "shape_before": vars(source.shape),
        "shape_after": shape_after(plan),
        "model_type_after": new_config["model_type"],
        "resumed_at_layer": resumed_at,
        "wall_seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": r.stages.peak_rss_bytes(),  # the run's own (getrusage's would include a parent's)
        # Most bytes of checkpoint tensors alive at once (tracked by the reader), independent of depth.
        "peak_weight_bytes": source.reader.peak_live_bytes,
        # The peak of each stage (a layer stage: its highest over the layers), and how it was measured.
        "peak_rss_by_stage": r.stages.peaks.rss,
        "peak_gpu_by_stage": r.stages.peaks.gpu,
        "peak_memory_probe": r.stages.probe,
        "layers": r.manifest.layers,
    }


def _placement(
    settings: PruneSettings, shape: arch.LayerShape, device: torch.device, group: distributed.Group = distributed.SINGLE
) -> tuple[Placement, MemoryPlan | None]:
    """On CUDA, plan the micro-batch and the hidden states' place within the GPU memory budget (planned
    for all the windows, a safe bound for one rank's share)."""
    matmul = "tf32" if settings.matmul == "tf32" else "ieee"
    decomposition = decomposition_device(settings.decomposition_device, device)
    if device.type != "cuda":
        if settings.max_gpu_memory:
            log.warning("--max-gpu-memory only applies to a CUDA device; this run is on the CPU")
        return Placement(device, device, settings.micro_batch, matmul, group, decomposition), None
    budget = (
        parse_size(settings.max_gpu_memory)
        if settings.max_gpu_memory
        else int(DEFAULT_BUDGET_FRACTION * torch.cuda.mem_get_info(device)[0])
    )
    on_gpu = decomposition == device  # the fp64 M takes room too
    memory = plan_memory(shape, settings.nsamples, settings.seqlen, budget, settings.micro_batch, on_gpu)
    log.info(
        "GPU budget %.2f GiB: micro-batch %d, calibration hidden states on the %s",
        budget / 2**30,
        memory.micro_batch,
        "GPU" if memory.hidden_on_device else "host (they do not fit)",
    )
    torch.cuda.reset_peak_memory_stats(device)
    return Placement(
        device,
        device if memory.hidden_on_device else torch.device("cpu"),
        memory.micro_batch,
        matmul,
        group,
        decomposition,
    ), memory


def _check_split(settings: PruneSettings, group: distributed.Group) -> None:
    """Refuse, before any work, a split of the calibration windows the ranks cannot share."""
    if group.world == 1:
        return
    n = settings.nsamples + (settings.self_nsamples if settings.calib != "self" else 0)
    if n < group.world:
        raise ValueError(
            f"{n} calibration windows cannot be split across {group.world} processes: give at least "
            f"one window per process (--nsamples)"
        )
    if STRATEGIES[settings.reconstruct].trains and n % group.world:
        raise ValueError(
            f"--reconstruct {settings.reconstruct} with {group.world} processes needs a number of "
            f"calibration windows ({n}) divisible by {group.world}: every rank must take the same "
            f"number of optimiser steps, whose gradients are averaged"
        )


def _resumed_manifest(work: Path, fp: dict) -> Manifest:
    manifest = Manifest.load(work)
    diff = differences(manifest.fingerprint, fp)
    if diff:
        raise OutputError(
            f"cannot resume the run in {work}: {'; '.join(diff)}; rerun without --resume and with "
            f"--overwrite to start over"
        )
    return manifest
