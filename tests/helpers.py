"""Helpers shared by the prune tests: settings for tiny runs, reading an output back, logits."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from rcpu_lite.prune.run import REPORT_NAME
from rcpu_lite.settings import PruneSettings

INDEX_NAME = "model.safetensors.index.json"


def make_settings(calib: Path, **overrides) -> PruneSettings:
    values = dict(
        ratio=0.25,
        score="rcpu",
        compensate="rotation",
        calib=str(calib),
        nsamples=8,
        seqlen=32,
        seed=0,
        device="cpu",
        micro_batch=3,
        multiple_of=1,  # the exact widths of --ratio on tiny layers (the default rounds to 32)
    )  # 3 does not divide 8: the last micro-batch is short
    values.update(overrides)
    return PruneSettings(**values)


def load_model(path: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="sdpa").eval()


def read_shards(out: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                assert name not in tensors, f"{name} is written to more than one shard"
                tensors[name] = f.get_tensor(name)
    return tensors


def some_token_ids(vocab: int, batch: int = 2, seqlen: int = 24, seed: int = 7) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    return model(input_ids=ids, use_cache=False).logits


# ---------------------------------------------------------------------------------------------
# 1. ratio 0 is the identity


VOLATILE = {
    "wall_seconds",
    "peak_rss_bytes",
    "peak_weight_bytes",
    "resumed_at_layer",
    "seconds",
    "rss_bytes",
    "reconstruct_seconds",
    "seconds_by_stage",
    "peak_rss_by_stage",
    "peak_gpu_by_stage",
    "peak_memory_probe",
}


def digests(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(directory.iterdir()) if p.is_file()}


def stable_report(directory: Path) -> dict:
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in VOLATILE}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads((directory / REPORT_NAME).read_text()))


def assert_same_output(a: Path, b: Path) -> None:
    da, db = digests(a), digests(b)
    da.pop(REPORT_NAME), db.pop(REPORT_NAME)
    assert da == db
    assert stable_report(a) == stable_report(b)


def cli_args(src: Path, out: Path, calib: Path) -> list[str]:
    s = make_settings(calib)
    return [
        "prune",
        str(src),
        "--out",
        str(out),
        "--ratio",
        str(s.ratio),
        "--calib",
        str(calib),
        "--nsamples",
        str(s.nsamples),
        "--seqlen",
        str(s.seqlen),
        "--micro-batch",
        str(s.micro_batch),
        "--device",
        "cpu",
        "--seed",
        str(s.seed),
        "--multiple-of",
        str(s.multiple_of),
        "--compensate",
        s.compensate,
    ]
