"""The per-layer-width ("remote code") output format, its loaders, and its perplexity.

Outputs are built here without the pipeline: the layers of a tiny checkpoint are sliced by hand to
different widths (GQA keeps the same query heads per kept group), optionally given o_proj / down_proj
biases, and written with ShardWriter, remote.config_json and remote.install_code. The reference is a
plain model assembled by hand from the same tensors: transformers' own decoder layers, each built with
its own config, between the embeddings and the final norm and head.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from remote_output import (  # noqa: E402,F401
    CASES,
    PROJECTIONS,
    SEQLEN,
    W,
    assert_clean_load,
    kept_units,
    model_logits,
    reference_logits,
    slice_layer,
    token_ids,
    write_output,
)
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import rcpu_lite
from rcpu_lite import calibration
from rcpu_lite.evaluate.perplexity import perplexity
from rcpu_lite.families import arch
from rcpu_lite.output import remote


@pytest.fixture(scope="module", params=list(CASES))
def output(request, tiny_checkpoint, tmp_path_factory):
    spec, overrides, widths, biases = CASES[request.param]
    src = tiny_checkpoint(spec, **overrides)
    out = tmp_path_factory.mktemp(request.param) / "out"
    layers = write_output(src, out, widths, biases)
    ids = token_ids(AutoConfig.from_pretrained(src).vocab_size)
    return {
        "src": src,
        "out": out,
        "widths": widths,
        "biases": biases,
        "ids": ids,
        "reference": reference_logits(src, widths, layers, ids),
    }


# ---------------------------------------------------------------------------------------------


def test_reference_is_the_stock_model_at_full_width(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint("qwen2_gqa")
    config = AutoConfig.from_pretrained(src)
    full = [W(config.num_attention_heads, config.num_key_value_heads, config.intermediate_size)] * 2
    layers = write_output(src, tmp_path / "out", full, set())
    ids = token_ids(config.vocab_size)
    stock = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
    delta = (reference_logits(src, full, layers, ids) - model_logits(stock, ids)).abs().max().item()
    assert delta <= 1e-4


def test_config_json_contract(output):
    written = json.loads((output["out"] / "config.json").read_text())
    src = json.loads((output["src"] / "config.json").read_text())
    base = src["model_type"]
    family = arch.FAMILIES[base].class_prefix
    assert written["model_type"] == base and written["base_model_type"] == base
    assert written["architectures"] == [f"Pruned{family}ForCausalLM"]
    assert written["auto_map"] == {
        "AutoConfig": f"modeling_rcpu.Pruned{family}Config",
        "AutoModelForCausalLM": f"modeling_rcpu.Pruned{family}ForCausalLM",
    }
    for key in (
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
        "hidden_size",
        "vocab_size",
        "tie_word_embeddings",
    ):
        assert written[key] == src[key]
    assert written["head_dim"] == arch.layer_shape(AutoConfig.from_pretrained(output["src"])).head_dim
    assert written["layer_widths"] == [
        {"heads": w.heads, "kv_heads": w.kv_heads, "channels": w.channels} for w in output["widths"]
    ]
    assert written["o_proj_bias"] == ("o_proj" in output["biases"])
    assert written["down_proj_bias"] == ("down_proj" in output["biases"])
    code = (output["out"] / "modeling_rcpu.py").read_text()
    imports = [line.split()[1] for line in code.splitlines() if line.startswith(("import ", "from "))]
    assert {m.split(".")[0] for m in imports} <= {"copy", "torch", "transformers"}  # self-contained


def test_trust_remote_code_loads_and_reproduces_logits(output):
    model, info = AutoModelForCausalLM.from_pretrained(
        output["out"], trust_remote_code=True, dtype=torch.float32, output_loading_info=True
    )
    assert_clean_load(info)
    assert type(model).__name__.startswith("Pruned")
    delta = (model_logits(model, output["ids"]) - output["reference"]).abs().max().item()
    assert delta <= 1e-4, f"trust_remote_code model differs from the reference by {delta}"

    # generation with the (dynamic) KV cache gives what recomputing every step gives
    prompt = output["ids"][:1, :6]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, min_new_tokens=4, use_cache=False)
    assert cached.shape == (1, 10) and torch.equal(cached, uncached)


def test_load_pruned_reproduces_logits_without_remote_code(output, tmp_path):
    model, info = rcpu_lite.load_pruned(output["out"], dtype=torch.float32, output_loading_info=True)
    assert_clean_load(info)
    assert (
        type(model).__module__ == "rcpu_lite.output.modeling_rcpu"
    )  # rcpu-lite's own copy, not the one beside the weights
    delta = (model_logits(model, output["ids"]) - output["reference"]).abs().max().item()
    assert delta <= 1e-4, f"load_pruned model differs from the reference by {delta}"

    # the layers follow a change of attention implementation (they hold their own config copies)
    model.set_attn_implementation("eager")
    assert all(layer.self_attn.config._attn_implementation == "eager" for layer in model.model.layers)
    delta = (model_logits(model, output["ids"]) - output["reference"]).abs().max().item()
    assert delta <= 1e-4

    # save_pretrained keeps the format: the code file is copied and auto_map kept
    model.save_pretrained(tmp_path / "resaved")
    assert (tmp_path / "resaved" / "modeling_rcpu.py").is_file()
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "resaved", trust_remote_code=True, dtype=torch.float32)
    assert (model_logits(again, output["ids"]) - output["reference"]).abs().max().item() <= 1e-4


def test_perplexity_equals_the_loaded_models(output, calib_file):
    got = perplexity(output["out"], calib_file, seqlen=SEQLEN, max_windows=5, device="cpu", micro_batch=2)
    tokenizer = AutoTokenizer.from_pretrained(output["out"])
    windows = calibration.consecutive_windows(
        calibration.tokenize(tokenizer, calibration.evaluation_text(calib_file)), SEQLEN, 5
    )
    model = rcpu_lite.load_pruned(output["out"], dtype=torch.float32)
    logits = model_logits(model, windows)
    nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), windows[:, 1:].reshape(-1))
    assert got["windows"] == 5 and got["tokens"] == 5 * (SEQLEN - 1)
    assert got["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-4)


def test_layer_configs(output):
    config, layers = remote.layer_configs(output["out"])
    base = json.loads((output["src"] / "config.json").read_text())["model_type"]
    assert config.model_type == base and config._attn_implementation == "sdpa" and not config.use_cache
    assert [(c.num_attention_heads, c.num_key_value_heads, c.intermediate_size) for c in layers] == [
        (w.heads, w.kv_heads, w.channels) for w in output["widths"]
    ]
    assert all(type(c) is type(config) and c.head_dim == config.head_dim for c in layers)
    names = remote.layer_tensor_names(layers[0])
    assert ("self_attn.o_proj.bias" in names) == ("o_proj" in output["biases"])
    assert ("mlp.down_proj.bias" in names) == ("down_proj" in output["biases"])


def test_layer_configs_of_a_plain_checkpoint(tiny_checkpoint):
    src = tiny_checkpoint("mistral_gqa")
    config, layers = remote.layer_configs(src)
    assert config.model_type == "mistral" and config._attn_implementation == "sdpa"
    assert len(layers) == config.num_hidden_layers and all(c is config for c in layers)
    assert remote.layer_tensor_names(config) == arch.layer_tensor_names(config)


def test_load_pruned_on_a_uniform_plain_output(tiny_checkpoint, tmp_path, calib_file):
    src = tiny_checkpoint("llama_gqa")
    widths = [W(4, 2, 64)] * 2
    layers = write_output(src, tmp_path / "out", widths, set(), remote_format=False)
    model, info = rcpu_lite.load_pruned(tmp_path / "out", dtype=torch.float32, output_loading_info=True)
    assert_clean_load(info)
    assert type(model).__name__ == "LlamaForCausalLM"
    ids = token_ids(model.config.vocab_size)
    delta = (model_logits(model, ids) - reference_logits(src, widths, layers, ids)).abs().max().item()
    assert delta <= 1e-4
    # the same through stock loading
    stock = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32)
    assert torch.allclose(model_logits(stock, ids), model_logits(model, ids), atol=1e-6)


def test_config_json_refuses_what_it_cannot_describe(tiny_checkpoint):
    raw = json.loads((tiny_checkpoint("llama_gqa") / "config.json").read_text())
    good = [W(8, 2, 96)] * 2
    with pytest.raises(ValueError, match="2 layers"):
        remote.config_json(raw, good[:1], 8, frozenset())
    with pytest.raises(ValueError, match="multiple"):
        remote.config_json(raw, [W(3, 2, 96), W(8, 2, 96)], 8, frozenset())
    with pytest.raises(ValueError, match="q_proj"):
        remote.config_json(raw, good, 8, frozenset({"q_proj"}))
    with pytest.raises(arch.UnsupportedModel):
        remote.config_json(dict(raw, model_type="gemma"), good, 8, frozenset())
    # a remote config as input (pruning a pruned model) keeps its base family
    again = remote.config_json(remote.config_json(raw, good, 8, frozenset({"o_proj"})), good, 8, frozenset())
    assert again["base_model_type"] == "llama" and again["o_proj_bias"] is False


def test_perplexity_refuses_layers_that_do_not_match_config(tiny_checkpoint, tmp_path, calib_file):
    src = tiny_checkpoint("llama_mha")
    out = tmp_path / "out"
    write_output(src, out, [W(3, 3, 80), W(2, 2, 50)], set())
    # per-layer widths under a plain config.json: refused before any layer runs, in one line
    (out / "config.json").write_text((src / "config.json").read_text())
    with pytest.raises(ValueError, match="do not match its config.json") as e:
        perplexity(out, calib_file, seqlen=SEQLEN, max_windows=2, device="cpu")
    assert "\n" not in str(e.value)
    # an unknown base family
    config = remote.config_json(
        json.loads((src / "config.json").read_text()), [W(3, 3, 80), W(2, 2, 50)], 16, frozenset()
    )
    (out / "config.json").write_text(json.dumps(dict(config, base_model_type="gemma")))
    with pytest.raises(ValueError, match="base_model_type 'gemma'") as e:
        perplexity(out, calib_file, seqlen=SEQLEN, max_windows=2, device="cpu")
    assert "\n" not in str(e.value)
    # widths the family's layers cannot have
    bad = dict(config, layer_widths=[{"heads": 3, "kv_heads": 2, "channels": 80}, config["layer_widths"][1]])
    (out / "config.json").write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="layer 0: 3 heads, 2 KV heads, 80 channels is not a valid layer"):
        perplexity(out, calib_file, seqlen=SEQLEN, max_windows=2, device="cpu")
    # transformers' per_layer_config, which the layer-by-layer evaluation would ignore
    (out / "config.json").write_text(
        json.dumps(
            dict(json.loads((src / "config.json").read_text()), per_layer_config={"0": {"intermediate_size": 80}})
        )
    )
    with pytest.raises(ValueError, match="per_layer_config"):
        perplexity(out, calib_file, seqlen=SEQLEN, max_windows=2, device="cpu")


def test_tokenizer_and_config_load_with_no_remote_code_and_no_question(output):
    """config.json's model_type is the base family's: AutoTokenizer (which reads the config first) and AutoConfig
    load in a process with no terminal and trust_remote_code unset, and never print transformers' question."""
    import subprocess
    import sys

    script = (
        "import sys\n"
        "from transformers import AutoConfig, AutoTokenizer\n"
        "tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])\n"
        "config = AutoConfig.from_pretrained(sys.argv[1])\n"
        "print(len(tokenizer), config.model_type)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(output["out"])],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert "custom code" not in proc.stdout + proc.stderr and "trust_remote_code" not in proc.stdout + proc.stderr
    base = json.loads((output["src"] / "config.json").read_text())["model_type"]
    assert proc.stdout.split()[-1] == base


def test_stock_class_refuses_per_layer_widths_loudly(output):
    """Without trust_remote_code the stock class is built at the global widths: transformers refuses the shapes
    instead of loading a wrong model (every case here has layers of different widths)."""
    assert len(set(output["widths"])) > 1
    with pytest.raises(RuntimeError, match="mismatch"):
        AutoModelForCausalLM.from_pretrained(output["out"])
