"""Fixed-size fp32 statistics of a linear layer's inputs, accumulated micro-batch by micro-batch.

Nothing here keeps activations: memory is O(d_in^2) whatever the number of calibration tokens.
"""

from __future__ import annotations

import torch

from rcpu_lite.distributed import Group
from rcpu_lite.runtime import cuda_matmul_precision


class InputStats:
    """Per-column count, sum, sum of squares, sum of |x| and the Gram matrix sum_t x_t x_t^T.

    These are the statistics of the inputs x the compact layer will see. Compensation aims at the
    dense projection's output on the same inputs (local targets): `output_cross` and `target_energy`
    are None and `target_mean` is the mean. PairedStats aims at the dense model's own inputs instead.
    """

    paired = False  # PairedStats: the targets are the dense model's, on inputs of their own
    output_cross: torch.Tensor | None = None
    target_energy: float | None = None
    summed_numbers: tuple[str, ...] = ("count",)  # plain-number statistics that reduce() sums across ranks

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
    def target_mean(self) -> torch.Tensor:
        """The mean input of the target output (local targets: the same inputs)."""
        return self.mean

    def release(self) -> None:
        """Drop the d x d matrices (the largest temporaries of a layer) once compensation has used them."""
        self.gram = None

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
        return bool(torch.isfinite(self.sum).all()) and _all_finite(self.gram)

    def reduce(self, group: Group) -> None:
        """Sum the statistics of every rank's share of the windows (distributed.py), in a fixed order."""
        if group.world > 1:
            # Sums of plain numbers go through fp64 (the token count is exact below 2^53); each keeps its type.
            totals = group.sum_floats([getattr(self, name) for name in self.summed_numbers])
            for name, total in zip(self.summed_numbers, totals):
                setattr(self, name, type(getattr(self, name))(total))
            group.all_reduce(self._tensors())

    def _tensors(self) -> list[torch.Tensor | None]:
        return [self.sum, self.sum_sq, self.sum_abs, self.gram]

    def hook(self):
        """A forward pre-hook that feeds the module's input into these statistics."""

        def _hook(module, args):
            self.update(args[0].detach())

        return _hook


class FoldedStats(InputStats):
    """InputStats that also keep the Gram of each of `folds` folds (micro-batches go to the folds in turn), for
    k-fold cross-validation of the damping (compensation's lstsq-cv). Costs `folds` more d x d matrices."""

    def __init__(
        self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, folds: int = 4
    ):
        super().__init__(dim, device, dtype)
        self.fold_grams = [torch.zeros(dim, dim, device=device, dtype=dtype) for _ in range(folds)]
        self._next = 0

    def update(self, x: torch.Tensor) -> None:
        super().update(x)
        x = x.reshape(-1, self.dim).to(self.gram.dtype)
        with cuda_matmul_precision("ieee"):
            self.fold_grams[self._next].addmm_(x.T, x)
        self._next = (self._next + 1) % len(self.fold_grams)

    def release(self) -> None:
        super().release()
        self.fold_grams = []

    def _tensors(self) -> list[torch.Tensor | None]:
        return [*super()._tensors(), *self.fold_grams]


class PairedStats(InputStats):
    """Dense targets ("global propagation" in Shin et al. 2024): the statistics of the pruned stream's
    inputs x_hat, plus, on the same tokens of the dense model's stream, its inputs x and the dense
    projection's outputs y = W x:

      output_cross = sum_t y_t x_hat_t^T = W C_cross  (d_out x d_in, C_cross = sum x x_hat^T),
      target_sum = sum_t x_t,  target_energy = sum_t ||y_t||^2  (the dense output's energy).

    Every compensation reads C_cross only as W C_cross[:, K], so storing W C_cross instead of C_cross
    costs d_out x d_in instead of d_in^2 (Llama-7B down_proj: 180 MB instead of 485 MB).
    """

    paired = True
    summed_numbers = ("count", "target_energy")

    def __init__(self, dim: int, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        super().__init__(dim, device, dtype)
        self.output_cross = None  # allocated by the first update_pair (d_out from W)
        self.target_sum = torch.zeros(dim, device=device, dtype=dtype)
        self.target_energy = 0.0

    def update_pair(self, x_hat: torch.Tensor, x: torch.Tensor, weight: torch.Tensor) -> None:
        self.update(x_hat)
        x_hat = x_hat.reshape(-1, self.dim).to(self.gram.dtype)
        x = x.reshape(-1, self.dim).to(self.gram.dtype)
        self.target_sum += x.sum(0)
        if self.output_cross is None:
            # A normal tensor even when the first update runs under inference mode: auto's refit adds to it outside.
            with torch.inference_mode(False):
                self.output_cross = torch.zeros(
                    weight.shape[0], self.dim, device=self.gram.device, dtype=self.gram.dtype
                )
        with cuda_matmul_precision("ieee"):
            y = x @ weight.to(x.dtype).T
            self.output_cross.addmm_(y.T, x_hat)
            self.target_energy += float(y.square().sum(dtype=torch.float64))

    @property
    def target_mean(self) -> torch.Tensor:
        return self.target_sum / self.count

    def release(self) -> None:
        self.gram = None
        self.output_cross = None

    def _tensors(self) -> list[torch.Tensor | None]:
        # Every rank has at least one window, so output_cross exists on every rank (update_pair allocates it).
        return [*super()._tensors(), self.target_sum, self.output_cross]

    def is_finite(self) -> bool:
        return (
            super().is_finite()
            and bool(torch.isfinite(self.target_sum).all())
            and (self.output_cross is None or _all_finite(self.output_cross))
        )


def _all_finite(matrix: torch.Tensor) -> bool:
    # A block of rows at a time: isfinite over a whole Gram would need several Gram-sized temporaries.
    return all(bool(torch.isfinite(rows).all()) for rows in matrix.split(512))
