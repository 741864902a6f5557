"""The work on one decoder layer: a dense pass that collects statistics (and targets), then select,
compensate, optionally reconstruct, and measure the errors on calibration and held-out windows.

The pipeline moves the data (streams.Streams) from layer to layer; the algorithms live in
scoring.py, compensation.py, auto.py and reconstruct.py; module names and shapes in arch.py.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from rcpu_lite.families import arch
from rcpu_lite.methods import auto
from rcpu_lite.methods import compensation
from rcpu_lite.methods import scoring
from rcpu_lite.families import units
from rcpu_lite.methods.compensation import CompensationOptions
from rcpu_lite.settings import PruneSettings
from rcpu_lite.output.report import LayerResult, ProjectionResult
from rcpu_lite.methods.reconstruct import ReconstructOptions, block_error, reconstruct
from rcpu_lite.runtime import Placement, Stopwatch, cuda_matmul_precision, decomposition_device, to_compute
from rcpu_lite.methods.stats import InputStats, PairedStats
from rcpu_lite.prune.streams import Streams
from rcpu_lite.methods.allocation import LayerWidths


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
        return (err / ref) ** 0.5 if ref > 0 else 0.0

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


def dense_pass(cfg, index: int, tensors: dict[str, torch.Tensor], streams: Streams, inputs: arch.LayerInputs,
               run: Placement, keep_targets: bool, advance: tuple[torch.Tensor, ...] = ()) -> DensePass:
    """Run the dense layer over the calibration (and held-out) windows of every stream.

    Local targets: the statistics are of the pruned stream's projection inputs. Dense targets: the
    dense stream runs beside it, micro-batch by micro-batch, so its inputs pair with the pruned ones
    token by token (PairedStats), and the dense stream moves on to the next layer in place.
    """
    shape = arch.layer_shape(cfg)
    dims = {"o_proj": shape.num_attention_heads * shape.head_dim, "down_proj": shape.intermediate_size}
    paired = streams.dense is not None
    kind = PairedStats if paired else InputStats
    stats = {n: kind(d, run.device) for n, d in dims.items()}
    # Generated windows: scores use the real ones (decided over all ranks: one rank may hold only real ones).
    separate_scores = run.group.any(streams.n_real < streams.calib.shape[0])
    score_stats = {n: InputStats(d, run.device) for n, d in dims.items()} if separate_scores else stats
    layer = arch.build_layer(cfg, index, tensors)
    weights = {n: arch.projection(layer, n).weight for n in dims}
    captured: dict[str, torch.Tensor] = {}
    for n in dims:
        arch.projection(layer, n).register_forward_pre_hook(
            lambda module, args, name=n: captured.__setitem__(name, args[0].detach().reshape(-1, dims[name])))

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        captured.clear()
        with cuda_matmul_precision(run.matmul):
            return arch.run_layer(layer, hidden.to(run.device, non_blocking=True), inputs, cfg, index)

    targets = torch.empty_like(streams.calib) if keep_targets and not paired else None
    with torch.inference_mode():
        for start, end in _batches(streams.calib.shape[0], run.micro_batch):
            out = forward(streams.calib[start:end])
            pruned_inputs = dict(captured)
            if paired:
                dense_out = forward(streams.dense[start:end])
                for n in dims:
                    stats[n].update_pair(pruned_inputs[n], captured[n], weights[n])
                streams.dense[start:end].copy_(dense_out)  # the dense stream moves on
            else:
                for n in dims:
                    stats[n].update(pruned_inputs[n])
                if targets is not None:
                    targets[start:end].copy_(out)
            if separate_scores and start < streams.n_real:
                for n in dims:
                    real_tokens = (min(end, streams.n_real) - start) * streams.calib.shape[1]
                    score_stats[n].update(pruned_inputs[n][:real_tokens])
        held_out = {n: HeldOut(weights[n]) for n in dims}
        held_out_targets = None
        if streams.holdout is not None:
            held_out_targets = None if paired else torch.empty_like(streams.holdout)
            for start, end in _batches(streams.holdout.shape[0], run.micro_batch):
                out = forward(streams.holdout[start:end])
                pruned_inputs = dict(captured)
                if paired:
                    streams.holdout_dense[start:end].copy_(forward(streams.holdout_dense[start:end]))
                for n in dims:
                    x_hat = pruned_inputs[n].clone()
                    held_out[n].x_hat.append(x_hat)
                    held_out[n].x.append(captured[n].clone() if paired else x_hat)
                if held_out_targets is not None:
                    held_out_targets[start:end].copy_(out)
        for hidden in advance:
            for start, end in _batches(hidden.shape[0], run.micro_batch):
                hidden[start:end].copy_(forward(hidden[start:end]))
    for s in (*stats.values(), *(score_stats.values() if separate_scores else ())):
        s.reduce(run.group)  # every rank's share of the windows: one process's sums, within fp32 rounding
    for n, s in stats.items():
        if not s.is_finite():
            raise ValueError(f"layer {index}: the {n} input statistics contain NaN or Inf")
    return DensePass(stats, score_stats, held_out, targets, held_out_targets)


def _batches(n: int, micro_batch: int):
    for start in range(0, n, micro_batch):
        yield start, min(start + micro_batch, n)


def prune_layer(
    cfg,
    index: int,
    stored: dict[str, torch.Tensor],
    streams: Streams | torch.Tensor,
    inputs: arch.LayerInputs,
    settings: PruneSettings,
    widths: LayerWidths | None = None,
    biases: frozenset[str] = frozenset(),
    watch: Stopwatch | None = None,
    placement: Placement | None = None,
    carry: Carry | None = None,
) -> tuple[dict[str, torch.Tensor], LayerResult]:
    """Prune one decoder layer to `widths`, repair it, and move the streams past it.

    Returns its compact tensors (on the host, in their stored dtypes) and its record. Order (DESIGN.md
    section 2): one dense fp32 pass collects the o_proj and down_proj input statistics; then score,
    select, compensate both projections (down_proj first: its Gram is the largest and goes first),
    optionally reconstruct the block, and run the compact layer over the streams (in place).
    `stored` is consumed so that the stored and the fp32 copy of the layer are never both resident.
    `biases` names the projections that get a bias in every layer. With `carry`, the dense pass also
    moves carry.previous on and leaves this layer's local targets in carry.own (--reconstruct cross).
    """
    streams = streams if isinstance(streams, Streams) else Streams(streams)
    shape = arch.layer_shape(cfg)
    widths = widths or _uniform_widths(shape, settings.ratio)
    here = streams.calib.device
    run = placement or Placement(here, here, settings.micro_batch,
                                 decomposition=decomposition_device(settings.decomposition_device, here))
    watch = watch or Stopwatch(run.device)
    dtypes = {k: v.dtype for k, v in stored.items()}
    tensors = to_compute(stored, run.device, consume=True)
    keep_targets = settings.reconstruct != "none" or streams.holdout is not None
    dense = dense_pass(cfg, index, tensors, streams, inputs, run, keep_targets, carry.previous if carry else ())
    if carry is not None:
        carry.own = (dense.targets, dense.held_out_targets)
    watch.lap("statistics")

    weights = {name: tensors.pop(arch.PROJECTIONS[name] + ".weight") for name in dense.stats}
    heads, kv_heads, channels = scoring.select(settings.score, weights, dense.score_stats, shape, widths)
    run.group.broadcast([heads, kv_heads, channels])  # rank 0's units: the same on every rank whatever the rounding
    on_device = [t.to(run.device) for t in (heads, kv_heads, channels)]
    kept_columns = {"o_proj": units.head_columns(heads, shape.head_dim).to(run.device), "down_proj": on_device[2]}
    watch.lap("scores")

    compact = {}  # fp32, on the compute device, until written
    for name in list(tensors):
        if name in (arch.PROJECTIONS[p] + ".bias" for p in dense.stats):
            continue  # an output bias keeps its shape; a compensating bias is added to it below
        compact[name] = units.slice_tensor(name, tensors.pop(name), shape, *on_device)
    layer_cfg = arch.pruned_config(cfg, widths.heads, widths.kv_heads, widths.channels)
    targets = streams.dense if streams.dense is not None else dense.targets
    held_targets = streams.holdout_dense if streams.holdout_dense is not None else dense.held_out_targets
    own_biases = {name: tensors.pop(arch.PROJECTIONS[name] + ".bias", None) for name in dense.stats}
    block_errors = _block_errors_before(compact, weights, kept_columns, own_biases, biases, layer_cfg, index, streams,
                                        targets, held_targets, inputs, run) if keep_targets else (None, None)

    options = CompensationOptions(decomposition=settings.decomposition, damp=settings.damp, damp_abs=settings.damp_abs,
                                  decomposition_device=str(run.decomposition))
    projections, decomposition_seconds = {}, 0.0
    for name in ("down_proj", "o_proj"):
        module, kept, held = arch.PROJECTIONS[name], kept_columns[name], dense.held_out[name]
        method = settings.compensate if name in settings.compensated_projections else "none"
        w, own_bias = weights.pop(name), own_biases.pop(name)
        held_pruned = held.error(kept, w[:, kept]) if held.x else None
        if method in auto.METHODS:
            choice = auto.choose(w, dense.stats[name], kept, held, options, method.endswith("+bias"), refit=held.add_to)
            chosen, result, held_compensated = choice.label, choice.result, choice.held_out_error
        else:
            chosen, result = method, compensation.compensate(w, dense.stats[name], kept, method, options, release=True)
            held_compensated = held.error(kept, result.weight, result.bias) if held.x else None
        compact[module + ".weight"] = result.weight
        if name in biases or own_bias is not None:
            total = torch.zeros(w.shape[0], device=w.device) if own_bias is None else own_bias
            compact[module + ".bias"] = total if result.bias is None else total + result.bias
        projections[name] = ProjectionResult(result.error_pruned, result.error_compensated, chosen, result.damp_used,
                                             result.bias is not None, held_pruned, held_compensated)
        decomposition_seconds += result.decomposition_seconds
        del w, result
    del dense.held_out, dense.stats
    watch.lap("compensation")
    watch.move("compensation", "decomposition", decomposition_seconds)

    record = LayerResult(index, heads.tolist(), kv_heads.tolist(), channels.tolist(),
                         {name: projections[name] for name in ("o_proj", "down_proj")})
    record.block_error_pruned, record.held_out_block_error_pruned = block_errors
    if settings.reconstruct == "block":
        layer = arch.build_layer(layer_cfg, index, compact)
        result = reconstruct([(layer, layer_cfg, index)], streams.calib, targets, inputs, _reconstruct_options(settings),
                             device=run.device, matmul=run.matmul, group=run.group)
        compact = {k: v.detach() for k, v in layer.state_dict().items()}
        record.reconstruct_seconds = round(result.seconds, 3)
        watch.lap("reconstruction")
    written = {name: t.to("cpu", dtypes.get(name, torch.float32)) for name, t in compact.items()}
    del compact
    run.group.broadcast([written[k] for k in sorted(written)])  # every rank carries on with what rank 0 writes
    # Propagate through the weights exactly as written, so the next layer sees what the saved model computes.
    errors = propagate(layer_cfg, index, written, streams, inputs, run, targets, held_targets)
    record.block_error, record.held_out_block_error = errors
    del dense
    watch.lap("propagate")
    return written, record


def _block_errors_before(compact, weights, kept_columns, own_biases, biases, layer_cfg, index: int, streams: Streams,
                         targets, held_targets, inputs, run: Placement) -> tuple[float | None, float | None]:
    """The block's errors on calibration and held-out windows before compensation: the compact layer with
    W_K (and only the biases it had). Measured before the compensations run, so that their temporaries
    and these W_K copies are never alive together."""
    pruned = dict(compact)
    for name, w in weights.items():
        module = arch.PROJECTIONS[name]
        pruned[module + ".weight"] = w[:, kept_columns[name]]
        if own_biases[name] is not None or name in biases:
            pruned[module + ".bias"] = own_biases[name] if own_biases[name] is not None else torch.zeros(
                w.shape[0], device=w.device)
    block = [(arch.build_layer(layer_cfg, index, pruned), layer_cfg, index)]
    calib = block_error(block, streams.calib, targets, inputs, run.micro_batch, run.device, run.group)
    held = block_error(block, streams.holdout, held_targets, inputs, run.micro_batch, run.device) \
        if streams.holdout is not None else None
    return calib, held


def propagate(layer_cfg, index: int, written: dict[str, torch.Tensor], streams: Streams, inputs: arch.LayerInputs,
              run: Placement, targets: torch.Tensor | None = None, held_targets: torch.Tensor | None = None
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
                out = arch.run_layer(layer, hidden[start:end].to(run.device, non_blocking=True), inputs, layer_cfg,
                                     index)
                if target is not None:
                    t = target[start:end].to(out.device)
                    err += float((out - t).square().sum(dtype=torch.float64))
                    ref += float(t.square().sum(dtype=torch.float64))
                hidden[start:end].copy_(out)
        if hidden is streams.calib and target is not None:  # the held-out windows are the same on every rank
            err, ref = run.group.sum_floats([err, ref])
        errors.append((err / ref) ** 0.5 if target is not None and ref > 0 else None)
    return errors[0], errors[1]


def _uniform_widths(shape: arch.LayerShape, ratio: float) -> LayerWidths:
    from rcpu_lite.methods.allocation import uniform

    return uniform(shape, 1, ratio).layers[0]


def _reconstruct_options(settings: PruneSettings) -> ReconstructOptions:
    return ReconstructOptions(epochs=settings.recon_epochs, lr=settings.recon_lr, micro_batch=settings.recon_micro_batch,
                              train=settings.recon_train, train_norms=settings.recon_norms == "train",
                              seed=settings.seed).validate()
