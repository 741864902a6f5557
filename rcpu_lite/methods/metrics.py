"""The one relative error every report uses: ||Y - Z|| / ||Y|| from the two squared norms."""

from __future__ import annotations


def relative_error(error_energy: float, reference_energy: float) -> float:
    """sqrt(||Y - Z||^2 / ||Y||^2), with a negative error energy (cancellation) read as 0.

    A zero reference (an all-zero target) gives 0 when the error is zero too, else infinity: a block that
    should output nothing and outputs something is infinitely wrong, never exactly right.
    """
    error_energy = max(error_energy, 0.0)
    if reference_energy > 0:
        return (error_energy / reference_energy) ** 0.5
    return float("inf") if error_energy > 0 else 0.0
