"""A safetensors file written from tensors that arrive in row chunks (the embedding, the head), so that no
whole copy of one is ever in memory: neither the tensor nor the bytes safetensors' save_file makes of it.

The file is byte for byte what save_file writes for the same tensors (tests/output/test_chunked.py compares
them): an 8-byte little-endian header length; the header, compact JSON with "__metadata__" first and then
the tensors by dtype (the widest kind first, safetensors' order) and name, padded with spaces to a multiple
of 8 bytes; then the tensors' bytes in that order.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite.checkpoint import DTYPE_BYTES

# safetensors' dtypes in its own order (the Dtype enum); a file lists the later ones first
DTYPE_ORDER = ("BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64")
TORCH_DTYPES = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.int16: "I16",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int32: "I32",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.int64: "I64",
}


@dataclass(frozen=True)
class ChunkedTensor:
    """A tensor to write without holding it: its dtype (safetensors' name), shape, and its rows in chunks."""

    dtype: str
    shape: tuple[int, ...]
    chunks: Callable[[], Iterator[torch.Tensor]]  # called once, when the file is written

    @property
    def nbytes(self) -> int:
        return DTYPE_BYTES[self.dtype] * torch.Size(self.shape).numel()


def as_chunked(tensor: torch.Tensor) -> ChunkedTensor:
    """A whole tensor as a one-chunk ChunkedTensor (a small one sharing a file with chunked ones)."""
    return ChunkedTensor(TORCH_DTYPES[tensor.dtype], tuple(tensor.shape), lambda: iter([tensor]))


def header(tensors: dict[str, ChunkedTensor], metadata: dict[str, str]) -> tuple[bytes, list[str]]:
    """The padded header and the order the tensors' bytes follow it in."""
    order = sorted(tensors, key=lambda n: (-DTYPE_ORDER.index(tensors[n].dtype), n))
    entries, offset = {"__metadata__": metadata}, 0
    for name in order:
        t = tensors[name]
        entries[name] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    text = json.dumps(entries, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text, order


def write_chunked(path: Path, tensors: dict[str, ChunkedTensor], metadata: dict[str, str]) -> None:
    """Write the safetensors file `path`, one chunk in memory at a time."""
    head, order = header(tensors, metadata)
    with open(path, "wb") as f:
        f.write(head)
        for name in order:
            t, written = tensors[name], 0
            for chunk in t.chunks():
                if TORCH_DTYPES[chunk.dtype] != t.dtype:
                    raise ValueError(f"{name}: a chunk of dtype {chunk.dtype} in a {t.dtype} tensor")
                data = chunk.detach().to("cpu").contiguous().view(torch.uint8).flatten().numpy()
                f.write(memoryview(data))
                written += data.nbytes
                del chunk, data
            if written != t.nbytes:
                raise ValueError(f"{name}: its chunks held {written} bytes, {t.nbytes} were expected")


__all__ = ["ChunkedTensor", "as_chunked", "header", "write_chunked"]
