"""rcpu_lite.runtime: the stored-to-compute copy of a layer, and where the decomposition runs."""

import pytest
import torch

from rcpu_lite.output.manifest import RUNTIME_SETTINGS
from rcpu_lite.runtime import decomposition_device, to_compute
from rcpu_lite.settings import PruneSettings, SettingsError


def _stored_layer() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "q_proj.weight": torch.randn(8, 8, generator=g).half(),
        "down_proj.weight": torch.randn(8, 16, generator=g).bfloat16(),
    }


def test_to_compute_gives_fp32_copies_and_keeps_the_input_by_default():
    stored = _stored_layer()
    copies = to_compute(stored, torch.device("cpu"))
    assert set(stored) == set(copies) == {"q_proj.weight", "down_proj.weight"}
    for name, t in copies.items():
        assert t.dtype == torch.float32
        assert torch.equal(t, stored[name].float())


def test_to_compute_consume_empties_the_stored_layer_and_gives_the_same_copies():
    expected = {k: v.float() for k, v in _stored_layer().items()}
    stored = _stored_layer()
    copies = to_compute(stored, torch.device("cpu"), consume=True)
    assert stored == {}  # the stored copy is gone: it and the fp32 copy are never both whole
    assert set(copies) == set(expected)
    for name, t in copies.items():
        assert torch.equal(t, expected[name])


# --decomposition-device: where the fp64 decomposition of M runs
CPU, GPU, GPU1 = torch.device("cpu"), torch.device("cuda"), torch.device("cuda:1")


@pytest.mark.parametrize(
    "requested, run_device, capability, expected",
    [
        ("cpu", GPU1, (9, 0), CPU),
        ("cuda", GPU1, (8, 6), GPU1),  # asked for: the run's own GPU, whatever its fp64 speed
        ("cuda", CPU, None, GPU),  # a CPU run can still send M to the current GPU
        ("auto", CPU, None, CPU),
        ("auto", GPU1, (9, 0), GPU1),  # H100/H200: half-rate fp64
        ("auto", GPU1, (8, 0), GPU1),  # A100
        ("auto", GPU1, (8, 6), CPU),  # RTX 30xx: fp64 at 1/64 of fp32
        ("auto", GPU1, (8, 9), CPU),  # RTX 40xx, L4, L40
    ],
)
def test_decomposition_device(monkeypatch, requested, run_device, capability, expected):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert decomposition_device(requested, run_device) == expected


def test_decomposition_device_refuses_an_unknown_name():
    with pytest.raises(ValueError, match="--decomposition-device must be one of cpu, cuda, auto"):
        decomposition_device("gpu", CPU)


def test_settings_default_to_the_cpu_and_refuse_cuda_without_cuda(monkeypatch):
    assert PruneSettings().validate().decomposition_device == "cpu"
    assert PruneSettings(decomposition_device="auto").validate()
    with pytest.raises(SettingsError, match="--decomposition-device must be one of cpu, cuda, auto"):
        PruneSettings(decomposition_device="gpu").validate()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SettingsError, match="--decomposition-device cuda needs a CUDA GPU"):
        PruneSettings(decomposition_device="cuda").validate()
    assert "decomposition_device" in RUNTIME_SETTINGS  # a resumed run may move the decomposition
