"""Writing a checkpoint as one GGUF file for llama.cpp, one tensor at a time.

Everything that can refuse runs before a byte is written: the layout (export/layout.py), the llama.cpp
architecture (export/targets.py), the tokenizer (export/vocab.py), the type (export/types.py), the target
file and the free space. The file is written as FILE.partial and renamed to FILE when complete; a K-quant is
made by llama.cpp's quantiser from a lossless FILE.unquantised.partial, which is then deleted.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf import quants

from rcpu_lite.export.layout import Layout, read_layout
from rcpu_lite.export.targets import ExportRefused, Target, choose_target
from rcpu_lite.export.types import GGUF_TYPES, GgufType
from rcpu_lite.export.vocab import TokenizerError, Vocabulary, add_vocabulary, read_vocabulary
from rcpu_lite.families import arch
from rcpu_lite.output.checks import DiskFull, check_free_space
from rcpu_lite.output.fsutil import atomic_write

log = logging.getLogger("rcpu_lite")

LLAMA_CPP_HINT = "pip install 'rcpu-lite[gguf]' (llama-cpp-python, which builds llama.cpp: several minutes)"


class ExportError(ValueError):
    """Bad input to export: one line for the user."""


@dataclass
class ExportResult:
    file: Path
    architecture: str
    type: str
    bytes: int
    seconds: float
    unquantised: list[str] = field(default_factory=list)  # 2-D weights the type left in F16 / F32


@dataclass(frozen=True)
class _Tensor:
    """One tensor of the GGUF file: where it comes from and how it is stored."""

    gguf_name: str
    source: str  # the checkpoint's name ("" for one computed here: rope_freqs)
    shape: tuple[int, ...]  # numpy order (rows, columns)
    qtype: gguf.GGMLQuantizationType
    permute_heads: int = 0  # q / k rows to permute into llama.cpp's pair-wise rotary layout (heads)


def to_gguf(
    model_dir: str | os.PathLike,
    file: str | os.PathLike,
    type: str = "f16",
    overwrite: bool = False,
    pre_tokenizer: str | None = None,
    threads: int | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> ExportResult:
    """Write the checkpoint in `model_dir` (pruned by rcpu-lite, or not) as the GGUF file `file`.

    `type`: one of GGUF_TYPES. `pre_tokenizer`: llama.cpp's name for how the tokenizer splits text, for a
    tokenizer rcpu-lite cannot identify. `progress(done, total)` is called after every tensor.
    """
    started = time.perf_counter()
    model_dir, file = Path(model_dir), Path(file)
    if type not in GGUF_TYPES:
        raise ExportError(f"unknown --type {type!r}; choose from {', '.join(GGUF_TYPES)}")
    kind = GGUF_TYPES[type]
    _check_file(file, overwrite)
    try:
        layout = read_layout(model_dir)
        target = choose_target(layout)
        vocab = read_vocabulary(model_dir, layout.vocab_size, pre_tokenizer)
    except (ExportRefused, TokenizerError, arch.UnsupportedModel) as e:
        raise ExportError(str(e)) from None
    rope_freqs = _rope_freqs(layout)
    if kind.needs_llama_cpp:
        _check_llama_cpp(type)
    source_type = _lossless_type(layout) if kind.needs_llama_cpp else kind
    tensors = list(_plan(layout, target, source_type, rope_freqs is not None))
    needed = sum(_nbytes(t) for t in tensors) * (2 if kind.needs_llama_cpp else 1)
    check_free_space(file.parent, needed, option="--gguf")

    lossless = file.with_name(file.name + ".unquantised.partial")

    def write(partial: Path) -> None:
        if kind.needs_llama_cpp:
            _write(lossless, layout, target, vocab, source_type, tensors, rope_freqs, progress)
            _quantise(lossless, partial, kind, threads)
        else:
            _write(partial, layout, target, vocab, source_type, tensors, rope_freqs, progress)

    try:
        atomic_write(file, write, suffix=".partial")
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise DiskFull(errno.ENOSPC, f"the disk holding {file} filled up; nothing was written") from None
        raise
    finally:
        lossless.unlink(missing_ok=True)
    return ExportResult(
        file, target.name, type, file.stat().st_size, time.perf_counter() - started, unquantised_weights(file)
    )


def _check_file(file: Path, overwrite: bool) -> None:
    if file.is_dir():
        raise ExportError(f"{file} is a directory; give the path of the .gguf file to write")
    if file.exists() and not overwrite:
        raise ExportError(f"{file} already exists; pass --overwrite to replace it")
    if not file.parent.is_dir():
        raise ExportError(f"the folder {file.parent} does not exist")


def _check_llama_cpp(type: str) -> None:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        raise ExportError(f"--type {type} is made by llama.cpp's quantiser, which is not installed: {LLAMA_CPP_HINT}")


def _lossless_type(layout: Layout) -> GgufType:
    """The type the K-quants start from: the checkpoint's own precision, so nothing is lost before them."""
    dtype = layout.reader.dtype_name(arch.EMBED)
    return GGUF_TYPES[{"F32": "f32", "BF16": "bf16"}.get(dtype, "f16")]


