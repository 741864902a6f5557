"""Width plans: the uniform paper counts, and the parameter budgets of target-params, depth and adaptive."""

import pytest
import torch

from rcpu_lite.families.arch import LayerShape, UnitCosts
from rcpu_lite.methods import allocation

LLAMA_7B = LayerShape(4096, 32, 32, 128, 11008)
SMOLLM2 = LayerShape(576, 9, 3, 64, 1536)


def _costs(shape: LayerShape) -> UnitCosts:
    h, d = shape.hidden_size, shape.head_dim
    layer = (
        2 * h * d * (shape.num_attention_heads + shape.num_key_value_heads) + 3 * h * shape.intermediate_size + 2 * h
    )
    return UnitCosts(2 * h * d, 2 * h * d, 3 * h, layer)


def _fraction_removed(plan, shape):
    costs = _costs(shape)
    return plan.params_removed(shape, costs) / (costs.layer * len(plan.layers))


def test_uniform_is_the_paper_count():
    plan = allocation.uniform(LLAMA_7B, 32, 0.2)
    assert plan.uniform and plan.layers[0] == allocation.LayerWidths(26, 26, 11008 - 2201)
    assert allocation.uniform(SMOLLM2, 30, 0.2).layers[0] == allocation.LayerWidths(9, 3, 1536 - 307)  # no head can go


@pytest.mark.parametrize("target", [0.1, 0.2, 0.3])
def test_target_params_hits_the_budget_on_gqa(target):
    plan = allocation.target_params(SMOLLM2, 30, target, _costs(SMOLLM2))
    assert plan.uniform
    channel_share = _costs(SMOLLM2).channel / _costs(SMOLLM2).layer
    assert abs(_fraction_removed(plan, SMOLLM2) - target) <= channel_share / 2 + 1e-12  # nearest channel
    assert (
        _fraction_removed(allocation.uniform(SMOLLM2, 30, target), SMOLLM2) < 0.8 * target
    )  # what uniform falls short


@pytest.mark.parametrize("shape", [LLAMA_7B, SMOLLM2])
def test_depth_rises_with_depth_and_hits_the_budget(shape):
    n_layers = 12
    plan = allocation.depth(shape, n_layers, 0.3, _costs(shape), spread=0.5)
    assert not plan.uniform
    channels = [w.channels for w in plan.layers]
    assert channels == sorted(channels, reverse=True)  # deeper layers keep fewer channels
    budget = 0.3 * _costs(shape).layer * n_layers
    assert abs(plan.params_removed(shape, _costs(shape)) - budget) <= _costs(shape).channel


def _adaptive_inputs(shape, n_layers, seed=0, low_layer=None):
    g = torch.Generator().manual_seed(seed)
    o = [torch.rand(shape.num_attention_heads * shape.head_dim, generator=g) for _ in range(n_layers)]
    ch = [torch.rand(shape.intermediate_size, generator=g) for _ in range(n_layers)]
    return o, ch


@pytest.mark.parametrize("shape", [LayerShape(64, 8, 8, 8, 96), LayerShape(64, 8, 2, 8, 96)])
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5])
def test_adaptive_hits_the_budget_within_one_unit(shape, ratio):
    n_layers, costs = 4, _costs(shape)
    plan = allocation.adaptive(shape, n_layers, ratio, costs, *_adaptive_inputs(shape, n_layers))
    budget = ratio * costs.layer * n_layers
    assert abs(plan.params_removed(shape, costs) - budget) <= costs.channel / 2 + 1e-9
    for w in plan.layers:
        mha = shape.num_key_value_heads == shape.num_attention_heads
        assert w.channels >= 1 and w.heads >= 1
        if mha:
            assert w.kv_heads == w.heads
        else:  # GQA: equal query heads per group, every KV head stays
            assert w.heads % shape.num_key_value_heads == 0 and w.kv_heads == shape.num_key_value_heads


def test_adaptive_follows_standardised_scores_not_raw_scale():
    """FLAP standardises within each layer: a layer whose scores are 1000x larger but equally spread is
    not spared, and a layer's far-below-the-rest units all go."""
    shape, n_layers = LayerShape(64, 8, 8, 8, 96), 3
    o, ch = _adaptive_inputs(shape, n_layers, seed=1)
    o[1], ch[1] = o[1] * 1000, ch[1] * 1000
    ch[2][:30] = -10.0  # 30 channels far below the rest of layer 2
    plan = allocation.adaptive(shape, n_layers, 0.2, _costs(shape), o, ch)
    kept = [w.channels for w in plan.layers]
    assert kept[2] <= 96 - 30
    assert abs(kept[0] - kept[1]) <= 5  # the scale of layer 1 did not protect it


def test_plan_round_trips_through_json():
    plan = allocation.depth(LLAMA_7B, 4, 0.2, _costs(LLAMA_7B))
    assert allocation.WidthPlan.from_json(plan.as_json()) == plan


# --multiple-of: widths llama.cpp can quantise


@pytest.mark.parametrize("multiple", [32, 64, 128, 256])
@pytest.mark.parametrize("ratio", [0.1, 0.2, 0.3])
def test_aligned_widths_are_multiples_and_the_total_stays_within_half_a_multiple_per_layer(multiple, ratio):
    plan = allocation.uniform(LLAMA_7B, 32, ratio)
    out = allocation.aligned(plan, LLAMA_7B, multiple)
    for before, after in zip(plan.layers, out.layers):
        assert after.channels % multiple == 0 and (after.heads * LLAMA_7B.head_dim) % multiple == 0
        assert after.heads == after.kv_heads  # multi-head: the KV heads follow
        assert abs(after.channels - before.channels) <= multiple / 2
    assert out.uniform and out.allocation == "uniform"


def test_aligned_rounds_each_layer_of_a_per_layer_plan_and_keeps_gqa_groups_even():
    shape = LayerShape(576, 9, 3, 64, 1536)  # SmolLM2-135M
    plan = allocation.depth(shape, 30, 0.3, _costs(shape))
    out = allocation.aligned(plan, shape, 64)
    assert [w.channels % 64 for w in out.layers] == [0] * 30
    assert all(w.heads % 3 == 0 and w.kv_heads == 3 for w in out.layers)
    removed = sum(shape.intermediate_size - w.channels for w in plan.layers)
    removed_after = sum(shape.intermediate_size - w.channels for w in out.layers)
    assert abs(removed_after - removed) <= 32 * 30


def test_aligned_leaves_full_widths_and_what_cannot_be_aligned():
    shape = LayerShape(576, 9, 3, 64, 1536)
    assert allocation.aligned(allocation.uniform(shape, 2, 0.0), shape, 256).layers[0] == allocation.LayerWidths(
        9, 3, 1536
    )
    # 256 / gcd(256, 64) = 4 heads per block, times 3 groups: 12 > 9 heads, so the heads stay as planned
    assert allocation.aligned(allocation.uniform(shape, 2, 0.2), shape, 256).layers[0] == allocation.LayerWidths(
        9, 3, 1280
    )
    assert allocation.aligned(allocation.uniform(shape, 2, 0.2), shape, 1).layers[0] == allocation.LayerWidths(
        9, 3, 1229
    )
    # a layer that would round to nothing keeps one multiple
    assert allocation._nearest_multiple(5, 64, 1536) == 64


@pytest.mark.parametrize("shape", [LLAMA_7B, SMOLLM2])
def test_log_rises_fast_early_and_hits_the_budget(shape):
    n_layers = 12
    costs = _costs(shape)
    plan = allocation.depth(shape, n_layers, 0.3, costs, spread=0.5, curve="log")
    linear = allocation.depth(shape, n_layers, 0.3, costs, spread=0.5)
    assert plan.allocation == "log"
    channels = [w.channels for w in plan.layers]
    assert channels == sorted(channels, reverse=True)
    assert channels[1] < [w.channels for w in linear.layers][1]  # log(i+1) rises faster in the first layers
    assert abs(plan.params_removed(shape, costs) - 0.3 * costs.layer * n_layers) <= costs.channel


def _curves(shape, n_layers, head_slopes, channel_slopes):
    """Convex error curves: removing k units of a layer costs slope * k^2 (relative)."""
    kv = shape.num_key_value_heads
    head_steps = shape.num_attention_heads // (1 if kv == shape.num_attention_heads else kv)
    k_heads = torch.arange(head_steps + 1, dtype=torch.float64)
    k_channels = torch.arange(shape.intermediate_size + 1, dtype=torch.float64)
    return allocation.DenseScores(
        [torch.zeros(0)] * n_layers,
        [torch.zeros(0)] * n_layers,
        [s * (k_heads / head_steps) ** 2 for s in head_slopes],
        [s * (k_channels / shape.intermediate_size) ** 2 for s in channel_slopes],
    )


@pytest.mark.parametrize("shape", [LLAMA_7B, SMOLLM2])
@pytest.mark.parametrize("ratio", [0.1, 0.25])
def test_errors_allocation_hits_the_budget_within_one_unit(shape, ratio):
    n_layers, costs = 6, _costs(shape)
    scores = _curves(shape, n_layers, [1, 2, 3, 1, 2, 3], [3, 1, 2, 2, 1, 3])
    plan = allocation.by_errors(shape, n_layers, ratio, costs, scores)
    assert plan.allocation == "errors"
    assert abs(plan.params_removed(shape, costs) - ratio * costs.layer * n_layers) <= costs.channel / 2 + 1e-9
    for w in plan.layers:
        gqa = shape.num_key_value_heads < shape.num_attention_heads
        assert w.channels >= 1 and w.heads >= (shape.num_key_value_heads if gqa else 1)
        if gqa:
            assert w.heads % shape.num_key_value_heads == 0 and w.kv_heads == shape.num_key_value_heads


def test_errors_allocation_takes_more_from_the_layers_whose_error_rises_slowly():
    n_layers, costs = 4, _costs(LLAMA_7B)
    scores = _curves(LLAMA_7B, n_layers, [100.0] * 4, [1.0, 4.0, 1.0, 4.0])  # heads dear: only channels go
    plan = allocation.by_errors(LLAMA_7B, n_layers, 0.15, costs, scores)
    removed = [LLAMA_7B.intermediate_size - w.channels for w in plan.layers]
    assert all(w.heads == 32 for w in plan.layers)
    # The marginal costs meet: 2 k / 11008^2 * slope equal, so the cheap layers lose 4x as many channels (+-1).
    assert abs(removed[0] - 4 * removed[1]) <= 4 and removed[0] == removed[2] and removed[1] == removed[3]
