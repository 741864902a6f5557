"""Architecture variants the default tiny specs do not cover (CPU, no network).

1. sliding-window attention (Mistral's sliding_window, Qwen2's per-layer sliding layers): ratio 0
   reproduces the logits, and the streamed perplexity equals the whole in-memory model's;
2. a bf16 checkpoint saved in several shards with an index;
3. a Llama with attention_bias and mlp_bias: every bias is sliced with its heads / channels;
4. evaluation in several chunks of windows equals evaluation in one;
5. the families of issue 12 (Qwen3, Gemma 2, Gemma 3 text; tiny.SPECS), one shared runner: the streamed
   perplexity of the input equals the stock model's (and each family feature arch.py handles changes it, so
   the comparison would catch a missing one), ratio 0 reproduces the dense logits, a 0.5 prune loads stock
   and its stock perplexity equals the streamed one, and an output with compensating biases loads as remote
   code with the same agreement.

The checkpoints here are built from transformers configs directly (tiny.py stays as it is), with
tiny.py's fixed-seed weights and tokenizer.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import tiny
import torch
import torch.nn.functional as F
from helpers import INDEX_NAME, load_model, logits, make_settings, read_shards, some_token_ids
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, LlamaConfig, MistralConfig, Qwen2Config

import rcpu_lite
from rcpu_lite import calibration
from rcpu_lite.evaluate import perplexity as evaluate_module
from rcpu_lite.evaluate.perplexity import perplexity
from rcpu_lite.families import arch
from rcpu_lite.prune.run import prune

SEQLEN = 32
EVAL_WINDOWS = 12  # of SEQLEN tokens: enough to see the masks matter, cheap on a busy CPU


COMMON = dict(
    vocab_size=320,
    hidden_size=64,
    intermediate_size=96,
    max_position_embeddings=256,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=None,
    tie_word_embeddings=False,
)


def sliding_config(family: str, window: int | None, sliding_from: int = 1):
    """A GQA config (8 heads in 2 KV groups, head_dim 8) with a sliding window of `window` tokens, or none.

    Mistral slides in every layer; Qwen2 only in layers >= `sliding_from` (max_window_layers)."""
    shape = dict(num_hidden_layers=3, num_attention_heads=8, num_key_value_heads=2, head_dim=8)
    if family == "mistral":
        return MistralConfig(sliding_window=window, **shape, **COMMON)
    assert family == "qwen2"
    if window is None:
        return Qwen2Config(use_sliding_window=False, **shape, **COMMON)
    return Qwen2Config(
        use_sliding_window=True, sliding_window=window, max_window_layers=sliding_from, **shape, **COMMON
    )


def random_model(config, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tiny._randomise(model, seed, 0.15)
    return model.eval()


def save_checkpoint(out_dir: Path, model: torch.nn.Module, calib_file: Path, **save_kwargs) -> Path:
    model.save_pretrained(out_dir, **save_kwargs)
    tiny.build_tokenizer(calib_file.read_text(encoding="utf-8")).save_pretrained(out_dir)
    return out_dir


def eval_windows(model_dir: Path, text_file: Path, max_windows: int | None = EVAL_WINDOWS) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    tokens = calibration.tokenize(tokenizer, calibration.evaluation_text(text_file))
    return calibration.consecutive_windows(tokens, SEQLEN, max_windows)


@torch.no_grad()
def in_memory_ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    out = model(input_ids=windows, use_cache=False).logits
    nll = F.cross_entropy(out[:, :-1].flatten(0, 1).double(), windows[:, 1:].flatten(), reduction="mean")
    return math.exp(nll.item())


# ---------------------------------------------------------------------------------------------
# 1. sliding-window attention


@pytest.fixture(scope="module")
def sliding_checkpoints(tmp_path_factory, calib_file):
    root = tmp_path_factory.mktemp("sliding")
    made = {}
    for family in ("mistral", "qwen2"):
        config = sliding_config(family, window=8)
        made[family] = save_checkpoint(root / family, random_model(config), calib_file)
    return made


@pytest.mark.parametrize("family", ["mistral", "qwen2"])
def test_sliding_window_ratio_zero_and_streamed_perplexity(sliding_checkpoints, calib_file, tmp_path, family):
    src = sliding_checkpoints[family]
    saved = json.loads((src / "config.json").read_text())
    assert saved["sliding_window"] == 8 < SEQLEN
    if family == "qwen2":  # a mix: layer 0 full attention, layers 1-2 sliding
        assert saved["layer_types"] == ["full_attention", "sliding_attention", "sliding_attention"]

    original = load_model(src)
    windows = eval_windows(src, calib_file)
    want = in_memory_ppl(original, windows)

    # The test means something only if the window changes the numbers on these inputs: the same
    # weights with no window, and (Qwen2) with every layer sliding, give another perplexity.
    variants = [sliding_config(family, window=None)]
    if family == "qwen2":
        variants.append(sliding_config(family, window=8, sliding_from=0))
    for config in variants:
        config._attn_implementation = "sdpa"
        other = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        other.load_state_dict(original.state_dict())
        assert abs(in_memory_ppl(other, windows) / want - 1) > 1e-3, "the sliding window makes no difference here"

    # Streamed evaluation applies each layer's own mask.
    got = perplexity(src, calib_file, seqlen=SEQLEN, max_windows=EVAL_WINDOWS, device="cpu")
    assert got["windows"] == EVAL_WINDOWS
    assert got["ppl"] == pytest.approx(want, rel=1e-5), f"{family}: streamed {got['ppl']} != in-memory {want}"

    # Ratio 0 keeps every unit, and the written config keeps the window (and Qwen2's layer types).
    out = tmp_path / "out"
    prune(src, out, make_settings(calib_file, ratio=0.0, compensate="none", seqlen=SEQLEN))
    written = json.loads((out / "config.json").read_text())
    assert written["model_type"] == family
    assert written["sliding_window"] == 8
    pruned = load_model(out)
    ids = some_token_ids(original.config.vocab_size, seqlen=SEQLEN)
    delta = (logits(original, ids) - logits(pruned, ids)).abs().max().item()
    assert delta <= 1e-4, f"{family}: ratio 0 changed the logits by {delta}"


# ---------------------------------------------------------------------------------------------
# 2. bf16, several shards with an index


def test_bf16_sharded_checkpoint(calib_file, tmp_path):
    spec = tiny.SPECS["qwen2_gqa"]  # GQA with q/k/v biases
    model = tiny.build_model(spec).to(torch.bfloat16)
    src = save_checkpoint(tmp_path / "src", model, calib_file, max_shard_size="50KB")
    assert (src / INDEX_NAME).is_file()
    assert len(list(src.glob("*.safetensors"))) > 1
    source = read_shards(src)
    assert {t.dtype for t in source.values()} == {torch.bfloat16}

    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.5))
    assert report["params_after"] < report["params_before"]

    written = read_shards(out)
    assert set(written) == set(source)
    wrong = {name: t.dtype for name, t in written.items() if t.dtype != torch.bfloat16}
    assert not wrong, f"written tensors are not bf16: {wrong}"
    for name in (
        "model.embed_tokens.weight",
        "model.norm.weight",
        "lm_head.weight",
        "model.layers.0.input_layernorm.weight",
    ):
        assert torch.equal(written[name], source[name]), name

    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    cfg = pruned.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size) == (4, 2, 48)
    out_logits = logits(pruned.float().eval(), some_token_ids(spec.vocab_size, seqlen=SEQLEN))
    assert torch.isfinite(out_logits).all()


# ---------------------------------------------------------------------------------------------
# 3. Llama with attention_bias and mlp_bias


@pytest.fixture(scope="module")
def llama_bias(tmp_path_factory, calib_file):
    config = LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4, attention_bias=True, mlp_bias=True, **COMMON
    )
    return save_checkpoint(tmp_path_factory.mktemp("llama_bias") / "src", random_model(config), calib_file)


def test_llama_with_biases_ratio_zero_reproduces_logits(llama_bias, calib_file, tmp_path):
    out = tmp_path / "out"
    prune(llama_bias, out, make_settings(calib_file, ratio=0.0, compensate="none"))
    original, pruned = load_model(llama_bias), load_model(out)
    ids = some_token_ids(original.config.vocab_size)
    delta = (logits(original, ids) - logits(pruned, ids)).abs().max().item()
    assert delta <= 1e-4, f"ratio 0 changed the logits by {delta}"


def test_llama_with_biases_slices_every_bias(llama_bias, calib_file, tmp_path):
    out = tmp_path / "out"
    report = prune(llama_bias, out, make_settings(calib_file, ratio=0.5))  # 4 -> 2 heads: 64 % 2 == 0
    written_config = json.loads((out / "config.json").read_text())
    assert written_config["model_type"] == "llama"
    assert written_config["attention_bias"] is True and written_config["mlp_bias"] is True

    pruned, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]

    source = read_shards(llama_bias)
    head_dim = 16
    for i, layer_report in enumerate(report["layers"]):
        heads, channels = layer_report["kept_heads"], layer_report["kept_channels"]
        assert len(heads) == 2 and len(channels) == 48
        rows = [h * head_dim + d for h in heads for d in range(head_dim)]
        layer = pruned.model.layers[i]
        p = f"model.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj"):  # MHA: k/v keep the same heads as q
            bias = getattr(layer.self_attn, proj).bias
            assert bias.shape == (2 * head_dim,), proj
            torch.testing.assert_close(bias.detach(), source[p + f"self_attn.{proj}.bias"][rows], rtol=0, atol=0)
        for proj in ("gate_proj", "up_proj"):
            bias = getattr(layer.mlp, proj).bias
            assert bias.shape == (48,), proj
            torch.testing.assert_close(bias.detach(), source[p + f"mlp.{proj}.bias"][channels], rtol=0, atol=0)
        for name, bias in (
            ("self_attn.o_proj.bias", layer.self_attn.o_proj.bias),
            ("mlp.down_proj.bias", layer.mlp.down_proj.bias),
        ):
            assert bias.shape == (64,), name
            torch.testing.assert_close(bias.detach(), source[p + name], rtol=0, atol=0)

    out_logits = logits(pruned.eval(), some_token_ids(pruned.config.vocab_size))
    assert torch.isfinite(out_logits).all()


# ---------------------------------------------------------------------------------------------
# 4. evaluation in chunks of windows


def test_chunked_evaluation_equals_one_chunk(tiny_checkpoint, calib_file, monkeypatch):
    src = tiny_checkpoint("llama_mha")  # hidden 64, 2 layers
    n_windows = 5
    whole = perplexity(src, calib_file, seqlen=SEQLEN, max_windows=n_windows, device="cpu")

    batches = []
    real = evaluate_module.run_layer_batched

    def spy(layer, hidden, *args, **kwargs):
        batches.append(hidden.shape[0])
        return real(layer, hidden, *args, **kwargs)

    monkeypatch.setattr(evaluate_module, "run_layer_batched", spy)
    two_windows = 2 * SEQLEN * 64 * 4 / 2**30  # the fp32 hidden states of 2 windows
    chunked = perplexity(src, calib_file, seqlen=SEQLEN, max_windows=n_windows, device="cpu", max_hidden_gb=two_windows)
    assert batches == [2, 2, 2, 2, 1, 1], f"expected chunks of 2, 2, 1 windows through 2 layers, got {batches}"

    assert chunked["windows"] == whole["windows"] == n_windows
    assert chunked["tokens"] == whole["tokens"] == n_windows * (SEQLEN - 1)
    assert chunked["ppl"] == pytest.approx(whole["ppl"], rel=1e-6)
    assert chunked["nll"] == pytest.approx(whole["nll"], rel=1e-6)


# ---------------------------------------------------------------------------------------------
# 5. Qwen3, Gemma 2, Gemma 3 (text): the shared runner

FAMILY_SPECS = ["qwen3_gqa", "gemma2_gqa", "gemma3_gqa"]
# config.json fields a prune must write back unchanged (those the family's config has)
FAMILY_FIELDS = (
    "model_type",
    "layer_types",
    "sliding_window",
    "query_pre_attn_scalar",
    "attn_logit_softcapping",
    "final_logit_softcapping",
    "rope_parameters",
    "head_dim",
    "tie_word_embeddings",
    "hidden_size",
)


def stock_model(path: Path, **kwargs) -> torch.nn.Module:
    """from_pretrained with the family's default attention (Gemma 2 refuses sdpa: eager)."""
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, **kwargs).eval()


