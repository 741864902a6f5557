"""The output checkpoint directory: checks before any work, its size, its config.json, and the final rename."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from . import arch
from .checkpoint import CheckpointReader
from .progress import MANIFEST_NAME, fsync_dir

log = logging.getLogger("rcpu_lite")


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
        raise OutputError(f"--out {out} is inside the input checkpoint, which is only ever read; choose a "
                          f"directory outside it")
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
        raise OutputError(f"{work} holds an interrupted run; pass --resume to continue it or --overwrite to "
                          f"start over")
    return work


def publish(work: Path, out: Path) -> None:
    """Make every file durable, then replace --out by the working directory in one rename."""
    for item in work.iterdir():
        if item.is_file():
            with open(item, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(work)
    if out.exists():
        shutil.rmtree(out)
    work.rename(out)
    # The manifest goes last: a crash before this point leaves a complete OUT.partial that --resume finishes.
    (out / MANIFEST_NAME).unlink()
    fsync_dir(out.parent)


def expected_shard_bytes(reader: CheckpointReader, cfg, names: list[str], final_names: list[str], heads: int,
                          kv_heads: int, channels: int) -> list[int]:
    """Bytes of every output shard, from the compact shapes (known before any work)."""
    pruned = arch.pruned_config(cfg, heads, kv_heads, channels)
    shapes = arch.layer_tensor_shapes(pruned)
    def size(name: str, shape=None) -> int:
        return torch.Size(shape or reader.shape(name)).numel() * reader.dtype_bytes(name)
    out = [size(arch.EMBED)]
    for i in range(cfg.num_hidden_layers):
        prefix = arch.layer_prefix(i)
        out.append(sum(size(prefix + n, shapes[n]) for n in names))
    out.append(sum(size(n) for n in final_names))
    return out


def check_free_space(work: Path, needed: int) -> None:
    where = work
    while not where.exists():  # the nearest existing folder is on the disk the output will go to
        where = where.parent
    free = shutil.disk_usage(where).free
    if needed > free:
        raise DiskFull(errno.ENOSPC, f"the output needs about {human_bytes(needed)} but only {human_bytes(free)} "
                       f"are free in {where}; free space or choose another --out")


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return f"{n:.2f} TiB"  # pragma: no cover




def pruned_config_json(model_dir: Path, layers: list[dict], shape: arch.LayerShape, model_type: str) -> dict:
    """The input's config.json with the new (uniform) widths, an explicit head_dim, and the model_type
    chosen by arch.saved_model_type."""
    config = json.loads((model_dir / "config.json").read_text())
    widths = {(len(r["kept_heads"]), len(r["kept_kv_heads"]), len(r["kept_channels"])) for r in layers}
    if len(widths) != 1:
        raise RuntimeError(f"layers ended with different widths {sorted(widths)}; uniform pruning expected")
    heads, kv_heads, channels = widths.pop()
    config.pop("quantization_config", None)
    config.update(num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=channels,
                  head_dim=shape.head_dim)
    if model_type != config["model_type"]:
        log.warning("writing this pruned %s as model_type %r: %d heads do not divide hidden_size %d, which "
                    "transformers' LlamaConfig refuses; the computation is identical", config["model_type"],
                    model_type, heads, shape.hidden_size)
        for llama_only in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(llama_only, None)
        config.update(model_type=model_type, architectures=[arch.FAMILIES[model_type] + "ForCausalLM"],
                      sliding_window=None)
    return config
