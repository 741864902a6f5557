"""How a prune run uses a GPU memory budget: the micro-batch size, and where the hidden states live.

Everything is estimated from shapes before any work, in fp32 bytes, on the generous side:
- fixed: one decoder layer in fp32, the two Gram matrices, and the compensation temporaries
  (G = C[:, K] W_K^T, a block of gathered Gram rows, M and W_K);
- per window of a micro-batch: the activations of one layer's forward pass, including the
  attention scores of an eager implementation (n_heads x seqlen^2);
- the calibration hidden states, nsamples x seqlen x hidden_size. They stay on the GPU when they
  fit beside the rest and a micro-batch; otherwise they live in pinned host memory and each
  micro-batch is copied over and back;
- with --decomposition-device cuda, the fp64 decomposition of M on the GPU as well.

cluster_plan() applies the same plan to each rank of a data-parallel run over windows, and
layer_work() counts the floating-point work of one layer; render_tables() prints both as the
the 70B plan in docs/scaling.md (`python -m rcpu_lite.memory_plan --table`).
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass

from rcpu_lite.families.arch import NAMED_SHAPES, LayerShape, named_layer_shape
from rcpu_lite.methods.allocation import uniform

FP32, FP64 = 4, 8
GIB = 2**30
DEFAULT_BUDGET_FRACTION = 0.9  # without --max-gpu-memory a run plans for 90 % of the free GPU memory


class MemoryBudgetError(ValueError):
    pass


@dataclass(frozen=True)
class MemoryPlan:
    micro_batch: int
    hidden_on_device: bool
    budget_bytes: int
    fixed_bytes: int
    per_window_bytes: int
    hidden_bytes: int

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def peak_bytes(self) -> int:
        """What the plan puts on the GPU at once: fixed, the hidden states if there, one micro-batch."""
        return (
            self.fixed_bytes
            + (self.hidden_bytes if self.hidden_on_device else 0)
            + self.micro_batch * self.per_window_bytes
        )


def linear_params(shape: LayerShape) -> int:
    """The weights of one decoder layer's seven projections."""
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    return shape.hidden_size * (2 * q + 2 * kv) + 3 * shape.hidden_size * shape.intermediate_size


def layer_bytes(shape: LayerShape) -> int:
    """One dense decoder layer in fp32 (projections and norms; biases are noise at this scale)."""
    return (linear_params(shape) + 2 * shape.hidden_size) * FP32


def gram_bytes(shape: LayerShape) -> dict[str, int]:
    """The fp32 Gram matrix of each compensated projection's input (d_in x d_in)."""
    return {
        "o_proj": (shape.num_attention_heads * shape.head_dim) ** 2 * FP32,
        "down_proj": shape.intermediate_size**2 * FP32,
    }


def decomposition_bytes(shape: LayerShape) -> int:
    """The fp64 decomposition of the hidden x hidden M at its peak: M, M^T M, the eigenvectors and
    the eigensolver's workspace (about 2 d^2: LAPACK/cuSOLVER syevd) are alive together."""
    return 5 * shape.hidden_size**2 * FP64


def fixed_bytes(shape: LayerShape, decomposition_on_gpu: bool = False) -> int:
    """The layer, both Grams and the largest compensation's temporaries (down_proj's); with
    decomposition_on_gpu, the fp64 decomposition too."""
    h, f = shape.hidden_size, shape.intermediate_size
    compensation = (2 * f * h + 1024 * f + 2 * h * h) * FP32  # G, W_K, gathered rows, M and Q
    decomposition = decomposition_bytes(shape) if decomposition_on_gpu else 0
    return layer_bytes(shape) + sum(gram_bytes(shape).values()) + compensation + decomposition


def hidden_bytes(shape: LayerShape, nsamples: int, seqlen: int) -> int:
    """One stream of calibration hidden states in fp32."""
    return nsamples * seqlen * shape.hidden_size * FP32


