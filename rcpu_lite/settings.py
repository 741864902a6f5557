"""The settings of one prune run: defaults (the paper's), validation, and TOML presets."""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

import torch

from rcpu_lite.calibration import DEFAULT_CALIBRATION
from rcpu_lite.methods.auto import METHODS as AUTO_METHODS
from rcpu_lite.methods.compensation import DECOMPOSITIONS, method_names
from rcpu_lite.memory_plan import parse_size
from rcpu_lite.output.report import PROJECTIONS
from rcpu_lite.runtime import DECOMPOSITION_DEVICES
from rcpu_lite.methods.scoring import SCORES
from rcpu_lite.methods.allocation import ALLOCATIONS


class SettingsError(ValueError):
    pass


MATMUL_PRECISIONS = ("fp32", "tf32")
# Settings with a fixed set of values (validation and --help).
CHOICES = {
    "targets": ("local", "dense"),
    "reconstruct": ("none", "block", "cross"),
    "recon_train": ("all", "out"),
    "recon_norms": ("frozen", "train"),
    "gen_quant": ("none", "4bit"),
    "decomposition_device": DECOMPOSITION_DEVICES,
}


def compensate_choices() -> list[str]:
    return [*method_names(), *AUTO_METHODS]


@dataclass
class PruneSettings:
    ratio: float = 0.2
    score: str = "rcpu"
    compensate: str = "rotation"
    calib: str = DEFAULT_CALIBRATION
    nsamples: int = 128
    seqlen: int = 128
    seed: int = 0
    device: str = "auto"
    micro_batch: int = 16
    decomposition: str = "eigh"
    decomposition_device: str = "cpu"  # cpu | cuda | auto; cpu: consumer GPUs are slow at fp64 (not measured here)
    max_gpu_memory: str = ""  # "" = 90 % of the GPU memory free at the start
    matmul: str = "fp32"
    damp: float = 0.01  # lstsq: lambda = damp * mean(diag C_KK)
    damp_abs: float = 0.0  # lstsq: an absolute lambda on the summed Gram (0: use damp)
    compensate_on: str = "o_proj,down_proj"
    allocation: str = "uniform"
    target_params: float = 0.0  # 0: off; else the fraction of decoder-layer parameters to remove
    depth_spread: float = 0.5
    targets: str = "local"  # local: the dense layer on the pruned stream; dense: the dense model's own outputs
    holdout: str = ""  # "": a part of the calibration text no window used; "none": off; else a text
    holdout_nsamples: int = 16
    reconstruct: str = "none"  # none | block | cross
    recon_epochs: int = 5
    recon_lr: float = 2e-4
    recon_micro_batch: int = 8
    recon_train: str = "all"  # all | out (o_proj and down_proj only)
    recon_norms: str = "frozen"  # frozen | train
    self_nsamples: int = 0  # generated windows added to the real ones (not used by the scores)
    gen_quant: str = "none"  # none | 4bit (CUDA, bitsandbytes)

    @property
    def compensated_projections(self) -> tuple[str, ...]:
        return tuple(p.strip() for p in self.compensate_on.split(",") if p.strip())

    @property
    def budget(self) -> float:
        """The fraction removed: of the decoder-layer parameters with --target-params (or a non-uniform
        allocation), else of every layer's heads and channels."""
        return self.target_params or self.ratio

    def validate(self) -> "PruneSettings":
        if not 0 <= self.ratio < 1:
            raise SettingsError(f"--ratio must be in [0, 1), got {self.ratio}")
        if self.score not in SCORES:
            raise SettingsError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        if self.compensate not in compensate_choices():
            raise SettingsError(f"--compensate must be one of {', '.join(compensate_choices())}, got "
                                f"{self.compensate!r}")
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise SettingsError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)}, got "
                                    f"{getattr(self, name)!r}")
        if self.compensate in AUTO_METHODS and (self.holdout == "none" or self.holdout_nsamples < 1):
            raise SettingsError("--compensate auto chooses by held-out error: keep a held-out set (--holdout, "
                                "--holdout-nsamples at least 1)")
        for name in ("recon_epochs", "recon_micro_batch"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.recon_lr <= 0:
            raise SettingsError(f"--recon-lr must be positive, got {self.recon_lr}")
        if self.holdout_nsamples < 0 or self.self_nsamples < 0:
            raise SettingsError("--holdout-nsamples and --self-nsamples must be at least 0")
        if self.calib == "self" and self.self_nsamples:
            raise SettingsError("--calib self already generates every window; --self-nsamples adds generated windows "
                                "to real ones: use one or the other")
        if self.allocation not in ALLOCATIONS:
            raise SettingsError(f"--allocation must be one of {', '.join(ALLOCATIONS)}, got {self.allocation!r}")
        unknown = [p for p in self.compensated_projections if p not in PROJECTIONS]
        if unknown or not self.compensated_projections:
            raise SettingsError(f"--compensate-on takes a comma-separated list of {', '.join(PROJECTIONS)}, got "
                                f"{self.compensate_on!r}")
        if not 0 <= self.target_params < 1:
            raise SettingsError(f"--target-params must be in (0, 1), got {self.target_params}")
        if not 0 <= self.depth_spread <= 1:
            raise SettingsError(f"--depth-spread must be in [0, 1], got {self.depth_spread}")
        if self.damp < 0 or self.damp_abs < 0:
            raise SettingsError(f"--damp and --damp-abs must be at least 0, got {self.damp} and {self.damp_abs}")
        if self.decomposition not in DECOMPOSITIONS:
            raise SettingsError(f"--decomposition must be one of {', '.join(DECOMPOSITIONS)}, got "
                                f"{self.decomposition!r}")
        if self.decomposition_device == "cuda" and not torch.cuda.is_available():
            raise SettingsError("--decomposition-device cuda needs a CUDA GPU and this torch sees none; use cpu "
                                "(the default) or auto")
        if self.matmul not in MATMUL_PRECISIONS:
            raise SettingsError(f"--matmul must be one of {', '.join(MATMUL_PRECISIONS)}, got {self.matmul!r}")
        if self.max_gpu_memory:
            try:
                parse_size(self.max_gpu_memory)
            except ValueError as e:
                raise SettingsError(str(e)) from None
        for name in ("nsamples", "seqlen", "micro_batch"):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise SettingsError(f"--device must be auto, cpu or cuda[:N], got {self.device!r}")
        return self

    @classmethod
    def merged(cls, toml_file: str | Path | None = None, **overrides) -> "PruneSettings":
        """Defaults, then the TOML file, then every override that is not None."""
        values = read_toml(toml_file) if toml_file else {}
        values.update({k: v for k, v in overrides.items() if v is not None})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            raise SettingsError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
        for name, value in values.items():
            expected = {"float": (int, float), "int": int, "str": str}[fields[name].type]
            if isinstance(value, bool) or not isinstance(value, expected):
                raise SettingsError(f"setting {name} must be a {fields[name].type}, got {value!r}")
        return cls(**values).validate()


def read_toml(path: str | Path) -> dict:
    """A preset: keys at the top level or under [prune], named like the options (dashes allowed)."""
    path = Path(path)
    if not path.is_file():
        raise SettingsError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path} is not valid TOML: {e}") from None
    tables = sorted(k for k, v in data.items() if isinstance(v, dict))
    if tables and tables != ["prune"]:
        raise SettingsError(f"{path} has table(s) [{'], ['.join(tables)}]; put the settings at the top level or "
                            f"under [prune]")
    data = data.get("prune", data)
    return {k.replace("-", "_"): v for k, v in data.items()}
