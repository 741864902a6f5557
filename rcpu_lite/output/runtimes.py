"""What the runtimes people use can do with an output's widths.

llama.cpp quantises a weight in blocks along its rows (its input dimension): 32 values for Q8_0, Q4_0 and Q5_0,
256 for the K-quants (Q4_K_M, Q5_K_M, Q6_K). Its quantiser (src/llama-quant.cpp, tensor_type_fallback) stores a
matrix whose rows are no multiple of 256 in a 32-block type instead (Q4_K -> Q5_0, Q5_K -> Q5_1, Q6_K -> Q8_0:
a little bigger, still quantised), and one whose rows are no multiple of 32 in F16, so a pruned model can end up
bigger than the dense one. The rows pruning shortens are those of ffn_down (the kept MLP channels) and
attn_output (the kept heads x head_dim).
"""

from __future__ import annotations

from collections.abc import Iterable

from rcpu_lite.methods.allocation import LayerWidths

SMALLEST_BLOCK = 32  # every quantised llama.cpp type takes rows in multiples of this
K_QUANT_BLOCK = 256  # the K-quants' own blocks


def quantisation_warning(layers: Iterable[LayerWidths], dense: LayerWidths, head_dim: int) -> str | None:
    """One line naming the pruned widths llama.cpp cannot quantise at all (None when it can quantise every one)."""
    rows = set()
    for w in layers:
        if w.channels != dense.channels:
            rows.add(w.channels)
        if w.heads != dense.heads:
            rows.add(w.heads * head_dim)
    bad = sorted(n for n in rows if n % SMALLEST_BLOCK)
    if not bad:
        return None
    shown = ", ".join(map(str, bad[:4])) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
    return (
        f"llama.cpp cannot quantise every pruned row of this output: widths {shown} are no multiple of "
        f"{SMALLEST_BLOCK}, so those matrices stay F16 at every quantised type (Q8_0, Q4_K_M, ...); prune with "
        f"--multiple-of {SMALLEST_BLOCK} (the default) or {K_QUANT_BLOCK} (the K-quants' own blocks everywhere)"
    )