def per_window_bytes(shape: LayerShape, seqlen: int) -> int:
    """Activations of one window through one layer: residual, norms, q/k/v/o, gate/up/act, scores."""
    h, f = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    per_token = 4 * h + 2 * q + 2 * kv + 3 * f
    return (seqlen * per_token + shape.num_attention_heads * seqlen * seqlen) * FP32


def plan(
    shape: LayerShape,
    nsamples: int,
    seqlen: int,
    budget_bytes: int,
    max_micro_batch: int,
    decomposition_on_gpu: bool = False,
) -> MemoryPlan:
    """The largest micro-batch up to max_micro_batch that fits, keeping the hidden states on the
    device when they fit beside it (they are read and written every layer: moving them costs)."""
    fixed, window = fixed_bytes(shape, decomposition_on_gpu), per_window_bytes(shape, seqlen)
    hidden = hidden_bytes(shape, nsamples, seqlen)
    if budget_bytes < fixed + window:
        raise MemoryBudgetError(
            f"--max-gpu-memory {budget_bytes / GIB:.2f} GiB is too small for this model: one layer, its "
            f"statistics and one window of {seqlen} tokens need about {(fixed + window) / GIB:.2f} GiB; raise it, "
            f"shorten --seqlen, or use --device cpu"
        )
    on_device = budget_bytes >= fixed + hidden + window
    room = budget_bytes - fixed - (hidden if on_device else 0)
    micro_batch = max(1, min(max_micro_batch, nsamples, room // window))
    return MemoryPlan(int(micro_batch), on_device, int(budget_bytes), fixed, window, hidden)


# --- work per layer, and a data-parallel plan over windows ------------------------------------------

# Symmetric eigendecomposition with eigenvectors, ~9 d^3 (Golub & Van Loan, Matrix Computations, 4th ed.,
# 8.3: tridiagonalisation and the symmetric QR algorithm), plus M^T M, U = M V and Q = U V^T (2 d^3 each).
EIGH_FLOPS_PER_D3 = 9 + 2 + 2 + 2
# Assumed throughputs, for seconds only (none is measured on a GPU here):
GPU_FP32_FLOPS = 30e12  # sustained fp32 of one 24 GB GPU: ~1/3 of an RTX 4090's 82.6 TFLOP/s peak
# The CPU's fp64 decomposition rate as measured at the Llama-7B shape (docs/scaling.md: 881 s for the 64
# decompositions of d = 4096 in the 32-layer run, 2 cores); a host with more cores is faster.
CPU_FP64_FLOPS = EIGH_FLOPS_PER_D3 * 4096**3 / (881 / 64)


@dataclass(frozen=True)
class LayerWork:
    """Floating-point operations (multiply and add counted apart) for one decoder layer."""

    forward: int  # two passes over every calibration token: dense (statistics) and pruned (propagate)
    grams: int  # C += X X^T for the o_proj and down_proj inputs
    compensation: int  # G = C[:,K] W_K^T, M = W G, tr(W_R C_RR W_R^T) and Q W_K, both projections
    decomposition: int  # fp64: polar factor of each d_out x d_out M (d_out = hidden_size for both)


def layer_work(shape: LayerShape, nsamples: int, seqlen: int, ratio: float = 0.2) -> LayerWork:
    """Counted at the dense width (the pruned pass is ~ratio cheaper); attention scores in full
    (seqlen^2 per head, as eager attention computes them); held-out windows not counted."""
    tokens, h = nsamples * seqlen, shape.hidden_size
    q = shape.num_attention_heads * shape.head_dim
    one_pass = 2 * tokens * linear_params(shape) + 2 * 2 * tokens * seqlen * q  # projections; Q K^T and A V
    kept = uniform(shape, 1, ratio).layers[0]
    compensation = 0
    for d_in, k in ((q, kept.heads * shape.head_dim), (shape.intermediate_size, kept.channels)):
        compensation += 2 * h * d_in * (k + h) + 2 * h * (d_in - k) ** 2 + 2 * h * h * k
    return LayerWork(
        forward=2 * one_pass,
        grams=2 * tokens * sum(b // FP32 for b in gram_bytes(shape).values()),
        compensation=compensation,
        decomposition=2 * EIGH_FLOPS_PER_D3 * h**3,
    )


@dataclass(frozen=True)
class ClusterPlan:
    """One rank of a data-parallel run over windows: every rank holds the layer, both Grams (its partial
    sums, then all-reduced) and the compensation temporaries, and its share of the hidden-state stream."""

    ranks: int
    windows_per_rank: int
    budget_bytes: int  # per rank
    fixed_bytes: int
    per_window_bytes: int
    stream_bytes: int  # this rank's share of the calibration hidden states
    memory: MemoryPlan | None  # None: one layer and one window do not fit the budget
    allreduce_bytes: int  # sent per rank per layer: ring all-reduce of both Grams, 2 (R - 1) / R of them
    work: LayerWork

    @property
    def fits(self) -> bool:
        return self.memory is not None

    @property
    def seconds_per_layer(self) -> float:
        """Forward passes and Grams split over the ranks; compensation on one GPU; decomposition on the
        CPU (the default --decomposition-device); the all-reduce is not counted."""
        w = self.work
        return ((w.forward + w.grams) / self.ranks + w.compensation) / GPU_FP32_FLOPS + w.decomposition / CPU_FP64_FLOPS


def cluster_plan(
    shape: LayerShape,
    nsamples: int,
    seqlen: int,
    ranks: int,
    gpu_bytes: int,
    max_micro_batch: int = 16,
    ratio: float = 0.2,
) -> ClusterPlan:
    """The memory plan of each of `ranks` GPUs of gpu_bytes (planned at DEFAULT_BUDGET_FRACTION of it),
    each taking ceil(nsamples / ranks) windows, and the per-layer work."""
    windows = -(-nsamples // ranks)
    budget = int(DEFAULT_BUDGET_FRACTION * gpu_bytes)
    try:
        memory = plan(shape, windows, seqlen, budget, max_micro_batch)
    except MemoryBudgetError:
        memory = None
    return ClusterPlan(
        ranks,
        windows,
        budget,
        fixed_bytes(shape),
        per_window_bytes(shape, seqlen),
        hidden_bytes(shape, windows, seqlen),
        memory,
        2 * (ranks - 1) * sum(gram_bytes(shape).values()) // ranks,
        layer_work(shape, nsamples, seqlen, ratio),
    )


# The plan in docs/scaling.md: both 70B models, the paper's calibration and a long one, on one 12 GB GPU (the
# design's consumer card), one 24 GB GPU and four 24 GB GPUs (ranks, bytes per GPU).
TABLE_MODELS = ("llama-2-70b", "llama-3-70b")
TABLE_CALIBRATIONS = ((128, 128), (512, 2048))
TABLE_SETUPS = ((1, 12 * GIB), (1, 24 * GIB), (4, 24 * GIB))


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n else "0"


def _tflop(n: float) -> str:
    return f"{n / 1e12:,.1f}"


def _gpus(ranks: int) -> str:
    return f"{ranks} GPU{'s' if ranks > 1 else ''}"


def _memory_row(
    name: str, nsamples: int, seqlen: int, p: ClusterPlan, gpu_bytes: int, on_gpu: MemoryPlan | None
) -> list[str]:
    m = p.memory
    cells = [
        name,
        f"{nsamples}×{seqlen}",
        f"{p.ranks} × {gpu_bytes // GIB} GB",
        str(p.windows_per_rank),
        _gib(p.fixed_bytes),
        _gib(p.stream_bytes),
        "—" if m is None else "GPU" if m.hidden_on_device else "host (pinned)",
        "—" if m is None else str(m.micro_batch),
        "—" if m is None else _gib(m.peak_bytes),
        "—" if m is None else _gib(0 if m.hidden_on_device else p.stream_bytes),
        "yes" if p.fits else "**no**",
        "**no**" if on_gpu is None else f"yes, micro-batch {on_gpu.micro_batch}",
    ]
    return cells


def render_tables(
    models: tuple[str, ...] = TABLE_MODELS,
    calibrations=TABLE_CALIBRATIONS,
    setups: tuple[tuple[int, int], ...] = TABLE_SETUPS,
) -> str:
    """Two Markdown tables from the shapes alone: memory per rank, and work per layer."""
    header = [
        "model",
        "calibration",
        "GPUs",
        "windows / rank",
        "layer + Grams + temporaries",
        "streams / rank",
        "streams live on",
        "micro-batch",
        "GPU peak / rank",
        "host RAM for streams / rank",
        "fits",
        "fits with --decomposition-device cuda",
    ]
    rank_counts = sorted({r for r, _ in setups})
    work_header = [
        "model",
        "calibration",
        "forward ×2 (TFLOP)",
        "Grams (TFLOP)",
        "compensation (TFLOP)",
        "decomposition (fp64 TFLOP)",
        "decomposition on the CPU (s)",
        *(f"all-reduce / rank, {_gpus(r)}" for r in rank_counts if r > 1),
        *(f"s / layer, {_gpus(r)}" for r in rank_counts),
        *(f"all layers, {_gpus(r)}" for r in rank_counts),
    ]
    memory, work = [header], [work_header]
    for name in models:
        shape, config = named_layer_shape(name), NAMED_SHAPES[name]
        for nsamples, seqlen in calibrations:
            for ranks, gpu_bytes in setups:
                p = cluster_plan(shape, nsamples, seqlen, ranks, gpu_bytes)
                try:
                    on_gpu = plan(shape, p.windows_per_rank, seqlen, p.budget_bytes, 16, decomposition_on_gpu=True)
                except MemoryBudgetError:
                    on_gpu = None
                memory.append(_memory_row(name, nsamples, seqlen, p, gpu_bytes, on_gpu))
            by_ranks = {r: cluster_plan(shape, nsamples, seqlen, r, setups[-1][1]) for r in rank_counts}
            w = by_ranks[rank_counts[0]].work
            work.append(
                [
                    name,
                    f"{nsamples}×{seqlen}",
                    _tflop(w.forward),
                    _tflop(w.grams),
                    _tflop(w.compensation),
                    _tflop(w.decomposition),
                    f"{w.decomposition / CPU_FP64_FLOPS:,.0f}",
                    *(_gib(p.allreduce_bytes) for r, p in by_ranks.items() if r > 1),
                    *(f"{p.seconds_per_layer:,.0f} s" for p in by_ranks.values()),
                    *(f"{p.seconds_per_layer * config['num_hidden_layers'] / 3600:,.1f} h" for p in by_ranks.values()),
                ]
            )
    return "\n\n".join(_markdown(rows) for rows in (memory, work)) + "\n"


def _markdown(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join([lines[0], "|" + "---|" * len(rows[0]), *lines[1:]])


def parse_size(text: str | float | int) -> int:
    """'10GiB', '10GB', '10G', '512MiB' or a plain number of GiB -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "gib"
    else:
        raw = str(text).strip().lower().replace(" ", "")
        number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = raw[len(number) :] or "gib"
        try:
            value = float(number)
        except ValueError:
            raise MemoryBudgetError(f"--max-gpu-memory must look like 10GiB, 10GB or 512MiB, got {text!r}") from None
    units = {"gib": GIB, "g": GIB, "gb": 10**9, "mib": 2**20, "m": 2**20, "mb": 10**6}
    if unit not in units:
        raise MemoryBudgetError(f"--max-gpu-memory unit must be GiB, GB, MiB or MB, got {text!r}")
    if not value > 0:
        raise MemoryBudgetError(f"--max-gpu-memory must be positive, got {text!r}")
    return int(value * units[unit])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m rcpu_lite.memory_plan",
        description="Print the 70B plan of docs/scaling.md, computed from their shapes.",
    )
    ap.add_argument("--table", action="store_true", help="print the Markdown tables (memory per rank, work per layer)")
    args = ap.parse_args(argv)
    if not args.table:
        ap.print_help()
        return
    print(render_tables(), end="")


if __name__ == "__main__":
    main()
