"""Short names for common checkpoints, as users type them: one table, mapping each to its hub id.

Read by `models.resolve_model` (so by prune, eval, generate and the tools), the CLI's MODEL help and the
alias table in docs/cli.md (a test keeps the two equal). Every id is the base (pretrained) model, not an instruct or chat
tune: the pruning literature reports on base models, and calibration text is plain text.
"""

from __future__ import annotations

ALIASES: dict[str, str] = {
    "llama-7b": "huggyllama/llama-7b",
    "llama-2-7b": "meta-llama/Llama-2-7b-hf",
    "llama-2-13b": "meta-llama/Llama-2-13b-hf",
    "llama-3-8b": "meta-llama/Meta-Llama-3-8B",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B",
    "mistral-7b": "mistralai/Mistral-7B-v0.1",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B",
    "smollm2-360m": "HuggingFaceTB/SmolLM2-360M",
    "smollm2-1.7b": "HuggingFaceTB/SmolLM2-1.7B",
}


def hub_id(name: str) -> str | None:
    """The hub id an alias stands for (case-insensitive: Llama-2-7B works too), or None."""
    return ALIASES.get(name.strip().lower())


def alias_list() -> str:
    """'alias (hub id), ...' for help texts."""
    return ", ".join(f"{alias} ({repo})" for alias, repo in ALIASES.items())
