"""What one pruned layer produced, as one typed record that the writer, the manifest, the log and the
report all read. Its JSON form is flat (the report's per-layer entries) and round-trips exactly."""
from __future__ import annotations

from dataclasses import dataclass, field

from .widths import LayerWidths

PROJECTIONS = ("o_proj", "down_proj")


@dataclass
class ProjectionResult:
    """The repair of one projection: relative output errors on the calibration tokens, the method used."""

    error_pruned: float
    error_compensated: float
    method: str
    damp: float | None = None  # the ridge lambda actually used (least squares only)
    bias: bool = False  # whether a compensating bias was written


@dataclass
class LayerResult:
    layer: int
    kept_heads: list[int]
    kept_kv_heads: list[int]
    kept_channels: list[int]
    projections: dict[str, ProjectionResult]
    seconds: float = 0.0
    seconds_by_stage: dict[str, float] = field(default_factory=dict)
    rss_bytes: int = 0

    @property
    def widths(self) -> LayerWidths:
        return LayerWidths(len(self.kept_heads), len(self.kept_kv_heads), len(self.kept_channels))

    def to_json(self) -> dict:
        out = {"layer": self.layer, "kept_heads": self.kept_heads, "kept_kv_heads": self.kept_kv_heads,
               "kept_channels": self.kept_channels}
        for name, p in self.projections.items():
            out.update({f"{name}_error_pruned": p.error_pruned, f"{name}_error_compensated": p.error_compensated,
                        f"{name}_method": p.method, f"{name}_damp": p.damp, f"{name}_bias": p.bias})
        out.update(seconds=self.seconds, seconds_by_stage=self.seconds_by_stage, rss_bytes=self.rss_bytes)
        return out

    @classmethod
    def from_json(cls, data: dict) -> "LayerResult":
        projections = {name: ProjectionResult(data[f"{name}_error_pruned"], data[f"{name}_error_compensated"],
                                              data[f"{name}_method"], data.get(f"{name}_damp"),
                                              data.get(f"{name}_bias", False))
                       for name in PROJECTIONS if f"{name}_error_pruned" in data}
        return cls(data["layer"], data["kept_heads"], data["kept_kv_heads"], data["kept_channels"], projections,
                   data.get("seconds", 0.0), data.get("seconds_by_stage", {}), data.get("rss_bytes", 0))