def streamed_ppl(model_dir: Path, calib_file: Path) -> float:
    return perplexity(model_dir, calib_file, seqlen=SEQLEN, max_windows=EVAL_WINDOWS, device="cpu")["ppl"]


def _no_embedding_scale(monkeypatch):
    unscaled = {k: dataclasses.replace(f, scaled_embeddings=False) for k, f in arch.FAMILIES.items()}
    monkeypatch.setattr(arch, "FAMILIES", unscaled)


def _no_final_softcap(monkeypatch):
    monkeypatch.setattr(arch, "lm_logits", lambda config, normed, head: normed @ head.T)


def _full_attention_everywhere(monkeypatch):
    monkeypatch.setattr(arch, "attention_type", lambda config, index: "full_attention")


def _global_rotary_everywhere(monkeypatch):
    real = arch.layer_inputs

    def layer_inputs(*args, **kwargs):
        inputs = real(*args, **kwargs)
        inputs.position_embeddings["sliding_attention"] = inputs.position_embeddings["full_attention"]
        return inputs

    monkeypatch.setattr(arch, "layer_inputs", layer_inputs)


@pytest.mark.parametrize("spec", FAMILY_SPECS)
def test_family_streamed_perplexity_is_the_stock_models(tiny_checkpoint, calib_file, spec):
    src = tiny_checkpoint(spec)
    want = in_memory_ppl(stock_model(src), eval_windows(src, calib_file))
    got = streamed_ppl(src, calib_file)
    assert got == pytest.approx(want, rel=1e-5), f"{spec}: streamed {got} != stock {want}"


