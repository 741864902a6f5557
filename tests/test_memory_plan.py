"""The GPU memory plan (pure arithmetic on shapes) and the --max-gpu-memory / --matmul settings."""
import pytest
import torch

from rcpu_lite import memory_plan as mp
from rcpu_lite.arch import LayerShape
from rcpu_lite.config import PruneSettings, SettingsError
from rcpu_lite.runtime import cuda_matmul_precision

LLAMA_7B = LayerShape(hidden_size=4096, num_attention_heads=32, num_key_value_heads=32, head_dim=128,
                      intermediate_size=11008)
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
    used = plan.fixed_bytes + (plan.hidden_bytes if plan.hidden_on_device else 0) + plan.micro_batch * plan.per_window_bytes
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


@pytest.mark.parametrize("text, expected", [("10GiB", 10 * GIB), ("10G", 10 * GIB), ("10GB", 10 * 10**9),
                                            ("512MiB", 512 * 2**20), ("1.5", int(1.5 * GIB)), (" 2 gib ", 2 * GIB),
                                            (3, 3 * GIB)])
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
    from rcpu_lite.stats import InputStats

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
