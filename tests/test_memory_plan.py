"""The GPU memory plan (pure arithmetic on shapes) and the --max-gpu-memory / --matmul settings."""

from pathlib import Path

import pytest
import torch

from rcpu_lite import memory_plan as mp
from rcpu_lite.families.arch import NAMED_SHAPES, LayerShape, named_layer_shape
from rcpu_lite.runtime import cuda_matmul_precision
from rcpu_lite.settings import PruneSettings, SettingsError

LLAMA_7B = LayerShape(
    hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128, intermediate_size=11008
)
GIB = 2**30


def test_layer_bytes_is_llama_7b_layer_in_fp32():
    # 4 x 4096^2 attention + 3 x 4096 x 11008 MLP = 202.4 M parameters per layer
    assert mp.layer_bytes(LLAMA_7B) == (4 * 4096**2 + 3 * 4096 * 11008 + 2 * 4096) * 4


def test_plan_keeps_hidden_on_gpu_when_it_fits():
    plan = mp.plan(LLAMA_7B, nsamples=128, seqlen=128, budget_bytes=12 * GIB, max_micro_batch=16)
    assert plan.hidden_on_device and plan.micro_batch == 16
    assert plan.hidden_bytes == 128 * 128 * 4096 * 4
    assert plan.fixed_bytes + plan.hidden_bytes + plan.micro_batch * plan.per_window_bytes <= 12 * GIB


def test_plan_long_windows_shrink_the_micro_batch():
    plan = mp.plan(LLAMA_7B, nsamples=128, seqlen=2048, budget_bytes=12 * GIB, max_micro_batch=16)
    assert 1 <= plan.micro_batch < 16
    used = (
        plan.fixed_bytes
        + (plan.hidden_bytes if plan.hidden_on_device else 0)
        + plan.micro_batch * plan.per_window_bytes
    )
    assert used <= 12 * GIB
    # one more window would not have fitted
    assert used + plan.per_window_bytes > 12 * GIB


def test_plan_moves_hidden_to_host_when_it_does_not_fit():
    # 128 x 2048 windows of Llama-7B hidden states are 4 GiB: a 6 GiB budget cannot hold them
    plan = mp.plan(LLAMA_7B, nsamples=128, seqlen=2048, budget_bytes=6 * GIB, max_micro_batch=16)
    assert not plan.hidden_on_device and plan.micro_batch >= 1
    assert plan.fixed_bytes + plan.micro_batch * plan.per_window_bytes <= 6 * GIB


def test_plan_never_exceeds_the_number_of_windows():
    assert mp.plan(LLAMA_7B, nsamples=3, seqlen=128, budget_bytes=40 * GIB, max_micro_batch=16).micro_batch == 3


def test_plan_refuses_a_budget_below_one_layer():
    with pytest.raises(mp.MemoryBudgetError, match="too small.*--device cpu"):
        mp.plan(LLAMA_7B, nsamples=128, seqlen=128, budget_bytes=1 * GIB, max_micro_batch=16)


@pytest.mark.parametrize(
    "text, expected",
    [
        ("10GiB", 10 * GIB),
        ("10G", 10 * GIB),
        ("10GB", 10 * 10**9),
        ("512MiB", 512 * 2**20),
        ("1.5", int(1.5 * GIB)),
        (" 2 gib ", 2 * GIB),
        (3, 3 * GIB),
    ],
)
def test_parse_size(text, expected):
    assert mp.parse_size(text) == expected


@pytest.mark.parametrize("text", ["ten", "10TB", "-1GiB", "0", "GiB", ""])
def test_parse_size_rejects(text):
    with pytest.raises(mp.MemoryBudgetError):
        mp.parse_size(text)


def test_settings_validate_gpu_options():
    assert PruneSettings(max_gpu_memory="10GiB", matmul="tf32").validate()
    with pytest.raises(SettingsError, match="--max-gpu-memory"):
        PruneSettings(max_gpu_memory="lots").validate()
    with pytest.raises(SettingsError, match="--matmul"):
        PruneSettings(matmul="bf16").validate()


def test_cuda_matmul_precision_restores_the_previous_setting():
    before = torch.backends.cuda.matmul.fp32_precision
    with cuda_matmul_precision("tf32"):
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
        with cuda_matmul_precision("ieee"):  # what the statistics use inside a TF32 forward pass
            assert torch.backends.cuda.matmul.fp32_precision == "ieee"
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    assert torch.backends.cuda.matmul.fp32_precision == before


def test_statistics_accumulate_in_ieee_fp32_inside_a_tf32_block(monkeypatch):
    from rcpu_lite.methods.stats import InputStats

    seen = []
    stats = InputStats(4)
    real = torch.Tensor.addmm_

    def spy(self, *args, **kwargs):
        seen.append(torch.backends.cuda.matmul.fp32_precision)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "addmm_", spy)
    with cuda_matmul_precision("tf32"):
        stats.update(torch.randn(5, 4))
    assert seen == ["ieee"]


# ---------------------------------------------------------------------------------------------
# the 70B plan (docs/scaling.md, "Large models"): per-rank memory of a data-parallel run, and work per layer

LLAMA_2_70B = named_layer_shape("llama-2-70b")
SCALING_DOC = Path(__file__).resolve().parents[1] / "docs" / "scaling.md"


