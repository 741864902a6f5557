"""Data parallelism over calibration windows (torchrun / accelerate launch), and nothing else.

Layers stay sequential; the calibration windows are split across the processes, each propagates
its own share of the hidden states, and every statistic (a sum over tokens) is all-reduced in fp32
before it is used. Scores, selection and compensation then run on every rank on the same numbers;
rank 0's kept units and compact weights are broadcast so that every rank carries exactly what is
written, and only rank 0 writes.

A `Group` is passed where communication is needed; `SINGLE` (one process) does nothing at all and
never imports torch.distributed, so a plain run is what it was before.

Determinism: the tensors are all-reduced one at a time in a fixed order, and gloo adds the same inputs
the same way every time (NCCL does too for a fixed topology and version, without promising it), so a
run does not depend on timing. The sum over ranks adds the ranks' partial sums, not the tokens in one
sequence, so results match a single process only within fp32 rounding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch

T = TypeVar("T")

__all__ = ["Group", "SINGLE", "launched", "local_device", "from_env"]


def launched() -> bool:
    """True under torchrun / accelerate launch with more than one process (WORLD_SIZE > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def local_device(device: torch.device) -> torch.device:
    """Under a launcher, a CUDA device without an index is this process's own GPU, cuda:LOCAL_RANK."""
    if launched() and device.type == "cuda" and device.index is None:
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks. world 1: every method is a no-op."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")  # where collectives run (NCCL needs CUDA tensors)
    owned: bool = False  # from_env started the process group: close() ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This rank's contiguous part of n windows: the first n % world ranks get one more."""
        base, extra = divmod(n, self.world)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def all_reduce(self, tensors: Sequence[torch.Tensor | None]) -> None:
        """Sum each tensor over the ranks, in place, one after the other in the order given."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            if t is None:
                continue
            moved = t.to(self.device)
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            if moved is not t:
                t.copy_(moved)

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Sum Python numbers over the ranks (fp64: errors and energies are accumulated in fp64)."""
        if self.world == 1:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64)
        self.all_reduce([t])
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (all ranks stop at the same layer boundary)."""
        return bool(self.sum_floats([float(flag)])[0]) if self.world > 1 else flag

    def broadcast(self, tensors: Sequence[torch.Tensor]) -> None:
        """Overwrite each tensor, in place, with rank 0's (same shapes and dtypes on every rank)."""
        if self.world == 1:
            return
        import torch.distributed as dist

        for t in tensors:
            moved = t.to(self.device)
            dist.broadcast(moved, src=0)
            if moved is not t:
                t.copy_(moved)

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor (the same shape on each) concatenated along dim 0 in rank order, which is the
        windows' order: the whole tensor as one process would hold it."""
        if self.world == 1:
            return t
        import torch.distributed as dist

        moved = t.to(self.device)
        parts = [torch.empty_like(moved) for _ in range(self.world)]
        dist.all_gather(parts, moved.contiguous())
        return torch.cat(parts).to(t.device)

    def from_main(self, make: Callable[[], T]) -> T:
        """make() on rank 0 only, its result (any picklable object) handed to every rank."""
        if self.world == 1:
            return make()
        import torch.distributed as dist

        box: list[Any] = [make() if self.is_main else None]
        dist.broadcast_object_list(box, src=0, device=self.device)
        return box[0]

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        if self.owned:
            import torch.distributed as dist

            dist.destroy_process_group()


SINGLE = Group()


def from_env(device: torch.device) -> Group:
    """The group the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), or SINGLE without one.

    NCCL when this rank computes on a GPU, gloo on CPUs. A process group started by the caller is used
    as it is (and left open)."""
    if not launched():
        return SINGLE
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # NCCL and broadcast_object_list use the current device
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group(backend="nccl" if cuda else "gloo", device_id=device if cuda else None)
    return Group(dist.get_rank(), dist.get_world_size(), device if cuda else torch.device("cpu"), owned)
