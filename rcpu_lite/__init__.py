"""rcpu-lite: layer-streaming structured pruning of Llama-family LMs with rotation-constrained compensation."""
__version__ = "0.1.0"