def test_70b_shapes_come_from_the_registry():
    assert LLAMA_2_70B == named_layer_shape("llama-3-70b") == LayerShape(8192, 64, 8, 128, 28672)
    assert NAMED_SHAPES["llama-2-70b"]["vocab_size"] == 32000 and NAMED_SHAPES["llama-3-70b"]["vocab_size"] == 128256
    assert NAMED_SHAPES["llama-2-70b"]["num_hidden_layers"] == NAMED_SHAPES["llama-3-70b"]["num_hidden_layers"] == 80
    with pytest.raises(ValueError, match="unknown shape"):
        named_layer_shape("llama-4")


def test_70b_grams_are_d_in_squared_fp32():
    grams = mp.gram_bytes(LLAMA_2_70B)
    assert grams == {"o_proj": 4 * 8192**2, "down_proj": 4 * 28672**2}
    assert grams["down_proj"] == 3_288_334_336  # 3.3 GB for the down_proj Gram alone
    assert (
        mp.fixed_bytes(LLAMA_2_70B)
        == mp.layer_bytes(LLAMA_2_70B) + sum(grams.values()) + (2 * 28672 * 8192 + 1024 * 28672 + 2 * 8192**2) * 4
    )


def test_decomposition_on_the_gpu_adds_its_fp64_working_set():
    assert mp.fixed_bytes(LLAMA_2_70B, decomposition_on_gpu=True) - mp.fixed_bytes(LLAMA_2_70B) == 5 * 8 * 8192**2
    cpu = mp.plan(LLAMA_7B, 128, 2048, 12 * GIB, 16)
    gpu = mp.plan(LLAMA_7B, 128, 2048, 12 * GIB, 16, decomposition_on_gpu=True)
    assert gpu.fixed_bytes > cpu.fixed_bytes and gpu.micro_batch <= cpu.micro_batch and gpu.peak_bytes <= 12 * GIB


@pytest.mark.parametrize("ranks", [1, 2, 4, 8])
def test_cluster_plan_splits_the_streams_over_ranks(ranks):
    one, p = (mp.cluster_plan(LLAMA_2_70B, 512, 2048, r, 24 * GIB) for r in (1, ranks))
    assert p.windows_per_rank == 512 // ranks
    assert p.stream_bytes == one.stream_bytes // ranks == 512 // ranks * 2048 * 8192 * 4
    assert p.fixed_bytes == one.fixed_bytes  # every rank holds the layer and both Grams
    assert p.budget_bytes == int(0.9 * 24 * GIB)
    assert p.allreduce_bytes == 2 * (ranks - 1) * (4 * 8192**2 + 4 * 28672**2) // ranks
    assert p.work == one.work  # the work of the layer, whoever does it


@pytest.mark.parametrize(
    "nsamples, seqlen, ranks, gib, fits, on_gpu, micro_batch",
    [
        (128, 128, 1, 12, True, True, 16),
        (512, 2048, 1, 12, False, None, None),  # one layer + Grams (8.9 GiB) + one 2048-token window (2.1) > 10.8
        (512, 2048, 1, 24, True, False, 6),  # 32 GiB of streams: pinned host memory
        (512, 2048, 4, 24, True, True, 2),  # 8 GiB per rank: on the GPU
    ],
)
def test_cluster_plan_verdicts(nsamples, seqlen, ranks, gib, fits, on_gpu, micro_batch):
    p = mp.cluster_plan(LLAMA_2_70B, nsamples, seqlen, ranks, gib * GIB)
    assert p.fits is fits
    if fits:
        assert p.memory.hidden_on_device is on_gpu and p.memory.micro_batch == micro_batch
        assert p.memory.peak_bytes <= p.budget_bytes
        assert p.memory.peak_bytes + p.per_window_bytes > p.budget_bytes or p.memory.micro_batch == 16


def test_layer_work_formulas():
    tokens, h, q, f = 128 * 128, 8192, 64 * 128, 28672
    w = mp.layer_work(LLAMA_2_70B, 128, 128, ratio=0.2)
    linear = h * (2 * q + 2 * 8 * 128) + 3 * h * f
    assert w.forward == 2 * (2 * tokens * linear + 4 * tokens * 128 * q)
    assert w.grams == 2 * tokens * (q * q + f * f)
    assert w.decomposition == 2 * 15 * h**3
    k_o, k_down = 56 * 128, f - int(0.2 * f)  # GQA: 8 heads go, one from each KV group
    assert w.compensation == sum(
        2 * h * d * (k + h) + 2 * h * (d - k) ** 2 + 2 * h * h * k for d, k in ((q, k_o), (f, k_down))
    )
    long = mp.layer_work(LLAMA_2_70B, 512, 2048)
    assert long.grams == 512 * 2048 // tokens * w.grams and long.decomposition == w.decomposition


def test_the_readme_plan_is_the_generated_one(capsys):
    mp.main(["--table"])
    printed = capsys.readouterr().out
    assert printed == mp.render_tables()
    text = SCALING_DOC.read_text(encoding="utf-8")
    assert "    python -m rcpu_lite.memory_plan --table\n" in text
    assert printed in text, "docs/scaling.md's 70B plan differs from `python -m rcpu_lite.memory_plan --table`"
