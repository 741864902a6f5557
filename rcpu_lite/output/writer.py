"""The one place that writes an output checkpoint: numbered shards as layers finish, side files, the index,
config.json and the tokenizer files, each atomically, and the resume manifest after every shard."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from rcpu_lite.checkpoint import DTYPE_BYTES, INDEX_NAME, SINGLE_NAME
from rcpu_lite.output.checks import DiskFull, human_bytes
from rcpu_lite.output.chunked import ChunkedTensor, as_chunked, write_chunked
from rcpu_lite.output.fsutil import atomic_write, write_json
from rcpu_lite.output.manifest import Manifest
from rcpu_lite.output.report import LayerResult
from rcpu_lite.peak_memory import StageMemory, StagePeaks
from rcpu_lite.runtime import fault_hook

# Weights are rewritten; everything else a checkpoint directory holds (tokenizer, generation
# config, chat template) is copied as is.
NOT_COPIED = {INDEX_NAME, SINGLE_NAME, "config.json", "pytorch_model.bin.index.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".ckpt")


def shard_name(index: int, total: int) -> str:
    return f"model-{index + 1:05d}-of-{total:05d}.safetensors"


class ShardWriter:
    """Writes numbered shards atomically, then the index from the files themselves.

    With a manifest (a prune run), every shard is recorded in it once durable, with its layer's record, and a
    full disk becomes DiskFull with the space still needed (`shard_bytes`: the expected size of every shard).
    `main=False` (a process other than rank 0) writes nothing: the other ranks computed the same tensors.
    """

    def __init__(
        self,
        out_dir: Path,
        n_shards: int,
        manifest: Manifest | None = None,
        shard_bytes: list[int] | None = None,
        main: bool = True,
    ):
        self.out_dir, self.n_shards, self.manifest, self.main = out_dir, n_shards, manifest, main
        self.shard_bytes = shard_bytes or []
        self.memory: StageMemory | None = None  # set by a prune run: a layer's record gets its write's peak

    def path(self, index: int) -> Path:
        return self.out_dir / shard_name(index, self.n_shards)

    def done(self, index: int) -> bool:
        return self.manifest is not None and self.manifest.done(index)

    def write(
        self, index: int, tensors: dict[str, torch.Tensor | ChunkedTensor], record: LayerResult | None = None
    ) -> int:
        """Write shard `index` (recording it, and the time it took into `record`); return its size in bytes."""
        if not self.main:
            return 0
        started = time.perf_counter()
        try:
            size = self.save(self.path(index), tensors, fault_point=index)
        except OSError as e:
            if e.errno != errno.ENOSPC or self.manifest is None:
                raise
            needed = sum(b for i, b in enumerate(self.shard_bytes) if i >= index)
            raise DiskFull(
                errno.ENOSPC,
                f"the disk holding {self.out_dir} filled up while writing "
                f"{self.path(index).name}; about {human_bytes(needed)} more are needed: free space and "
                f"rerun the same command with --resume",
            ) from None
        if record is not None:
            seconds = time.perf_counter() - started
            record.seconds_by_stage["write"] = round(seconds, 4)
            record.seconds = round(record.seconds + seconds, 3)
            if self.memory is not None:  # booked into the record's own dicts
                self.memory.mark("write", also=StagePeaks(record.peak_rss_by_stage, record.peak_gpu_by_stage))
        if self.manifest is not None:
            self.manifest.record(index, size, record.to_json() if record is not None else None)
        return size

    @staticmethod
    def save(
        path: Path,
        tensors: dict[str, torch.Tensor | ChunkedTensor],
        metadata: dict[str, str] | None = None,
        fault_point: int | None = None,
    ) -> int:
        """One safetensors file, atomically (also the side files of cross-block reconstruction). A ChunkedTensor
        among `tensors` (the embedding, the head) is written a chunk at a time, to the same bytes."""
        metadata = {"format": "pt", **(metadata or {})}
        if any(isinstance(v, ChunkedTensor) for v in tensors.values()):
            chunked = {k: v if isinstance(v, ChunkedTensor) else as_chunked(v) for k, v in tensors.items()}
            write = lambda tmp: write_chunked(tmp, chunked, metadata)  # noqa: E731
        else:
            cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
            write = lambda tmp: save_file(cpu, str(tmp), metadata=metadata)  # noqa: E731
        if fault_point is not None:
            fault_hook("before_shard", fault_point)
        return atomic_write(path, write)

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
                    total_bytes += numel * DTYPE_BYTES[sl.get_dtype()]
        index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
        write_json(self.out_dir / INDEX_NAME, index)
        return total_params

    def write_json(self, name: str, data: dict) -> None:
        write_json(self.out_dir / name, data)

    def copy_side_files(self, src: Path) -> list[str]:
        """Copy the tokenizer and the other non-weight files of the checkpoint directory `src`."""
        return copy_side_files(src, self.out_dir)


def copy_side_files(src: Path, dst: Path) -> list[str]:
    """Copy the tokenizer and other non-weight files of a checkpoint directory."""
    copied = []
    for item in sorted(src.iterdir()):
        if item.is_file() and item.name not in NOT_COPIED and not item.name.endswith(WEIGHT_SUFFIXES):
            shutil.copy2(item, dst / item.name)
            copied.append(item.name)
    return copied


def read_side_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(path, framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


__all__ = ["ShardWriter", "copy_side_files", "read_side_file", "shard_name"]
