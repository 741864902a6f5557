"""Which llama.cpp architecture holds a pruned checkpoint, read from llama.cpp's own loaders.

Each entry says what that architecture's loader (`load_arch_tensors` in llama.cpp's src/models/<arch>.cpp)
accepts, because a GGUF file must hold exactly the tensors it creates, at exactly its shapes:

- llama (src/models/llama.cpp): q and o sized n_head * head_dim (key_length), optional q/k/v, o and MLP
  biases (create_tensor_qkv; wo_b, ffn_*_b); one head count and FFN length for every layer (layer 0's).
  Its rotary embedding rotates consecutive pairs (LLAMA_ROPE_TYPE_NORM), so the q/k rows of a Hugging Face
  checkpoint, which rotates the two halves of each head, are permuted as llama.cpp's converter permutes them.
- deci (src/models/deci.cpp, Nemotron-NAS): llama's tensors and rope, and n_head(il), n_head_kv(il) and
  n_ff(il) per layer from the array-valued head_count, head_count_kv and feed_forward_length: the one
  architecture that holds per-layer widths.
- qwen2 (src/models/qwen2.cpp): q and o sized n_embd x n_embd (so no query head may go), q/k/v biases, no o
  or MLP bias; NEOX rotary (halves), as Hugging Face's: no permutation.
- qwen3 (src/models/qwen3.cpp): q and o sized n_head * head_dim, q_norm / k_norm, no o or MLP bias; NEOX.

A family lists the architectures to try, its own first; the first whose loader takes the checkpoint wins.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

# GGUF tensor kinds (blk.N.<kind>.<weight|bias>) by the loaders that create them.
_NORMS = frozenset({"attn_norm.weight", "ffn_norm.weight"})
_LINEARS = frozenset(
    f"{k}.weight" for k in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
)
_QKV_BIASES = frozenset({"attn_q.bias", "attn_k.bias", "attn_v.bias"})
_OTHER_BIASES = frozenset({"attn_output.bias", "ffn_gate.bias", "ffn_up.bias", "ffn_down.bias"})


@dataclass(frozen=True)
class Target:
    """One llama.cpp architecture, as its loader and graph see a decoder layer."""

    arch: gguf.MODEL_ARCH
    layer_tensors: frozenset[str]  # every blk.N tensor kind the loader may create
    required: frozenset[str]  # those it needs
    per_layer_widths: bool = False  # reads head counts and FFN length per layer
    query_is_hidden: bool = False  # sizes q / o as n_embd x n_embd: every query head must stay
    permute_qk: bool = False  # pair-wise (NORM) rotary: Hugging Face's q/k rows are permuted

    @property
    def name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    def refusal(self, layout) -> str | None:
        """Why this architecture cannot hold `layout` (an export.layout.Layout), or None if it can."""
        if not layout.uniform and not self.per_layer_widths:
            return "its layers all take layer 0's widths"
        if self.query_is_hidden and any(w.heads * layout.head_dim != layout.hidden_size for w in layout.widths):
            return "it sizes q and o as hidden x hidden, so no query head may be removed"
        extra = sorted(layout.layer_tensor_kinds - self.layer_tensors)
        if extra:
            return f"its loader has no {', '.join(extra)}"
        missing = sorted(self.required - layout.layer_tensor_kinds)
        if missing:
            return f"its loader needs {', '.join(missing)}"
        return None


_LLAMA_LAYER = _NORMS | _LINEARS | _QKV_BIASES | _OTHER_BIASES
TARGETS = {
    t.name: t
    for t in (
        Target(gguf.MODEL_ARCH.LLAMA, _LLAMA_LAYER, _NORMS | _LINEARS, permute_qk=True),
        Target(gguf.MODEL_ARCH.DECI, _LLAMA_LAYER, _NORMS | _LINEARS, per_layer_widths=True, permute_qk=True),
        Target(gguf.MODEL_ARCH.QWEN2, _NORMS | _LINEARS | _QKV_BIASES, _NORMS | _LINEARS, query_is_hidden=True),
        Target(
            gguf.MODEL_ARCH.QWEN3,
            _NORMS | _LINEARS | _QKV_BIASES | {"attn_q_norm.weight", "attn_k_norm.weight"},
            _NORMS | _LINEARS | {"attn_q_norm.weight", "attn_k_norm.weight"},
        ),
    )
}

# model_type -> the architectures to try, in order. llama.cpp's converter writes Mistral as llama too.
FAMILY_TARGETS = {
    "llama": ("llama", "deci"),
    "mistral": ("llama", "deci"),
    "qwen2": ("qwen2", "llama", "deci"),
    "qwen3": ("qwen3",),
}
# Families rcpu-lite prunes but does not export yet, and why.
NOT_EXPORTED = {
    "gemma2": "llama.cpp's gemma2 graph needs Gemma's norm offsets, embedding scale and soft-capping written its "
    "own way, which rcpu-lite's exporter does not do yet, and deci (per-layer widths) has none of them",
    "gemma3_text": "llama.cpp's gemma3 graph needs Gemma's norm offsets, embedding scale and sliding-window "
    "pattern written its own way, which rcpu-lite's exporter does not do yet, and deci has none of them",
}


class ExportRefused(ValueError):
    pass


def choose_target(layout) -> Target:
    """The first architecture of the family's list that holds `layout`; a one-line refusal if none does."""
    family = layout.model_type
    if family in NOT_EXPORTED:
        raise ExportRefused(f"rcpu-lite does not export {family} to GGUF: {NOT_EXPORTED[family]}")
    if family not in FAMILY_TARGETS:
        raise ExportRefused(
            f"rcpu-lite does not export model_type {family!r} to GGUF; it exports {', '.join(FAMILY_TARGETS)}"
        )
    reasons = []
    for name in FAMILY_TARGETS[family]:
        reason = TARGETS[name].refusal(layout)
        if reason is None:
            return TARGETS[name]
        reasons.append(f"not {name}: {reason}")
    raise ExportRefused(f"no llama.cpp architecture holds this {family} output ({'; '.join(reasons)})")
