"""What a pruned output holds, read back from its rcpu_report.json: a table per layer, a summary, a plot.

The per-layer entries are parsed by LayerResult.from_json (the record the pipeline wrote) and reduced
to counts and errors; the kept indices stay in the report.
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rcpu_lite.methods.allocation import LayerWidths
from rcpu_lite.output.checks import working_dir
from rcpu_lite.output.report import PROJECTIONS, REPORT_NAME, LayerResult, ProjectionResult
from rcpu_lite.output.runtimes import quantisation_warning

PLOT_SIZE_INCHES = (9.0, 7.0)
PLOT_DPI = 100  # with PLOT_SIZE_INCHES: a 900 x 700 PNG
PLOT_EXTRA_HINT = "pip install 'rcpu-lite[plot]'"


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says which extra brings it."""


@dataclass
class LayerSummary:
    """One row of the table: widths kept and the errors of one pruned layer."""

    layer: int
    heads: int
    kv_heads: int
    channels: int
    projections: dict[str, ProjectionResult]
    block_error_pruned: float | None = None
    block_error: float | None = None
    held_out_block_error_pruned: float | None = None
    held_out_block_error: float | None = None
    seconds: float = 0.0

    @classmethod
    def of(cls, result: LayerResult) -> "LayerSummary":
        w = result.widths
        return cls(
            result.layer,
            w.heads,
            w.kv_heads,
            w.channels,
            result.projections,
            result.block_error_pruned,
            result.block_error,
            result.held_out_block_error_pruned,
            result.held_out_block_error,
            result.seconds,
        )

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "LayerSummary":
        projections = {name: ProjectionResult(**p) for name, p in data["projections"].items()}
        return cls(**{**data, "projections": projections})


@dataclass
class InspectReport:
    """What `rcpu-lite inspect` shows: per-layer rows, then the run's totals and settings."""

    path: str
    model: str
    heads_before: int
    kv_heads_before: int
    channels_before: int
    params_before: int
    params_after: int
    layers: list[LayerSummary]
    settings: dict = field(default_factory=dict)
    decoder_layer_param_reduction: float | None = None
    device: str | None = None
    device_name: str | None = None
    output_format: str | None = None
    model_type_after: str | None = None
    wall_seconds: float | None = None
    peak_rss_bytes: int | None = None
    peak_gpu_bytes: int | None = None  # None on the CPU
    peak_weight_bytes: int | None = None
    resumed_at_layer: int | None = None
    head_dim: int | None = None

    @property
    def param_reduction(self) -> float:
        return 1 - self.params_after / self.params_before

    def to_json(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["layers"] = [row.to_json() for row in self.layers]
        out["param_reduction"] = self.param_reduction
        return out

    @classmethod
    def from_json(cls, data: dict) -> "InspectReport":
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in data.items() if k in known}  # param_reduction is derived
        values["layers"] = [LayerSummary.from_json(row) for row in data["layers"]]
        return cls(**values)


# Totals older reports (or CPU runs) may lack.
OPTIONAL_TOTALS = (
    "decoder_layer_param_reduction",
    "device",
    "device_name",
    "output_format",
    "model_type_after",
    "wall_seconds",
    "peak_rss_bytes",
    "peak_gpu_bytes",
    "peak_weight_bytes",
    "resumed_at_layer",
)


def report_file(path: str | Path) -> Path:
    """The report of an output directory (or the report file itself); a one-line error when there is none."""
    path = Path(path)
    if path.is_file():
        return path
    report = path / REPORT_NAME
    if report.is_file():
        return report
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist")
    partial = working_dir(path)
    hint = (
        f"; {partial} exists: an interrupted prune, finish it with --resume"
        if partial.is_dir()
        else ": not an rcpu-lite prune output (or the prune did not finish)"
    )
    raise FileNotFoundError(f"{path} has no {REPORT_NAME}{hint}")


