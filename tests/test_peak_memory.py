"""peak_memory.py: the peak RSS of each stage, by the kernel's high-water mark or by the sampling thread."""

from __future__ import annotations

import time

import pytest
import torch

from rcpu_lite import peak_memory
from rcpu_lite.peak_memory import StageMemory, current_rss_bytes, peak_rss_bytes

MB = 2**20


def refused() -> None:
    raise PermissionError("not here")


@pytest.mark.parametrize("probe", ["high-water mark", "sampler"])
def test_a_stage_holds_the_peak_of_what_it_allocated_and_freed(monkeypatch, probe):
    if probe == "sampler":
        monkeypatch.setattr(peak_memory._HighWaterMark, "reset", staticmethod(refused))
    stages = StageMemory(torch.device("cpu"))
    if stages.probe != probe:
        stages.close()
        pytest.skip("this kernel does not let a process reset its high-water mark (not Linux)")
    try:
        stages.mark("before")
        base = current_rss_bytes()
        big = torch.ones(64 * MB // 4 * 4)  # 256 MB, touched
        time.sleep(0.05)  # longer than the sampler's period
        del big
        big_rss, _ = stages.mark("big")
        small_rss, _ = stages.mark("small")
        stages.mark("big")  # a stage seen again keeps its highest peak
    finally:
        stages.close()
    assert big_rss >= base + 250 * MB
    assert small_rss < base + 64 * MB
    assert stages.peaks.rss["big"] == big_rss and stages.peaks.gpu is None
    assert peak_rss_bytes() >= big_rss  # the whole-run peak survives the resets


def test_the_first_mark_keeps_the_peak_from_before_the_run():
    held = torch.ones(64 * MB)  # 256 MB, touched, then freed: the process's peak is above what it holds now
    level = current_rss_bytes()
    del held
    stages = StageMemory(torch.device("cpu"))
    stages.close()
    assert stages.peaks.rss["start"] >= level - 8 * MB  # the kernel counts resident pages per thread, a few behind
