"""What happens to a layer after its closed-form repair: none, block or cross reconstruction.

A strategy turns read layers into finished ones. `step(i, stored, widths, watch)` prunes layer i and returns
its record and the layers it finished (each written by the loop as it comes); `finish()` returns the layers
still held at the end. Only the loop writes. A finished layer that is held back also owes what comes after its
write (cross: deleting its side file): that runs when the loop asks for the next finished layer.

- none: each layer is finished by its own step (the paper).
- block: the compact layer is trained against its targets before it moves the streams on (Shin et al.'s BR).
- cross: windows of two adjacent layers are trained together (Shin et al.'s CR): after layer j is selected and
  compensated, the compact layers j-1 and j are trained on the pruned stream entering j-1 against the target
  after layer j (the dense stream with --targets dense, else the dense layers j-1 then j on that stream:
  j-1's local targets, moved on by j's dense pass). Layer j-1 is then finished; j waits for the window
  (j, j+1). Two compact layers are held, never more. Each window's time and its error as written go to layer
  j's record; layer 0 keeps its own block error. Before layer j-1 is written, the pending layer j (its weights
  as they would be written, its record and its local targets) goes to a side file the manifest does not count,
  so that a resumed run reloads it and continues byte for byte.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths, dense_widths
from rcpu_lite.methods.reconstruct import reconstruct
from rcpu_lite.output.checks import OutputError
from rcpu_lite.output.report import LayerResult
from rcpu_lite.output.writer import ShardWriter, read_side_file
from rcpu_lite.prune import step as steps
from rcpu_lite.prune.step import Carry, LayerStep
from rcpu_lite.prune.streams import Streams
from rcpu_lite.runtime import Stopwatch, to_compute

PENDING = "rcpu_pending-{:05d}.safetensors"
_TARGETS = ("rcpu.targets.calib", "rcpu.targets.holdout")


@dataclass
class Finished:
    """A layer as written: host tensors in their stored dtypes, names without the layer prefix."""

    index: int
    tensors: dict[str, torch.Tensor]
    record: LayerResult


class Plain:
    """--reconstruct none: the closed-form repair alone."""

    name = "none"
    trains = False  # whether the strategy trains weights (the ranks must then take equal steps)
    stages: tuple[str, ...] = ("propagate",)  # the Stopwatch laps after "compensation", in order

    def __init__(self, layer_step: LayerStep, work: Path | None = None):
        self.layer_step, self.work = layer_step, work
        self.main = layer_step.run.group.is_main  # only rank 0 touches files (distributed.py)

    def pending_after(self, finished: int, n_layers: int) -> int:
        """How many layers past the finished ones were computed and are held in a side file (resume)."""
        return 0

    def resume(self, index: int) -> None:
        """Continue after layers 0..index-1 were written and replayed."""

    def step(
        self, i: int, stored: dict[str, torch.Tensor], widths: LayerWidths, watch: Stopwatch
    ) -> tuple[LayerResult, Iterable[Finished]]:
        pruned = self.layer_step.prune(i, stored, widths, watch)
        return pruned.record, [Finished(i, self.layer_step.propagate(pruned, watch), pruned.record)]

    def finish(self) -> Iterable[Finished]:
        return []


class Block(Plain):
    """--reconstruct block: train the compact layer against its targets, then move the streams on."""

    name = "block"
    trains = True
    stages = ("reconstruction", "propagate")

    def step(
        self, i: int, stored: dict[str, torch.Tensor], widths: LayerWidths, watch: Stopwatch
    ) -> tuple[LayerResult, Iterable[Finished]]:
        s = self.layer_step
        pruned = s.prune(i, stored, widths, watch)
        layer = arch.build_layer(pruned.config, i, pruned.compact)
        result = reconstruct(
            [(layer, pruned.config, i)],
            s.streams.calib,
            pruned.targets,
            s.inputs,
            s.settings.reconstruct_options(),
            device=s.run.device,
            matmul=s.run.matmul,
            group=s.run.group,
        )
        pruned.compact = {k: v.detach() for k, v in layer.state_dict().items()}
        pruned.record.reconstruct_seconds = round(result.seconds, 3)
        watch.lap("reconstruction")
        written = s.propagate(pruned, watch)
        return pruned.record, [Finished(i, written, pruned.record)]


@dataclass
class Pending:
    """The compact layer that waits for its second window."""

    finished: Finished  # as it would be written now
    inputs: Streams  # the pruned calibration and held-out streams entering it
    targets: tuple[torch.Tensor | None, torch.Tensor | None]  # its local targets (None with dense targets)


class Cross(Plain):
    """--reconstruct cross: windows of two adjacent layers (see the module docstring)."""

    name = "cross"
    trains = True
    stages = ("propagate", "reconstruction", "propagate")

    def __init__(self, layer_step: LayerStep, work: Path | None = None):
        super().__init__(layer_step, work)
        self.pending: Pending | None = None

    def pending_after(self, finished: int, n_layers: int) -> int:
        return 1 if 0 < finished < n_layers else 0

    def step(
        self, i: int, stored: dict[str, torch.Tensor], widths: LayerWidths, watch: Stopwatch
    ) -> tuple[LayerResult, Iterable[Finished]]:
        """Prune layer i and train the window (i-1, i); layer i-1 is finished, layer i pending."""
        s, prev, streams = self.layer_step, self.pending, self.layer_step.streams
        if prev is None:  # layer 0: its input is the embeddings
            inputs, carry = streams.copy_pruned(), Carry()
        else:
            inputs, carry = prev.inputs, Carry(tuple(t for t in prev.targets if t is not None))
        pruned = s.prune(i, stored, widths, watch, carry)
        # Copies: a tensor kept as read (an fp32 norm on the CPU) would keep the reader's layer alive meanwhile.
        written = {k: v.clone() for k, v in s.propagate(pruned, watch).items()}
        record = pruned.record
        if prev is None:
            self.pending = Pending(Finished(i, written, record), inputs, carry.own)
            return record, []
        written = self._window(prev, Finished(i, written, record), inputs, watch)
        self.pending = Pending(Finished(i, written, record), inputs, carry.own)
        self._save(self.pending)
        return record, self._release(prev.finished)

    def _window(self, prev: Pending, current: Finished, inputs: Streams, watch: Stopwatch) -> dict[str, torch.Tensor]:
        """Train layers i-1 and i together (prev.finished's tensors are replaced), then move the streams past
        layer i through both as written; return layer i's tensors."""
        s, streams, i = self.layer_step, self.layer_step.streams, current.index
        targets = streams.dense if streams.dense_targets else prev.targets[0]
        held_targets = streams.holdout_dense if streams.dense_targets else prev.targets[1]
        cfgs = (self._cfg(prev.finished.record), self._cfg(current.record))
        written = current.tensors
        if self._pruned(prev.finished.record) or self._pruned(current.record):  # nothing pruned: nothing to repair
            blocks = [
                (arch.build_layer(c, k, to_compute(t, s.run.device)), c, k)
                for c, k, t in ((cfgs[0], i - 1, prev.finished.tensors), (cfgs[1], i, written))
            ]
            result = reconstruct(
                blocks,
                inputs.calib,
                targets,
                s.inputs,
                s.settings.reconstruct_options(),
                device=s.run.device,
                matmul=s.run.matmul,
                group=s.run.group,
            )
            prev.finished.tensors, written = (
                _as_stored(layer.state_dict(), like)
                for (layer, _, _), like in zip(blocks, (prev.finished.tensors, written))
            )
            current.record.reconstruct_seconds = round(result.seconds, 3)
            del blocks
            watch.lap("reconstruction")
        # The streams through the weights as written: the input of layer i (kept), then past layer i.
        steps.propagate(cfgs[0], i - 1, prev.finished.tensors, inputs, s.inputs, s.run)
        streams.calib.copy_(inputs.calib)
        if streams.holdout is not None:
            streams.holdout.copy_(inputs.holdout)
        current.record.block_error, current.record.held_out_block_error = steps.propagate(
            cfgs[1], i, written, streams, s.inputs, s.run, targets, held_targets
        )
        watch.lap("propagate")
        return written

    def _release(self, finished: Finished) -> Iterator[Finished]:
        yield finished
        if self.main:  # written: its side file is no longer needed
            self._path(finished.index).unlink(missing_ok=True)

    def finish(self) -> Iterator[Finished]:
        """The last layer (its last window is done); then the side files go."""
        if self.pending is not None:
            yield self.pending.finished
            self.pending = None
        for path in self.work.glob("rcpu_pending-*") if self.main else ():  # a .tmp too (a kill)
            path.unlink()

    def resume(self, index: int) -> None:
        """Reload the pending layer `index` (layers 0..index-1 are written and replayed)."""
        path = self._path(index)
        if not path.is_file():
            raise OutputError(
                f"cannot resume the run in {self.work}: {path.name} (layer {index}, waiting for its "
                f"second window) is missing; rerun with --overwrite to start over"
            )
        tensors, metadata = read_side_file(path)
        record = LayerResult.from_json(json.loads(metadata["record"]))
        s, streams = self.layer_step, self.layer_step.streams
        targets = tuple(None if (t := tensors.pop(n, None)) is None else t.to(streams.calib.device) for n in _TARGETS)
        if targets[0] is not None:  # the file holds every calibration window's targets: this rank takes its share
            targets = (targets[0][s.run.group.share(targets[0].shape[0])], targets[1])
        inputs = streams.copy_pruned()
        steps.propagate(self._cfg(record), index, tensors, streams, s.inputs, s.run)
        self.pending = Pending(Finished(index, tensors, record), inputs, targets)

    def _cfg(self, record: LayerResult):
        w = record.widths
        return arch.pruned_config(self.layer_step.cfg, w.heads, w.kv_heads, w.channels)

    def _pruned(self, record: LayerResult) -> bool:
        s = self.layer_step.shape
        return record.widths != dense_widths(s)

    def _path(self, index: int) -> Path:
        return self.work / PENDING.format(index)

    def _save(self, p: Pending) -> None:
        """By rank 0, with every rank's calibration targets in window order (any process count can resume); the
        held-out windows are the same on every rank."""
        group = self.layer_step.run.group
        targets = {
            n: group.gather(t.detach()) if n == _TARGETS[0] else t.detach()
            for n, t in zip(_TARGETS, p.targets)
            if t is not None
        }
        if not self.main:
            return
        tensors = {**p.finished.tensors, **targets}
        ShardWriter.save(self._path(p.finished.index), tensors, {"record": json.dumps(p.finished.record.to_json())})


def _as_stored(trained: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", like[k].dtype) for k, v in trained.items()}


STRATEGIES: dict[str, type[Plain]] = {s.name: s for s in (Plain, Block, Cross)}