def inspect_output(path: str | Path) -> InspectReport:
    """Read a pruned output directory's report into an InspectReport."""
    file = report_file(path)
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        shape = data["shape_before"]
        return InspectReport(
            path=str(file.parent),
            model=data["model"],
            heads_before=shape["num_attention_heads"],
            kv_heads_before=shape["num_key_value_heads"],
            channels_before=shape["intermediate_size"],
            params_before=data["params_before"],
            params_after=data["params_after"],
            layers=[LayerSummary.of(LayerResult.from_json(r)) for r in data["layers"]],
            settings=data.get("settings", {}),
            head_dim=shape.get("head_dim"),
            **{name: data.get(name) for name in OPTIONAL_TOTALS},
        )
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{file} is not a readable rcpu-lite report ({type(e).__name__}: {e})") from None


def _error(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _columns(report: InspectReport) -> list[tuple[str, str, list[str]]]:
    """(group, header, cells) per column; error columns the report has no value for are left out."""
    rows = report.layers
    cols = [
        ("", "layer", [str(r.layer) for r in rows]),
        ("kept", "heads", [f"{r.heads}/{report.heads_before}" for r in rows]),
        ("kept", "kv", [f"{r.kv_heads}/{report.kv_heads_before}" for r in rows]),
        ("kept", "channels", [f"{r.channels}/{report.channels_before}" for r in rows]),
    ]
    for name in PROJECTIONS:
        projections = [r.projections.get(name) for r in rows]
        for attr, header in (
            ("error_pruned", "pruned"),
            ("error_compensated", "comp"),
            ("held_out_error_pruned", "ho pruned"),
            ("held_out_error_compensated", "ho comp"),
        ):
            values = [getattr(p, attr) if p else None for p in projections]
            if any(v is not None for v in values):
                cols.append((name, header, [_error(v) for v in values]))
        cols.append((name, "method", [p.method if p else "-" for p in projections]))
    for attr, header in (
        ("block_error_pruned", "pruned"),
        ("block_error", "final"),
        ("held_out_block_error_pruned", "ho pruned"),
        ("held_out_block_error", "ho final"),
    ):
        values = [getattr(r, attr) for r in rows]
        if any(v is not None for v in values):
            cols.append(("block", header, [_error(v) for v in values]))
    return cols


def _bytes(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.0f} MiB"


def format_table(report: InspectReport) -> str:
    """The per-layer table (errors are relative: ||Y - Z|| / ||Y||; ho = held-out), then the totals."""
    cols = _columns(report)
    widths = [max([len(header), *map(len, cells)]) for _, header, cells in cols]
    group_line, start = "", 0
    for i, (group, _, _) in enumerate(cols):  # each group's name centred over its columns
        if i + 1 == len(cols) or cols[i + 1][0] != group:
            span = sum(widths[start : i + 1]) + 2 * (i - start)
            group_line += ("  " if start else "") + group.center(span, "-" if group else " ")
            start = i + 1
    lines = [group_line.rstrip(), "  ".join(h.rjust(w) for (_, h, _), w in zip(cols, widths))]
    for k in range(len(report.layers)):
        lines.append("  ".join(cells[k].rjust(w) for (_, _, cells), w in zip(cols, widths)))
    legend = [
        "errors: ||Y - Z|| / ||Y|| on the calibration windows (ho: on the held-out windows)",
        "pruned: before compensation, comp: after; block final: as written (after compensation and any reconstruction)",
    ]
    return "\n".join(lines + legend + [""] + _totals(report) + _runtime_warning(report))


def _runtime_warning(report: InspectReport) -> list[str]:
    if report.head_dim is None:  # an older report
        return []
    dense = LayerWidths(report.heads_before, report.kv_heads_before, report.channels_before)
    layers = [LayerWidths(r.heads, r.kv_heads, r.channels) for r in report.layers]
    warning = quantisation_warning(layers, dense, report.head_dim)
    return [f"warning: {warning}"] if warning else []


def _totals(report: InspectReport) -> list[str]:
    decoder = (
        ""
        if report.decoder_layer_param_reduction is None
        else f"; decoder layers {100 * report.decoder_layer_param_reduction:.1f}% fewer"
    )
    lines = [
        f"model        {report.model} -> {report.path}",
        f"parameters   {report.params_before:,} -> {report.params_after:,} "
        f"({100 * report.param_reduction:.1f}% fewer{decoder})",
    ]
    if report.output_format:
        lines.append(f"output       {report.output_format} checkpoint, model_type {report.model_type_after}")
    if report.device:
        name = f" ({report.device_name})" if report.device_name and report.device_name != report.device else ""
        lines.append(f"device       {report.device}{name}")
    if report.wall_seconds is not None:
        resumed = "" if report.resumed_at_layer is None else f" (resumed at layer {report.resumed_at_layer})"
        lines.append(f"time         {report.wall_seconds:.1f} s{resumed}")
    memory = [
        f"{label} {_bytes(n)}"
        for label, n in (
            ("RSS", report.peak_rss_bytes),
            ("GPU", report.peak_gpu_bytes),
            ("checkpoint tensors", report.peak_weight_bytes),
        )
        if n
    ]
    if memory:
        lines.append(f"peak memory  {', '.join(memory)}")
    if report.settings:
        text = " ".join(f"{k}={v}" if v != "" else f'{k}=""' for k, v in report.settings.items())
        lines += textwrap.wrap(text, 100, initial_indent="settings     ", subsequent_indent=" " * 13)
    return lines


def plot_report(report: InspectReport, out: str | Path) -> Path:
    """A PNG of the widths kept (fractions) and the errors per layer, before and after compensation."""
    try:
        import matplotlib
    except ImportError:
        raise MissingExtra(f"--plot needs matplotlib: {PLOT_EXTRA_HINT}") from None
    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    layers = [r.layer for r in report.layers]
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=PLOT_SIZE_INCHES, dpi=PLOT_DPI, sharex=True, gridspec_kw={"height_ratios": [1, 1.6]}
    )
    _plot_widths(top, layers, report)
    _plot_errors(bottom, layers, report)
    settings = report.settings
    fig.suptitle(
        f"{Path(report.model).name}: ratio {settings.get('ratio')}, score {settings.get('score')}, "
        f"compensate {settings.get('compensate')}; {100 * report.param_reduction:.1f}% fewer parameters"
    )
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)  # no bbox_inches="tight": the PNG keeps PLOT_SIZE_INCHES x PLOT_DPI pixels
    plt.close(fig)
    return out


