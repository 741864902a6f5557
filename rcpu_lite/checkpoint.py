"""Reading a safetensors checkpoint one layer at a time, and writing compact shards as layers finish."""
from __future__ import annotations

import errno
import json
import os
import signal
import shutil
import threading
import weakref
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
# Weights are rewritten; everything else a checkpoint directory holds (tokenizer, generation
# config, chat template) is copied as is.
NOT_COPIED = {INDEX_NAME, SINGLE_NAME, "config.json", "pytorch_model.bin.index.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


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
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.path}; it is incomplete: "
                                  f"download or convert it again")
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
            raise CheckpointError(f"tensor {missing[0]}{more} is missing from the checkpoint in {self.path}; it is "
                                  f"incomplete: download or convert it again")
        for fname in sorted(set(self.weight_map[n] for n in names)):
            self._open(fname)

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def dtype_bytes(self, name: str) -> int:
        return _DTYPE_BYTES[self._file(name).get_slice(name).get_dtype()]

    def get(self, name: str, handles: dict | None = None) -> torch.Tensor:
        try:
            tensor = self._file(name, handles).get_tensor(name)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"cannot read {name} from {self.path / self.weight_map[name]} ({e}); "
                                  f"the file is truncated or corrupted") from None
        self._track(tensor)
        return tensor

    def get_many(self, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        handles = {}  # each file opened once for the call, and closed with it
        return {n: self.get(prefix + n, handles) for n in names}

    def layers(self, names: list[str], prefixes: list[str], background: bool = False
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
        size = tensor.untyped_storage().nbytes()
        with self._lock:
            self.live_bytes += size
            self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor.untyped_storage(), self._release, size)

    def _release(self, size: int) -> None:
        with self._lock:
            self.live_bytes -= size

    def close(self) -> None:
        """Nothing to release (no file stays open); kept so callers can say when they are done."""


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes numbered shards atomically (temporary name, fsync, rename), then the index from the files."""

    def __init__(self, out_dir: Path, n_shards: int):
        self.out_dir = out_dir
        self.n_shards = n_shards

    def path(self, index: int) -> Path:
        return self.out_dir / shard_name(index, self.n_shards)

    def write(self, index: int, tensors: dict[str, torch.Tensor]) -> int:
        """Write shard `index` and return its size in bytes; a crash leaves no half-written shard."""
        path = self.path(index)
        tmp = path.with_name(path.name + ".tmp")
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        fault_hook("before_shard", index)
        try:
            save_file(cpu, str(tmp), metadata={"format": "pt"})
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, path)
        return path.stat().st_size

    def read(self, index: int) -> dict[str, torch.Tensor]:
        """A finished shard's tensors (used to replay finished layers on resume)."""
        with safe_open(self.path(index), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}

    def finish(self) -> int:
        """Write the index from the shard files themselves; return the number of parameters."""
        weight_map, total_bytes, total_params = {}, 0, 0
        for index in range(self.n_shards):
            path = self.path(index)
            if not path.is_file():
                raise RuntimeError(f"shard {path.name} is missing")
            with safe_open(path, framework="pt") as f:
                for name in f.keys():
                    sl = f.get_slice(name)
                    numel = torch.Size(sl.get_shape()).numel()
                    weight_map[name] = path.name
                    total_params += numel
                    total_bytes += numel * _DTYPE_BYTES[sl.get_dtype()]
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return total_params


_DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
                "F8_E4M3": 1, "F8_E5M2": 1}


def fault_hook(point: str, index: int) -> None:
    """Test-only fault injection: RCPU_LITE_FAULT="before_shard:3:kill" SIGKILLs this process just
    before shard 3 is written; "enospc" raises a full-disk error instead, "sigint"/"sigterm" send
    that signal to this process (the run then stops after this shard). "after_layer:2:kill" fires
    once 2 layers are finished (the pipeline's loop, on every rank); a fourth field, as in
    "after_layer:2:kill:1", limits it to that rank (RANK, set by torchrun)."""
    spec = os.environ.get("RCPU_LITE_FAULT")
    if not spec:
        return
    where, at, what, *rank = spec.split(":")
    if where != point or int(at) != index or (rank and int(rank[0]) != int(os.environ.get("RANK", "0"))):
        return
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if what == "sigint" else signal.SIGTERM)
    if what == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and other non-weight files of a checkpoint directory."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in NOT_COPIED and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied
