"""Peak memory of pruning a Llama-7B-shaped checkpoint, and where the time goes.

    python tools/bench_memory.py --shape llama-7b --layers 4 32 --dir /data/synthetic [--repeats 3]
    python tools/bench_memory.py --layers 32 --dir /data/synthetic --device cuda --nsamples 128 --seqlen 2048
    python tools/bench_memory.py --layers 2 --dir /data/synthetic --prune-args "--compensate lstsq+bias --allocation adaptive"
    python tools/bench_memory.py --layers 4 --dir /data/synthetic --device cuda --prune-args "--decomposition-device cuda"


Writes synthetic checkpoints with tools/make_synthetic.py (once; reused afterwards), prunes each
with `rcpu-lite prune` in a fresh process (so the peak RSS the operating system reports belongs
to that run alone), and prints the peak, the growth from the fewest to the most layers (the
streaming promise: <= 10 %), the time split by stage, summed over layers, and the peak RSS of each stage
(a layer stage: its highest over the layers). With --device cuda
it also prints the peak GPU memory (torch.cuda.max_memory_allocated, from the run report), the
GPU's name and the memory plan (micro-batch, where the calibration hidden states lived).
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_synthetic import make_synthetic  # noqa: E402

STAGES = ("read", "statistics", "scores", "compensation", "decomposition", "propagate", "write")


def prune_once(model: Path, out: Path, args) -> dict:
    cmd = [
        sys.executable,
        "-m",
        "rcpu_lite.cli",
        "prune",
        str(model),
        "--out",
        str(out),
        "--ratio",
        str(args.ratio),
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--compensate",
        args.compensate,
        "--device",
        args.device,
        "--matmul",
        args.matmul,
        "--overwrite",
        "--quiet",
    ]
    if args.max_gpu_memory:
        cmd += ["--max-gpu-memory", args.max_gpu_memory]
    cmd += shlex.split(args.prune_args)  # later flags win: any method can be measured
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)
    report = json.loads((out / "rcpu_report.json").read_text())
    shutil.rmtree(out)
    return report


def by_stage(runs: list[dict], key: str) -> str:
    """The median over runs of each stage's peak in report[key], in GiB."""
    medians = {s: statistics.median(r[key].get(s, 0) for r in runs) for s in runs[0][key]}
    return ", ".join(f"{s} {v / 2**30:.2f}" for s, v in medians.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--layers", type=int, nargs="+", default=[4, 32])
    ap.add_argument("--dir", type=Path, required=True, help="where the synthetic checkpoints live")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--compensate", default="rotation", help="rotation (default), rotation-scale or none")
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    ap.add_argument("--matmul", default="fp32", help="fp32 (default) or tf32 (CUDA forward passes)")
    ap.add_argument("--max-gpu-memory", default=None, help="GPU memory budget, e.g. 10GiB (default: 90%% of free)")
    ap.add_argument(
        "--prune-args",
        default="",
        help='more rcpu-lite prune flags, e.g. "--compensate lstsq '
        '--allocation adaptive" or "--decomposition-device cuda" (they override the ones above)',
    )
    args = ap.parse_args()

    peaks = {}
    for layers in args.layers:
        model = args.dir / f"{args.shape}-{layers}l"
        if not (model / "model.safetensors.index.json").is_file():
            make_synthetic(args.shape, layers, model)
        runs = [prune_once(model, args.dir / f"{args.shape}-{layers}l-pruned", args) for _ in range(args.repeats)]
        peaks[layers] = statistics.median(r["peak_rss_bytes"] for r in runs)
        walls = statistics.median(r["wall_seconds"] for r in runs)
        split = {
            s: statistics.median(sum(layer["seconds_by_stage"].get(s, 0) for layer in r["layers"]) for r in runs)
            for s in STAGES
        }
        print(
            f"{args.shape}, {layers} layers, {args.nsamples}x{args.seqlen} calibration, --compensate "
            f"{args.compensate} {args.prune_args}, {runs[0]['device_name']}, decomposition on "
            f"{runs[0].get('decomposition_device', 'cpu')}: "
            f"peak RSS {peaks[layers] / 2**30:.2f} GiB, wall {walls:.0f} s (median of {args.repeats})"
        )
        if runs[0]["peak_gpu_bytes"] is not None:
            gpu = statistics.median(r["peak_gpu_bytes"] for r in runs)
            print(f"  peak GPU memory {gpu / 2**30:.2f} GiB, --matmul {args.matmul}, plan {runs[0]['memory_plan']}")
        print("  time by stage (s, summed over layers): " + ", ".join(f"{s} {v:.1f}" for s, v in split.items()))
        print(f"  peak RSS by stage (GiB; {runs[0]['peak_memory_probe']}): {by_stage(runs, 'peak_rss_by_stage')}")
        if runs[0].get("peak_gpu_by_stage"):
            print(f"  peak GPU memory by stage (GiB): {by_stage(runs, 'peak_gpu_by_stage')}")
    lo, hi = min(args.layers), max(args.layers)
    if lo == hi:
        return
    growth = peaks[hi] / peaks[lo] - 1
    print(f"peak RSS growth from {lo} to {hi} layers: {100 * growth:+.1f} % (goal <= 10 %)")


if __name__ == "__main__":
    main()
