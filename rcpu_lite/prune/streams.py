"""The hidden states that flow from one decoder layer to the next (an IntermediatesCache of sorts).

Each stream is a (windows x seqlen x hidden) fp32 tensor, kept where the memory plan says (on the
GPU, or in pinned host memory and copied a micro-batch at a time). The pruned streams are what the
compact model computes; the dense ones, for --targets dense, what the dense model computes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Streams:
    calib: torch.Tensor  # the pruned model's hidden states of the calibration windows (real, then generated)
    dense: torch.Tensor | None = None  # the dense model's, same windows (--targets dense)
    holdout: torch.Tensor | None = None  # the pruned model's on the held-out windows
    holdout_dense: torch.Tensor | None = None
    n_real: int = -1  # the first n_real calibration windows are real text (scores use only those)

    def __post_init__(self) -> None:
        if self.n_real < 0:
            self.n_real = self.calib.shape[0]

    @property
    def dense_targets(self) -> bool:
        """Whether the targets are the dense model's own outputs (a dense stream runs beside the pruned one)."""
        return self.dense is not None

    def copy_pruned(self) -> "Streams":
        """A copy of the pruned calibration and held-out streams (what enters a layer, kept for later)."""
        return Streams(self.calib.clone(), holdout=None if self.holdout is None else self.holdout.clone())

    @classmethod
    def start(
        cls,
        embed: Callable[[torch.Tensor], torch.Tensor],
        windows: torch.Tensor,
        holdout: torch.Tensor | None,
        dense: bool,
        n_real: int,
        place,
    ) -> "Streams":
        """The embeddings of the windows (`embed`: token ids -> fp32 hidden states, arch.embed); `place` puts a
        tensor where the run keeps its hidden states."""
        calib = place(embed(windows))
        held = place(embed(holdout)) if holdout is not None and holdout.numel() else None
        return cls(
            calib,
            place(calib.clone()) if dense else None,
            held,
            place(held.clone()) if dense and held is not None else None,
            n_real,
        )
