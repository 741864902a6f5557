"""The real SmolLM2-135M, pruned uniformly and with per-layer widths, exported and run in real llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from llama_cpp_run import greedy, llama_cpp, logits

from rcpu_lite.export import to_gguf, unquantised_weights
from rcpu_lite.loading import load_pruned
from rcpu_lite.models import load_tokenizer, resolve_model
from rcpu_lite.prune.run import prune
from rcpu_lite.settings import PruneSettings

pytestmark = pytest.mark.slow

TEXT = "The history of the city begins in the Roman period, when a small fort was built beside the river."
# rms(llama.cpp - transformers) / rms(transformers) over the prompt's logits. f32 (f32 KV cache): summation order
# only, over 30 layers. q8_0 / q4_k_m: the weight rounding of each type, measured on these outputs at about
# 0.02 and 0.09 (the tolerances leave room for other prunings of the same model).
TOLERANCE = {"f32": 1e-4, "q8_0": 0.1, "q4_k_m": 0.25}
GREEDY_TOKENS = {"f32": 16, "q8_0": 1, "q4_k_m": 0}  # equal greedy tokens; rounding may flip a close call later
# The share of prompt positions whose most likely next token is the same (measured: 1.0, 0.95-1.0, 0.86-0.90).
TOP1_AGREEMENT = {"f32": 1.0, "q8_0": 0.85, "q4_k_m": 0.75}


@pytest.fixture(scope="module")
def outputs(tmp_path_factory) -> dict:
    smollm2 = resolve_model("smollm2-135m")
    root = tmp_path_factory.mktemp("smollm2-gguf")
    made = {}
    for name, allocation in (("uniform", "uniform"), ("per-layer", "adaptive")):
        settings = PruneSettings(ratio=0.2, allocation=allocation, calib="wikitext2", nsamples=16, seqlen=128)
        prune(smollm2, root / name, settings)
        made[name] = root / name
    return made


@pytest.fixture(scope="module")
def prompt(outputs) -> list[int]:
    return load_tokenizer(outputs["uniform"])(TEXT)["input_ids"]


def test_per_layer_output_has_different_widths(outputs):
    widths = json.loads((outputs["per-layer"] / "config.json").read_text())["layer_widths"]
    assert len({w["channels"] for w in widths}) > 1


@pytest.mark.parametrize("name", ["uniform", "per-layer"])
@pytest.mark.parametrize("type_", ["f32", "q8_0", "q4_k_m"])
def test_smollm2_in_llama_cpp(outputs, prompt, tmp_path, name, type_):
    llama_cpp()
    result = to_gguf(outputs[name], tmp_path / f"{name}.gguf", type=type_)
    assert result.architecture == {"uniform": "llama", "per-layer": "deci"}[name]
    model = load_pruned(outputs[name], dtype=torch.float32)
    with torch.no_grad():
        expected = model(torch.tensor([prompt])).logits[0].numpy()
    got = logits(result.file, prompt)
    error = float(np.sqrt(((got - expected) ** 2).mean() / (expected**2).mean()))
    print(f"{name} {type_}: relative rms {error:.2e}, {result.bytes / 1e6:.1f} MB")
    assert error < TOLERANCE[type_]
    agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    print(f"{name} {type_}: top-1 agreement {agree:.2f}")
    assert agree >= TOP1_AGREEMENT[type_]
    if n := GREEDY_TOKENS[type_]:
        ids = model.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False)[0, len(prompt) :].tolist()
        assert greedy(result.file, prompt, n) == ids
    if type_ != "f32":  # the default --multiple-of leaves every matrix quantisable
        assert result.unquantised == [] == unquantised_weights(result.file)


def test_llama_cpp_tokenises_as_transformers(outputs, tmp_path):
    """The pre-tokenizer written (identified from tokenizer.json) makes llama.cpp split text as transformers does."""
    file = to_gguf(outputs["uniform"], tmp_path / "m.gguf", type="q8_0").file
    model = llama_cpp().Llama(str(file), vocab_only=True, verbose=False)
    tokenizer = load_tokenizer(outputs["uniform"])
    for text in (TEXT, "Numbers 12345 and 3.14, tabs\tand\nnewlines; émigré café 東京", "  two  spaces"):
        assert model.tokenize(text.encode(), add_bos=False, special=False) == tokenizer(text)["input_ids"], text
    model.close()
