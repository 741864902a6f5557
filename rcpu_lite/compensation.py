"""Compensation of a pruned linear layer y = W x from the Gram matrix of its inputs.

Y = W X is the dense output and Z = W_K X_K the pruned one on the same inputs X; with the Gram
C = X X^T every quantity below needs only W, C and the kept columns K. The functions keep the
dtype they are given, except the SVD, which runs in fp64 (cheap next to the products).
"""
from __future__ import annotations

import torch

METHODS = ("rotation", "rotation-scale", "none")


def cross_product(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """M = Y Z^T = W C[:, K] W_K^T  (d_out x d_out)."""
    return weight @ gram[:, kept] @ weight[:, kept].T


def procrustes(m: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The orthogonal Q maximising tr(Q^T M) (reflections allowed), and M's singular values.

    The SVD runs in fp64 on the CPU: consumer GPUs are slow at fp64, and M is only d_out x d_out.
    """
    u, s, vh = torch.linalg.svd(m.detach().to("cpu", torch.float64))
    return (u @ vh).to(m.device, m.dtype), s.to(m.device, m.dtype)


def compensate(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, method: str) -> torch.Tensor:
    """The compact d_out x |K| weight that replaces W after the columns outside K are removed."""
    if method not in METHODS:
        raise ValueError(f"unknown compensation {method!r}; choose one of {', '.join(METHODS)}")
    w_kept = weight[:, kept]
    if method == "none" or kept.numel() == weight.shape[1]:  # nothing removed, nothing to repair
        return w_kept.clone()
    q, singular = procrustes(cross_product(weight, gram, kept))
    rotated = q @ w_kept
    if method == "rotation-scale":
        z_energy = ((w_kept @ gram[kept][:, kept]) * w_kept).sum()  # ||Z||_F^2 = tr(W_K C_KK W_K^T)
        rotated = rotated * (singular.sum() / z_energy)
    return rotated


def relative_error(weight: torch.Tensor, gram: torch.Tensor, kept: torch.Tensor, new_weight: torch.Tensor) -> float:
    """||Y - Z'||_F / ||Y||_F with Z' = new_weight X_K, from the Gram, in the inputs' dtype.

    Y - Z' = D X with D = W less new_weight in the kept columns, so ||Y - Z'||^2 = tr(D C D^T): one
    quadratic form, with none of the cancellation of expanding ||Y||^2 - 2<Y, Z'> + ||Z'||^2.
    A bias, unchanged by pruning, cancels in Y - Z'.
    """
    diff = weight.clone()
    diff[:, kept] -= new_weight
    return float((_energy(diff, gram) / _energy(weight, gram)).clamp_min(0).sqrt())


def _energy(a: torch.Tensor, gram: torch.Tensor) -> torch.Tensor:
    """tr(A C A^T) = ||A X||_F^2."""
    return ((a @ gram) * a).sum()