def _rope_freqs(layout: Layout) -> np.ndarray | None:
    """llama.cpp's rope_freqs (per-frequency divisors) for Llama 3's rope scaling; None where there are none.
    Other rope scalings are refused: the file would run with different positions than transformers."""
    params = dict(getattr(layout.config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type in ("default", "linear"):
        return None
    if rope_type != "llama3":
        raise ExportError(f"rope_type {rope_type!r} is not exported yet; rcpu-lite writes default, linear and llama3")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](layout.config, torch.device("cpu"))
    d = layout.head_dim
    plain = 1.0 / (params["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    return (plain / scaled).to(torch.float32).numpy()


def _matrix_type(kind: GgufType, columns: int) -> gguf.GGMLQuantizationType:
    """The stored type of a 2-D weight: the type's own, or F16 where its rows are no whole number of blocks
    (llama.cpp's converter falls back the same way)."""
    return kind.matrix if columns % kind.block == 0 else gguf.GGMLQuantizationType.F16


def _plan(layout: Layout, target: Target, kind: GgufType, rope_freqs: bool) -> Iterator[_Tensor]:
    """Every tensor of the file, in order, with its stored type; nothing is loaded."""
    names = gguf.get_tensor_name_map(target.arch, len(layout.widths))
    reader = layout.reader

    def tensor(source: str, permute: int = 0) -> _Tensor:
        shape = tuple(reader.shape(source))
        qtype = _matrix_type(kind, shape[1]) if len(shape) == 2 else gguf.GGMLQuantizationType.F32
        gguf_name = names.get_name(source, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"llama.cpp's {target.name} has no tensor for {source}")
        return _Tensor(gguf_name, source, shape, qtype, permute)

    yield tensor(arch.EMBED)
    for i, (widths, layer) in enumerate(zip(layout.widths, layout.layer_tensors)):
        for name in layer:
            permute = 0
            if target.permute_qk and name.startswith("self_attn.q_proj."):
                permute = widths.heads
            elif target.permute_qk and name.startswith("self_attn.k_proj."):
                permute = widths.kv_heads
            yield tensor(arch.layer_prefix(i) + name, permute)
    yield tensor(arch.FINAL_NORM)
    if not layout.tied:
        yield tensor(arch.LM_HEAD)
    if rope_freqs:
        name = gguf.TENSOR_NAMES[gguf.MODEL_TENSOR.ROPE_FREQS] + ".weight"
        yield _Tensor(name, "", (layout.head_dim // 2,), gguf.GGMLQuantizationType.F32)


def _nbytes(t: _Tensor) -> int:
    block, size = gguf.GGML_QUANT_SIZES[t.qtype]
    return int(np.prod(t.shape)) // block * size


def _metadata(writer: gguf.GGUFWriter, layout: Layout, target: Target, kind: GgufType) -> None:
    cfg, widths = layout.config, layout.widths

    def per_layer(values: list[int]) -> int | list[int]:
        return values if target.per_layer_widths else values[0]

    writer.add_name(layout.model_dir.resolve().name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(layout.hidden_size)
    writer.add_block_count(len(widths))
    writer.add_feed_forward_length(per_layer([w.channels for w in widths]))
    writer.add_head_count(per_layer([w.heads for w in widths]))
    writer.add_head_count_kv(per_layer([w.kv_heads for w in widths]))
    # Always explicit: llama.cpp otherwise takes n_embd / n_head, wrong once heads are removed.
    writer.add_key_length(layout.head_dim)
    writer.add_value_length(layout.head_dim)
    writer.add_rope_dimension_count(layout.head_dim)
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(cfg, "rope_theta", 10000.0))))
    if rope.get("rope_type") == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(rope["factor"]))
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_vocab_size(layout.vocab_size)
    writer.add_file_type(kind.file_type)


def _write(
    path: Path,
    layout: Layout,
    target: Target,
    vocab: Vocabulary,
    kind: GgufType,
    tensors: list[_Tensor],
    rope_freqs: np.ndarray | None,
    progress: Callable[[int, int], None] | None,
) -> None:
    writer = gguf.GGUFWriter(path, target.name)
    try:
        _fill(writer, layout, target, vocab, kind, tensors, rope_freqs, progress)
    finally:
        writer.close()


def _fill(writer, layout, target, vocab, kind, tensors, rope_freqs, progress) -> None:
    _metadata(writer, layout, target, kind)
    add_vocabulary(writer, layout.model_dir, vocab)
    for t in tensors:
        raw = None if t.qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else t.qtype
        shape = t.shape if raw is None else gguf.quant_shape_to_byte_shape(t.shape, t.qtype)
        dtype = {gguf.GGMLQuantizationType.F32: np.float32, gguf.GGMLQuantizationType.F16: np.float16}.get(
            t.qtype, np.uint8
        )
        writer.add_tensor_info(t.gguf_name, shape, np.dtype(dtype), _nbytes(t), raw_dtype=raw)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for done, t in enumerate(tensors, 1):
        data = rope_freqs if not t.source else _converted(layout.reader.get(t.source), t)
        writer.write_tensor_data(data)
        if progress is not None:
            progress(done, len(tensors))


def _converted(tensor: torch.Tensor, t: _Tensor) -> np.ndarray:
    """The tensor as stored: q / k rows in llama.cpp's rotary layout, then its GGUF type."""
    data = tensor.to(torch.float32)
    if t.permute_heads:
        data = permute_rotary(data, t.permute_heads)
    array = data.numpy()
    if t.qtype == gguf.GGMLQuantizationType.F32:
        return np.ascontiguousarray(array)
    return quants.quantize(array, t.qtype)


def permute_rotary(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder each head's rows (or bias entries) from Hugging Face's rotary layout (the first half of a head
    pairs with the second) to llama.cpp's pair-wise one (row 2i pairs with 2i + 1)."""
    head_dim = rows.shape[0] // heads
    split = rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:])
    return split.transpose(1, 2).reshape(rows.shape)


def _quantise(source: Path, out: Path, kind: GgufType, threads: int | None) -> None:
    """llama.cpp's own quantiser (the library behind llama-quantize), in this process."""
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(kind.file_type)
    params.nthread = threads or 0
    status = llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params))
    if status != 0:
        raise ExportError(f"llama.cpp's quantiser failed on {source} (status {status}); its log is above")


def unquantised_weights(file: str | os.PathLike) -> list[str]:
    """The 2-D weights of a quantised GGUF file that are still F16 / F32 / BF16 (none in an f32/f16/bf16 file)."""
    reader = gguf.GGUFReader(str(file))
    types = {int(t.tensor_type) for t in reader.tensors if len(t.shape) == 2}
    floats = {
        int(q) for q in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16, gguf.GGMLQuantizationType.BF16)
    }
    if types <= floats:
        return []
    return [t.name for t in reader.tensors if len(t.shape) == 2 and int(t.tensor_type) in floats]
