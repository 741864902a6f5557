"""Perplexity computed layer by layer, so a model larger than memory can be evaluated too.

Plain checkpoints of the supported families and rcpu-lite's per-layer-width format (rcpu_lite.output.remote) are
evaluated; anything else is refused with one line before any layer runs.
"""

from __future__ import annotations

import math
import os
import time

import torch
import torch.nn.functional as F

from rcpu_lite import calibration
from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.display import PlainReporter, Reporter
from rcpu_lite.families import arch
from rcpu_lite.models import load_tokenizer, resolve_model
from rcpu_lite.output import remote
from rcpu_lite.peak_memory import peak_rss_bytes
from rcpu_lite.runtime import pick_device, run_layer_batched, to_compute


@torch.inference_mode()
def perplexity(
    model: str | os.PathLike,
    text_file: str | os.PathLike,
    seqlen: int = 128,
    max_windows: int | None = None,
    device: str = "auto",
    micro_batch: int = 16,
    max_hidden_gb: float = 1.0,
    reporter: Reporter | None = None,
) -> dict:
    """WikiText-style perplexity: the text in non-overlapping windows of `seqlen` tokens.

    `text_file` is a text file or a built-in evaluation name ("wikitext2": the WikiText-2 raw test
    split, bundled); a file of that name wins.

    The hidden states of at most `max_hidden_gb` worth of windows are held at once; larger texts
    are done in chunks, each streaming every layer from disk again. `reporter` shows the progress
    (display.py); by default one log line per layer and chunk.
    """
    reporter = reporter or PlainReporter()
    _check_arguments(seqlen, micro_batch, max_windows)
    text_path = calibration.resolve_text(text_file, "evaluation")  # before any model work: fail early
    started = time.perf_counter()
    model_dir = resolve_model(model)
    reader = CheckpointReader(model_dir)
    config, layer_configs = remote.layer_configs(model_dir)
    names = remote.layer_tensor_names(layer_configs[0]) if layer_configs else []  # the same for every layer
    check_shapes(reader, config, layer_configs, names)
    dev = pick_device(device)
    windows = _windows(model_dir, reader, text_path, seqlen, max_windows)
    inputs = arch.layer_inputs(config, seqlen, dev, torch.float32)
    per_window = seqlen * config.hidden_size * 4
    chunk = max(1, int(max_hidden_gb * 2**30 // per_window))

    nll, count = 0.0, 0
    n_windows = int(windows.shape[0])
    reporter.start("eval", n_windows, "windows")
    for start in range(0, windows.shape[0], chunk):
        ids = windows[start : start + chunk]
        where = f"windows {start + 1}-{start + ids.shape[0]} of {n_windows}"
        hidden = _last_hidden(reader, config, layer_configs, names, ids, inputs, dev, micro_batch, reporter, where)
        reporter.phase("logits")
        norm = arch.final_norm(config, reader.get(arch.FINAL_NORM).to(dev, torch.float32))
        head = reader.get(arch.head_weight_name(config)).to(dev, torch.float32)
        for w in range(ids.shape[0]):  # one window at a time: seqlen x vocab logits, not micro_batch times that
            logits = arch.lm_logits(config, norm(hidden[w, :-1]), head)
            target = ids[w, 1:].to(dev)
            nll += float(F.cross_entropy(logits, target, reduction="sum"))
            count += target.numel()
        del hidden, norm, head
    reader.close()
    reporter.finish([])  # the command prints the result itself
    return {
        "ppl": math.exp(nll / count),
        "nll": nll / count,
        "tokens": count,
        "windows": int(windows.shape[0]),
        "seqlen": seqlen,
        "model": str(model),
        "text": str(text_file),
        "seconds": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss_bytes(),
    }


def _check_arguments(seqlen: int, micro_batch: int, max_windows: int | None) -> None:
    if seqlen < 2:
        raise ValueError(f"--seqlen must be at least 2 (a window predicts its tokens after the first), got {seqlen}")
    if micro_batch < 1:
        raise ValueError(f"--micro-batch must be at least 1, got {micro_batch}")
    if max_windows is not None and max_windows < 1:
        raise ValueError(f"--max-windows must be at least 1, got {max_windows}")


def _windows(model_dir, reader: CheckpointReader, text_path, seqlen: int, max_windows: int | None) -> torch.Tensor:
    """The text's consecutive windows; refuses a tokenizer whose ids the model has no embeddings for."""
    tokenizer = load_tokenizer(model_dir)
    windows = calibration.consecutive_windows(
        calibration.tokenize(tokenizer, calibration.evaluation_text(text_path)), seqlen, max_windows
    )
    vocab = reader.shape(arch.EMBED)[0]
    if windows.numel() and int(windows.max()) >= vocab:
        raise ValueError(
            f"the tokenizer of {model_dir} gives token id {int(windows.max())} but the model has only "
            f"{vocab} embeddings; the tokenizer files do not belong to this model"
        )
    return windows


def _last_hidden(
    reader: CheckpointReader,
    config,
    layer_configs: list,
    names: list[str],
    ids: torch.Tensor,
    inputs: arch.LayerInputs,
    dev: torch.device,
    micro_batch: int,
    reporter: Reporter,
    where: str,
) -> torch.Tensor:
    """The hidden states after the last decoder layer for the windows `ids`, one layer resident at a time."""
    n_layers = config.num_hidden_layers
    hidden = arch.embed(config, reader.get(arch.EMBED), ids).to(dev)
    prefixes = [arch.layer_prefix(i) for i in range(n_layers)]
    layer_reads = reader.layers(names, prefixes, background=dev.type == "cuda")
    for i in range(n_layers):
        reporter.position(f"{where}, layer {i + 1}/{n_layers}")
        reporter.phase("read")
        stored = next(layer_reads)  # not enumerate(): it would keep the previous layer alive
        tensors = to_compute(stored, dev, consume=True)
        layer = arch.build_layer(layer_configs[i], i, tensors)
        reporter.phase("forward")
        run_layer_batched(layer, hidden, inputs, config, i, micro_batch)
        del layer, tensors
        # A window is done after the last layer; its share of each layer keeps the bar and the ETA moving.
        reporter.advance(f"{where}: layer {i + 1}/{n_layers}", steps=ids.shape[0] / n_layers)
    return hidden


def check_shapes(reader: CheckpointReader, config, layer_configs: list, names: list[str]) -> None:
    """Refuse, before any work, a checkpoint whose tensors are missing or whose layers do not have the shapes
    config.json gives them (per-layer widths under a plain config.json, for example)."""
    prefixes = [arch.layer_prefix(i) for i in range(len(layer_configs))]
    reader.require([arch.EMBED, *arch.final_tensor_names(config), *(p + n for p in prefixes for n in names)])
    shapes: dict[int, dict] = {}  # by config: a plain checkpoint has one config for every layer
    for prefix, cfg in zip(prefixes, layer_configs):
        if id(cfg) not in shapes:
            shapes[id(cfg)] = {n: list(s) for n, s in arch.layer_tensor_shapes(cfg).items()}
        expected = shapes[id(cfg)]
        for n in names:
            want = expected.get(n, [cfg.hidden_size])  # an o_proj / down_proj bias the family's class lacks
            got = reader.shape(prefix + n)
            if got != want:
                raise ValueError(
                    f"{reader.path}: {prefix + n} has shape {got} but config.json gives {want}; the "
                    f"checkpoint's layers do not match its config.json"
                )
