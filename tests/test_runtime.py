"""rcpu_lite.runtime: the stored-to-compute copy of a layer."""
import torch

from rcpu_lite.runtime import to_compute


def _stored_layer() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"q_proj.weight": torch.randn(8, 8, generator=g).half(),
            "down_proj.weight": torch.randn(8, 16, generator=g).bfloat16()}


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