@pytest.mark.parametrize(
    "spec, without",
    [
        ("gemma2_gqa", _no_embedding_scale),
        ("gemma2_gqa", _no_final_softcap),
        ("gemma2_gqa", _full_attention_everywhere),
        ("gemma3_gqa", _full_attention_everywhere),
        ("gemma3_gqa", _global_rotary_everywhere),
    ],
)
def test_family_features_change_the_streamed_perplexity(tiny_checkpoint, calib_file, monkeypatch, spec, without):
    """Without each feature the streamed perplexity moves away from the stock one: the tiny specs exercise it."""
    src = tiny_checkpoint(spec)
    want = in_memory_ppl(stock_model(src), eval_windows(src, calib_file))
    without(monkeypatch)
    got = streamed_ppl(src, calib_file)
    assert abs(got / want - 1) > 1e-3, f"{spec}: {without.__name__} makes no difference on the tiny model"


def test_gemma2_attention_softcap_needs_eager(tiny_checkpoint):
    """sdpa refuses soft-capped attention scores; the compute config runs Gemma 2 eager, the others sdpa."""

    def attention(spec: str) -> str:
        return arch.compute_config(AutoConfig.from_pretrained(tiny_checkpoint(spec)))._attn_implementation

    assert attention("gemma2_gqa") == "eager"
    assert attention("qwen3_gqa") == attention("gemma3_gqa") == "sdpa"


