"""Checks before any work on the output: the --out folder, the disk space, and the size of every shard."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import torch

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import WidthPlan
from rcpu_lite.output.manifest import MANIFEST_NAME


class OutputError(ValueError):
    pass


class DiskFull(OSError):
    def __str__(self) -> str:  # the message alone, without "[Errno 28]"
        return self.strerror


def working_dir(out: Path) -> Path:
    return out.parent / (out.name + ".partial")


def check_output(out: Path, model_dir: Path, overwrite: bool, resume: bool) -> Path:
    """Refuse a bad --out before any work, and return the sibling working directory (not created yet).

    --overwrite deletes --out at the end, so --out may not hold the input or the current directory.
    """
    target, src, cwd = out.resolve(), model_dir.resolve(), Path.cwd().resolve()
    if target == src:
        raise OutputError(f"--out {out} is the input checkpoint; choose another directory")
    if target.name in ("", "..") or target == Path(target.anchor):
        raise OutputError(f"--out {out} is not a usable directory name; give a new directory such as {out}/pruned")
    if src.is_relative_to(target):
        raise OutputError(f"--out {out} contains the input checkpoint; choose a directory beside it")
    if target.is_relative_to(src):
        raise OutputError(
            f"--out {out} is inside the input checkpoint, which is only ever read; choose a directory outside it"
        )
    if cwd.is_relative_to(target):
        raise OutputError(f"--out {out} contains the current directory; choose another directory")
    if target.exists() and not target.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory path")
    if target.exists() and not overwrite:
        raise OutputError(f"{out} already exists; pass --overwrite to replace it")
    work = working_dir(target)
    if resume and not (work / MANIFEST_NAME).is_file():
        raise OutputError(f"there is no interrupted run to resume in {work}; run without --resume")
    if not resume and work.exists() and not overwrite:
        raise OutputError(f"{work} holds an interrupted run; pass --resume to continue it or --overwrite to start over")
    return work


def expected_shard_bytes(
    reader: CheckpointReader, cfg, names: list[str], final_names: list[str], plan: WidthPlan
) -> list[int]:
    """Bytes of every output shard, from the compact shapes (known before any work)."""

    def size(name: str, shape=None) -> int:
        return torch.Size(shape or reader.shape(name)).numel() * reader.dtype_bytes(name)

    out = [size(arch.EMBED)]
    shapes_of = {}
    for i, w in enumerate(plan.layers):
        if w not in shapes_of:
            shapes_of[w] = arch.layer_tensor_shapes(arch.pruned_config(cfg, w.heads, w.kv_heads, w.channels))
        prefix = arch.layer_prefix(i)
        out.append(sum(size(prefix + n, shapes_of[w][n]) for n in names))
    out.append(sum(size(n) for n in final_names))
    return out


def check_free_space(work: Path, needed: int, option: str = "--out") -> None:
    """Refuse, before writing, a disk without `needed` bytes free where `work` will be (`option` names the
    command-line option that chose the place)."""
    where = work
    while not where.exists():  # the nearest existing folder is on the disk the output will go to
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DiskFull(
            errno.ENOSPC,
            f"the output needs about {human_bytes(needed)} but only {human_bytes(free)} "
            f"are free in {where}; free space or choose another {option}",
        )


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover
