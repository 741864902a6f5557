"""Which heads and channels a layer keeps: the selection registry.

A selection method takes the layer's o_proj / down_proj weights, their input statistics, the layer shape and
the widths to keep (`SelectionInput`), and returns the kept units (`Kept`). A method that repairs while it
selects (structured OBS) may also return its repaired weights in `Kept.repaired` (OBS's equal the ridge
least-squares refit); the pipeline repairs with --compensate and does not ask for them.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch

from rcpu_lite.families.arch import LayerShape
from rcpu_lite.families.units import head_columns
from rcpu_lite.methods import obs, scoring
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.methods.registry import Entry, registrar
from rcpu_lite.methods.stats import InputStats


@dataclass
class Kept:
    """The kept query heads, key/value heads and MLP channels of one layer (sorted indices)."""

    heads: torch.Tensor
    kv_heads: torch.Tensor
    channels: torch.Tensor
    head_dim: int
    repaired: dict[str, torch.Tensor] | None = None  # weights a selection method repaired itself
    _columns: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

    def tensors(self) -> list[torch.Tensor]:
        return [self.heads, self.kv_heads, self.channels]

    def to(self, device: torch.device) -> "Kept":
        """The same units on `device` (the o_proj columns are derived on the host first, as they always were)."""
        columns = {"o_proj": head_columns(self.heads, self.head_dim).to(device), "down_proj": self.channels.to(device)}
        return Kept(*(t.to(device) for t in self.tensors()), self.head_dim, self.repaired, columns)

    def columns(self, projection: str) -> torch.Tensor:
        """The kept input columns of o_proj (its heads' columns) or down_proj (its channels)."""
        if projection not in self._columns:
            self._columns[projection] = (
                head_columns(self.heads, self.head_dim) if projection == "o_proj" else self.channels
            )
        return self._columns[projection]

    def as_lists(self) -> tuple[list[int], list[int], list[int]]:
        return self.heads.tolist(), self.kv_heads.tolist(), self.channels.tolist()


@dataclass
class SelectionInput:
    """What a selection method reads for one layer."""

    score: str  # the --score name (topk)
    weights: dict[str, torch.Tensor]  # o_proj and down_proj weights
    stats: dict[str, InputStats]  # their input statistics
    shape: LayerShape
    widths: LayerWidths  # the units to keep
    obs: obs.ObsOptions = field(default_factory=obs.ObsOptions)


SelectFn = Callable[[SelectionInput], Kept]


SELECTIONS: dict[str, Entry[SelectFn]] = {}
register = registrar(SELECTIONS)


@register("topk", "score every unit once (--score), keep the highest ones")
def top_k(layer: SelectionInput) -> Kept:
    score, weights, stats, shape = layer.score, layer.weights, layer.stats, layer.shape
    columns = scoring.column_scores(score, weights["o_proj"], stats["o_proj"])
    heads, kv_heads = scoring.kept_heads(
        scoring.head_scores(columns, shape.head_dim, score), shape.num_key_value_heads, layer.widths.heads
    )
    channels = scoring.kept_channels(
        scoring.column_scores(score, weights["down_proj"], stats["down_proj"]), layer.widths.channels
    )
    return Kept(heads.cpu(), kv_heads.cpu(), channels.cpu(), shape.head_dim)


@register(
    "obs",
    "greedy structured OBS (ZipLM, SlimGPT): repeatedly remove the head or channel whose removal least raises the "
    "least-squares error on the Gram (--obs-gram, damped by --obs-damp), updating the other columns after each "
    "removal (--score is not used)",
)
def greedy_obs(layer: SelectionInput) -> Kept:
    weights, stats, shape, widths, options = layer.weights, layer.stats, layer.shape, layer.widths, layer.obs
    n, kv, head_dim = shape.num_attention_heads, shape.num_key_value_heads, shape.head_dim
    repaired = {}
    heads = torch.arange(n)
    if widths.heads < n:
        mha = kv == n
        dropped = n - widths.heads
        if not mha and dropped % kv:
            raise ValueError(f"{widths.heads} query heads cannot be split evenly over {kv} key/value groups")
        result = obs.prune(
            weights["o_proj"],
            stats["o_proj"].gram,
            head_dim,
            dropped,
            replace(options, step_fraction=0.0),  # heads are few: one at a time
            None if mha else torch.arange(n) // (n // kv),
            0 if mha else dropped // kv,
        )
        heads = result.kept
        repaired["o_proj"] = result.weight
    channels = torch.arange(shape.intermediate_size)
    if widths.channels < shape.intermediate_size:
        result = obs.prune(
            weights["down_proj"], stats["down_proj"].gram, 1, shape.intermediate_size - widths.channels, options
        )
        channels = result.kept
        repaired["down_proj"] = result.weight
    kv_heads = heads.clone() if kv == n else torch.arange(kv)
    repaired = {name: w for name, w in repaired.items() if w is not None}
    return Kept(heads, kv_heads, channels, head_dim, repaired or None)


def select(
    method: str,
    score: str,
    weights: dict[str, torch.Tensor],
    stats: dict[str, InputStats],
    shape: LayerShape,
    widths: LayerWidths,
    options: obs.ObsOptions | None = None,
) -> Kept:
    """The units one layer keeps, by the selection `method` (a SELECTIONS name) and the importance `score`."""
    if method not in SELECTIONS:
        raise ValueError(f"unknown selection {method!r}; choose one of {', '.join(SELECTIONS)}")
    return SELECTIONS[method].fn(SelectionInput(score, weights, stats, shape, widths, options or obs.ObsOptions()))
