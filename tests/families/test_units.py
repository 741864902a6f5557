"""slice_layer / head_columns on a fake layer with distinguishable values."""

import torch

from rcpu_lite.families.arch import LayerShape
from rcpu_lite.families.units import head_columns, slice_layer

SHAPE = LayerShape(hidden_size=8, num_attention_heads=4, num_key_value_heads=2, head_dim=3, intermediate_size=5)


def _fake_layer():
    hd, h, kv, hid, inter = (
        SHAPE.head_dim,
        SHAPE.num_attention_heads,
        SHAPE.num_key_value_heads,
        SHAPE.hidden_size,
        SHAPE.intermediate_size,
    )
    base = iter(range(0, 100000, 1000))

    def t(*shape):
        n = 1
        for s in shape:
            n *= s
        return (torch.arange(n, dtype=torch.float32) + next(base)).reshape(shape)

    return {
        "self_attn.q_proj.weight": t(h * hd, hid),
        "self_attn.k_proj.weight": t(kv * hd, hid),
        "self_attn.v_proj.weight": t(kv * hd, hid),
        "self_attn.o_proj.weight": t(hid, h * hd),
        "self_attn.q_proj.bias": t(h * hd),
        "self_attn.k_proj.bias": t(kv * hd),
        "self_attn.v_proj.bias": t(kv * hd),
        "self_attn.o_proj.bias": t(hid),
        "mlp.gate_proj.weight": t(inter, hid),
        "mlp.up_proj.weight": t(inter, hid),
        "mlp.down_proj.weight": t(hid, inter),
        "mlp.down_proj.bias": t(hid),
        "input_layernorm.weight": t(hid),
        "post_attention_layernorm.weight": t(hid),
    }


def _head_rows(t, heads, hd):
    return torch.cat([t[h * hd : (h + 1) * hd] for h in heads])


def test_slice_layer():
    tensors = _fake_layer()
    originals = {k: v.clone() for k, v in tensors.items()}
    heads = torch.tensor([0, 2, 3])
    kv_heads = torch.tensor([1])
    channels = torch.tensor([0, 3, 4])
    hd = SHAPE.head_dim
    o_new = torch.randn(8, 9, generator=torch.Generator().manual_seed(0))
    down_new = torch.randn(8, 3, generator=torch.Generator().manual_seed(1))

    out = slice_layer(tensors, SHAPE, heads, kv_heads, channels, o_new, down_new)
    assert set(out) == set(tensors)

    q = originals["self_attn.q_proj.weight"]
    assert torch.equal(out["self_attn.q_proj.weight"], _head_rows(q, [0, 2, 3], hd))
    assert torch.equal(out["self_attn.q_proj.weight"], torch.cat([q[0:3], q[6:9], q[9:12]]))
    assert torch.equal(out["self_attn.q_proj.bias"], _head_rows(originals["self_attn.q_proj.bias"], [0, 2, 3], hd))
    for p in ("k_proj", "v_proj"):
        for kind in ("weight", "bias"):
            name = f"self_attn.{p}.{kind}"
            assert torch.equal(out[name], originals[name][3:6]), name
    for p in ("gate_proj", "up_proj"):
        name = f"mlp.{p}.weight"
        assert torch.equal(out[name], torch.stack([originals[name][i] for i in (0, 3, 4)])), name
    assert torch.equal(out["self_attn.o_proj.weight"], o_new)
    assert torch.equal(out["mlp.down_proj.weight"], down_new)
    for name in (
        "self_attn.o_proj.bias",
        "mlp.down_proj.bias",
        "input_layernorm.weight",
        "post_attention_layernorm.weight",
    ):
        assert torch.equal(out[name], originals[name]), name
    assert all(v.is_contiguous() for v in out.values())
    # inputs untouched
    for k in tensors:
        assert torch.equal(tensors[k], originals[k]), k


def test_slice_layer_mha_kv_follow_heads():
    shape = LayerShape(hidden_size=6, num_attention_heads=3, num_key_value_heads=3, head_dim=2, intermediate_size=4)
    g = torch.Generator().manual_seed(2)
    tensors = {
        "self_attn.q_proj.weight": torch.randn(6, 6, generator=g),
        "self_attn.k_proj.weight": torch.randn(6, 6, generator=g),
        "self_attn.v_proj.weight": torch.randn(6, 6, generator=g),
        "self_attn.o_proj.weight": torch.randn(6, 6, generator=g),
        "mlp.gate_proj.weight": torch.randn(4, 6, generator=g),
        "mlp.up_proj.weight": torch.randn(4, 6, generator=g),
        "mlp.down_proj.weight": torch.randn(6, 4, generator=g),
    }
    heads = torch.tensor([1, 2])
    channels = torch.tensor([1, 2, 3])
    o_new = tensors["self_attn.o_proj.weight"][:, head_columns(heads, 2)]
    down_new = tensors["mlp.down_proj.weight"][:, channels]
    out = slice_layer(tensors, shape, heads, heads, channels, o_new, down_new)
    for p in ("q_proj", "k_proj", "v_proj"):
        name = f"self_attn.{p}.weight"
        assert torch.equal(out[name], tensors[name][2:6]), name
    assert torch.equal(out["self_attn.o_proj.weight"], tensors["self_attn.o_proj.weight"][:, 2:6])
    assert torch.equal(out["mlp.gate_proj.weight"], tensors["mlp.gate_proj.weight"][1:4])
    assert out["mlp.down_proj.weight"].shape == (6, 3)


def test_head_columns():
    assert head_columns(torch.tensor([0, 2]), 3).tolist() == [0, 1, 2, 6, 7, 8]
    heads = torch.tensor([1, 4, 5])
    hd = 4
    direct = [h * hd + i for h in heads.tolist() for i in range(hd)]
    assert head_columns(heads, hd).tolist() == direct
    assert head_columns(torch.tensor([], dtype=torch.long), 4).numel() == 0


def test_head_columns_pick_o_proj_columns():
    o = torch.arange(5 * 12).reshape(5, 12)
    cols = head_columns(torch.tensor([1, 3]), 3)
    assert torch.equal(o[:, cols], torch.cat([o[:, 3:6], o[:, 9:12]], dim=1))
