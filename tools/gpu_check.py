"""The GPU path, proved in one call on a lent GPU: the CUDA-only tests, then prunes of a Llama-7B-shaped
synthetic checkpoint on the GPU checked against the same prune on the CPU.

    bash tools/gpu_check.sh                      # on the GPU machine: everything under $OUT (or ./gpu-check)
    python tools/gpu_check.py --dry-run          # anywhere: print the plan, run the smallest prune on the CPU

The runs (4 layers of the Llama-7B shape, made on that machine's disk by tools/make_synthetic.py):
- cpu: the reference, 128 x 128 windows on the CPU;
- cuda-11GiB: 128 x 128 under --max-gpu-memory 11GiB (a 12 GB card);
- cuda-11GiB-2048: 128 x 2048 windows under the same budget;
- cuda-decomposition: the fp64 decomposition on the GPU (--decomposition-device cuda);
- cuda-tf32: --matmul tf32.
Each prints one line: seconds per layer, peak GPU memory, peak RSS and the time by stage. Every 128 x 128 CUDA
output must keep the CPU output's heads and channels, with every weight within TOLERANCE of the CPU's (relative to
the tensor's largest value; tf32 gets TF32_TOLERANCE). The exit status is 1 when a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
from make_synthetic import make_synthetic  # noqa: E402

TOLERANCE = 2e-3  # fp32 on both sides; the output is stored in fp16 (about 1e-3 relative)
TF32_TOLERANCE = 2e-2
STAGES = ("read", "statistics", "scores", "compensation", "decomposition", "propagate", "write")


@dataclass
class Run:
    name: str
    device: str
    seqlen: int
    flags: list[str] = field(default_factory=list)
    tolerance: float | None = TOLERANCE  # None: not compared with the CPU output (other windows)


RUNS = [
    Run("cpu", "cpu", 128),
    Run("cuda-11GiB", "cuda", 128, ["--max-gpu-memory", "11GiB"]),
    Run("cuda-11GiB-2048", "cuda", 2048, ["--max-gpu-memory", "11GiB"], tolerance=None),
    Run("cuda-decomposition", "cuda", 128, ["--decomposition-device", "cuda"]),
    Run("cuda-tf32", "cuda", 128, ["--matmul", "tf32"], tolerance=TF32_TOLERANCE),
]


def command(run: Run, model: Path, out: Path, nsamples: int, seqlen: int | None = None) -> list[str]:
    return [
        sys.executable,
        "-m",
        "rcpu_lite",
        "prune",
        str(model),
        "--out",
        str(out),
        "--device",
        run.device,
        "--nsamples",
        str(nsamples),
        "--seqlen",
        str(seqlen or run.seqlen),
        "--overwrite",
        "--quiet",
        *run.flags,
    ]


def summary_line(name: str, report: dict) -> str:
    """One line: seconds per layer, peak GPU memory, peak RSS, and the seconds by stage summed over the layers."""
    layers = report["layers"]
    split = {s: sum(layer["seconds_by_stage"].get(s, 0.0) for layer in layers) for s in STAGES}
    gpu = report.get("peak_gpu_bytes")
    return (
        f"{name:20s} {sum(layer['seconds'] for layer in layers) / len(layers):7.2f} s/layer  "
        f"GPU peak {'-' if gpu is None else f'{gpu / 2**30:.2f} GiB':>9s}  "
        f"RSS peak {report['peak_rss_bytes'] / 2**30:.2f} GiB  " + "  ".join(f"{s} {v:.1f}" for s, v in split.items())
    )


def compare(reference: Path, candidate: Path, tolerance: float) -> list[str]:
    """What differs between two outputs: kept units, then weights beyond `tolerance` of each tensor's max."""
    a, b = (json.loads((p / "rcpu_report.json").read_text())["layers"] for p in (reference, candidate))
    problems = [
        f"layer {x['layer']}: kept {key} differ"
        for x, y in zip(a, b)
        for key in ("kept_heads", "kept_kv_heads", "kept_channels")
        if x[key] != y[key]
    ]
    if problems:
        return problems
    ta, tb = _tensors(reference), _tensors(candidate)
    for name in sorted(ta):
        scale = float(ta[name].abs().max()) or 1.0
        diff = float((ta[name] - tb[name]).abs().max()) / scale
        if diff > tolerance:
            problems.append(f"{name}: max difference {diff:.2e} of its largest value (tolerance {tolerance:g})")
    return problems


def _tensors(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({k: f.get_tensor(k).float() for k in f.keys()})
    return tensors


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ.get("OUT", "gpu-check")),
        help="where the checkpoints, the outputs and the log go (default: $OUT, else ./gpu-check)",
    )
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument(
        "--dry-run",
        action="store_true",
        help="print every command, then run only the CPU reference, shrunk to --layers 1, --nsamples 2, "
        "--seqlen 16 (for CI, where there is no GPU)",
    )
    ap.add_argument("--skip-tests", action="store_true", help="do not run the CUDA-only tests first")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    outputs = {run.name: args.out / f"pruned-{run.name}" for run in RUNS}
    planned = args.out / f"{args.shape}-{args.layers}l"
    for run in RUNS:
        print("$", " ".join(command(run, planned, outputs[run.name], args.nsamples)[1:]), flush=True)
    layers = 1 if args.dry_run else args.layers
    model = args.out / f"{args.shape}-{layers}l"
    if args.dry_run:
        runs, nsamples, seqlen = [RUNS[0]], 2, 16
        print("dry run: only", " ".join(command(RUNS[0], model, outputs["cpu"], nsamples, seqlen)[1:]), flush=True)
    else:
        if not torch.cuda.is_available():
            print("no CUDA device: run with --dry-run on a machine without a GPU", file=sys.stderr)
            return 2
        print(f"GPU: {torch.cuda.get_device_name()}", flush=True)
        if not args.skip_tests:  # the tests that skip without CUDA
            subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "pytest",
                    "-q",
                    "-rs",
                    "tests/methods/test_compensation.py",
                    "-k",
                    "cuda or device",
                ],
                cwd=ROOT,
                check=False,
            )
        runs, nsamples, seqlen = RUNS, args.nsamples, None
    if not (model / "model.safetensors.index.json").is_file():
        make_synthetic(args.shape, layers, model)
    failed = False
    for run in runs:
        started = time.perf_counter()
        subprocess.run(command(run, model, outputs[run.name], nsamples, seqlen), check=True, cwd=ROOT)
        report = json.loads((outputs[run.name] / "rcpu_report.json").read_text())
        print(summary_line(run.name, report) + f"  (wall {time.perf_counter() - started:.0f} s)", flush=True)
        if run.device == "cuda" and run.tolerance is not None:
            problems = compare(outputs["cpu"], outputs[run.name], run.tolerance)
            failed |= bool(problems)
            print(
                f"{run.name}: {'FAIL ' + '; '.join(problems[:3]) if problems else 'same units, weights within'}"
                f"{'' if problems else f' {run.tolerance:g}'} of the CPU output",
                flush=True,
            )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
