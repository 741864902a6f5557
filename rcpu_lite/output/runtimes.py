"""What the runtimes people use can do with an output's widths.

llama.cpp quantises a weight only in whole blocks along its rows (its input dimension): 32 values for Q8_0,
Q4_0 and Q5_0, 256 for the K-quants (Q4_K_M, Q5_K_M, Q6_K). A matrix whose rows are no multiple of the block
stays F16 ("falling back to f16"), so a pruned model can end up bigger than the dense one. The rows that
pruning shortens are those of ffn_down (the kept MLP channels) and attn_output (the kept heads x head_dim).
"""

from __future__ import annotations

from collections.abc import Iterable

from rcpu_lite.methods.allocation import LayerWidths

BLOCKS = {"Q8_0": 32, "Q4_K_M": 256}  # the smallest block each family of llama.cpp types needs


def quantisation_warning(layers: Iterable[LayerWidths], dense: LayerWidths, head_dim: int) -> str | None:
    """One line naming the pruned widths llama.cpp cannot quantise (None when every pruned width can)."""
    rows = set()
    for w in layers:
        if w.channels != dense.channels:
            rows.add(("ffn_down", w.channels))
        if w.heads != dense.heads:
            rows.add(("attn_output", w.heads * head_dim))
    for name, block in BLOCKS.items():
        bad = sorted({n for _, n in rows if n % block})
        if bad:
            shown = ", ".join(map(str, bad[:4])) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            at = "any quantised type" if block == min(BLOCKS.values()) else f"{name} and the other K-quants"
            return (
                f"llama.cpp cannot quantise every pruned row of this output: widths {shown} are no multiple of "
                f"{block}, so those matrices stay F16 at {at}; prune with --multiple-of {max(BLOCKS.values())} "
                f"(or {min(BLOCKS.values())} for Q8_0 alone)"
            )
    return None
