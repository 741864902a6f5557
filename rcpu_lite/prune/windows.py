"""The token windows of a run: calibration (real, then generated) and held-out, the same on every rank."""

from __future__ import annotations

from pathlib import Path

import torch

from rcpu_lite import calibration, distributed
from rcpu_lite.display import Reporter
from rcpu_lite.models import load_tokenizer
from rcpu_lite.settings import PruneSettings


def calibration_sets(
    settings: PruneSettings, model_dir: Path, reporter: Reporter, group: distributed.Group = distributed.SINGLE
) -> tuple[torch.Tensor, int, torch.Tensor | None]:
    """The calibration windows (real ones first, then generated ones), how many are real, and the
    held-out windows (None when there are none): all of them, the same on every rank (generated
    windows by rank 0 alone, handed to the others)."""
    tokenizer = load_tokenizer(model_dir)
    real, holdout, n_real = None, None, settings.nsamples
    if settings.calib == "self":
        windows = group.from_main(lambda: _generated(settings, model_dir, settings.nsamples, reporter))
    else:
        tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.calib))
        starts = calibration.random_starts(tokens, settings.nsamples, settings.seqlen, settings.seed)
        real = windows = torch.stack([tokens[s : s + settings.seqlen] for s in starts])
        if settings.self_nsamples:
            windows = torch.cat(
                [real, group.from_main(lambda: _generated(settings, model_dir, settings.self_nsamples, reporter))]
            )
    if settings.holdout_nsamples and settings.holdout != "none":
        if settings.holdout:  # a text of its own
            held_tokens = calibration.tokenize(tokenizer, calibration.read_text(settings.holdout))
            holdout = calibration.random_windows(
                held_tokens, settings.holdout_nsamples, settings.seqlen, settings.seed + 1
            )
        elif real is not None:
            holdout = calibration.unused_windows(
                tokens, starts, settings.holdout_nsamples, settings.seqlen, settings.seed + 1
            )
        else:  # --calib self: more generated windows, after the calibration ones
            holdout = group.from_main(
                lambda: _generated(settings, model_dir, settings.nsamples + settings.holdout_nsamples, reporter)[
                    settings.nsamples :
                ]
            )
    return windows, n_real, holdout


def _generated(settings: PruneSettings, model_dir: Path, n: int, reporter: Reporter) -> torch.Tensor:
    from rcpu_lite.selfgen import self_generated  # loads the whole model: only when asked for

    return self_generated(
        model_dir,
        n,
        settings.seqlen,
        settings.seed,
        device=settings.device,
        quant=settings.gen_quant,
        reporter=reporter,
    )