@pytest.mark.parametrize("spec", FAMILY_SPECS)
def test_family_ratio_zero_reproduces_dense_logits(tiny_checkpoint, calib_file, tmp_path, spec):
    src = tiny_checkpoint(spec)
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.0, compensate="none", seqlen=SEQLEN))
    assert report["params_after"] == report["params_before"]
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, out))
    for key in FAMILY_FIELDS:
        assert after.get(key) == before.get(key), key
    original, pruned = stock_model(src), stock_model(out)
    ids = some_token_ids(original.config.vocab_size, seqlen=SEQLEN)
    delta = (logits(original, ids) - logits(pruned, ids)).abs().max().item()
    assert delta <= 1e-4, f"{spec}: ratio 0 changed the logits by {delta}"


def assert_clean_load(info: dict) -> None:
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"):
        assert not info[key], f"{key}: {info[key]}"


@pytest.mark.parametrize("spec", FAMILY_SPECS)
def test_family_half_pruned_loads_stock_and_matches_the_stream(tiny_checkpoint, calib_file, tmp_path, spec):
    src = tiny_checkpoint(spec)
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.5, seqlen=SEQLEN))
    assert report["output_format"] == "stock"
    before, after = (json.loads((d / "config.json").read_text()) for d in (src, out))
    for key in FAMILY_FIELDS:  # query_pre_attn_scalar included: the score scale does not follow the head count
        assert after.get(key) == before.get(key), key
    assert (after["num_attention_heads"], after["num_key_value_heads"], after["intermediate_size"]) == (4, 2, 48)

    model, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert_clean_load(info)
    model.eval()
    assert type(model).__name__ == before["architectures"][0]
    loaded, written, source = model.state_dict(), read_shards(out), read_shards(src)
    for name, tensor in written.items():
        assert torch.equal(loaded[name], tensor), f"{name} was not loaded as written"
    for name in written:  # q_norm / k_norm are shared by every head: kept whole, not sliced
        if name.endswith(("q_norm.weight", "k_norm.weight")):
            assert torch.equal(written[name], source[name]), name
    if before["tie_word_embeddings"]:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()

    # The pipeline's own computation of the output (streamed, layer by layer) is the stock model's.
    stock = in_memory_ppl(model, eval_windows(out, calib_file))
    assert math.isfinite(stock)
    assert streamed_ppl(out, calib_file) == pytest.approx(stock, rel=1e-5)
    assert stock != pytest.approx(in_memory_ppl(stock_model(src), eval_windows(src, calib_file)), rel=1e-3)


