"""rcpu-lite: layer-streaming structured pruning of Llama-family LMs with rotation-constrained compensation."""

__version__ = "0.1.0"


def load_pruned(path, **kwargs):
    """Load a pruned output (plain or with per-layer widths) as a transformers model: see rcpu_lite.loading."""
    from rcpu_lite.loading import load_pruned as load

    return load(path, **kwargs)
