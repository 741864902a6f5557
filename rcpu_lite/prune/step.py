"""One decoder layer: collect -> select -> slice -> repair -> propagate.

`LayerStep.prune` runs the dense layer over the streams (statistics, held-out inputs, local targets),
selects the kept units, slices the layer and repairs o_proj and down_proj; it returns the compact layer
before it moves the streams on, so a strategy (strategies.py) may refine it first. `LayerStep.propagate`
then casts it to the stored dtypes and runs it over the streams. The maths is in
methods/; module names and shapes in families/.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PretrainedConfig

from rcpu_lite.families import arch, units
from rcpu_lite.methods import compensation, selection
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.methods.metrics import relative_error
from rcpu_lite.methods.reconstruct import block_error
from rcpu_lite.methods.stats import FoldedStats, InputStats, PairedStats
from rcpu_lite.output.report import LayerResult, ProjectionResult
from rcpu_lite.prune.streams import Streams
from rcpu_lite.runtime import Placement, Stopwatch, cuda_matmul_precision, to_compute
from rcpu_lite.settings import PruneSettings


@dataclass
class HeldOut:
    """One projection on the held-out windows: the pruned stream's inputs x_hat and the target's inputs x
    (the dense stream's, or the same x_hat for local targets); the targets W x are formed when needed."""

    weight: torch.Tensor  # the dense projection W
    x_hat: list[torch.Tensor] = field(default_factory=list)  # tokens x d_in, a micro-batch each
    x: list[torch.Tensor] = field(default_factory=list)

    def error(self, kept: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> float:
        """||Y - (W' X_K + b)|| / ||Y|| over the held-out tokens, Y = W X."""
        err = ref = 0.0
        for x_hat, x in zip(self.x_hat, self.x):
            y = x @ self.weight.T
            z = x_hat[:, kept] @ weight.T
            if bias is not None:
                z += bias
            err += float((y - z).square().sum(dtype=torch.float64))
            ref += float(y.square().sum(dtype=torch.float64))
        return relative_error(err, ref)

    def halves(self) -> tuple["HeldOut", "HeldOut"]:
        """The held-out tokens in two halves (the first and second half of every micro-batch: whole windows when it
        holds an even number), so that a choice made on one can be measured on the other."""
        first, second = HeldOut(self.weight), HeldOut(self.weight)
        for x_hat, x in zip(self.x_hat, self.x):
            cut = x_hat.shape[0] // 2
            first.x_hat.append(x_hat[:cut])
            first.x.append(x[:cut])
            second.x_hat.append(x_hat[cut:])
            second.x.append(x[cut:])
        return first, second

    def add_to(self, stats: InputStats) -> None:
        """Add the held-out tokens to the statistics (auto refits the chosen method on every token)."""
        for x_hat, x in zip(self.x_hat, self.x):
            if isinstance(stats, PairedStats):
                stats.update_pair(x_hat, x, self.weight)
            else:
                stats.update(x_hat)


@dataclass
class Carry:
    """Local targets carried from one layer to the next (cross-block reconstruction): `previous` (the
    previous layer's dense outputs) is moved on by this layer's dense pass; `own` receives this
    layer's (the dense layer on the calibration and held-out streams it was pruned on)."""

    previous: tuple[torch.Tensor, ...] = ()
    own: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)


@dataclass
class DensePass:
    """What one dense pass of a layer over the streams leaves: statistics for compensation and for
    scores (the real windows only), held-out inputs and targets, and the calibration targets."""

    stats: dict[str, InputStats]
    score_stats: dict[str, InputStats]
    held_out: dict[str, HeldOut]
    targets: torch.Tensor | None  # the dense layer on the calibration stream (local targets); None: streams.dense
    held_out_targets: torch.Tensor | None


@dataclass
class PrunedLayer:
    """A layer after selection and repair, before it moves the streams, on the compute device: fp32 where the
    strategy trains it; otherwise only the repaired projections are fp32, the rest is in its stored dtype."""

    index: int
    config: PretrainedConfig  # the config of its own widths
    compact: dict[str, torch.Tensor]
    record: LayerResult
    dtypes: dict[str, torch.dtype]  # the stored dtypes it is written in
    targets: torch.Tensor | None  # what the block should output on the calibration / held-out streams
    held_targets: torch.Tensor | None


class _DenseLayer:
    """The dense layer with hooks that capture the inputs of o_proj and down_proj at every forward."""

    def __init__(self, cfg, index: int, tensors: dict[str, torch.Tensor], inputs: arch.LayerInputs, run: Placement):
        self.cfg, self.index, self.inputs, self.run = cfg, index, inputs, run
        shape = arch.layer_shape(cfg)
        self.dims = {"o_proj": shape.num_attention_heads * shape.head_dim, "down_proj": shape.intermediate_size}
        self.layer = arch.build_layer(cfg, index, tensors)
        self.weights = {n: arch.projection(self.layer, n).weight for n in self.dims}
        self.captured: dict[str, torch.Tensor] = {}
        captured, dims = self.captured, self.dims  # not self: a hook holding it would make a cycle with the layer
        for n in dims:
            arch.projection(self.layer, n).register_forward_pre_hook(
                lambda module, args, name=n: captured.__setitem__(name, args[0].detach().reshape(-1, dims[name]))
            )

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        self.captured.clear()
        with cuda_matmul_precision(self.run.matmul):
            return arch.run_layer(
                self.layer, hidden.to(self.run.device, non_blocking=True), self.inputs, self.cfg, self.index
            )


def dense_pass(
    cfg,
    index: int,
    tensors: dict[str, torch.Tensor],
    streams: Streams,
    inputs: arch.LayerInputs,
    run: Placement,
    keep_targets: bool,
    advance: tuple[torch.Tensor, ...] = (),
    folds: int = 0,
) -> DensePass:
    """Run the dense layer over the calibration (and held-out) windows of every stream.

    Local targets: the statistics are of the pruned stream's projection inputs. Dense targets: the
    dense stream runs beside it, micro-batch by micro-batch, so its inputs pair with the pruned ones
    token by token (PairedStats), and the dense stream moves on to the next layer in place.
    """
    dense = _DenseLayer(cfg, index, tensors, inputs, run)
    if folds:  # lstsq-cv: a Gram per fold as well (local targets only; settings refuse dense ones)
        stats = {n: FoldedStats(d, run.device, folds=folds) for n, d in dense.dims.items()}
    else:
        kind = PairedStats if streams.dense_targets else InputStats
        stats = {n: kind(d, run.device) for n, d in dense.dims.items()}
    # Generated windows: scores use the real ones (decided over all ranks: one rank may hold only real ones).
    separate_scores = run.group.any(streams.n_real < streams.calib.shape[0])
    score_stats = {n: InputStats(d, run.device) for n, d in dense.dims.items()} if separate_scores else stats
    with torch.inference_mode():
        targets = _calibration_pass(dense, streams, stats, score_stats if separate_scores else None, keep_targets)
        held_out, held_out_targets = _held_out_pass(dense, streams)
        for hidden in advance:
            for start, end in _batches(hidden.shape[0], run.micro_batch):
                hidden[start:end].copy_(dense(hidden[start:end]))
    for s in (*stats.values(), *(score_stats.values() if separate_scores else ())):
        s.reduce(run.group)  # every rank's share of the windows: one process's sums, within fp32 rounding
    for n, s in stats.items():
        if not s.is_finite():
            raise ValueError(f"layer {index}: the {n} input statistics contain NaN or Inf")
    return DensePass(stats, score_stats, held_out, targets, held_out_targets)


def _calibration_pass(
    dense: _DenseLayer,
    streams: Streams,
    stats: dict[str, InputStats],
    score_stats: dict[str, InputStats] | None,
    keep_targets: bool,
) -> torch.Tensor | None:
    """Accumulate the statistics over the calibration windows; return the local targets when asked for."""
    targets = torch.empty_like(streams.calib) if keep_targets and not streams.dense_targets else None
    for start, end in _batches(streams.calib.shape[0], dense.run.micro_batch):
        out = dense(streams.calib[start:end])
        pruned_inputs = dict(dense.captured)
        if streams.dense_targets:
            dense_out = dense(streams.dense[start:end])
            for n in dense.dims:
                stats[n].update_pair(pruned_inputs[n], dense.captured[n], dense.weights[n])
            streams.dense[start:end].copy_(dense_out)  # the dense stream moves on
        else:
            for n in dense.dims:
                stats[n].update(pruned_inputs[n])
            if targets is not None:
                targets[start:end].copy_(out)
        if score_stats is not None and start < streams.n_real:
            for n in dense.dims:
                real_tokens = (min(end, streams.n_real) - start) * streams.calib.shape[1]
                score_stats[n].update(pruned_inputs[n][:real_tokens])
    return targets


def _held_out_pass(dense: _DenseLayer, streams: Streams) -> tuple[dict[str, HeldOut], torch.Tensor | None]:
    """Keep the projection inputs on the held-out windows (and their local targets)."""
    held_out = {n: HeldOut(dense.weights[n]) for n in dense.dims}
    if streams.holdout is None:
        return held_out, None
    held_out_targets = None if streams.dense_targets else torch.empty_like(streams.holdout)
    for start, end in _batches(streams.holdout.shape[0], dense.run.micro_batch):
        out = dense(streams.holdout[start:end])
        pruned_inputs = dict(dense.captured)
        if streams.dense_targets:
            streams.holdout_dense[start:end].copy_(dense(streams.holdout_dense[start:end]))
        for n in dense.dims:
            x_hat = pruned_inputs[n].clone()
            held_out[n].x_hat.append(x_hat)
            held_out[n].x.append(dense.captured[n].clone() if streams.dense_targets else x_hat)
        if held_out_targets is not None:
            held_out_targets[start:end].copy_(out)
    return held_out, held_out_targets


def _batches(n: int, micro_batch: int):
    for start in range(0, n, micro_batch):
        yield start, min(start + micro_batch, n)


class LayerStep:
    """Prunes layers of one model with one set of settings; see the module docstring for the order."""

    def __init__(
        self,
        cfg,
        streams: Streams,
        inputs: arch.LayerInputs,
        settings: PruneSettings,
        run: Placement,
        biases: frozenset[str] = frozenset(),
        trains: bool = False,
    ):
        """`trains`: the strategy trains the compact layer, so it needs local targets and fp32 tensors."""
        self.cfg, self.streams, self.inputs, self.settings, self.run = cfg, streams, inputs, settings, run
        self.shape = arch.layer_shape(cfg)
        self.biases = biases  # the projections that get a bias in every layer
        self.trains = trains
        self.keep_targets = trains or streams.holdout is not None  # block errors need targets
        self.options = settings.compensation_options(str(run.decomposition))

    def prune(
        self,
        index: int,
        stored: dict[str, torch.Tensor],
        widths: LayerWidths,
        watch: Stopwatch,
        carry: Carry | None = None,
    ) -> PrunedLayer:
        """Collect, select, slice and repair layer `index`. `stored` is consumed so that the stored and the
        fp32 copy of the layer are never both resident. With `carry`, the dense pass also moves
        carry.previous on and leaves this layer's local targets in carry.own (cross-block reconstruction)."""
        dtypes = {k: v.dtype for k, v in stored.items()}
        tensors = to_compute(stored, self.run.device, consume=True)
        dense = dense_pass(
            self.cfg,
            index,
            tensors,
            self.streams,
            self.inputs,
            self.run,
            self.keep_targets,
            carry.previous if carry else (),
            self.settings.cv_folds if self.settings.compensate.startswith("lstsq-cv") else 0,
        )
        if carry is not None:
            carry.own = (dense.targets, dense.held_out_targets)
        watch.lap("statistics")

        weights = {name: tensors.pop(arch.PROJECTIONS[name] + ".weight") for name in dense.stats}
        kept = selection.select(
            self.settings.select,
            self.settings.score,
            weights,
            self._selection_stats(dense),
            self.shape,
            widths,
            self.settings.obs_options(),
        )
        self.run.group.broadcast(kept.tensors())  # rank 0's units, the same on every rank whatever the rounding
        kept = kept.to(self.run.device)
        dense.score_stats = {}  # with generated windows, a second set of Grams, not needed past the selection
        watch.lap("scores")

        compact, own_biases = units.slice_kept(tensors, self.shape, kept)
        layer_cfg = arch.pruned_config(self.cfg, widths.heads, widths.kv_heads, widths.channels)
        targets = self.streams.dense if self.streams.dense_targets else dense.targets
        held_targets = self.streams.holdout_dense if self.streams.dense_targets else dense.held_out_targets
        record = LayerResult(index, *kept.as_lists(), {})
        if not self.trains:
            # Written as they are, so held in their stored dtype: exactly, since they are cuts of the stored tensors.
            for name in list(compact):
                compact[name] = compact[name].to(dtypes.get(name, torch.float32))
        decomposition_seconds = self._repair(compact, weights, own_biases, kept, dense, record)
        if self.keep_targets:  # after the repairs: their Grams are gone before the W_K copies and the forward come
            record.block_error_pruned, record.held_out_block_error_pruned = self._block_errors(
                compact, weights, kept, own_biases, layer_cfg, index, targets, held_targets
            )
        del weights, own_biases
        watch.lap("compensation")
        watch.move("compensation", "decomposition", decomposition_seconds)
        return PrunedLayer(index, layer_cfg, compact, record, dtypes, targets, held_targets)

    def _selection_stats(self, dense: DensePass) -> dict[str, InputStats]:
        """The statistics the selection reads: the scores' (real calibration windows), or for OBS the Gram that
        --obs-gram names."""
        gram = self.settings.obs_gram if self.settings.select == "obs" else "calibration"
        if gram == "calibration":
            return dense.score_stats
        if gram == "all":
            return dense.stats
        out = {}
        for name, held in dense.held_out.items():
            stats = InputStats(held.weight.shape[1], self.run.device)
            held.add_to(stats)
            stats.reduce(self.run.group)
            if gram == "calibration+held-out":
                stats.gram += dense.score_stats[name].gram
            out[name] = stats
        return out

    def _repair(
        self,
        compact: dict[str, torch.Tensor],
        weights: dict[str, torch.Tensor],
        own_biases: dict[str, torch.Tensor | None],
        kept: selection.Kept,
        dense: DensePass,
        record: LayerResult,
    ) -> float:
        """Compensate o_proj, then down_proj, into `compact`; return the seconds spent in decompositions. Each
        projection's statistics and held-out inputs go as soon as it is repaired: o_proj's are gone before
        down_proj's larger temporaries. The dense weights stay, for the block errors."""
        projections, decomposition_seconds = {}, 0.0
        for name in ("o_proj", "down_proj"):
            module, columns, held = arch.PROJECTIONS[name], kept.columns(name), dense.held_out.pop(name)
            method = self.settings.compensate if name in self.settings.compensated_projections else "none"
            w, own_bias = weights[name], own_biases[name]
            held_pruned = held.error(columns, w[:, columns]) if held.x else None
            repaired = compensation.repair(w, dense.stats.pop(name), columns, method, self.options, held)
            result = repaired.result
            compact[module + ".weight"] = result.weight
            if name in self.biases or own_bias is not None:
                total = torch.zeros(w.shape[0], device=w.device) if own_bias is None else own_bias
                compact[module + ".bias"] = total if result.bias is None else total + result.bias
            projections[name] = ProjectionResult(
                result.error_pruned,
                result.error_compensated,
                repaired.label,
                result.damp_used,
                result.bias is not None,
                held_pruned,
                repaired.held_out_error,
            )
            decomposition_seconds += result.decomposition_seconds
            del w, result, repaired, held
        record.projections = {name: projections[name] for name in ("o_proj", "down_proj")}
        return decomposition_seconds

    def _block_errors(
        self, compact, weights, kept: selection.Kept, own_biases, layer_cfg, index: int, targets, held_targets
    ) -> tuple[float | None, float | None]:
        """The block's errors on calibration and held-out windows before compensation: the compact layer with
        W_K (and only the biases it had), in fp32."""
        pruned = {name: t.to(torch.float32) for name, t in compact.items()}  # exact: stored-dtype cuts, upcast
        for name, w in weights.items():
            module = arch.PROJECTIONS[name]
            pruned[module + ".weight"] = w[:, kept.columns(name)]
            if own_biases[name] is not None or name in self.biases:
                pruned[module + ".bias"] = (
                    own_biases[name] if own_biases[name] is not None else torch.zeros(w.shape[0], device=w.device)
                )
        block = [(arch.build_layer(layer_cfg, index, pruned), layer_cfg, index)]
        streams, run = self.streams, self.run
        calib = block_error(block, streams.calib, targets, self.inputs, run.micro_batch, run.device, run.group)
        held = (
            block_error(block, streams.holdout, held_targets, self.inputs, run.micro_batch, run.device)
            if streams.holdout is not None
            else None
        )
        return calib, held

    def propagate(self, pruned: PrunedLayer, watch: Stopwatch) -> dict[str, torch.Tensor]:
        """The layer as written (host, stored dtypes), after it moved the streams on and measured its errors."""
        written = {name: t.to("cpu", pruned.dtypes.get(name, torch.float32)) for name, t in pruned.compact.items()}
        pruned.compact = {}
        self.run.group.broadcast([written[k] for k in sorted(written)])  # every rank carries on with rank 0's
        # Propagate through the weights exactly as written, so the next layer sees what the saved model computes.
        pruned.record.block_error, pruned.record.held_out_block_error = propagate(
            pruned.config,
            pruned.index,
            written,
            self.streams,
            self.inputs,
            self.run,
            pruned.targets,
            pruned.held_targets,
        )
        watch.lap("propagate")
        return written


def propagate(
    layer_cfg,
    index: int,
    written: dict[str, torch.Tensor],
    streams: Streams,
    inputs: arch.LayerInputs,
    run: Placement,
    targets: torch.Tensor | None = None,
    held_targets: torch.Tensor | None = None,
) -> tuple[float | None, float | None]:
    """Run the compact layer over the pruned streams in place; with targets, return its relative errors
    against them on the calibration and held-out windows."""
    layer = arch.build_layer(layer_cfg, index, to_compute(written, run.device))
    errors = []
    for hidden, target in ((streams.calib, targets), (streams.holdout, held_targets)):
        if hidden is None:
            errors.append(None)
            continue
        err = ref = 0.0
        with torch.inference_mode(), cuda_matmul_precision(run.matmul):
            for start, end in _batches(hidden.shape[0], run.micro_batch):
                out = arch.run_layer(
                    layer, hidden[start:end].to(run.device, non_blocking=True), inputs, layer_cfg, index
                )
                if target is not None:
                    t = target[start:end].to(out.device)
                    err += float((out - t).square().sum(dtype=torch.float64))
                    ref += float(t.square().sum(dtype=torch.float64))
                hidden[start:end].copy_(out)
        if hidden is streams.calib and target is not None:  # the held-out windows are the same on every rank
            err, ref = run.group.sum_floats([err, ref])
        errors.append(relative_error(err, ref) if target is not None else None)
    return errors[0], errors[1]
