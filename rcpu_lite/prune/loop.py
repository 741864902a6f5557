"""The layer loop: read each layer, let the strategy prune it, write what it finished, stop cleanly on a
signal; and, on resume, replay the finished layers to rebuild the streams. It only moves data."""

from __future__ import annotations

import logging
import signal
import threading
import time

from rcpu_lite.display import Reporter, StageCursor
from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import WidthPlan
from rcpu_lite.output.formats import OutputFormat
from rcpu_lite.output.report import LayerResult, layer_line
from rcpu_lite.output.writer import ShardWriter
from rcpu_lite.peak_memory import StageMemory, current_rss_bytes
from rcpu_lite.prune.source import Source, check_finite
from rcpu_lite.prune.step import propagate
from rcpu_lite.prune.strategies import Finished, Plain
from rcpu_lite.prune.streams import Streams
from rcpu_lite.runtime import Stopwatch, fault_hook, to_compute

log = logging.getLogger("rcpu_lite")
STAGES_BEFORE = ("read", "statistics", "scores", "compensation")  # the laps of every strategy, then its own


class Interrupted(RuntimeError):
    """The run stopped at a layer boundary on SIGINT/SIGTERM; its finished work is kept."""

    exit_code = 75  # EX_TEMPFAIL: try again (with --resume)


class StopFlag:
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
        log.warning("%s received: finishing the current layer, then stopping (send it again to abort now)", self.signal)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class LayerLoop:
    """Runs the layers from `start` to the end through `strategy` and writes each finished one."""

    def __init__(
        self,
        source: Source,
        strategy: Plain,
        writer: ShardWriter,
        plan: WidthPlan,
        fmt: OutputFormat,
        reporter: Reporter,
        memory: StageMemory | None = None,
    ):
        self.source, self.strategy, self.writer, self.plan, self.fmt = source, strategy, writer, plan, fmt
        self.reporter, self.memory = reporter, memory
        self.run = strategy.layer_step.run

    def layers(self, start: int) -> None:
        n_layers, device = self.source.n_layers, self.run.device
        reads = self.source.layers(list(range(start, n_layers)), background=device.type == "cuda")
        stages = StageCursor([*STAGES_BEFORE, *self.strategy.stages, "write"], self.reporter.phase)
        with StopFlag() as stop:
            for i in range(start, n_layers):
                t0 = time.perf_counter()
                self.reporter.position(f"layer {i + 1}/{n_layers}")
                stages.begin()
                watch = Stopwatch(device, on_lap=stages, memory=self.memory)
                # next() rather than zip/enumerate: those keep the previous item alive while the next is read
                stored = next(reads)
                check_finite(f"layer {i}", stored)
                watch.lap("read")
                record, finished = self.strategy.step(i, stored, self.plan.layers[i], watch)
                del stored
                record.seconds = round(time.perf_counter() - t0, 3)
                record.seconds_by_stage = watch.seconds  # the write adds "write"
                record.rss_bytes = current_rss_bytes()
                record.peak_rss_by_stage, record.peak_gpu_by_stage = watch.peaks.rss, watch.peaks.gpu
                self.write(finished)
                del finished, record  # a finished layer's tensors are not kept through the next one
                if self.run.group.any(stop.signal is not None):  # every rank stops after the same layer
                    raise Interrupted(
                        f"stopped by {stop.signal or 'a signal to another rank'} after layer {i + 1} of "
                        f"{n_layers}; the finished layers are kept in {self.writer.out_dir}: rerun the "
                        f"same command with --resume to continue"
                    )
                fault_hook("after_layer", i + 1)
        self.write(self.strategy.finish())

    def write(self, finished) -> None:
        """Write each finished layer as the strategy hands it over (with the zero biases the format needs)."""
        shape = self.source.shape
        for layer in finished:
            layer.tensors.update(self.fmt.zero_biases(layer.record.widths, shape))
            prefix = arch.layer_prefix(layer.index)
            self.writer.write(layer.index + 1, {prefix + k: v for k, v in layer.tensors.items()}, layer.record)
            self.reporter.advance(layer_line(layer.record, self.source.n_layers, shape))
            del layer  # before the strategy is asked for the next one (its tensors can go)


def replay(
    source: Source,
    writer: ShardWriter,
    results: list[LayerResult],
    streams: Streams,
    inputs: arch.LayerInputs,
    run,
    n_dense: int,
) -> None:
    """Resume: run the finished compact layers (as written) over the pruned streams, and the input's first
    n_dense dense layers over the dense streams."""
    n_done = len(results)
    reads = source.layers(list(range(n_dense))) if streams.dense_targets else None
    for i in range(n_dense):
        if reads is not None:
            dense = to_compute(next(reads), run.device, consume=True)
            propagate(source.cfg, i, dense, Streams(streams.dense, holdout=streams.holdout_dense), inputs, run)
            del dense
        if i >= n_done:
            continue
        prefix = arch.layer_prefix(i)
        written = {k[len(prefix) :]: v for k, v in writer.read(i + 1).items()}
        widths = results[i].widths
        propagate(
            arch.pruned_config(source.cfg, widths.heads, widths.kv_heads, widths.channels),
            i,
            written,
            Streams(streams.calib, holdout=streams.holdout),
            inputs,
            run,
        )
        del written


__all__ = ["Finished", "Interrupted", "LayerLoop", "StopFlag", "replay"]
