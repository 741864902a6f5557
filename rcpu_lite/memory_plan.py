"""How a prune run uses a GPU memory budget: the micro-batch size, and where the hidden states live.

Everything is estimated from shapes before any work, in fp32 bytes, on the generous side:
- fixed: one decoder layer in fp32, the two Gram matrices, and the compensation temporaries
  (G = C[:, K] W_K^T, a block of gathered Gram rows, M and W_K);
- per window of a micro-batch: the activations of one layer's forward pass, including the
  attention scores of an eager implementation (n_heads x seqlen^2);
- the calibration hidden states, nsamples x seqlen x hidden_size. They stay on the GPU when they
  fit beside the rest and a micro-batch; otherwise they live in pinned host memory and each
  micro-batch is copied over and back.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from .arch import LayerShape

FP32 = 4
GIB = 2**30


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


def layer_bytes(shape: LayerShape) -> int:
    """One dense decoder layer in fp32 (projections; norms and biases are noise at this scale)."""
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    attention = shape.hidden_size * (2 * q + 2 * kv)
    mlp = 3 * shape.hidden_size * shape.intermediate_size
    return (attention + mlp + 2 * shape.hidden_size) * FP32


def fixed_bytes(shape: LayerShape) -> int:
    """The layer, both Grams and the largest compensation's temporaries (down_proj's)."""
    o_in = shape.num_attention_heads * shape.head_dim
    grams = (o_in * o_in + shape.intermediate_size ** 2) * FP32
    h, f = shape.hidden_size, shape.intermediate_size
    compensation = (2 * f * h + 1024 * f + 2 * h * h) * FP32  # G, W_K, gathered rows, M and Q
    return layer_bytes(shape) + grams + compensation


def per_window_bytes(shape: LayerShape, seqlen: int) -> int:
    """Activations of one window through one layer: residual, norms, q/k/v/o, gate/up/act, scores."""
    h, f = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    per_token = 4 * h + 2 * q + 2 * kv + 3 * f
    return (seqlen * per_token + shape.num_attention_heads * seqlen * seqlen) * FP32


def plan(shape: LayerShape, nsamples: int, seqlen: int, budget_bytes: int, max_micro_batch: int) -> MemoryPlan:
    """The largest micro-batch up to max_micro_batch that fits, keeping the hidden states on the
    device when they fit beside it (they are read and written every layer: moving them costs)."""
    fixed, window = fixed_bytes(shape), per_window_bytes(shape, seqlen)
    hidden = nsamples * seqlen * shape.hidden_size * FP32
    if budget_bytes < fixed + window:
        raise MemoryBudgetError(
            f"--max-gpu-memory {budget_bytes / GIB:.2f} GiB is too small for this model: one layer, its "
            f"statistics and one window of {seqlen} tokens need about {(fixed + window) / GIB:.2f} GiB; raise it, "
            f"shorten --seqlen, or use --device cpu")
    on_device = budget_bytes >= fixed + hidden + window
    room = budget_bytes - fixed - (hidden if on_device else 0)
    micro_batch = max(1, min(max_micro_batch, nsamples, room // window))
    return MemoryPlan(int(micro_batch), on_device, int(budget_bytes), fixed, window, hidden)


def parse_size(text: str | float | int) -> int:
    """'10GiB', '10GB', '10G', '512MiB' or a plain number of GiB -> bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), "gib"
    else:
        raw = str(text).strip().lower().replace(" ", "")
        number = raw.rstrip("abcdefghijklmnopqrstuvwxyz")
        unit = raw[len(number):] or "gib"
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
