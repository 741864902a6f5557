"""Running a GGUF file in real llama.cpp (through llama-cpp-python) for the export tests."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest


def llama_cpp():
    """llama-cpp-python (tools/setup_llama_cpp.sh); a local run without it skips, CI (RCPU_REQUIRE_LLAMA_CPP=1)
    fails."""
    if os.environ.get("RCPU_REQUIRE_LLAMA_CPP"):
        import llama_cpp as module
    else:
        module = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (the gguf extra)")
    return module


def load(file: Path, f32_cache: bool = True):
    """The model in `file`, with every position's logits kept; an f32 KV cache (llama.cpp's default is f16)
    where a test compares against transformers' fp32 to within float rounding."""
    module = llama_cpp()
    kwargs = dict(type_k=0, type_v=0) if f32_cache else {}  # GGML_TYPE_F32
    return module.Llama(str(file), n_ctx=128, logits_all=True, n_threads=1, verbose=False, seed=0, **kwargs)


def logits(file: Path, ids: list[int], f32_cache: bool = True) -> np.ndarray:
    """llama.cpp's logits at every position of `ids` (one forward pass)."""
    model = load(file, f32_cache)
    try:
        model.eval(ids)
        return np.array(model.scores[: len(ids)], dtype=np.float32)
    finally:
        model.close()


def greedy(file: Path, ids: list[int], n: int) -> list[int]:
    """llama.cpp's first `n` greedy tokens after `ids`."""
    model = load(file, f32_cache=True)
    try:
        out = []
        for token in model.generate(ids, temp=0.0, top_k=1, reset=True):
            out.append(int(token))
            if len(out) == n:
                break
        return out
    finally:
        model.close()


def converter_source() -> Path:
    """llama.cpp's own converter (convert_hf_to_gguf.py, conversion/, gguf-py/), from the llama-cpp-python source
    package that tools/setup_llama_cpp.sh unpacks into .llama.cpp/ (or $RCPU_LLAMA_CPP_SOURCE); a local run
    without it skips, CI (RCPU_REQUIRE_LLAMA_CPP=1) fails."""
    unpacked = Path(__file__).resolve().parents[1] / ".llama.cpp/llama_cpp_python-0.3.36/vendor/llama.cpp"
    source = os.environ.get("RCPU_LLAMA_CPP_SOURCE", str(unpacked))
    if source and (Path(source) / "convert_hf_to_gguf.py").is_file():
        return Path(source)
    if os.environ.get("RCPU_REQUIRE_LLAMA_CPP"):
        raise RuntimeError(
            f"RCPU_LLAMA_CPP_SOURCE={source!r} holds no convert_hf_to_gguf.py: run tools/setup_llama_cpp.sh"
        )
    pytest.skip("llama.cpp's converter is not unpacked (run tools/setup_llama_cpp.sh)")


# Runs the converter with two changes that only touch the vocabulary, which the reference check does not compare:
# a tokenizer its hash table does not know is taken as GPT-2's splitting, and Llama's vocabulary is read as
# byte-level BPE directly (it tries sentencepiece first, which the tests do not install).
_CONVERT = """
import runpy, sys
source, model, outfile = sys.argv[1:4]
sys.path[:0] = [source, source + "/gguf-py"]
import conversion.base, conversion.llama
conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
conversion.llama.LlamaModel.set_vocab = lambda self: self._set_vocab_gpt2()
sys.argv = ["convert_hf_to_gguf.py", model, "--outfile", outfile, "--outtype", "f32"]
runpy.run_path(source + "/convert_hf_to_gguf.py", run_name="__main__")
"""


def convert_with_llama_cpp(model_dir: Path, outfile: Path) -> Path:
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-c", _CONVERT, str(converter_source()), str(model_dir), str(outfile)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return outfile
