"""Reading a safetensors checkpoint one layer at a time, and writing compact shards as layers finish."""
from __future__ import annotations

import json
import os
import shutil
import weakref
from pathlib import Path

import torch
from safetensors import safe_open
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
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        if not (self.path / "config.json").is_file():
            raise CheckpointError(f"{self.path} has no config.json; pass a Hugging Face checkpoint directory")
        if (self.path / INDEX_NAME).is_file():
            self.weight_map: dict[str, str] = json.loads((self.path / INDEX_NAME).read_text())["weight_map"]
        elif (self.path / SINGLE_NAME).is_file():
            with safe_open(self.path / SINGLE_NAME, framework="pt") as f:
                self.weight_map = {k: SINGLE_NAME for k in f.keys()}
        else:
            raise CheckpointError(f"{self.path} has no {SINGLE_NAME} or {INDEX_NAME}")
        self._handles: dict[str, object] = {}
        self.live_bytes = 0
        self.peak_live_bytes = 0

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def _file(self, name: str):
        if name not in self.weight_map:
            raise CheckpointError(f"tensor {name} is missing from the checkpoint in {self.path}")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(self.path / fname, framework="pt")
        return self._handles[fname]

    def shape(self, name: str) -> list[int]:
        return list(self._file(name).get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        tensor = self._file(name).get_tensor(name)
        self._track(tensor)
        return tensor

    def get_many(self, names: list[str], prefix: str = "") -> dict[str, torch.Tensor]:
        return {n: self.get(prefix + n) for n in names}

    def _track(self, tensor: torch.Tensor) -> None:
        size = tensor.untyped_storage().nbytes()
        self.live_bytes += size
        self.peak_live_bytes = max(self.peak_live_bytes, self.live_bytes)
        weakref.finalize(tensor.untyped_storage(), self._release, size)

    def _release(self, size: int) -> None:
        self.live_bytes -= size

    def close(self) -> None:
        self._handles.clear()


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes one shard per call, fsynced, and the index at the end."""

    def __init__(self, out_dir: Path, n_shards: int):
        self.out_dir = out_dir
        self.n_shards = n_shards
        self.weight_map: dict[str, str] = {}
        self.total_bytes = 0
        self.total_params = 0
        self._written = 0

    def write(self, tensors: dict[str, torch.Tensor]) -> Path:
        name = shard_name(self._written, self.n_shards)
        path = self.out_dir / name
        cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
        save_file(cpu, str(path), metadata={"format": "pt"})
        with open(path, "rb") as f:
            os.fsync(f.fileno())
        for k, v in cpu.items():
            self.weight_map[k] = name
            self.total_bytes += v.numel() * v.element_size()
            self.total_params += v.numel()
        self._written += 1
        return path

    def finish(self) -> None:
        if self._written != self.n_shards:
            raise RuntimeError(f"wrote {self._written} of {self.n_shards} shards")
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": dict(sorted(self.weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and other non-weight files of a checkpoint directory."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in NOT_COPIED and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied
