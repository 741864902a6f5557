"""rcpu_lite.reconstruct: block-wise and cross-block reconstruction of compact layers, on tiny checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig

from rcpu_lite.checkpoint import CheckpointReader
from rcpu_lite.families import arch, units
from rcpu_lite.methods.reconstruct import ReconstructOptions, block_error, reconstruct, trainable_parameters

WINDOWS, SEQLEN = 16, 16
LR = 2e-2  # the paper's 2e-4 is for 7B models; tiny random ones need a larger step to move in a few epochs
FAST = ReconstructOptions(epochs=8, lr=LR, micro_batch=4)
NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


class Model:
    """A tiny checkpoint's config, its dense layers' tensors, and the compact layers' widths."""

    # spec -> (kept query heads, kept KV heads, kept MLP channels); GQA keeps 2 query heads in each of its 2 groups
    KEPT = {"llama_mha": ([0, 3], [0, 3], 48), "qwen2_gqa": ([0, 2, 5, 7], [0, 1], 48)}

    def __init__(self, path, spec: str):
        self.cfg = arch.compute_config(AutoConfig.from_pretrained(path))
        self.shape = arch.layer_shape(self.cfg)
        reader = CheckpointReader(path)
        names = arch.layer_tensor_names(self.cfg)
        self.dense = [reader.get_many(names, arch.layer_prefix(i)) for i in range(self.cfg.num_hidden_layers)]
        reader.close()
        heads, kv_heads, n_channels = self.KEPT[spec]
        self.heads, self.kv_heads = torch.tensor(heads), torch.tensor(kv_heads)
        self.channels = torch.arange(0, self.shape.intermediate_size, 2)[:n_channels]
        self.compact_cfg = arch.pruned_config(self.cfg, len(heads), len(kv_heads), n_channels)
        self.layer_inputs = arch.layer_inputs(self.cfg, SEQLEN, torch.device("cpu"), torch.float32)

    def dense_block(self, i: int):
        return arch.build_layer(self.cfg, i, dict(self.dense[i])), self.cfg, i

    def compact_tensors(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i cut to the kept units (o_proj / down_proj simply sliced: no compensation), as fresh tensors."""
        columns = {
            "self_attn.o_proj.weight": units.head_columns(self.heads, self.shape.head_dim),
            "mlp.down_proj.weight": self.channels,
        }
        return {
            name: t[:, columns[name]].clone()
            if name in columns
            else units.slice_tensor(name, t, self.shape, self.heads, self.kv_heads, self.channels).clone()
            for name, t in self.dense[i].items()
        }

    def compact_block(self, i: int):
        return arch.build_layer(self.compact_cfg, i, self.compact_tensors(i)), self.compact_cfg, i

    def windows(self, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(WINDOWS, SEQLEN, self.shape.hidden_size, generator=g)

    @torch.inference_mode()
    def targets(self, inputs: torch.Tensor, layers: list[int]) -> torch.Tensor:
        hidden = inputs
        for i in layers:
            layer, cfg, _ = self.dense_block(i)
            hidden = arch.run_layer(layer, hidden, self.layer_inputs, cfg, i)
        return hidden.clone()


@pytest.fixture(scope="module")
def mha(tiny_checkpoint):
    return Model(tiny_checkpoint("llama_mha"), "llama_mha")


@pytest.fixture(scope="module")
def qwen(tiny_checkpoint):
    return Model(tiny_checkpoint("qwen2_gqa"), "qwen2_gqa")


def _state(blocks) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in layer.state_dict().items()} for layer, _, _ in blocks]


def _no_grad_anywhere(blocks) -> bool:
    return all(not p.requires_grad and p.grad is None for layer, _, _ in blocks for p in layer.parameters())


def test_block_reconstruction_lowers_the_error_against_the_dense_layer(mha):
    x = mha.windows()
    y = mha.targets(x, [0])
    blocks = [mha.compact_block(0)]
    before = block_error(blocks, x, y, mha.layer_inputs, micro_batch=5)
    lines = []
    result = reconstruct(blocks, x, y, mha.layer_inputs, FAST, log=lines.append)
    after = block_error(blocks, x, y, mha.layer_inputs, micro_batch=5)
    assert after <= 0.8 * before, (before, after)
    assert result.error_before == pytest.approx(before, rel=1e-9)
    assert result.error_after == pytest.approx(after, rel=1e-9)
    assert result.loss_after < result.loss_before
    # the loss is the mean squared error over all elements: error^2 * ||y||^2 / numel
    assert result.loss_before == pytest.approx(before**2 * y.double().pow(2).sum().item() / y.numel(), rel=1e-9)
    assert result.steps == FAST.epochs * WINDOWS // FAST.micro_batch
    assert len(result.epoch_losses) == len(lines) == FAST.epochs
    assert result.trained_params == sum(p.numel() for n, p in blocks[0][0].named_parameters() if "norm" not in n)
    assert _no_grad_anywhere(blocks)


def test_shapes_never_change_and_out_trains_only_o_and_down(qwen):
    x = qwen.windows()
    y = qwen.targets(x, [0])
    blocks = [qwen.compact_block(0)]
    start = _state(blocks)[0]
    result = reconstruct(
        blocks, x, y, qwen.layer_inputs, ReconstructOptions(epochs=2, lr=LR, micro_batch=4, train="out")
    )
    end = _state(blocks)[0]
    assert {k: v.shape for k, v in end.items()} == {k: v.shape for k, v in start.items()}
    trained = {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
    for name in start:
        if name in trained:
            assert not torch.equal(start[name], end[name]), name
        else:  # q/k/v (and their biases), gate/up and the norms
            assert torch.equal(start[name], end[name]), name
    assert any(name.startswith("self_attn.q_proj.bias") for name in start)  # qwen2: biases are covered
    assert result.error_after < result.error_before
    assert _no_grad_anywhere(blocks)


@pytest.mark.parametrize("train_norms", [False, True])
def test_norms_are_frozen_unless_asked(mha, train_norms):
    x = mha.windows()
    y = mha.targets(x, [0])
    blocks = [mha.compact_block(0)]
    start = _state(blocks)[0]
    reconstruct(
        blocks, x, y, mha.layer_inputs, ReconstructOptions(epochs=1, lr=LR, micro_batch=4, train_norms=train_norms)
    )
    end = _state(blocks)[0]
    for name in start:
        changed = not torch.equal(start[name], end[name])
        assert changed == (train_norms or name not in NORMS), name
    assert _no_grad_anywhere(blocks)


def test_trainable_parameters_by_choice(mha):
    layer = mha.compact_block(0)[0]
    names = lambda **kw: {n for n, _ in trainable_parameters(layer, **kw)}  # noqa: E731
    assert names(train="out") == {"self_attn.o_proj.weight", "mlp.down_proj.weight"}
    assert names(train="out", train_norms=True) == {"self_attn.o_proj.weight", "mlp.down_proj.weight", *NORMS}
    assert names(train="all") == set(layer.state_dict()) - set(NORMS)


def test_cross_block_lowers_the_error_after_the_second_layer(mha):
    x = mha.windows()
    y = mha.targets(x, [0, 1])
    blocks = [mha.compact_block(0), mha.compact_block(1)]
    start = _state(blocks)
    before = block_error(blocks, x, y, mha.layer_inputs, micro_batch=8)
    result = reconstruct(blocks, x, y, mha.layer_inputs, FAST)
    after = block_error(blocks, x, y, mha.layer_inputs, micro_batch=8)
    assert after <= 0.8 * before, (before, after)
    assert result.error_after == pytest.approx(after, rel=1e-9)
    end = _state(blocks)
    for s, e in zip(start, end):  # both layers of the window were trained
        assert not torch.equal(s["mlp.up_proj.weight"], e["mlp.up_proj.weight"])
    assert _no_grad_anywhere(blocks)


def test_same_seed_gives_bit_identical_weights_and_another_seed_does_not(mha):
    x = mha.windows()
    y = mha.targets(x, [0])
    runs = []
    for seed in (5, 5, 6):
        blocks = [mha.compact_block(0)]
        result = reconstruct(
            blocks, x, y, mha.layer_inputs, ReconstructOptions(epochs=2, lr=LR, micro_batch=4, seed=seed)
        )
        runs.append((_state(blocks)[0], result))
    (a, ra), (b, rb), (c, _) = runs
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert ra.epoch_losses == rb.epoch_losses and ra.loss_after == rb.loss_after
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_block_error_equals_a_direct_computation(mha):
    x = mha.windows()
    y = mha.targets(x, [0, 1])
    blocks = [mha.compact_block(0), mha.compact_block(1)]
    with torch.inference_mode():
        out = x
        for layer, cfg, i in blocks:
            out = arch.run_layer(layer, out, mha.layer_inputs, cfg, i)
        direct = (torch.linalg.norm((out - y).double()) / torch.linalg.norm(y.double())).item()
    for micro_batch in (1, 3, WINDOWS):
        assert block_error(blocks, x, y, mha.layer_inputs, micro_batch) == pytest.approx(direct, rel=1e-6)
    dense = [mha.dense_block(0), mha.dense_block(1)]
    assert block_error(dense, x, y, mha.layer_inputs, 4) == pytest.approx(0.0, abs=1e-6)


def test_works_under_inference_mode_with_inference_tensors(mha):
    """What the pipeline hands over may all have been made under torch.inference_mode."""
    with torch.inference_mode():
        layer_inputs = arch.layer_inputs(mha.cfg, SEQLEN, torch.device("cpu"), torch.float32)
        x = mha.windows()
        y = mha.targets(x, [0])
        tensors = mha.compact_tensors(0)
        blocks = [(arch.build_layer(mha.compact_cfg, 0, dict(tensors)), mha.compact_cfg, 0)]
        assert x.is_inference() and next(blocks[0][0].parameters()).is_inference()
        result = reconstruct(blocks, x, y, layer_inputs, FAST)
    assert result.error_after < 0.8 * result.error_before
    # the trained weights are the layer's; the inference tensors it was built from are untouched
    state = blocks[0][0].state_dict()
    assert not torch.equal(state["mlp.up_proj.weight"], tensors["mlp.up_proj.weight"])
    assert torch.equal(tensors["mlp.up_proj.weight"], mha.compact_tensors(0)["mlp.up_proj.weight"])
    assert _no_grad_anywhere(blocks)


def test_a_diverging_run_raises_and_leaves_no_grad(mha):
    x = mha.windows()
    y = mha.targets(x, [0])
    blocks = [mha.compact_block(0)]
    with pytest.raises(FloatingPointError, match="learning rate"):
        reconstruct(blocks, x, y, mha.layer_inputs, ReconstructOptions(epochs=3, lr=1e30, micro_batch=4))
    assert _no_grad_anywhere(blocks)
    bad = y.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="not finite"):
        reconstruct(blocks, x, bad, mha.layer_inputs, FAST)
    assert _no_grad_anywhere(blocks)


def test_bad_options_and_shapes_are_refused(mha):
    x = mha.windows()
    blocks = [mha.compact_block(0)]
    with pytest.raises(ValueError, match="train"):
        reconstruct(blocks, x, x, mha.layer_inputs, ReconstructOptions(train="qkv"))
    with pytest.raises(ValueError, match="micro_batch"):
        reconstruct(blocks, x, x, mha.layer_inputs, ReconstructOptions(micro_batch=0))
    with pytest.raises(ValueError, match="windows x seqlen x hidden"):
        reconstruct(blocks, x, x[:, :-1], mha.layer_inputs, FAST)
    assert _no_grad_anywhere(blocks)
