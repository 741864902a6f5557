"""`rcpu-lite generate` and rcpu_lite.generate: greedy output is model.generate's, on plain checkpoints and on
pruned outputs with per-layer widths; chat templates; the command line streams the text."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from remote_output import write_output
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import rcpu_lite
from rcpu_lite.cli import app
from rcpu_lite.evaluate.generate import generate, prompt_ids
from rcpu_lite.methods.allocation import LayerWidths as W
from rcpu_lite.output import remote

PROMPT = "The game was released in Japan"
N = 12
runner = CliRunner()


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return tiny_checkpoint("llama_gqa")


@pytest.fixture(scope="module")
def pruned(tiny_checkpoint, tmp_path_factory):
    """A remote-code output: layers of different widths and an o_proj bias, with the tokenizer beside it."""
    out = tmp_path_factory.mktemp("generate") / "pruned"
    write_output(tiny_checkpoint("llama_gqa"), out, [W(6, 2, 70), W(2, 1, 40)], {"o_proj"})
    return out


def reference_ids(model, ids: torch.Tensor) -> list[int]:
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=N)
    return out[0, ids.shape[1] :].tolist()


def test_greedy_is_model_generate_and_deterministic(plain):
    first = generate(plain, PROMPT, max_new_tokens=N, device="cpu")
    again = generate(plain, PROMPT, max_new_tokens=N, device="cpu")
    assert first == again
    tokenizer = AutoTokenizer.from_pretrained(plain)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]  # the tiny tokenizer has no chat template
    assert first.prompt_ids == ids[0].tolist()
    model = AutoModelForCausalLM.from_pretrained(plain, dtype=torch.float32).eval()
    assert first.new_ids == reference_ids(model, ids)
    assert 0 < len(first.new_ids) <= N
    assert first.text == tokenizer.decode(first.new_ids, skip_special_tokens=True)


def test_greedy_on_a_pruned_output_with_per_layer_widths(pruned):
    assert remote.is_remote(json.loads((pruned / "config.json").read_text()))
    result = generate(pruned, PROMPT, max_new_tokens=N, device="cpu")
    model = rcpu_lite.load_pruned(pruned, dtype=torch.float32).eval()
    ids = torch.tensor([result.prompt_ids])
    assert result.new_ids == reference_ids(model, ids)


def test_sampling_repeats_with_a_seed(plain):
    one = generate(plain, PROMPT, max_new_tokens=N, temperature=1.5, seed=7, device="cpu")
    two = generate(plain, PROMPT, max_new_tokens=N, temperature=1.5, seed=7, device="cpu")
    assert one.new_ids == two.new_ids


def test_chat_template_wraps_the_prompt_unless_no_chat(plain, tmp_path):
    chat_model = shutil.copytree(plain, tmp_path / "chat")
    config_file = chat_model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["chat_template"] = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant:{% endif %}"
    )
    config_file.write_text(json.dumps(config))
    tokenizer = AutoTokenizer.from_pretrained(chat_model)
    templated = tokenizer("<s>user: " + PROMPT + "</s><s>assistant:", add_special_tokens=False)["input_ids"]
    assert prompt_ids(tokenizer, PROMPT).tolist() == [templated]
    assert prompt_ids(tokenizer, PROMPT, chat=False).tolist() == [tokenizer(PROMPT)["input_ids"]]
    assert generate(chat_model, PROMPT, max_new_tokens=2, device="cpu").prompt_ids == templated


def test_command_line_prints_the_text(plain):
    expected = generate(plain, PROMPT, max_new_tokens=N, device="cpu")
    result = runner.invoke(app, ["generate", str(plain), PROMPT, "--max-new-tokens", str(N), "--device", "cpu", "-q"])
    assert result.exit_code == 0, result.output
    assert result.stdout.split() == expected.text.split()  # the streamer's spacing may differ at piece joins


def test_command_line_on_a_pruned_output(pruned):
    result = runner.invoke(app, ["generate", str(pruned), PROMPT, "--max-new-tokens", "4", "--no-chat", "-q"])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize(
    "args, words",
    [
        (["--max-new-tokens", "0"], "--max-new-tokens"),
        (["--temperature", "-1"], "--temperature"),
        (["--device", "tpu"], "--device"),
    ],
)
def test_bad_options_are_one_line(plain, args, words):
    result = runner.invoke(app, ["generate", str(plain), PROMPT, *args])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and words in lines[0], result.stderr
