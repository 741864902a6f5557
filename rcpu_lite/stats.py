"""Fixed-size fp32 statistics of a linear layer's inputs, accumulated micro-batch by micro-batch.

Nothing here keeps activations: memory is O(d_in^2) whatever the number of calibration tokens.
"""
from __future__ import annotations

import torch

from .runtime import cuda_matmul_precision


class InputStats:
    """Per-column count, sum, sum of squares, sum of |x| and the Gram matrix sum_t x_t x_t^T."""

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.dim = dim
        self.count = 0
        self.sum = torch.zeros(dim, device=device, dtype=dtype)
        self.sum_sq = torch.zeros(dim, device=device, dtype=dtype)
        self.sum_abs = torch.zeros(dim, device=device, dtype=dtype)
        self.gram = torch.zeros(dim, dim, device=device, dtype=dtype)

    def update(self, x: torch.Tensor) -> None:
        x = x.reshape(-1, self.dim).to(self.gram.dtype)
        self.count += x.shape[0]
        self.sum += x.sum(0)
        self.sum_sq += x.square().sum(0)
        self.sum_abs += x.abs().sum(0)
        with cuda_matmul_precision("ieee"):  # full fp32 even inside a TF32 forward pass
            self.gram.addmm_(x.T, x)

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.count

    @property
    def variance(self) -> torch.Tensor:
        """Population variance E[x^2] - E[x]^2, clamped at zero (cancellation can make it slightly negative)."""
        return (self.sum_sq / self.count - self.mean.square()).clamp_min(0)

    @property
    def l2_norm(self) -> torch.Tensor:
        """||X_j||_2 over all calibration tokens."""
        return self.sum_sq.sqrt()

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.sum_abs / self.count

    def is_finite(self) -> bool:
        # A block of rows at a time: isfinite over the whole Gram would need several Gram-sized temporaries.
        return bool(torch.isfinite(self.sum).all()) and all(bool(torch.isfinite(rows).all())
                                                            for rows in self.gram.split(512))

    def hook(self):
        """A forward pre-hook that feeds the module's input into these statistics."""

        def _hook(module, args):
            self.update(args[0].detach())

        return _hook
