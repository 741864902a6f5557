"""What makes a prune run resumable: its fingerprint and the manifest of finished shards.

The manifest lives in the working directory (OUT.partial) and is replaced atomically after every
shard, so after a crash at any moment it lists exactly the shards that are complete and fsynced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import torch

from rcpu_lite import __version__
from rcpu_lite.output.fsutil import write_json

MANIFEST_NAME = "rcpu_progress.json"
RUNTIME_SETTINGS = ("device", "micro_batch", "max_gpu_memory", "decomposition_device")


def fingerprint(model_dir: Path, settings, windows: torch.Tensor) -> dict:
    """Everything a resumed run must share with the run it continues."""
    inputs = {}
    for item in sorted(model_dir.iterdir()):
        if item.is_file():
            stat = item.stat()
            inputs[item.name] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return {
        "rcpu_lite_version": __version__,
        "model_dir": str(model_dir.resolve()),
        "input_files": inputs,
        # The devices and micro-batch change how the work runs, not what it computes, so a run that ran
        # out of memory can resume with a smaller micro-batch or on the CPU (byte-identical only if unchanged).
        "settings": {k: v for k, v in dataclasses.asdict(settings).items() if k not in RUNTIME_SETTINGS},
        "calibration_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
    }


def differences(old: dict, new: dict) -> list[str]:
    """Readable list of what differs between two fingerprints."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if key == "settings" and isinstance(a, dict) and isinstance(b, dict):
            out += [
                f"setting {k}: {a.get(k)!r} then, {b.get(k)!r} now"
                for k in sorted(set(a) | set(b))
                if a.get(k) != b.get(k)
            ]
        elif key == "input_files" and isinstance(a, dict) and isinstance(b, dict):
            changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            out.append(f"input files changed since: {', '.join(changed)}")
        elif key == "calibration_sha256":
            out.append("the calibration tokens differ (calibration text or tokenizer changed)")
        else:
            out.append(f"{key}: {a!r} then, {b!r} now")
    return out


class Manifest:
    """Finished shards and the per-layer reports of a run, persisted after every shard."""

    def __init__(
        self,
        work: Path,
        fp: dict,
        shards: dict[str, int] | None = None,
        layers: list[dict] | None = None,
        plan: dict | None = None,
    ):
        self.path = work / MANIFEST_NAME
        self.fingerprint = fp
        self.shards: dict[str, int] = shards or {}  # shard index (as str) -> bytes
        self.layers: list[dict] = layers or []  # LayerResult.to_json() of each finished layer
        self.plan = plan  # the width plan (WidthPlan.as_json()): an adaptive one costs a scoring pass

    @classmethod
    def load(cls, work: Path) -> "Manifest":
        data = json.loads((work / MANIFEST_NAME).read_text())
        return cls(work, data["fingerprint"], data["shards"], data["layers"], data.get("plan"))

    def done(self, shard: int) -> bool:
        return str(shard) in self.shards

    def record(self, shard: int, size: int, layer_report: dict | None = None) -> None:
        self.shards[str(shard)] = size
        if layer_report is not None:
            self.layers.append(layer_report)
        self.save()

    def save(self) -> None:
        write_json(
            self.path,
            {"fingerprint": self.fingerprint, "shards": self.shards, "layers": self.layers, "plan": self.plan},
        )
