"""Tiny random Llama-family checkpoints built on disk for tests, with no network access.

`build_checkpoint(root, spec)` writes a Hugging Face checkpoint directory (fp32 safetensors,
config.json, a tiny BPE tokenizer trained on the calibration text) and returns its path.
`write_calibration(path)` writes the calibration text the tokenizer is trained on.

The specs in SPECS cover multi-head and grouped-query attention, tied and untied embeddings,
q/k/v biases (Qwen2) and an explicit head_dim that differs from hidden_size / num_heads
(Mistral); where head_dim is hidden_size / num_heads, config.json leaves it out, as Llama-1/2
checkpoints do. Qwen3 (q_norm / k_norm), Gemma 2 and Gemma 3 (text) are GQA with head_dim 16 on
hidden 64 and their own features switched on where tiny inputs would not show them: a sliding
window of 8 tokens (windows are 32) in alternating layers, query_pre_attn_scalar 32 (not head_dim),
Gemma 2's soft-capping at small caps, Gemma 3's local and global rotary bases far apart.
Weights are drawn from a fixed seed and scaled up (std 0.15) so that pruning
changes the outputs noticeably.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from rcpu_lite.calibration import CALIBRATION_TEXTS

WIKITEXT_VALID = CALIBRATION_TEXTS["wikitext2"]  # the bundled WikiText-2 validation split, gzipped

CALIB_CHARS = 24_000
TOKENIZER_VOCAB = 300  # <= every spec's vocab_size
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]


@dataclass(frozen=True)
class TinySpec:
    model_type: str = "llama"  # llama | mistral | qwen2 | qwen3 | gemma2 | gemma3_text
    num_hidden_layers: int = 2
    hidden_size: int = 64
    num_attention_heads: int = 4
    num_key_value_heads: int = 4
    head_dim: int = 16
    intermediate_size: int = 96
    vocab_size: int = 320
    tie_word_embeddings: bool = False
    seed: int = 0
    std: float = 0.15
    tokenizer: str = "whitespace"  # whitespace | bytelevel (GPT-2-style byte-level BPE, which llama.cpp reads)

    def replace(self, **changes) -> "TinySpec":
        return dataclasses.replace(self, **changes)

    @property
    def name(self) -> str:
        tie = "tied" if self.tie_word_embeddings else "untied"
        return (
            f"{self.model_type}-h{self.num_attention_heads}kv{self.num_key_value_heads}d{self.head_dim}"
            f"-ff{self.intermediate_size}-L{self.num_hidden_layers}-{tie}-s{self.seed}"
            + ("" if self.tokenizer == "whitespace" else f"-{self.tokenizer}")
        )


SPECS = {
    # multi-head attention, untied embeddings
    "llama_mha": TinySpec("llama"),
    "llama_mha_tied": TinySpec("llama", tie_word_embeddings=True),
    # grouped-query attention: 8 query heads in 2 KV groups, head_dim 8
    "llama_gqa": TinySpec("llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    "llama_gqa_tied": TinySpec(
        "llama", num_attention_heads=8, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True
    ),
    # GQA with an explicit head_dim: 8 heads x 16 = 128 != hidden 64
    "mistral_gqa": TinySpec("mistral", num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    # GQA with q/k/v biases
    "qwen2_gqa": TinySpec("qwen2", num_attention_heads=8, num_key_value_heads=2, head_dim=8),
    # GQA with q_norm / k_norm, head_dim 16 on hidden 64
    "qwen3_gqa": TinySpec("qwen3", num_attention_heads=8, num_key_value_heads=2, head_dim=16),
    # four norms per layer, scaled embeddings, sliding / global layers, soft-capping, tied lm_head
    "gemma2_gqa": TinySpec(
        "gemma2", num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
    ),
    # as Gemma 2 with q_norm / k_norm and a rotary table per layer type (no soft-capping)
    "gemma3_gqa": TinySpec(
        "gemma3_text", num_attention_heads=8, num_key_value_heads=2, head_dim=16, tie_word_embeddings=True
    ),
}

# Family features of the Gemma specs (see the module docstring).
GEMMA_WINDOW = 8
QUERY_PRE_ATTN_SCALAR = 32


def calibration_text(n_chars: int = CALIB_CHARS) -> str:
    """The first n_chars of WikiText-2 validation (the bundled copy), cut after the last full line."""
    with gzip.open(WIKITEXT_VALID, "rt", encoding="utf-8") as f:
        text = f.read(n_chars)
    return text[: text.rfind("\n") + 1]


def write_calibration(path: Path, n_chars: int = CALIB_CHARS) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(calibration_text(n_chars), encoding="utf-8")
    return path


def build_tokenizer(text: str, vocab_size: int = TOKENIZER_VOCAB, kind: str = "whitespace"):
    """A tiny BPE tokenizer trained on `text`, wrapped as a transformers fast tokenizer: split on whitespace,
    or GPT-2's byte-level BPE (every byte a token, then merges), the form llama.cpp's "gpt2" vocabulary reads."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if kind == "bytelevel":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder()
        alphabet = []
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, initial_alphabet=alphabet, show_progress=False
    )
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    assert tok.get_vocab_size() <= vocab_size
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def make_config(spec: TinySpec):
    from transformers import Gemma2Config, Gemma3TextConfig, LlamaConfig, MistralConfig, Qwen2Config, Qwen3Config

    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=256,
        tie_word_embeddings=spec.tie_word_embeddings,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
    )
    if spec.model_type == "llama":
        return LlamaConfig(**common)
    if spec.model_type == "mistral":
        return MistralConfig(sliding_window=None, **common)
    if spec.model_type == "qwen2":
        return Qwen2Config(use_sliding_window=False, **common)
    if spec.model_type == "qwen3":
        return Qwen3Config(use_sliding_window=False, **common)
    # Gemma: the first layer slides, the next is global, and so on
    layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.num_hidden_layers)]
    gemma = dict(
        sliding_window=GEMMA_WINDOW, layer_types=layer_types, query_pre_attn_scalar=QUERY_PRE_ATTN_SCALAR, **common
    )
    if spec.model_type == "gemma2":
        return Gemma2Config(attn_logit_softcapping=5.0, final_logit_softcapping=3.0, **gemma)
    if spec.model_type == "gemma3_text":
        rope = {
            "sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
            "full_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        }
        return Gemma3TextConfig(rope_parameters=rope, **gemma)
    raise ValueError(f"no tiny builder for model_type {spec.model_type!r}")


def _randomise(model: torch.nn.Module, seed: int, std: float) -> None:
    """Fixed-seed weights: norms near 1, everything else N(0, std^2) (embeddings a bit larger)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            noise = torch.randn(p.shape, generator=g, dtype=torch.float32)
            if "norm" in name:
                p.copy_(1.0 + 0.2 * noise)
            elif "embed_tokens" in name:
                p.copy_(4 * std * noise)
            else:
                p.copy_(std * noise)


def build_model(spec: TinySpec):
    """The tiny random model in memory (fp32, eval mode)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(spec.seed)
    model = AutoModelForCausalLM.from_config(make_config(spec), dtype=torch.float32)
    _randomise(model, spec.seed, spec.std)
    if spec.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.eval()


def build_checkpoint(out_dir: Path, spec: TinySpec, calib_text: str | None = None) -> Path:
    """Write the tiny checkpoint (safetensors + config + tokenizer) into out_dir and return it."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = build_model(spec)
    model.save_pretrained(out_dir, safe_serialization=True)
    if spec.head_dim * spec.num_attention_heads == spec.hidden_size and spec.model_type in (
        "llama",
        "mistral",
        "qwen2",
    ):
        # Like Llama-1/2 checkpoints: no head_dim in config.json, it is hidden_size / num_attention_heads.
        # (Qwen3's and Gemma's configs default to a fixed head_dim instead.)
        config_file = out_dir / "config.json"
        config = json.loads(config_file.read_text())
        del config["head_dim"]
        config_file.write_text(json.dumps(config, indent=2) + "\n")
    tokenizer = build_tokenizer(calib_text if calib_text is not None else calibration_text(), kind=spec.tokenizer)
    assert len(tokenizer) <= spec.vocab_size
    tokenizer.save_pretrained(out_dir)
    return out_dir


def save_unsupported(out_dir: Path, model_type: str) -> Path:
    """A tiny random checkpoint of an architecture rcpu-lite does not prune (gpt2, gemma, phi3)."""
    from transformers import AutoModelForCausalLM, GemmaConfig, GPT2Config, Phi3Config

    ids = dict(bos_token_id=1, eos_token_id=2)
    if model_type == "gpt2":
        config = GPT2Config(vocab_size=320, n_positions=64, n_embd=32, n_layer=1, n_head=2, **ids)
    elif model_type == "gemma":
        config = GemmaConfig(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            head_dim=16,
            pad_token_id=0,
            **ids,
        )
    elif model_type == "phi3":
        config = Phi3Config(
            vocab_size=320,
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            pad_token_id=0,
            **ids,
        )
    else:
        raise ValueError(model_type)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    out_dir = Path(out_dir)
    model.save_pretrained(out_dir, safe_serialization=True)
    build_tokenizer(calibration_text()).save_pretrained(out_dir)
    return out_dir
