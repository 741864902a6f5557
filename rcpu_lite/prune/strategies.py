"""Cross-block reconstruction in the streaming loop (Shin et al., EMNLP 2024): windows of two adjacent layers.

After layer j is selected and compensated, the compact layers j-1 and j are trained together (AdamW, the
block options) on the pruned stream entering layer j-1 against the target after layer j: the dense
stream with --targets dense, else the dense layers j-1 then j on that stream (layer j-1's local
targets, kept from its dense pass, moved on by layer j's). Layer j-1 is then final and written; layer j
waits for the window (j, j+1). Two compact layers are held, never more, and the checkpoint is still read
one layer at a time. Each window's time and its error as written (the stream after layer j against the
target) go to layer j's record; layer 0 keeps its own block error.

Resume: before layer j-1 is written, the pending layer j (its weights as they would be written, its
record and its local targets) goes to a side file the manifest does not count. A resumed run replays the
finished layers, reloads the pending one and continues byte for byte.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rcpu_lite.families import arch
from rcpu_lite.prune.step import Carry, _reconstruct_options, propagate, prune_layer
from rcpu_lite.output.formats import OutputError
from rcpu_lite.output.manifest import fsync_dir
from rcpu_lite.output.report import LayerResult
from rcpu_lite.methods.reconstruct import reconstruct
from rcpu_lite.runtime import Placement, Stopwatch, to_compute
from rcpu_lite.prune.streams import Streams
from rcpu_lite.methods.allocation import LayerWidths

PENDING = "rcpu_pending-{:05d}.safetensors"
_TARGETS = ("rcpu.targets.calib", "rcpu.targets.holdout")


@dataclass
class Pending:
    """The compact layer that waits for its second window."""

    index: int
    tensors: dict[str, torch.Tensor]  # as they would be written: host, stored dtypes, names without the prefix
    record: LayerResult
    inputs: Streams  # the pruned calibration and held-out streams entering it
    targets: tuple[torch.Tensor | None, torch.Tensor | None]  # its local targets (None with dense targets)


class CrossWindows:
    """Runs the layers through windows of two; `write(index, tensors, record)` writes a final layer."""

    def __init__(self, cfg, streams: Streams, inputs: arch.LayerInputs, settings, run: Placement, work: Path,
                 write: Callable[[int, dict[str, torch.Tensor], LayerResult], None]):
        self.cfg, self.streams, self.inputs, self.settings, self.run = cfg, streams, inputs, settings, run
        self.work, self.write = work, write
        self.pending: Pending | None = None

    def _cfg(self, record: LayerResult):
        w = record.widths
        return arch.pruned_config(self.cfg, w.heads, w.kv_heads, w.channels)

    def _pruned(self, record: LayerResult) -> bool:
        s = arch.layer_shape(self.cfg)
        return record.widths != LayerWidths(s.num_attention_heads, s.num_key_value_heads, s.intermediate_size)

    def step(self, i: int, stored: dict[str, torch.Tensor], widths: LayerWidths, biases: frozenset[str],
             watch: Stopwatch) -> LayerResult:
        """Prune layer i, train the window (i-1, i) and write layer i-1; return layer i's (pending) record."""
        prev, streams = self.pending, self.streams
        if prev is None:  # layer 0: its input is the embeddings
            inputs = Streams(streams.calib.clone(), holdout=_clone(streams.holdout))
            carry = Carry()
        else:
            inputs, carry = prev.inputs, Carry(tuple(t for t in prev.targets if t is not None))
        written, record = prune_layer(self.cfg, i, stored, streams, self.inputs, self.settings, widths, biases, watch,
                                      self.run, carry)
        # Copies: a tensor kept as read (an fp32 norm on the CPU) would keep the reader's layer alive meanwhile.
        written = {k: v.clone() for k, v in written.items()}
        if prev is None:
            self.pending = Pending(i, written, record, inputs, carry.own)
            return record
        local = streams.dense is None
        targets = prev.targets[0] if local else streams.dense
        held_targets = prev.targets[1] if local else streams.holdout_dense
        cfgs = (self._cfg(prev.record), self._cfg(record))
        if self._pruned(prev.record) or self._pruned(record):  # nothing pruned: nothing to repair (as compensation)
            blocks = [(arch.build_layer(c, k, to_compute(t, self.run.device)), c, k)
                      for c, k, t in ((cfgs[0], i - 1, prev.tensors), (cfgs[1], i, written))]
            result = reconstruct(blocks, inputs.calib, targets, self.inputs, _reconstruct_options(self.settings),
                                 device=self.run.device, matmul=self.run.matmul, group=self.run.group)
            prev.tensors, written = (_as_stored(layer.state_dict(), like)
                                     for (layer, _, _), like in zip(blocks, (prev.tensors, written)))
            record.reconstruct_seconds = round(result.seconds, 3)
            del blocks
            watch.lap("reconstruction")
        # The streams through the weights as written: the input of layer i (kept), then past layer i.
        propagate(cfgs[0], i - 1, prev.tensors, inputs, self.inputs, self.run)
        streams.calib.copy_(inputs.calib)
        if streams.holdout is not None:
            streams.holdout.copy_(inputs.holdout)
        record.block_error, record.held_out_block_error = propagate(cfgs[1], i, written, streams, self.inputs,
                                                                    self.run, targets, held_targets)
        watch.lap("propagate")
        self.pending = Pending(i, written, record, inputs, carry.own)
        self._save(self.pending)
        self.write(i - 1, prev.tensors, prev.record)
        if self.run.group.is_main:
            self._path(i - 1).unlink(missing_ok=True)
        return record

    def finish(self) -> None:
        """Write the last layer (its last window is done) and remove the side files."""
        if self.pending is not None:
            self.write(self.pending.index, self.pending.tensors, self.pending.record)
            self.pending = None
        for path in self.work.glob("rcpu_pending-*") if self.run.group.is_main else ():  # a .tmp too (a kill)
            path.unlink()

    def resume(self, index: int) -> None:
        """Continue after layers 0..index-1 were written and replayed (the streams enter layer index)."""
        if not self._path(index).is_file():
            raise OutputError(f"cannot resume the run in {self.work}: {self._path(index).name} (layer {index}, "
                              f"waiting for its second window) is missing; rerun with --overwrite to start over")
        with safe_open(self._path(index), framework="pt") as f:
            record = LayerResult.from_json(json.loads(f.metadata()["record"]))
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        targets = tuple(None if (t := tensors.pop(n, None)) is None else t.to(self.streams.calib.device)
                        for n in _TARGETS)
        if targets[0] is not None:  # the file holds every calibration window's targets: this rank takes its share
            targets = (targets[0][self.run.group.share(targets[0].shape[0])], targets[1])
        inputs = Streams(self.streams.calib.clone(), holdout=_clone(self.streams.holdout))
        propagate(self._cfg(record), index, tensors, self.streams, self.inputs, self.run)
        self.pending = Pending(index, tensors, record, inputs, targets)

    def _path(self, index: int) -> Path:
        return self.work / PENDING.format(index)

    def _save(self, p: Pending) -> None:
        """Atomically (temporary name, fsync, rename), like the shards; by rank 0, with every rank's targets."""
        group = self.run.group
        # Every rank's calibration targets, in window order (any process count can resume); the held-out
        # windows are the same on every rank.
        targets = {n: group.gather(t.detach()) if n == _TARGETS[0] else t.detach()
                   for n, t in zip(_TARGETS, p.targets) if t is not None}
        if not group.is_main:
            return
        tensors = {k: v.detach().to("cpu").contiguous() for k, v in p.tensors.items()}
        tensors.update({n: t.to("cpu").contiguous() for n, t in targets.items()})
        path = self._path(p.index)
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata={"format": "pt", "record": json.dumps(p.record.to_json())})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _as_stored(trained: dict[str, torch.Tensor], like: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", like[k].dtype) for k, v in trained.items()}
