"""Calibration and evaluation text -> token windows."""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path
from typing import Literal

import torch

DATA_DIR = Path(__file__).parent / "data"
# Built-in texts, one table per role. The WikiText-2 test split is an evaluation text only:
# calibrating on the text a model is evaluated on would be contamination.
CALIBRATION_TEXTS: dict[str, Path] = {
    "c4": DATA_DIR / "c4_calibration.jsonl.gz",  # 920 documents of C4 English validation (ODC-BY)
    "wikitext2": DATA_DIR / "wikitext2_valid.txt.gz",  # WikiText-2 validation split, word-level (CC BY-SA 3.0)
}
EVALUATION_TEXTS: dict[str, Path] = {
    "wikitext2": DATA_DIR / "wikitext2_test.raw.gz",  # WikiText-2 raw test split (CC BY-SA 3.0)
}
Role = Literal["calibration", "evaluation"]
BUILT_IN: dict[str, dict[str, Path]] = {"calibration": CALIBRATION_TEXTS, "evaluation": EVALUATION_TEXTS}
DEFAULT_CALIBRATION = "c4"


class CalibrationError(ValueError):
    pass


def resolve_text(source: str | os.PathLike, role: Role = "calibration") -> Path:
    """The file behind a text option: an existing file wins, else a built-in name of that role."""
    path = Path(source)
    if path.is_file():
        return path
    names = BUILT_IN[role]
    if str(source) in names:
        return names[str(source)]
    raise CalibrationError(
        f"{role} text {str(source)!r} does not exist: it is neither a file nor a built-in name "
        f"(built-in {role} texts: {', '.join(names)})"
    )


def read_text(source: str | os.PathLike, role: Role = "calibration") -> str:
    """Text of a plain file, or of a .jsonl / .jsonl.gz file's "text" fields joined by blank lines.

    `source` may also be a built-in name of `role` (CALIBRATION_TEXTS, EVALUATION_TEXTS).
    """
    path = resolve_text(source, role)
    text = _decode(path).replace("\r\n", "\n")
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        text = "\n\n".join(_jsonl_texts(path, text))
    return text


def _decode(path: Path) -> str:
    """The file's bytes (gunzipped for .gz) as UTF-8, refusing binary files."""
    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    if b"\x00" in raw[:65536]:
        raise CalibrationError(f"{path} looks binary; give a UTF-8 text or .jsonl file")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CalibrationError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8") from None


def _jsonl_texts(path: Path, text: str) -> list[str]:
    """The "text" string of every non-blank line of a JSONL file."""
    docs = []
    for n, line in enumerate(text.splitlines(), 1):
        if line.strip():
            try:
                doc = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                doc = None
            if not isinstance(doc, str):
                raise CalibrationError(f'{path}:{n} is not a JSON object with a "text" string')
            docs.append(doc)
    return docs


def evaluation_text(source: str | os.PathLike) -> str:
    """The perplexity convention of the pruning literature: the split's lines joined by blank lines.

    `source` is a file or a built-in evaluation name ("wikitext2": the WikiText-2 raw test split).
    """
    return "\n\n".join(read_text(source, "evaluation").split("\n"))


def tokenize(tokenizer, text: str) -> torch.Tensor:
    # One long sequence on purpose; silence the "longer than model_max_length" warning.
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """nsamples windows of seqlen tokens at seeded random offsets (nsamples x seqlen)."""
    return _gather(tokens, random_starts(tokens, nsamples, seqlen, seed), seqlen)


def random_starts(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int) -> list[int]:
    if tokens.numel() - seqlen < nsamples:  # fewer distinct window starts than windows asked for
        raise CalibrationError(
            f"calibration text has {tokens.numel()} tokens, too few for {nsamples} windows of {seqlen} (at least "
            f"{nsamples + seqlen} needed); give more text or lower --nsamples / --seqlen"
        )
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, tokens.numel() - seqlen, (nsamples,), generator=g).tolist()


def unused_windows(tokens: torch.Tensor, used_starts: list[int], n: int, seqlen: int, seed: int) -> torch.Tensor:
    """n windows that share no token with the windows at used_starts, nor with each other (held-out
    windows from the calibration text itself), at seeded random places among the free ones."""
    free = torch.ones(tokens.numel(), dtype=torch.bool)
    for s in used_starts:
        free[s : s + seqlen] = False
    # A start is possible when its whole window is free: a running count of free tokens tells.
    counts = torch.cat([torch.zeros(1, dtype=torch.long), free.long().cumsum(0)])
    possible = ((counts[seqlen:] - counts[:-seqlen]) == seqlen).nonzero().squeeze(1)
    order = possible[torch.randperm(possible.numel(), generator=torch.Generator().manual_seed(seed))]
    chosen: list[int] = []
    for s in order.tolist():
        if all(abs(s - c) >= seqlen for c in chosen):
            chosen.append(s)
            if len(chosen) == n:
                return _gather(tokens, sorted(chosen), seqlen)
    raise CalibrationError(
        f"the calibration text has room for only {len(chosen)} held-out windows of {seqlen} tokens "
        f"beside the calibration windows, {n} were asked for; give --holdout FILE, more text, or "
        f"lower --holdout-nsamples"
    )


def _gather(tokens: torch.Tensor, starts: list[int], seqlen: int) -> torch.Tensor:
    return torch.stack([tokens[s : s + seqlen] for s in starts])


def consecutive_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows from the start; the incomplete tail is dropped."""
    n = tokens.numel() // seqlen
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"text has {tokens.numel()} tokens, fewer than one window of {seqlen}")
    return tokens[: n * seqlen].reshape(n, seqlen)
