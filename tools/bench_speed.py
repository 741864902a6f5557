"""Prune time against one plain dense forward pass over the same calibration tokens, in one run;
or, for a big checkpoint, against the I/O floor.

    python tools/bench_speed.py [--model smollm2-135m] [--calib FILE] [--nsamples 128] [--seqlen 128] [--repeats 3]
    python tools/bench_speed.py --io-floor --model /data/llama-7b-4l [--nsamples 8] [--device cpu]
        [--decomposition-device cpu|cuda|auto]
    python tools/bench_speed.py --nproc 2 [--model smollm2-135m] [--nsamples 512] [--seqlen 128] [--repeats 1]

The dense pass is transformers' whole model (fp32, CPU, no KV cache) over the calibration
windows in micro-batches; the prune is rcpu_lite.pipeline.prune with the same windows. Prints
each run and the medians; the goal is a ratio <= 4.

--io-floor (for checkpoints too big for a whole-model forward, such as the synthetic Llama-7B
from tools/make_synthetic.py) compares the prune with the time to only read every input tensor
and write the pruned output's bytes (fsynced shards, as the pruner writes them). Both run with
the input in the page cache, as the prune reads it right after the floor's read.

--nproc N (data parallelism, docs/scaling.md "Several processes") prunes with one process and with N
(`python -m torch.distributed.run --nproc-per-node N -m rcpu_lite prune`, gloo on the CPU), one after
the other in each repeat, and prints both prune times and their ratio. The time compared is the
report's wall_seconds (rank 0, from the start of prune() to the published output), which leaves out
the interpreter start and the process-group set-up; the launcher's own wall time is printed beside it.
The CPU's cores are shared: one process gets all of them as torch threads, each of N processes
cores / N, so only the work that is split (the passes over the calibration windows) can go faster.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from rcpu_lite import calibration  # noqa: E402
from rcpu_lite.checkpoint import CheckpointReader  # noqa: E402
from rcpu_lite.models import load_tokenizer, resolve_model  # noqa: E402
from rcpu_lite.output.writer import ShardWriter  # noqa: E402
from rcpu_lite.prune.run import prune  # noqa: E402
from rcpu_lite.settings import PruneSettings  # noqa: E402


@torch.inference_mode()
def dense_forward_seconds(model_dir: Path, windows: torch.Tensor, micro_batch: int) -> float:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    started = time.perf_counter()
    for start in range(0, windows.shape[0], micro_batch):
        model(input_ids=windows[start : start + micro_batch], use_cache=False)
    return time.perf_counter() - started


def io_floor_seconds(model_dir: Path, pruned_dir: Path) -> tuple[float, float]:
    """Seconds to read every tensor of the input, and to write the pruned output's tensors again."""
    started = time.perf_counter()
    reader = CheckpointReader(model_dir)
    for name in reader.weight_map:
        reader.get(name).clone()  # materialise: the reader hands out views of the file mapping
    read = time.perf_counter() - started
    shards = sorted(pruned_dir.glob("*.safetensors"))
    out = CheckpointReader(pruned_dir)
    per_shard = {}
    for name, fname in out.weight_map.items():
        per_shard.setdefault(fname, []).append(name)
    tensors = [{n: out.get(n).clone() for n in per_shard[s.name]} for s in shards]
    with tempfile.TemporaryDirectory(dir=pruned_dir.parent) as tmp:
        writer = ShardWriter(Path(tmp), len(tensors))
        started = time.perf_counter()
        for index, shard in enumerate(tensors):
            writer.write(index, shard)
        writer.finish()
        write = time.perf_counter() - started
    return read, write


