"""Reading a safetensors checkpoint one layer at a time (output/writer.py writes the compact one)."""

from __future__ import annotations

import json
import os
import threading
import weakref
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK_BYTES = 16 * 2**20  # the embedding and the head are read and copied in row chunks of this size


class CheckpointError(ValueError):
    pass


class CheckpointReader:
    """Lazy access to the tensors of a Hugging Face safetensors checkpoint directory.

    It also counts the bytes of loaded tensors that are still alive (through weak references to
    their storages), so tests can check that the pruner never holds more than one layer.

    No file stays open between calls: safetensors maps a file and hands out tensors that view the
    mapping, and every page read through a mapping stays in the process's resident set until the
    mapping goes. An open handle per shard would therefore grow the RSS by one layer per layer.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()  # the prefetch thread loads while the main thread frees
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json; pass a Hugging Face checkpoint directory")
        if (self.path / INDEX_NAME).is_file():
            self.weight_map: dict[str, str] = json.loads((self.path / INDEX_NAME).read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).is_file():
            self.weight_map = {k: SINGLE_NAME for k in self._open(SINGLE_NAME).keys()}
        else:
            raise CheckpointError(f"{self.path} has no {SINGLE_NAME} or {INDEX_NAME}")
        self.live_bytes = 0
        self.peak_live_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str, handles: dict | None = None):
        if name not in self.weight_map:
            raise CheckpointError(
                f"tensor {name} is missing from the checkpoint in {self.path}; it is incomplete: "
                f"download or convert it again"
            )
        fname = self.weight_map[name]
        if handles is None:
            return self._open(fname)
        if fname not in handles:
            handles[fname] = self._open(fname)
        return handles[fname]

    def _open(self, fname: str):
        path = self.path / fname
        if not path.is_file():
            raise CheckpointError(f"{path} is listed in the index but does not exist")
        try:
            return safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path} is truncated or corrupted ({e}); download or convert it again") from None

    def require(self, names: list[str]) -> None:
        """Fail before any work if a tensor the run will need is missing."""
        missing = [n for n in names if n not in self.weight_map]
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise CheckpointError(
                f"tensor {missing[0]}{more} is missing from the checkpoint in {self.path}; it is "
                f"incomplete: download or convert it again"
            )
        for fname in sorted(set(self.weight_map[n] for n in names)):
            self._open(fname)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def dtype_name(self, name: str) -> str:
        """safetensors' name of the tensor's dtype ("F32", "BF16", ...)."""
        return self._file(name).get_slice(name).get_dtype()

    def dtype_bytes(self, name: str) -> int:
        return DTYPE_BYTES[self._file(name).get_slice(name).get_dtype()]

    def get(self, name: str, handles: dict | None = None) -> torch.Tensor:
        return self._read(name, lambda f: f.get_tensor(name), handles)

    def _read(self, name: str, take: Callable, handles: dict | None = None) -> torch.Tensor:
        """take(handle of name's file), a damaged file reported as such; the tensor is tracked."""
        try:
            tensor = take(self._file(name, handles))
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(
                f"cannot read {name} from {self.path / self.weight_map[name]} ({e}); the file is truncated or corrupted"
            ) from None
        self._track(tensor)
        return tensor

    def get_many(self, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        handles = {}  # each file opened once for the call, and closed with it
        return {n: self.get(prefix + n, handles) for n in names}

    def row_chunks(self, name: str, max_bytes: int | None = None) -> Iterator[torch.Tensor]:
        """The tensor `name` in consecutive chunks of rows (dim 0), each at most `max_bytes` (default CHUNK_BYTES,
        read when called) and one row at least.

        Each chunk comes through a handle of its own: the pages read through one mapping stay resident until it
        goes, so one handle for the whole walk would end with the whole tensor resident after all.
        """
        shape = self.shape(name)
        row_bytes = self.dtype_bytes(name) * torch.Size(shape[1:]).numel()
        step = max(1, (max_bytes or CHUNK_BYTES) // max(row_bytes, 1))
        for start in range(0, shape[0], step):
            chunk = self._read(name, lambda f: f.get_slice(name)[start : start + step])  # called at once
            yield chunk
            del chunk

    def rows(self, name: str, indices: torch.Tensor, max_bytes: int | None = None) -> torch.Tensor:
        """Rows `indices` (sorted, unique) of the tensor `name`, read in chunks: never the whole tensor."""
        shape = self.shape(name)
        if indices.numel() and (int(indices[0]) < 0 or int(indices[-1]) >= shape[0]):
            raise CheckpointError(
                f"row {int(indices[-1]) if int(indices[-1]) >= shape[0] else int(indices[0])} of {name} was asked "
                f"for, but it has {shape[0]} rows: the token ids do not belong to this model's vocabulary"
            )
        out, start = None, 0
        for chunk in self.row_chunks(name, max_bytes):
            stop = start + chunk.shape[0]
            lo, hi = torch.searchsorted(indices, torch.tensor([start, stop])).tolist()
            if out is None:
                out = torch.empty((indices.numel(), *chunk.shape[1:]), dtype=chunk.dtype)
            out[lo:hi] = chunk[indices[lo:hi] - start]
            start = stop
        return out

    def layers(
        self, names: list[str], prefixes: list[str], background: bool = False
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Yield get_many(names, prefix) for each prefix, one layer at a time.

        background=True (the GPU path) reads the next layer in a thread, into page-locked memory for
        asynchronous copies, while the caller works on the current one: two layers are resident then.
        Take items with next(): zip/enumerate keep the previous item alive while the next is read.
        """
        if not background:
            for prefix in prefixes:
                yield self.get_many(names, prefix)
            return

        def load(prefix: str) -> dict[str, torch.Tensor]:
            tensors = self.get_many(names, prefix)
            if not torch.cuda.is_available():
                return tensors
            pinned = {k: v.pin_memory() for k, v in tensors.items()}
            for t in pinned.values():
                self._track(t)  # the pinned copy is what stays resident
            return pinned

        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="rcpu-prefetch") as pool:
            pending = pool.submit(load, prefixes[0]) if prefixes else None
            for k in range(len(prefixes)):
                current = pending.result()
                pending = pool.submit(load, prefixes[k + 1]) if k + 1 < len(prefixes) else None
                yield current
                del current

    def _track(self, tensor: torch.Tensor) -> None:
        # the tensor's own bytes: a chunk of rows views a mapping of the whole tensor, of which it touches its part
        size = tensor.numel() * tensor.element_size()
        with self._lock:
            self.live_bytes += size
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor.untyped_storage(), self._release, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self.live_bytes -= size

    def close(self) -> None:
        """Nothing to release (no file stays open); kept so callers can say when they are done."""


DTYPE_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
}
