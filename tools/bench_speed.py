"""Prune time against one plain dense forward pass over the same calibration tokens, in one run.

    python tools/bench_speed.py [--model smollm2-135m] [--calib FILE] [--nsamples 128] [--seqlen 128] [--repeats 3]

The dense pass is transformers' whole model (fp32, CPU, no KV cache) over the calibration
windows in micro-batches; the prune is rcpu_lite.pipeline.prune with the same windows. Prints
each run and the medians; the goal is a ratio <= 4.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite import calibration  # noqa: E402
from rcpu_lite.config import PruneSettings  # noqa: E402
from rcpu_lite.models import load_tokenizer, resolve_model  # noqa: E402
from rcpu_lite.pipeline import prune  # noqa: E402


@torch.inference_mode()
def dense_forward_seconds(model_dir: Path, windows: torch.Tensor, micro_batch: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="sdpa").eval()
    started = time.perf_counter()
    for start in range(0, windows.shape[0], micro_batch):
        model(input_ids=windows[start:start + micro_batch], use_cache=False)
    return time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    model_dir = resolve_model(args.model)
    settings = PruneSettings(ratio=args.ratio, calib=args.calib, nsamples=args.nsamples, seqlen=args.seqlen,
                             device="cpu")
    tokens = calibration.tokenize(load_tokenizer(model_dir), calibration.read_text(args.calib))
    windows = calibration.random_windows(tokens, args.nsamples, args.seqlen, settings.seed)
    dense, pruned, ratios = [], [], []
    for run in range(args.repeats):
        dense.append(dense_forward_seconds(model_dir, windows, settings.micro_batch))
        with tempfile.TemporaryDirectory() as tmp:
            pruned.append(prune(model_dir, Path(tmp) / "out", settings)["wall_seconds"])
        ratios.append(pruned[-1] / dense[-1])
        print(f"run {run + 1}: dense forward {dense[-1]:.1f} s, prune {pruned[-1]:.1f} s, ratio {ratios[-1]:.2f}",
              flush=True)
    print(f"{args.model}, {args.nsamples}x{args.seqlen} calibration, CPU ({torch.get_num_threads()} threads): "
          f"median dense forward {statistics.median(dense):.1f} s, median prune {statistics.median(pruned):.1f} s, "
          f"median ratio {statistics.median(ratios):.2f} (goal <= 4)")


if __name__ == "__main__":
    main()
