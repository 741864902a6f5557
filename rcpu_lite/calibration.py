"""Calibration and evaluation text -> token windows."""
from __future__ import annotations

import gzip
import json
from pathlib import Path

import torch

BUNDLED = {"c4": Path(__file__).parent / "data" / "c4_calibration.jsonl.gz"}
DEFAULT_CALIBRATION = "c4"


class CalibrationError(ValueError):
    pass


def read_text(source: str | Path) -> str:
    """Text of a plain file, or of a .jsonl / .jsonl.gz file's "text" fields joined by blank lines.

    `source` may also name a bundled set ("c4": 920 documents of C4 English validation, ODC-BY).
    """
    path = Path(source)
    if not path.exists() and str(source) in BUNDLED:
        path = BUNDLED[str(source)]
    if not path.is_file():
        raise CalibrationError(f"text file {path} does not exist")
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise CalibrationError(f"{path} looks binary; give a UTF-8 text or .jsonl file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None
    text = text.replace("\r\n", "\n")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        docs = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    doc = json.loads(line)["text"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    doc = None
                if not isinstance(doc, str):
                    raise CalibrationError(f"{path}:{n} is not a JSON object with a \"text\" string")
                docs.append(doc)
        text = "\n\n".join(docs)
    return text


def evaluation_text(source: str | Path) -> str:
    """The perplexity convention of the pruning literature: the split's lines joined by blank lines."""
    return "\n\n".join(read_text(source).split("\n"))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # One long sequence on purpose; silence the "longer than model_max_length" warning.
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets (nsamples x seqlen)."""
    if tokens.numel() - seqlen < nsamples:  # fewer distinct window starts than windows asked for
        raise CalibrationError(
            f"calibration text has {tokens.numel()} tokens, too few for {nsamples} windows of {seqlen} (at least "
            f"{nsamples + seqlen} needed); give more text or lower --nsamples / --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g)
    return torch.stack([tokens[s:s + seqlen] for s in starts.tolist()])


def consecutive_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start; the incomplete tail is dropped."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)
