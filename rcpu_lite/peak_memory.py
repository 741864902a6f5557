"""Peak memory, whole-run and by stage: resident memory (RSS) on the host, allocated memory on CUDA.

A stage's peak is the highest RSS between the mark that ended the stage before it and its own mark. Two
probes give it:

- Linux: the kernel's own high-water mark (VmHWM in /proc/self/status), reset at every mark by writing "5"
  to /proc/self/clear_refs. It is exact, it costs one small read per mark, and it needs no thread.
- Elsewhere (or where /proc refuses the reset): a daemon thread samples psutil's RSS every 5 ms. It can miss
  a spike shorter than that, which a multi-gigabyte allocation, touched page by page, is not.

Every mark also hands the heap's freed pages back to the operating system (glibc's malloc_trim), so that the
next stage starts from what is in use: tokenising the calibration text alone leaves about 130 MB of freed but
resident heap behind otherwise.

Resetting the high-water mark also resets what getrusage reports, so the whole-run peak is kept here
(`peak_rss_bytes`) as the highest mark seen as well.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import torch

_CLEAR_REFS = Path("/proc/self/clear_refs")
_STATUS = Path("/proc/self/status")
_highest_marked = 0  # the highest stage peak of this process: a reset high-water mark forgets it


def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library has none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def trim_heap() -> None:
    """Return the heap's free pages to the operating system, where the C library can (a no-op elsewhere)."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def current_rss_bytes() -> int:
    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far.

    On Linux this is the address space's own high-water mark, not getrusage's ru_maxrss: that one survives
    fork and exec, so a run started by a process that once held more (a benchmark that has just written a
    synthetic checkpoint) would report its parent's peak.
    """
    if sys.platform == "win32":
        return max(int(psutil.Process().memory_info().peak_wset), _highest_marked)
    with contextlib.suppress(OSError):
        return max(_HighWaterMark.read(), _highest_marked)
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(peak if sys.platform == "darwin" else peak * 1024), _highest_marked)  # bytes on macOS


def peak_gpu_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


class _HighWaterMark:
    """The kernel's peak RSS since the last reset (Linux 4.0 and later); OSError where the reset is refused."""

    def __init__(self):
        self._carried = self.read()  # the peak so far, which the first reset (the test that it works) forgets
        self.reset()

    @staticmethod
    def reset() -> None:
        _CLEAR_REFS.write_text("5")

    @staticmethod
    def read() -> int:
        match = re.search(r"VmHWM:\s+(\d+) kB", _STATUS.read_text())
        if match is None:
            raise OSError("no VmHWM line in /proc/self/status")
        return int(match.group(1)) * 1024

    def take(self) -> int:
        peak, self._carried = max(self.read(), self._carried), 0
        self.reset()
        return peak

    def close(self) -> None:
        pass


def _probe() -> "_HighWaterMark | _Sampler":
    try:
        return _HighWaterMark()
    except OSError:
        return _Sampler()


class _Sampler:
    """A thread sampling the RSS every `period` seconds; take() is the highest sample since the last take."""

    def __init__(self, period: float = 0.005):
        self._process, self._period = psutil.Process(), period
        self._peak = int(self._process.memory_info().rss)
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._run, name="rcpu-rss-sampler", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self._period):
            rss = int(self._process.memory_info().rss)
            with self._lock:
                self._peak = max(self._peak, rss)

    def take(self) -> int:
        now = int(self._process.memory_info().rss)
        with self._lock:
            peak, self._peak = max(self._peak, now), now
        return peak

    def close(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class StagePeaks:
    """Per stage name, the highest peak of every interval booked under it (a stage repeats: once per layer, or
    twice in one layer); `gpu` is None off CUDA."""

    rss: dict[str, int] = field(default_factory=dict)
    gpu: dict[str, int] | None = None

    def add(self, stage: str, rss: int, gpu: int | None) -> None:
        self.rss[stage] = max(self.rss.get(stage, 0), rss)
        if self.gpu is not None and gpu is not None:
            self.gpu[stage] = max(self.gpu.get(stage, 0), gpu)


class StageMemory:
    """Peak RSS (and peak CUDA memory) per stage of a run; `mark(stage)` ends a stage.

    `peaks` holds the run's; `mark` also books the interval into another StagePeaks when given one (a layer's
    record), and returns the interval's own peaks.
    """

    def __init__(self, device: torch.device):
        self.device = device
        self.peaks = StagePeaks(gpu={} if device.type == "cuda" else None)
        self._probe = _probe()
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.mark("start")  # what came before the run's first stage (the process's start: imports, opening)

    @property
    def probe(self) -> str:
        """How the peaks are measured: "high-water mark" or "sampler" (see the module's docstring)."""
        return "high-water mark" if isinstance(self._probe, _HighWaterMark) else "sampler"

    def mark(self, stage: str, also: StagePeaks | None = None) -> tuple[int, int | None]:
        """The peaks since the previous mark, booked under `stage` (in `also` too); the next interval starts now."""
        global _highest_marked
        trim_heap()  # before the reset: the next stage starts from the trimmed level
        rss = self._probe.take()
        _highest_marked = max(_highest_marked, rss)
        gpu = None
        if self.peaks.gpu is not None:
            gpu = int(torch.cuda.max_memory_allocated(self.device))
            torch.cuda.reset_peak_memory_stats(self.device)
        self.peaks.add(stage, rss, gpu)
        if also is not None:
            also.add(stage, rss, gpu)
        return rss, gpu

    def peak_rss_bytes(self) -> int:
        """The run's peak RSS: the highest of its stages'."""
        return max(self.peaks.rss.values())

    def peak_gpu_bytes(self) -> int | None:
        """The whole run's peak CUDA memory (the counter is reset at every mark)."""
        gpu = self.peaks.gpu
        return max([*gpu.values(), peak_gpu_bytes(self.device)]) if gpu is not None else None

    def close(self) -> None:
        self._probe.close()


__all__ = ["StageMemory", "StagePeaks", "current_rss_bytes", "peak_gpu_bytes", "peak_rss_bytes"]
