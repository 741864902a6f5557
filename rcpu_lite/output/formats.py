"""The output checkpoint directory: checks before any work, its size, its config.json, and the final rename."""
from __future__ import annotations

import errno
import json
import logging
import os
import shutil
from pathlib import Path

import torch

from dataclasses import dataclass

from rcpu_lite.families import arch
from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.methods.compensation import has_bias
from rcpu_lite.methods.allocation import LayerWidths, WidthPlan
from rcpu_lite.output.manifest import MANIFEST_NAME, fsync_dir

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


def expected_shard_bytes(reader: CheckpointReader, cfg, names: list[str], final_names: list[str],
                         plan: WidthPlan) -> list[int]:
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




def output_biases(settings, plan: WidthPlan, shape: arch.LayerShape) -> frozenset[str]:
    """The projections that get a compensating bias in every layer: those compensated with '+bias' (or
    'bias') whose inputs lose a unit somewhere. Nothing removed, no bias: ratio 0 writes the input as is."""
    with_bias = has_bias(settings.compensate)
    removes = {"o_proj": plan.removes_heads(shape), "down_proj": plan.removes_channels(shape)}
    return frozenset(p for p in settings.compensated_projections if with_bias and removes[p])


@dataclass(frozen=True)
class OutputFormat:
    """How the output is written: a stock checkpoint of `model_type`, or rcpu-lite's remote-code format."""

    remote: bool
    model_type: str
    config_updates: tuple[tuple[str, object], ...] = ()
    zero_bias_modules: tuple[str, ...] = ()  # stock Llama + bias: the biases the flags add, all zero

    def zero_biases(self, widths: LayerWidths, shape: arch.LayerShape) -> dict[str, torch.Tensor]:
        """The zero biases a stock Llama needs beside a compensating one (attention_bias and mlp_bias give
        every projection of the block a bias)."""
        rows = {"self_attn.q_proj": widths.heads * shape.head_dim, "self_attn.k_proj": widths.kv_heads * shape.head_dim,
                "self_attn.v_proj": widths.kv_heads * shape.head_dim, "mlp.gate_proj": widths.channels,
                "mlp.up_proj": widths.channels}
        return {m + ".bias": torch.zeros(rows[m]) for m in self.zero_bias_modules}


def _remote_format() -> OutputFormat:
    from rcpu_lite.output.modeling_rcpu import MODEL_TYPE  # the remote-code format (remote.py writes its config)

    return OutputFormat(True, MODEL_TYPE)


def choose_format(cfg, plan: WidthPlan, biases: frozenset[str]) -> OutputFormat:
    """Stock whenever the family's own classes can hold the result; otherwise the remote-code format
    (per-layer widths, or biases Mistral / Qwen2 cannot hold, or a Llama shape LlamaConfig refuses)."""
    if not plan.uniform:
        return _remote_format()
    heads = plan.layers[0].heads
    if not biases:
        try:
            return OutputFormat(False, arch.saved_model_type(cfg, heads))
        except arch.UnsupportedModel:
            return _remote_format()
    if cfg.model_type != "llama" or cfg.hidden_size % heads:
        return _remote_format()
    updates, zeros = [], []
    if "o_proj" in biases and not getattr(cfg, "attention_bias", False):
        updates.append(("attention_bias", True))
        zeros += ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"]
    if "down_proj" in biases and not getattr(cfg, "mlp_bias", False):
        updates.append(("mlp_bias", True))
        zeros += ["mlp.gate_proj", "mlp.up_proj"]
    return OutputFormat(False, "llama", tuple(updates), tuple(zeros))


def pruned_config_json(model_dir: Path, layer_widths: list[LayerWidths], shape: arch.LayerShape, fmt: OutputFormat,
                       biases: frozenset[str]) -> dict:
    """The output's config.json: the input's with the new widths and an explicit head_dim (stock), or
    the remote-code format's (per-layer widths, compensating biases)."""
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("quantization_config", None)
    if fmt.remote:
        from rcpu_lite.output import remote

        return remote.config_json(config, layer_widths, shape.head_dim, biases)
    widths = set(layer_widths)
    if len(widths) != 1:
        raise RuntimeError(f"layers ended with different widths {sorted(widths)}; a stock output needs uniform ones")
    w = widths.pop()
    config.update(num_attention_heads=w.heads, num_key_value_heads=w.kv_heads, intermediate_size=w.channels,
                  head_dim=shape.head_dim, **dict(fmt.config_updates))
    if fmt.model_type != config["model_type"]:
        log.warning("writing this pruned %s as model_type %r: %d heads do not divide hidden_size %d, which "
                    "transformers' LlamaConfig refuses; the computation is identical", config["model_type"],
                    fmt.model_type, w.heads, shape.hidden_size)
        for llama_only in ("attention_bias", "mlp_bias", "pretraining_tp"):
            config.pop(llama_only, None)
        config.update(model_type=fmt.model_type, architectures=[arch.FAMILIES[fmt.model_type] + "ForCausalLM"],
                      sliding_window=None)
    return config
