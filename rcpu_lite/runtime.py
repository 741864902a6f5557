"""Small runtime helpers shared by pruning and evaluation: device choice, memory, batched layer runs."""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from rcpu_lite.distributed import SINGLE, Group
from rcpu_lite.families import arch
from rcpu_lite.peak_memory import StageMemory, StagePeaks


@dataclass(frozen=True)
class Placement:
    """Where a run computes and keeps its calibration hidden states, and how it batches."""

    device: torch.device  # where layers run
    hidden_device: torch.device  # where the hidden states live (the host when they do not fit the GPU)
    micro_batch: int
    matmul: str = "ieee"  # fp32 matmul precision of the forward passes on CUDA: "ieee" or "tf32"
    group: Group = SINGLE  # the processes sharing the calibration windows (distributed.py); one by default
    decomposition: torch.device = torch.device("cpu")  # where the fp64 decomposition of M runs, resolved once


def pick_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda was asked for but this torch has no CUDA device; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}") from None


# Compute capabilities whose fp64 runs at half the fp32 rate (CUDA C++ Programming Guide, throughput of
# arithmetic instructions): P100 (6.0), V100 (7.0), A100 (8.0), H100/H200 (9.0), B200 (10.0). Every other
# part (GeForce, RTX workstation, L4/L40, Jetson) runs fp64 at 1/32 to 1/64 of fp32.
FAST_FP64 = frozenset({(6, 0), (7, 0), (8, 0), (9, 0), (10, 0)})
DECOMPOSITION_DEVICES = ("cpu", "cuda", "auto")


def decomposition_device(requested: str, run_device: torch.device) -> torch.device:
    """Where the fp64 decomposition of M runs (--decomposition-device): cpu; cuda (the run's GPU, or the
    current one when the run is on the CPU); auto: the run's GPU when its fp64 is fast (FAST_FP64), else
    the CPU. Nothing here is measured: auto only avoids GPUs whose fp64 is known to be slow."""
    if requested not in DECOMPOSITION_DEVICES:
        raise ValueError(f"--decomposition-device must be one of {', '.join(DECOMPOSITION_DEVICES)}, got {requested!r}")
    fast = run_device.type == "cuda" and tuple(torch.cuda.get_device_capability(run_device)) in FAST_FP64
    if requested == "cpu" or (requested == "auto" and not fast):
        return torch.device("cpu")
    return run_device if run_device.type == "cuda" else torch.device("cuda")


def to_compute(
    tensors: dict[str, torch.Tensor], device: torch.device, consume: bool = False
) -> dict[str, torch.Tensor]:
    """fp32 copies on the compute device; the copy goes first so that pinned memory is copied asynchronously.

    With `consume`, `tensors` is emptied one tensor at a time as the copies are made, so the stored
    and the fp32 copy of a layer are never both whole in memory.
    """
    if not consume:
        return {k: v.to(device, non_blocking=True).float() for k, v in tensors.items()}
    copies = {}
    while tensors:
        name, t = tensors.popitem()
        copies[name] = t.to(device, non_blocking=True).float()
        del t
    return copies


@contextlib.contextmanager
def cuda_matmul_precision(precision: str):
    """fp32 matmuls on CUDA as "tf32" (tensor cores, 10-bit mantissa products) or "ieee" within the block.

    The layer forward passes may use TF32 (--matmul tf32); statistics and compensation always use
    "ieee", so the Gram matrices and the rotation stay full fp32 whatever the forward passes use.
    """
    previous = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = precision
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = previous


@torch.inference_mode()
def run_layer_batched(
    layer: torch.nn.Module,
    hidden: torch.Tensor,
    inputs: arch.LayerInputs,
    config,
    index: int,
    micro_batch: int,
    update: bool = True,
    device: torch.device | None = None,
    matmul: str = "ieee",
) -> None:
    """Run `layer` (on `device`, default hidden's) over `hidden` (windows x seqlen x hidden) in
    micro-batches, in place if `update`. Hidden states kept on the host are copied over a
    micro-batch at a time."""
    device = device or hidden.device
    with cuda_matmul_precision(matmul):
        for start in range(0, hidden.shape[0], micro_batch):
            chunk = hidden[start : start + micro_batch]
            out = arch.run_layer(layer, chunk.to(device, non_blocking=True), inputs, config, index)
            if update:
                chunk.copy_(out)


class Stopwatch:
    """Seconds per stage of one layer (waiting for the GPU first, so the time lands where it is spent).

    `on_lap(stage)`, when given, hears of every lap as it ends: how a progress display follows the stages.
    With `memory`, every lap also marks the end of a stage there, and `peaks` keeps this layer's peak per stage.
    """

    def __init__(
        self,
        device: torch.device,
        on_lap: Callable[[str], None] | None = None,
        memory: StageMemory | None = None,
    ):
        self.device = device
        self.seconds: dict[str, float] = {}
        self.on_lap = on_lap
        self.memory = memory
        self.peaks = StagePeaks(gpu={} if memory is not None and memory.peaks.gpu is not None else None)
        self._last = time.perf_counter()

    def lap(self, stage: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.seconds[stage] = round(self.seconds.get(stage, 0.0) + now - self._last, 4)
        self._last = now
        if self.memory is not None:
            self.memory.mark(stage, also=self.peaks)
        if self.on_lap is not None:
            self.on_lap(stage)

    def move(self, source: str, target: str, seconds: float) -> None:
        """Book `seconds` of what was lapped as `source` under `target` (a part timed inside it)."""
        seconds = min(seconds, self.seconds.get(source, 0.0))
        self.seconds[source] = round(self.seconds.get(source, 0.0) - seconds, 4)
        self.seconds[target] = round(self.seconds.get(target, 0.0) + seconds, 4)


def fault_hook(point: str, index: int) -> None:
    """Test-only fault injection: RCPU_LITE_FAULT="before_shard:3:kill" SIGKILLs this process just
    before shard 3 is written; "enospc" raises a full-disk error instead, "sigint"/"sigterm" send
    that signal to this process (the run then stops after this shard). "after_layer:2:kill" fires
    once 2 layers are finished (the pipeline's loop, on every rank); a fourth field, as in
    "after_layer:2:kill:1", limits it to that rank (RANK, set by torchrun)."""
    spec = os.environ.get("RCPU_LITE_FAULT")
    if not spec:
        return
    where, at, what, *rank = spec.split(":")
    if where != point or int(at) != index or (rank and int(rank[0]) != int(os.environ.get("RANK", "0"))):
        return
    if what == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    if what in ("sigint", "sigterm"):
        os.kill(os.getpid(), signal.SIGINT if what == "sigint" else signal.SIGTERM)
    if what == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
