"""Shared fixtures: a calibration text file and a cache of tiny random checkpoints (see tests/tiny.py)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

# Tests never reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import tiny  # noqa: E402


@pytest.fixture(scope="session")
def calib_file(tmp_path_factory) -> Path:
    """The calibration text the tiny tokenizers are trained on (a UTF-8 file)."""
    return tiny.write_calibration(tmp_path_factory.mktemp("calib") / "calib.txt")


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, calib_file):
    """Factory: tiny_checkpoint("llama_gqa", num_hidden_layers=3) -> path of a tiny checkpoint on disk.

    The first argument names an entry of tiny.SPECS (or is a tiny.TinySpec); keyword arguments
    override its fields. Checkpoints are built once per session and must be treated as read-only.
    """
    root = tmp_path_factory.mktemp("tiny_models")
    text = calib_file.read_text(encoding="utf-8")
    cache: dict[tiny.TinySpec, Path] = {}

    def make(spec: str | tiny.TinySpec = "llama_mha", **overrides) -> Path:
        spec = tiny.SPECS[spec] if isinstance(spec, str) else spec
        spec = spec.replace(**overrides)
        if spec not in cache:
            cache[spec] = tiny.build_checkpoint(root / spec.name, spec, calib_text=text)
        return cache[spec]

    return make


@pytest.fixture(autouse=True, scope="module")
def one_thread(request):
    """Tiny models gain nothing from threads, and OpenMP spinning costs 10x on a busy CPU.

    Modules marked slow (the real model) keep torch's threads.
    """
    if request.node.get_closest_marker("slow"):
        yield
        return
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
