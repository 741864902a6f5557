"""The tokenizer of a checkpoint as llama.cpp's GGUF metadata (tokenizer.ggml.*), through gguf-py's vocab helpers.

llama.cpp tokenises with its own code, picked by two keys: `tokenizer.ggml.model` ("gpt2" for byte-level BPE,
"llama" for SentencePiece-style BPE with byte fallback) and, for byte-level BPE, `tokenizer.ggml.pre`, which
selects the regular expressions that split text before the merges (src/llama-vocab.cpp, one case per name).
gguf-py cannot tell the second: llama.cpp's converter hashes the token ids of a probe text and looks the hash
up in its table. Here the splitting itself is read from tokenizer.json's `pre_tokenizer` and matched against
the forms below; a tokenizer that matches none is refused in one line unless the caller names the form.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import gguf


class TokenizerError(ValueError):
    pass


# The splitting rules, as tokenizer.json writes them (regular expressions as the models publish them).
_LLAMA3_SPLIT = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class PreTokenizer:
    """One way of splitting text that llama.cpp implements, under its `tokenizer.ggml.pre` name."""

    name: str
    used_by: str
    steps: tuple[str, ...]  # the pre_tokenizer reduced by `splitting_steps`


PRE_TOKENIZERS = (
    PreTokenizer(
        "gpt-2", "GPT-2 splitting (also a tokenizer that transformers rebuilt from a GGUF file)", ("bytes+gpt2",)
    ),
    PreTokenizer("smollm", "SmolLM, SmolLM2: every digit alone, then GPT-2's splitting", ("digits", "bytes+gpt2")),
    PreTokenizer("llama-bpe", "Llama 3, 3.1, 3.2", (f"split:{_LLAMA3_SPLIT}", "bytes")),
    PreTokenizer("qwen2", "Qwen2, Qwen2.5, Qwen3", (f"split:{_QWEN2_SPLIT}", "bytes")),
)
PRE_TOKENIZER_NAMES = tuple(p.name for p in PRE_TOKENIZERS)


def splitting_steps(pre_tokenizer: dict | None) -> tuple[str, ...]:
    """tokenizer.json's pre_tokenizer reduced to what decides where text splits."""
    if pre_tokenizer is None:
        return ()
    kind = pre_tokenizer.get("type")
    if kind == "Sequence":
        return tuple(step for p in pre_tokenizer["pretokenizers"] for step in splitting_steps(p))
    if kind == "ByteLevel":
        return ("bytes+gpt2" if pre_tokenizer.get("use_regex", True) else "bytes",)
    if kind == "Digits":
        return ("digits" if pre_tokenizer.get("individual_digits") else "digit-runs",)
    if kind == "Split":
        pattern = pre_tokenizer.get("pattern", {})
        return (f"split:{pattern.get('Regex', pattern.get('String'))}",)
    return (str(kind),)


def detect_pre_tokenizer(tokenizer_json: dict) -> str | None:
    """llama.cpp's name for the splitting of a byte-level BPE tokenizer, or None if none matches."""
    steps = splitting_steps(tokenizer_json.get("pre_tokenizer"))
    return next((p.name for p in PRE_TOKENIZERS if p.steps == steps), None)


@dataclass(frozen=True)
class Vocabulary:
    """What goes into the GGUF file's tokenizer.ggml.* keys."""

    model: str  # "gpt2" | "llama"
    pre: str | None
    tokens: list[bytes]
    scores: list[float]
    types: list[int]