def _plot_widths(top, layers: list[int], report: InspectReport) -> None:
    """The fraction of query heads, KV heads and channels each layer keeps."""
    # Query and KV heads often coincide (both all kept): hollow, larger KV markers keep both visible.
    for label, kept, total, style in (
        ("query heads", "heads", report.heads_before, dict(marker="o", markersize=4)),
        (
            "KV heads",
            "kv_heads",
            report.kv_heads_before,
            dict(marker="s", markersize=7, markerfacecolor="none", linestyle="--"),
        ),
        ("MLP channels", "channels", report.channels_before, dict(marker="^", markersize=4)),
    ):
        top.plot(layers, [getattr(r, kept) / total for r in report.layers], label=label, **style)
    top.set_ylabel("fraction kept")
    top.set_ylim(0, 1.05)
    top.set_title("Widths kept per layer")
    top.legend(loc="lower left", fontsize="small")
    top.grid(alpha=0.3)


def _plot_errors(bottom, layers: list[int], report: InspectReport) -> None:
    """Each projection's relative error before and after compensation (and held out, where measured)."""
    from matplotlib.ticker import MaxNLocator

    for name, color in zip(PROJECTIONS, ("tab:blue", "tab:red")):
        projections = [r.projections.get(name) for r in report.layers]
        for attr, style, what in (
            ("error_pruned", ":", "before compensation"),
            ("error_compensated", "-", "after compensation"),
            ("held_out_error_compensated", "--", "after, held-out windows"),
        ):
            values = [getattr(p, attr) if p else None for p in projections]
            if any(v is not None for v in values):
                bottom.plot(
                    layers,
                    [float("nan") if v is None else v for v in values],
                    style,
                    color=color,
                    marker="." if style == "-" else None,
                    label=f"{name} {what}",
                )
    bottom.set_xlabel("decoder layer")
    bottom.set_ylabel("relative error ||Y - Z|| / ||Y||")
    bottom.set_ylim(0, 1.45 * max(bottom.get_ylim()[1], 1e-3))  # headroom: the legend sits above the lines
    bottom.xaxis.set_major_locator(MaxNLocator(integer=True))
    bottom.set_title("Output error per layer, before and after compensation")
    bottom.legend(loc="upper center", fontsize="small", ncol=2)
    bottom.grid(alpha=0.3)
