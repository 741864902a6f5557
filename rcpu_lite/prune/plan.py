"""The width plan: how many heads and channels every layer keeps, decided before the first layer is cut.

The allocation (methods/allocation.py, PLANS) makes it; one that reads every layer's scores gets them from a
scoring pass over the dense model here, one layer resident at a time.
"""

from __future__ import annotations

import logging

import torch

from rcpu_lite.display import Reporter
from rcpu_lite.families import arch
from rcpu_lite.methods import scoring
from rcpu_lite.methods.allocation import PLANS, DenseScores, WidthPlan, aligned
from rcpu_lite.output.formats import OutputFormat
from rcpu_lite.prune.source import Source, check_finite
from rcpu_lite.prune.step import dense_pass, propagate
from rcpu_lite.prune.streams import Streams
from rcpu_lite.runtime import Placement, to_compute
from rcpu_lite.settings import PruneSettings

log = logging.getLogger("rcpu_lite")


def width_plan(
    settings: PruneSettings,
    source: Source,
    windows: torch.Tensor,
    inputs: arch.LayerInputs,
    run: Placement,
    reporter: Reporter,
    place,
) -> WidthPlan:
    """The widths of every layer; `windows` are the real calibration windows (the scores use only those) and
    `place` puts hidden states where the run keeps them."""
    allocation = PLANS[settings.allocation]
    scores = None
    if allocation.needs_scores:
        # The embeddings are read again for the prune: only one layer's tensors are alive during the pass.
        hidden = place(source.embedder(windows)(windows))
        scores = scoring_pass(settings, source, hidden, inputs, run, reporter, curves=allocation.needs_curves)
        del hidden
    plan = allocation.plan(source.shape, source.n_layers, settings, arch.unit_costs(source.cfg), scores)
    return aligned(plan, source.shape, settings.multiple_of)


def scoring_pass(
    settings: PruneSettings,
    source: Source,
    hidden: torch.Tensor,
    inputs: arch.LayerInputs,
    run: Placement,
    reporter: Reporter,
    curves: bool = False,
) -> DenseScores:
    """Every layer's o_proj column and MLP channel scores on the dense model, one layer resident at a time (FLAP's
    global allocation needs all of them before the first layer is cut); with `curves`, also every layer's error
    curves (the `errors` allocation)."""
    n_layers, cfg, shape = source.n_layers, source.cfg, source.shape
    out = DenseScores([], [], [] if curves else None, [] if curves else None)
    layer_reads = source.layers(list(range(n_layers)), background=run.device.type == "cuda")
    reporter.start("scoring pass", n_layers, "layer")
    for i in range(n_layers):
        reporter.position(f"layer {i + 1}/{n_layers}")
        reporter.phase("read")
        stored = next(layer_reads)
        check_finite(f"layer {i}", stored)
        tensors = to_compute(stored, run.device, consume=True)
        reporter.phase("statistics")
        # The errors are measured against the residual stream the layer adds to: a projection whose output is
        # small beside it costs little to cut, however large its own relative error.
        residual = float(torch.linalg.vector_norm(hidden).double() ** 2) if curves else None
        stats = dense_pass(cfg, i, tensors, Streams(hidden), inputs, run, keep_targets=False).stats
        for name, s in stats.items():
            weight = tensors[arch.PROJECTIONS[name] + ".weight"]
            columns = scoring.column_scores(settings.score, weight, s).cpu()
            if curves:
                _add_curve(out, name, weight, s.gram, columns, shape, settings.score, residual)
            s.release()  # the Gram is freed before the next projection's
            (out.o_columns if name == "o_proj" else out.channels).append(columns)
            del weight  # no reference may outlive the layer (one layer's tensors alive at a time)
        propagate(cfg, i, tensors, Streams(hidden), inputs, run)
        del tensors, stored, stats
        reporter.advance(f"scoring pass: layer {i + 1}/{n_layers}")
    return out


def _add_curve(
    out: DenseScores, name: str, weight, gram, columns, shape: arch.LayerShape, score: str, residual: float
) -> None:
    """The error curve of removing the lowest-scoring units in the order the selection would (GQA: the k-th
    lowest head of every group together)."""
    if name == "down_proj":
        order = torch.argsort(columns.double(), stable=True)
        out.channel_curves.append(scoring.error_curve(weight, gram, order.to(weight.device), reference=residual).cpu())
        return
    heads = scoring.head_scores(columns, shape.head_dim, score).double()
    n, kv = shape.num_attention_heads, shape.num_key_value_heads
    if kv == n:
        order, step = torch.argsort(heads, stable=True), 1
    else:
        per_group = n // kv
        ranked = torch.argsort(heads.reshape(kv, per_group), dim=1, stable=True) + torch.arange(kv)[:, None] * per_group
        order, step = ranked.T.reshape(-1), kv  # rank by rank: one head from every group
    curve = scoring.error_curve(weight, gram, order.to(weight.device), shape.head_dim, step, reference=residual)
    out.head_curves.append(curve.cpu())


def log_plan(plan: WidthPlan, shape: arch.LayerShape, costs: arch.UnitCosts, fmt: OutputFormat) -> None:
    removed = plan.params_removed(shape, costs) / (costs.layer * len(plan.layers))
    heads = sorted({w.heads for w in plan.layers})
    channels = sorted({w.channels for w in plan.layers})
    log.info(
        "width plan (%s): heads %d -> %s, channels %d -> %s; %.1f%% of the decoder-layer parameters go; output: %s",
        plan.allocation,
        shape.num_attention_heads,
        _span(heads),
        shape.intermediate_size,
        _span(channels),
        100 * removed,
        "remote code (per-layer widths or biases the stock class cannot hold)"
        if fmt.remote
        else "stock transformers checkpoint",
    )
    if not plan.removes_heads(shape) and removed > 0 and shape.num_key_value_heads < shape.num_attention_heads:
        log.warning(
            "no attention heads are removed: with %d query heads per key/value group, a group loses a head "
            "only from ratio %.3f up; only MLP channels are pruned (--target-params gives the heads' "
            "share of the budget to the channels)",
            shape.num_attention_heads // shape.num_key_value_heads,
            shape.num_key_value_heads / shape.num_attention_heads,
        )


def _span(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"