@pytest.mark.parametrize("spec", FAMILY_SPECS)
def test_family_remote_code_output_matches_the_stream(tiny_checkpoint, calib_file, tmp_path, spec):
    """A compensating o_proj / down_proj bias these classes cannot hold: the remote-code format."""
    src = tiny_checkpoint(spec)
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.5, compensate="rotation+bias", seqlen=SEQLEN))
    assert report["output_format"] == "remote-code"
    model, info = rcpu_lite.load_pruned(out, dtype=torch.float32, output_loading_info=True)
    assert_clean_load(info)
    assert model.model.layers[0].mlp.down_proj.bias is not None
    stock = in_memory_ppl(model.eval(), eval_windows(out, calib_file))
    assert streamed_ppl(out, calib_file) == pytest.approx(stock, rel=1e-5)


def test_gemma_heads_that_do_not_divide_hidden_go_to_remote_code(tiny_checkpoint, calib_file, tmp_path):
    """8 -> 6 heads on hidden 64: Gemma's config refuses that and, unlike Llama, has no stock twin."""
    src = tiny_checkpoint("gemma2_gqa")
    out = tmp_path / "out"
    report = prune(src, out, make_settings(calib_file, ratio=0.25, seqlen=SEQLEN))
    assert report["output_format"] == "remote-code" and report["shape_after"]["num_attention_heads"] == 6
    model, info = rcpu_lite.load_pruned(out, dtype=torch.float32, output_loading_info=True)
    assert_clean_load(info)
    assert model.model.layers[0].self_attn.q_proj.out_features == 6 * 16
    assert streamed_ppl(out, calib_file) == pytest.approx(
        in_memory_ppl(model.eval(), eval_windows(out, calib_file)), rel=1e-5
    )