def io_floor_main(args) -> None:
    model_dir = resolve_model(args.model)
    settings = PruneSettings(
        ratio=args.ratio,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        device=args.device,
        decomposition_device=args.decomposition_device,
    ).validate()
    walls, floors = [], []
    with tempfile.TemporaryDirectory(dir=model_dir.parent) as tmp:
        for run in range(args.repeats):
            report = prune(model_dir, Path(tmp) / "out", settings, overwrite=True)
            read, write = io_floor_seconds(model_dir, Path(tmp) / "out")  # the output to rewrite exists now
            walls.append(report["wall_seconds"])
            floors.append(read + write)
            print(
                f"run {run + 1}: prune {walls[-1]:.1f} s, I/O floor {floors[-1]:.1f} s (read {read:.1f} s, write "
                f"{write:.1f} s), ratio {walls[-1] / floors[-1]:.1f}",
                flush=True,
            )
    layers = len(report["layers"])
    print(
        f"{model_dir.name}, {layers} layers, {args.nsamples}x{args.seqlen} calibration, {report['device']}: "
        f"median prune {statistics.median(walls):.1f} s ({statistics.median(walls) / layers:.1f} s/layer), median "
        f"I/O floor {statistics.median(floors):.1f} s, ratio {statistics.median(walls) / statistics.median(floors):.1f}"
    )


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prune_command(model_dir: Path, out: Path, args, nproc: int) -> tuple[list[str], dict[str, str]]:
    """The prune command line for 1 or nproc processes, and its environment: torch threads per process =
    cores // nproc, so that the processes together use the machine's cores once."""
    prune_args = [
        "prune",
        str(model_dir),
        "--out",
        str(out),
        "--ratio",
        str(args.ratio),
        "--calib",
        args.calib,
        "--nsamples",
        str(args.nsamples),
        "--seqlen",
        str(args.seqlen),
        "--device",
        "cpu",
        "--quiet",
    ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS=str(max(1, cores() // nproc)), PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    if nproc == 1:
        return [sys.executable, "-m", "rcpu_lite", *prune_args], env
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(_free_port()),
        "-m",
        "rcpu_lite",
        *prune_args,
    ], env


def timed_prune(model_dir: Path, args, nproc: int) -> tuple[float, float]:
    """(the report's wall_seconds, the launcher's wall time) of one prune with nproc processes."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        cmd, env = prune_command(model_dir, out, args, nproc)
        started = time.perf_counter()
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        launcher = time.perf_counter() - started
        if proc.returncode != 0:
            sys.exit(f"prune with {nproc} process(es) failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
        report = json.loads((out / "rcpu_report.json").read_text())
        assert report["processes"] == nproc
        return report["wall_seconds"], launcher


def nproc_main(args) -> None:
    model_dir = resolve_model(args.model)
    n, k = cores(), args.nproc
    one, many = [], []
    for run in range(args.repeats):
        one.append(timed_prune(model_dir, args, 1))
        many.append(timed_prune(model_dir, args, k))
        print(
            f"run {run + 1}: 1 process {one[-1][0]:.1f} s, {k} processes {many[-1][0]:.1f} s, speed-up "
            f"{one[-1][0] / many[-1][0]:.2f}x (launcher wall {one[-1][1]:.1f} s / {many[-1][1]:.1f} s)",
            flush=True,
        )
    t1, tk = statistics.median(t for t, _ in one), statistics.median(t for t, _ in many)
    print(
        f"{args.model}, {args.nsamples}x{args.seqlen} calibration, CPU, {n} cores (gloo): median prune with 1 process "
        f"({max(1, n)} threads) {t1:.1f} s, with {k} processes ({max(1, n // k)} thread(s) each) {tk:.1f} s, "
        f"speed-up {t1 / tk:.2f}x (time ratio {k} processes / 1 process {tk / t1:.2f})"
    )
    print(
        f"note: on a {n}-core machine the {k} processes share the same {n} cores (torch threads per rank = "
        f"{n} cores / {k} processes = {max(1, n // k)}), so at most the parallel fraction of the work (the passes "
        f"over the calibration windows) can speed up; reading and writing the layers, scores, compensation and "
        f"the held-out windows run in full on every rank, and every statistic is all-reduced."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--calib", default="c4")
    ap.add_argument("--ratio", type=float, default=0.2)
    ap.add_argument("--nsamples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--io-floor", action="store_true", help="compare with the I/O floor instead of a dense forward")
    ap.add_argument("--device", default="cpu", help="for --io-floor: cpu or cuda")
    ap.add_argument(
        "--decomposition-device",
        default="cpu",
        help="where the prune's fp64 decomposition runs: cpu "
        "(default), cuda or auto (rcpu-lite prune --decomposition-device)",
    )
    ap.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="compare the prune with 1 process and with NPROC processes (torchrun, gloo) instead",
    )
    args = ap.parse_args()
    if args.io_floor:
        return io_floor_main(args)
    if args.nproc > 1:
        return nproc_main(args)
    model_dir = resolve_model(args.model)
    settings = PruneSettings(
        ratio=args.ratio,
        calib=args.calib,
        nsamples=args.nsamples,
        seqlen=args.seqlen,
        device="cpu",
        decomposition_device=args.decomposition_device,
    ).validate()
    tokens = calibration.tokenize(load_tokenizer(model_dir), calibration.read_text(args.calib))
    windows = calibration.random_windows(tokens, args.nsamples, args.seqlen, settings.seed)
    dense, pruned, ratios = [], [], []
    for run in range(args.repeats):
        dense.append(dense_forward_seconds(model_dir, windows, settings.micro_batch))
        with tempfile.TemporaryDirectory() as tmp:
            pruned.append(prune(model_dir, Path(tmp) / "out", settings)["wall_seconds"])
        ratios.append(pruned[-1] / dense[-1])
        print(
            f"run {run + 1}: dense forward {dense[-1]:.1f} s, prune {pruned[-1]:.1f} s, ratio {ratios[-1]:.2f}",
            flush=True,
        )
    print(
        f"{args.model}, {args.nsamples}x{args.seqlen} calibration, CPU ({torch.get_num_threads()} threads): "
        f"median dense forward {statistics.median(dense):.1f} s, median prune {statistics.median(pruned):.1f} s, "
        f"median ratio {statistics.median(ratios):.2f} (goal <= 4)"
    )


if __name__ == "__main__":
    main()
