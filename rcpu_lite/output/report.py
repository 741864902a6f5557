"""What one pruned layer produced, as one typed record that the writer, the manifest, the log and the
report all read. Its JSON form is flat (the report's per-layer entries) and round-trips exactly."""

from __future__ import annotations

from dataclasses import dataclass, field

from rcpu_lite.families import arch
from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.output.checks import human_bytes

REPORT_NAME = "rcpu_report.json"  # the run report in every output directory
PROJECTIONS = tuple(arch.PROJECTIONS)  # the repaired projections, by short name
BLOCK_FIELDS = (
    "block_error_pruned",
    "block_error",
    "held_out_block_error_pruned",
    "held_out_block_error",
    "reconstruct_seconds",
)


@dataclass
class ProjectionResult:
    """The repair of one projection: relative output errors on the calibration tokens, the method used."""

    error_pruned: float
    error_compensated: float
    method: str
    damp: float | None = None  # the ridge lambda actually used (least squares only)
    bias: bool = False  # whether a compensating bias was written
    held_out_error_pruned: float | None = None  # the same errors on the held-out windows
    held_out_error_compensated: float | None = None

    FIELDS = (
        "error_pruned",
        "error_compensated",
        "method",
        "damp",
        "bias",
        "held_out_error_pruned",
        "held_out_error_compensated",
    )


@dataclass
class LayerResult:
    layer: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    projections: dict[str, ProjectionResult]
    # ||dense target - block output|| / ||dense target|| on the calibration and held-out windows, before
    # compensation (the compact layer with W_K) and as written (after compensation and reconstruction)
    block_error_pruned: float | None = None
    block_error: float | None = None
    held_out_block_error_pruned: float | None = None
    held_out_block_error: float | None = None
    reconstruct_seconds: float | None = None
    seconds: float = 0.0
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    rss_bytes: int = 0
    # the peak RSS (and CUDA memory) of each stage of this layer, the write included (peak_memory.py)
    peak_rss_by_stage: dict[str, int] = field(default_factory=dict)
    peak_gpu_by_stage: dict[str, int] | None = None

    @property
    def widths(self) -> LayerWidths:
        return LayerWidths(len(self.kept_heads), len(self.kept_kv_heads), len(self.kept_channels))

    def to_json(self) -> dict:
        out = {
            "layer": self.layer,
            "kept_heads": self.kept_heads,
            "kept_kv_heads": self.kept_kv_heads,
            "kept_channels": self.kept_channels,
        }
        for name, p in self.projections.items():
            out.update({f"{name}_{f}": getattr(p, f) for f in ProjectionResult.FIELDS})
        out.update({f: getattr(self, f) for f in BLOCK_FIELDS})
        out.update(seconds=self.seconds, seconds_by_stage=self.seconds_by_stage, rss_bytes=self.rss_bytes)
        out.update(peak_rss_by_stage=self.peak_rss_by_stage, peak_gpu_by_stage=self.peak_gpu_by_stage)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LayerResult":
        projections = {
            name: ProjectionResult(**{f: data[f"{name}_{f}"] for f in ProjectionResult.FIELDS if f"{name}_{f}" in data})
            for name in PROJECTIONS
            if f"{name}_error_pruned" in data
        }
        return cls(
            data["layer"],
            data["kept_heads"],
            data["kept_kv_heads"],
            data["kept_channels"],
            projections,
            **{f: data.get(f) for f in BLOCK_FIELDS},
            seconds=data.get("seconds", 0.0),
            seconds_by_stage=data.get("seconds_by_stage", {}),
            rss_bytes=data.get("rss_bytes", 0),
            peak_rss_by_stage=data.get("peak_rss_by_stage", {}),
            peak_gpu_by_stage=data.get("peak_gpu_by_stage"),
        )


def layer_line(record: LayerResult, n_layers: int, shape) -> str:
    """One progress line for a finished layer."""
    o, d = record.projections["o_proj"], record.projections["down_proj"]
    return (
        f"layer {record.layer + 1}/{n_layers}  heads {shape.num_attention_heads}->{len(record.kept_heads)}  "
        f"channels {shape.intermediate_size}->{len(record.kept_channels)}  "
        f"o_proj err {o.error_pruned:.4f}->{o.error_compensated:.4f}  "
        f"down_proj err {d.error_pruned:.4f}->{d.error_compensated:.4f}  {record.seconds:.1f}s"
    )


def shape_after(plan) -> dict:
    """Uniform widths as the config names them; per-layer lists when they differ."""
    keys = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads", "intermediate_size": "channels"}
    values = {k: [getattr(w, f) for w in plan.layers] for k, f in keys.items()}
    return {k: v[0] if plan.uniform else v for k, v in values.items()}


def summary(report: dict, out) -> list[str]:
    """The end of a run: parameters before and after, time, peak memory and where everything went."""
    gpu = report["peak_gpu_bytes"]
    return [
        f"wrote {out}: {report['params_before']} -> {report['params_after']} parameters "
        f"({100 * report['param_reduction']:.1f}% fewer) in {report['wall_seconds']:.0f}s",
        f"peak memory {human_bytes(report['peak_rss_bytes'])} resident"
        + (f", {human_bytes(gpu)} on the GPU" if gpu is not None else "")
        + f"; report: {out / REPORT_NAME} (rcpu-lite inspect {out})",
    ]