def read_vocabulary(model_dir: Path, n_vocab: int, pre_tokenizer: str | None = None) -> Vocabulary:
    """The tokenizer in `model_dir`, padded with unused tokens to the embedding's `n_vocab` rows.

    `pre_tokenizer` names llama.cpp's splitting for a byte-level tokenizer this module cannot identify.
    """
    path = Path(model_dir) / "tokenizer.json"
    if not path.is_file():
        raise TokenizerError(f"{model_dir} has no tokenizer.json; GGUF export needs the fast tokenizer's file")
    data = json.loads(path.read_text(encoding="utf-8"))
    model = data.get("model", {})
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        vocab, kind, pre = gguf.LlamaHfVocab(Path(model_dir)), "llama", None
    elif model.get("type") == "BPE":
        pre = pre_tokenizer or detect_pre_tokenizer(data)
        if pre is None:
            raise TokenizerError(
                f"cannot tell llama.cpp how this tokenizer splits text (pre_tokenizer "
                f"{splitting_steps(data.get('pre_tokenizer'))}); known: {', '.join(PRE_TOKENIZER_NAMES)}. "
                f"If it splits like one of llama.cpp's (src/llama-vocab.cpp), pass --pre-tokenizer NAME"
            )
        if (data.get("decoder") or {}).get("type") != "ByteLevel" and pre_tokenizer is None:
            raise TokenizerError("the tokenizer's decoder is not byte-level, which llama.cpp's gpt2 vocabulary needs")
        vocab, kind = _ByteLevelVocab(data), "gpt2"
    else:
        raise TokenizerError(
            f"tokenizer model {model.get('type')!r} is not exported; rcpu-lite writes byte-level BPE and "
            f"SentencePiece-style BPE tokenizers"
        )
    tokens, scores, types = [], [], []
    for text, score, token_type in vocab.all_tokens():
        tokens.append(text.encode("utf-8") if isinstance(text, str) else text)
        scores.append(score)
        types.append(int(token_type))
    if len(tokens) > n_vocab:
        raise TokenizerError(f"the tokenizer has {len(tokens)} tokens but the embedding only {n_vocab} rows")
    for i in range(len(tokens), n_vocab):  # rows the tokenizer never produces (as llama.cpp's converter pads)
        tokens.append(f"[PAD{i}]".encode())
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return Vocabulary(kind, pre, tokens, scores, types)


class _ByteLevelVocab(gguf.BpeVocab):
    """gguf-py's byte-level BPE vocabulary read from an already parsed tokenizer.json, with the special added
    tokens typed CONTROL and the others USER_DEFINED."""

    def __init__(self, data: dict):
        vocab = data["model"]["vocab"]
        added = data.get("added_tokens") or []
        self._special = {a["content"] for a in added if a.get("special")}
        extra = {a["content"]: a["id"] for a in added if a["content"] not in vocab}
        self.vocab, self.added_tokens_dict = vocab, extra
        self.added_tokens_list = [t for t, _ in sorted(extra.items(), key=lambda item: item[1])]
        if sorted(extra.values()) != list(range(len(vocab), len(vocab) + len(extra))):
            raise TokenizerError("the tokenizer's added tokens do not follow its vocabulary; llama.cpp needs them to")
        self.vocab_size_base = len(vocab)
        self.vocab_size = len(vocab) + len(extra)

    def bpe_tokens(self):
        for text, _, _ in super().bpe_tokens():
            kind = gguf.TokenType.CONTROL if text in self._special else gguf.TokenType.NORMAL
            yield text, 0.0, kind

    def added_tokens(self):
        for text in self.added_tokens_list:
            kind = gguf.TokenType.CONTROL if text in self._special else gguf.TokenType.USER_DEFINED
            yield text.encode("utf-8"), -1000.0, kind


def add_vocabulary(writer: gguf.GGUFWriter, model_dir: Path, vocab: Vocabulary) -> None:
    """Write the tokenizer keys: tokens, and gguf-py's SpecialVocab (merges, special ids, add_bos, chat template)."""
    writer.add_tokenizer_model(vocab.model)
    if vocab.pre is not None:
        writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(vocab.tokens)
    writer.add_token_scores(vocab.scores)
    writer.add_token_types(vocab.types)
    special = gguf.SpecialVocab(Path(model_dir), load_merges=vocab.model == "gpt2", n_vocab=len(vocab.tokens))
    special.add_to_gguf(writer, quiet=True)
