"""How many heads and MLP channels every layer keeps: the width plan, and the allocations that make it.

Pure functions of shapes (and, for `adaptive`, of every layer's unit scores). A plan is decided
before the first layer is cut; `uniform` (the paper's setting) is the plan where every layer is
the same. Budgets are in parameters of the decoder layers, so that on grouped-query models, where
heads can only go a group-multiple at a time, the MLP channels can take up what the heads cannot.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from rcpu_lite.families.arch import LayerShape, UnitCosts


@dataclass(frozen=True)
class LayerWidths:
    heads: int  # query heads kept
    kv_heads: int  # key/value heads kept
    channels: int  # MLP channels kept


@dataclass(frozen=True)
class WidthPlan:
    allocation: str
    layers: tuple[LayerWidths, ...]

    @property
    def uniform(self) -> bool:
        return len(set(self.layers)) <= 1

    def removes_heads(self, shape: LayerShape) -> bool:
        return any(w.heads < shape.num_attention_heads for w in self.layers)

    def removes_channels(self, shape: LayerShape) -> bool:
        return any(w.channels < shape.intermediate_size for w in self.layers)

    def params_removed(self, shape: LayerShape, costs: UnitCosts) -> int:
        return sum(_removed_params(shape, costs, w) for w in self.layers)

    def as_json(self) -> dict:
        return {"allocation": self.allocation, "layers": [asdict(w) for w in self.layers]}

    @classmethod
    def from_json(cls, data: dict) -> "WidthPlan":
        return cls(data["allocation"], tuple(LayerWidths(**w) for w in data["layers"]))


def dense_widths(shape: LayerShape) -> LayerWidths:
    """The widths of an unpruned layer."""
    return LayerWidths(shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size)


def _removed_params(shape: LayerShape, costs: UnitCosts, w: LayerWidths) -> int:
    return (
        (shape.num_attention_heads - w.heads) * costs.query_head
        + (shape.num_key_value_heads - w.kv_heads) * costs.kv_head
        + (shape.intermediate_size - w.channels) * costs.channel
    )


def heads_kept(shape: LayerShape, ratio: float) -> tuple[int, int]:
    """Query and KV heads kept at `ratio`: int(ratio * n) heads go (multi-head attention); with grouped
    queries int(ratio * n) // n_kv go from every group (the floor: small ratios may remove none)."""
    n, kv = shape.num_attention_heads, shape.num_key_value_heads
    if kv == n:
        keep = n - int(ratio * n)
        return keep, keep
    return n - (int(ratio * n) // kv) * kv, kv


def uniform(shape: LayerShape, n_layers: int, ratio: float) -> WidthPlan:
    """The paper's plan: int(ratio * n) units of each kind go from every layer."""
    heads, kv = heads_kept(shape, ratio)
    widths = LayerWidths(heads, kv, shape.intermediate_size - int(ratio * shape.intermediate_size))
    return WidthPlan("uniform", (widths,) * n_layers)


def target_params(shape: LayerShape, n_layers: int, ratio: float, costs: UnitCosts) -> WidthPlan:
    """Uniform widths that remove `ratio` of the decoder layers' parameters: heads go as uniform() would
    remove them, and the MLP channels take the rest of the budget (rounded to the nearest channel)."""
    heads, kv = heads_kept(shape, ratio)
    left = ratio * costs.layer - _removed_params(shape, costs, LayerWidths(heads, kv, shape.intermediate_size))
    drop = min(max(round(left / costs.channel), 0), shape.intermediate_size - 1)
    return WidthPlan("uniform", (LayerWidths(heads, kv, shape.intermediate_size - drop),) * n_layers)


def depth(
    shape: LayerShape, n_layers: int, ratio: float, costs: UnitCosts, spread: float = 0.5, curve: str = "linear"
) -> WidthPlan:
    """The ratio rises with depth from ratio*(1-spread) to ratio*(1+spread): linearly, or (curve "log") as SlimGPT's
    r_i = r_0 + (r_{n-1} - r_0) log(i+1) / log(n); heads follow each layer's ratio, and the channels are then
    scaled so the whole model loses `ratio` of its decoder-layer parameters (to the nearest channel)."""
    last = max(n_layers - 1, 1)
    rise = [math.log(i + 1) / math.log(last + 1) if curve == "log" else i / last for i in range(n_layers)]
    ratios = [min(ratio * (1 - spread + 2 * spread * f), 0.95) for f in rise]
    heads = [heads_kept(shape, r) for r in ratios]
    budget = ratio * costs.layer * n_layers - sum(
        _removed_params(shape, costs, LayerWidths(h, kv, shape.intermediate_size)) for h, kv in heads
    )
    channels = _spread_channels(shape, budget, ratios, costs)
    return WidthPlan(
        "log" if curve == "log" else "depth",
        tuple(LayerWidths(h, kv, shape.intermediate_size - c) for (h, kv), c in zip(heads, channels)),
    )


def _spread_channels(shape: LayerShape, budget: float, weights: list[float], costs: UnitCosts) -> list[int]:
    """Channels to remove per layer, proportional to `weights`, summing to budget / channel cost
    (largest remainders get the rounding), each within [0, intermediate_size - 1]."""
    total = max(round(budget / costs.channel), 0)
    cap = shape.intermediate_size - 1
    total = min(total, cap * len(weights))
    share = torch.tensor(weights, dtype=torch.float64)
    share = share / share.sum() * total if share.sum() > 0 else torch.full_like(share, total / len(weights))
    out = share.floor().clamp(max=cap).long()
    while int(out.sum()) < total:  # hand out the rest, largest remainder first, to layers with room
        room = out < cap
        rest = torch.where(room, share - out, torch.tensor(-1.0, dtype=torch.float64))
        out[int(rest.argmax())] += 1
    return out.tolist()


def adaptive(
    shape: LayerShape,
    n_layers: int,
    ratio: float,
    costs: UnitCosts,
    o_columns: list[torch.Tensor],
    channel_scores: list[torch.Tensor],
) -> WidthPlan:
    """FLAP's global allocation: every layer's o_proj column scores and channel scores are standardised
    within the layer; a head scores the mean of its standardised columns. One threshold over all
    layers then removes the lowest units, each head weighed by its parameter cost against a
    channel's, until `ratio` of the decoder-layer parameters is removed.

    Grouped-query heads can only go in multiples of the KV groups: each layer's head count is rounded
    down to one, and the channels take up the budget left (to the nearest channel). Every layer
    keeps at least one head per group and one channel.
    """
    budget = ratio * costs.layer * n_layers
    n, kv, inter = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    mha = kv == n
    head_cost = costs.query_head + (costs.kv_head if mha else 0)
    units = []  # (standardised score, cost, layer, is_head)
    for i in range(n_layers):
        heads = _standardised(o_columns[i]).reshape(n, -1).mean(1)
        units += [(s, head_cost, i, True) for s in heads.tolist()]
        units += [(s, costs.channel, i, False) for s in _standardised(channel_scores[i]).tolist()]
    units.sort(key=lambda u: u[0])
    heads_drop, removed = [0] * n_layers, 0.0
    min_heads = 1 if mha else kv
    for score, cost, layer, is_head in units:
        if removed + cost / 2 > budget:
            break
        if is_head and n - heads_drop[layer] > min_heads:
            heads_drop[layer] += 1
            removed += cost
        elif not is_head:
            removed += cost  # channels are counted again below, once the head counts are final
    if not mha:
        heads_drop = [d // kv * kv for d in heads_drop]
    left = budget - sum(d * head_cost for d in heads_drop)
    ranked = sorted(((s, i) for i in range(n_layers) for s in _standardised(channel_scores[i]).tolist()))
    channels_drop, removed = [0] * n_layers, 0.0
    for score, layer in ranked:
        if removed + costs.channel / 2 > left:
            break
        if channels_drop[layer] < inter - 1:
            channels_drop[layer] += 1
            removed += costs.channel
    return WidthPlan(
        "adaptive",
        tuple(
            LayerWidths(n - heads_drop[i], (n - heads_drop[i]) if mha else kv, inter - channels_drop[i])
            for i in range(n_layers)
        ),
    )


@dataclass
class DenseScores:
    """What the scoring pass measures on the dense model, one entry per layer: the o_proj column scores and the
    MLP channel scores (--score), and, for the `errors` allocation, the error curves: curve[k] is the output error
    ||Y - Z||^2 of o_proj (heads) or down_proj (channels) with the k lowest-scoring units removed and no repair,
    relative to the energy of the residual stream entering the layer (scoring.error_curve; GQA heads go one from
    every group at a time)."""

    o_columns: list[torch.Tensor]
    channels: list[torch.Tensor]
    head_curves: list[torch.Tensor] | None = None
    channel_curves: list[torch.Tensor] | None = None


def by_errors(shape: LayerShape, n_layers: int, ratio: float, costs: UnitCosts, scores: DenseScores) -> WidthPlan:
    """ZipLM-style: spend the budget of `ratio` of the decoder-layer parameters one step at a time, always where
    the summed error curves rise least per parameter removed (a head step is one head, or one from every key/value
    group; a channel step one channel). Every layer keeps a head per group and a channel."""
    n, kv, inter = shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size
    mha = kv == n
    head_step = 1 if mha else kv
    head_cost = (costs.query_head + costs.kv_head) if mha else kv * costs.query_head
    steps = {"heads": [0] * n_layers, "channels": [0] * n_layers}
    limits = {"heads": (n - (1 if mha else kv)) // head_step, "channels": inter - 1}
    unit_cost = {"heads": head_cost, "channels": costs.channel}
    curves = {"heads": scores.head_curves, "channels": scores.channel_curves}

    def next_step(kind: str, layer: int):
        k = steps[kind][layer]
        if k >= limits[kind]:
            return None
        curve = curves[kind][layer]
        return (float(curve[k + 1] - curve[k]) / unit_cost[kind], kind, layer)

    heap = [e for kind in steps for i in range(n_layers) if (e := next_step(kind, i)) is not None]
    heapq.heapify(heap)
    budget, removed = ratio * costs.layer * n_layers, 0.0
    while heap:
        _, kind, layer = heapq.heappop(heap)
        if removed + unit_cost[kind] / 2 > budget:
            if kind == "channels":
                break
            continue  # a head step overshoots: channels may still fit
        steps[kind][layer] += 1
        removed += unit_cost[kind]
        if (e := next_step(kind, layer)) is not None:
            heapq.heappush(heap, e)
    return WidthPlan(
        "errors",
        tuple(
            LayerWidths(
                n - steps["heads"][i] * head_step,
                n - steps["heads"][i] if mha else kv,
                inter - steps["channels"][i],
            )
            for i in range(n_layers)
        ),
    )


def _standardised(scores: torch.Tensor) -> torch.Tensor:
    scores = scores.double().cpu()
    std = scores.std() if scores.numel() > 1 else torch.tensor(0.0, dtype=torch.float64)
    return (scores - scores.mean()) / std if std > 0 else scores - scores.mean()


def aligned(plan: WidthPlan, shape: LayerShape, multiple: int) -> WidthPlan:
    """`plan` with every layer's kept MLP width, and its attention width n_heads * head_dim where the key/value
    groups allow, rounded to the nearest multiple of `multiple` (llama.cpp quantises a row only in whole blocks:
    32 values for Q8_0 / Q4_0, 256 for the K-quants; a row of another length stays F16).

    Each layer rounds to its nearest multiple, so the total lands within half a multiple per layer of the
    plan's. A full width stays full; a pruned layer keeps at least one multiple; widths that cannot be aligned
    (fewer heads than one aligned group) stay as planned.
    """
    if multiple <= 1:
        return plan
    return WidthPlan(plan.allocation, tuple(_aligned_layer(w, shape, multiple) for w in plan.layers))


def _aligned_layer(w: LayerWidths, shape: LayerShape, multiple: int) -> LayerWidths:
    n, kv = shape.num_attention_heads, shape.num_key_value_heads
    mha = kv == n
    head_unit = multiple // math.gcd(multiple, shape.head_dim)  # heads whose columns make whole blocks
    if not mha:
        head_unit = head_unit * kv // math.gcd(head_unit, kv)  # and the same number from every key/value group
    heads = _nearest_multiple(w.heads, head_unit, n)
    return LayerWidths(
        heads, heads if mha else w.kv_heads, _nearest_multiple(w.channels, multiple, shape.intermediate_size)
    )


def _nearest_multiple(kept: int, unit: int, full: int) -> int:
    if kept >= full or unit > full:
        return kept
    rounded = max(unit, unit * math.floor(kept / unit + 0.5))
    return rounded if rounded <= full else full - full % unit


@dataclass(frozen=True)
class Allocation:
    """One --allocation: how the widths of every layer are planned from the settings and the layer shapes.

    `needs_scores`: the plan reads every layer's unit scores on the dense model, so the run makes a scoring
    pass (prune/plan.py) first; `plan` then receives them (DenseScores), with the error curves if `needs_curves`.
    """

    name: str
    help: str
    plan: Callable[..., WidthPlan]  # (shape, n_layers, settings, costs, scores) -> WidthPlan
    needs_scores: bool = False
    needs_curves: bool = False


def _uniform(shape: LayerShape, n_layers: int, settings, costs: UnitCosts, scores=None) -> WidthPlan:
    if settings.target_params:
        return target_params(shape, n_layers, settings.target_params, costs)
    return uniform(shape, n_layers, settings.ratio)


def _adaptive(shape: LayerShape, n_layers: int, settings, costs: UnitCosts, scores: DenseScores) -> WidthPlan:
    return adaptive(shape, n_layers, settings.budget, costs, scores.o_columns, scores.channels)


def _log(shape: LayerShape, n_layers: int, settings, costs: UnitCosts, scores=None) -> WidthPlan:
    return depth(shape, n_layers, settings.budget, costs, settings.depth_spread, curve="log")


def _errors(shape: LayerShape, n_layers: int, settings, costs: UnitCosts, scores: DenseScores) -> WidthPlan:
    return by_errors(shape, n_layers, settings.budget, costs, scores)


def _depth(shape: LayerShape, n_layers: int, settings, costs: UnitCosts, scores=None) -> WidthPlan:
    return depth(shape, n_layers, settings.budget, costs, settings.depth_spread)


PLANS: dict[str, Allocation] = {
    a.name: a
    for a in (
        Allocation("uniform", "every layer loses the same share (the paper's setting)", _uniform),
        Allocation(
            "adaptive",
            "FLAP's global threshold over every layer's standardised scores (a scoring pass first)",
            _adaptive,
            needs_scores=True,
        ),
        Allocation(
            "depth",
            "the ratio rises linearly with depth, from ratio*(1-spread) to ratio*(1+spread) (SlimGPT-like)",
            _depth,
        ),
        Allocation(
            "log",
            "SlimGPT's schedule: the ratio rises with log(layer + 1), from ratio*(1-spread) to ratio*(1+spread)",
            _log,
        ),
        Allocation(
            "errors",
            "measured: a scoring pass records every layer's output error as its lowest-scoring units go, then the "
            "budget goes where the summed errors rise least per parameter (ZipLM-style)",
            _errors,
            needs_scores=True,
            needs_curves=True,
        ),
    )
}
# name -> what it does (validation and --help)
ALLOCATIONS: dict[str, str] = {name: a.help for name, a in PLANS.items()}
