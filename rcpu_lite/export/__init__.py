"""Exporting a checkpoint to the formats runtimes load: GGUF for llama.cpp (and Ollama, LM Studio)."""

from rcpu_lite.export.gguf_file import ExportError, ExportResult, to_gguf, unquantised_weights
from rcpu_lite.export.types import GGUF_TYPES

__all__ = ["GGUF_TYPES", "ExportError", "ExportResult", "to_gguf", "unquantised_weights"]
