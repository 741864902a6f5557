"""Self-generated calibration windows (rcpu_lite.selfgen) on a tiny random checkpoint."""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from rcpu_lite import selfgen
from rcpu_lite.cli import app
from rcpu_lite.models import load_tokenizer

N, SEQLEN, GREEDY = 6, 16, 5


@pytest.fixture(scope="module")
def model_dir(tiny_checkpoint):
    return tiny_checkpoint("llama_gqa")


@pytest.fixture(scope="module")
def windows(model_dir):
    return selfgen.generate_windows(model_dir, N, SEQLEN, seed=0, greedy_tokens=GREEDY, micro_batch=4)


def _ordinary(tokenizer, vocab: int) -> torch.Tensor:
    """The ids a window may hold, written out independently of selfgen."""
    ok = torch.arange(vocab) < len(tokenizer)
    ok[tokenizer.all_special_ids] = False
    return ok


def test_windows_have_the_shape_and_only_ordinary_tokens(model_dir, windows):
    tokenizer = load_tokenizer(model_dir)
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert windows.shape == (N, SEQLEN) and windows.dtype == torch.long
    assert 0 <= windows.min() and windows.max() < min(vocab, len(tokenizer))
    assert _ordinary(tokenizer, vocab)[windows].all()  # no EOS or other special token anywhere
    for start in windows[:, 0].tolist():
        text = tokenizer.decode([start]).strip()
        assert text.isascii() and text.isalpha() and start not in tokenizer.all_special_ids


def test_greedy_prefix_follows_the_model(model_dir, windows):
    from transformers import AutoModelForCausalLM

    tokenizer = load_tokenizer(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ok = _ordinary(tokenizer, model.config.vocab_size)
    greedy = windows[:, :1]
    with torch.no_grad():
        for _ in range(SEQLEN - 1):
            logits = model(greedy).logits[:, -1].masked_fill(~ok, float("-inf"))
            greedy = torch.cat([greedy, logits.argmax(-1, keepdim=True)], dim=1)
    assert torch.equal(windows[:, : GREEDY + 1], greedy[:, : GREEDY + 1])
    assert not torch.equal(windows, greedy)  # after the greedy prefix it samples


def test_same_seed_same_windows_whatever_the_micro_batch(model_dir, windows):
    again = selfgen.generate_windows(model_dir, N, SEQLEN, seed=0, greedy_tokens=GREEDY, micro_batch=3)
    assert torch.equal(again, windows)
    other = selfgen.generate_windows(model_dir, N, SEQLEN, seed=1, greedy_tokens=GREEDY, micro_batch=4)
    assert not torch.equal(other, windows)


def test_cache_round_trips_and_second_call_does_not_generate(model_dir, tmp_path, monkeypatch):
    calls = []
    real = selfgen.generate_windows

    def counting(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(selfgen, "generate_windows", counting)
    monkeypatch.setenv("RCPU_LITE_CACHE", str(tmp_path))
    first, path = selfgen.cached_windows(model_dir, 4, SEQLEN, 7, device="cpu", micro_batch=2)
    assert path.parent == tmp_path / "selfgen" and path.suffix == ".jsonl" and len(calls) == 1
    second, path2 = selfgen.cached_windows(model_dir, 4, SEQLEN, 7, device="cpu", micro_batch=3)
    assert path2 == path and len(calls) == 1 and torch.equal(first, second)
    assert torch.equal(selfgen.self_generated(model_dir, 4, SEQLEN, 7), first) and len(calls) == 1
    # Another setting is another file.
    selfgen.cached_windows(model_dir, 4, SEQLEN, 7, temperature=0.5, device="cpu")
    assert len(calls) == 2 and len(list((tmp_path / "selfgen").glob("*.jsonl"))) == 2
    assert not list((tmp_path / "selfgen").glob("*.tmp"))
    # A damaged file is generated again, not trusted.
    text = path.read_text(encoding="utf-8")
    path.write_text(text[: len(text) // 2], encoding="utf-8")
    third, _ = selfgen.cached_windows(model_dir, 4, SEQLEN, 7, device="cpu")
    assert len(calls) == 3 and torch.equal(third, first)
    assert path.read_text(encoding="utf-8").splitlines()[1:] == text.splitlines()[1:]

    lines = path.read_text(encoding="utf-8").splitlines()
    header, rows = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["settings"] == {
        "n": 4,
        "seqlen": SEQLEN,
        "seed": 7,
        "greedy_tokens": 5,
        "temperature": 1.0,
        "quant": "none",
    }
    assert header["model_dir"] == str(model_dir.resolve())
    tokenizer = load_tokenizer(model_dir)
    assert [r["ids"] for r in rows] == first.tolist()
    assert [r["text"] for r in rows] == [tokenizer.decode(w) for w in first.tolist()]


def test_calib_show_prints_the_header_and_windows(model_dir, tmp_path):
    windows, path = selfgen.cached_windows(model_dir, 3, SEQLEN, 0, device="cpu", cache_dir=tmp_path)
    texts = [json.loads(line)["text"] for line in path.read_text(encoding="utf-8").splitlines()[1:]]
    result = CliRunner().invoke(app, ["calib", "show", str(path), "--max", "2"])
    assert result.exit_code == 0, result.output
    assert '"seqlen": 16' in result.stdout and str(model_dir.resolve()) in result.stdout
    assert texts[0] in result.stdout and texts[1] in result.stdout and "1 more window" in result.stdout
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "not a header"}\n')
    result = CliRunner().invoke(app, ["calib", "show", str(bad)])
    assert result.exit_code == 2 and "not a readable self-generated calibration file" in result.output


def test_memory_refusal_gives_the_numbers(model_dir, monkeypatch):
    monkeypatch.setattr(selfgen, "available_memory_bytes", lambda device: 100 * 2**20)
    monkeypatch.setattr(selfgen, "_load_model", lambda *a: pytest.fail("loaded despite the memory check"))
    need = selfgen.generation_memory_bytes(model_dir, "cpu", "none", seqlen=SEQLEN, micro_batch=2)
    with pytest.raises(selfgen.SelfGenError) as err:
        selfgen.generate_windows(model_dir, 2, SEQLEN, 0, device="cpu", micro_batch=2)
    message = str(err.value)
    assert "\n" not in message and f"{need / 2**30:.1f} GiB" in message and "0.1 GiB" in message
    assert "--gen-quant 4bit" in message


def test_memory_estimate_follows_the_parameters(model_dir):
    from safetensors.torch import load_file

    params = sum(t.numel() for t in load_file(model_dir / "model.safetensors").values())
    full = selfgen.generation_memory_bytes(model_dir, "cpu", "none", seqlen=SEQLEN, micro_batch=1)
    four = selfgen.generation_memory_bytes(model_dir, "cuda", "4bit", seqlen=SEQLEN, micro_batch=1)
    assert full >= params * 4 * 1.1 and four < full


def test_4bit_on_cpu_and_windows_past_the_context_refuse_clearly(model_dir):
    with pytest.raises(selfgen.SelfGenError, match="--gen-quant 4bit needs a CUDA GPU"):
        selfgen.generate_windows(model_dir, 2, SEQLEN, 0, device="cpu", quant="4bit")
    with pytest.raises(selfgen.SelfGenError, match="the model's context is 256"):
        selfgen.generate_windows(model_dir, 2, 257, 0, device="cpu")
    with pytest.raises(selfgen.SelfGenError, match="--gen-quant must be one of none, 4bit"):
        selfgen.generate_windows(model_dir, 2, SEQLEN, 0, device="cpu", quant="8bit")
