"""InputStats accumulated over micro-batches against direct fp64 computations."""

import torch

from rcpu_lite.methods.stats import InputStats, PairedStats


def _activations(seed=0, n=300, d=7):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.5, 3.0, d, dtype=torch.float64) + torch.linspace(-2.0, 2.0, d, dtype=torch.float64)
    return x


def _feed(stats, x, splits):
    for chunk in torch.split(x, splits):
        stats.update(chunk)


def _direct(x):
    n = x.shape[0]
    mean = x.sum(0) / n
    var = ((x - mean) ** 2).sum(0) / n  # population variance
    return {
        "count": n,
        "mean": mean,
        "variance": var.clamp_min(0),
        "l2": torch.sqrt((x**2).sum(0)),
        "mean_abs": x.abs().sum(0) / n,
        "gram": x.T @ x,
    }


def test_microbatches_match_direct_fp64():
    x = _activations()
    stats = InputStats(x.shape[1])  # default fp32 accumulation
    _feed(stats, x.float(), [13, 100, 1, 86, 100])
    ref = _direct(x)
    assert stats.count == ref["count"]
    assert stats.gram.dtype == torch.float32
    torch.testing.assert_close(stats.mean.double(), ref["mean"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.variance.double(), ref["variance"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(stats.l2_norm.double(), ref["l2"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.mean_abs.double(), ref["mean_abs"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.gram.double(), ref["gram"], rtol=1e-5, atol=1e-3)


def test_microbatches_match_direct_fp64_tight():
    x = _activations(seed=1)
    stats = InputStats(x.shape[1], dtype=torch.float64)
    _feed(stats, x, [50, 50, 200])
    ref = _direct(x)
    assert stats.count == ref["count"]
    torch.testing.assert_close(stats.mean, ref["mean"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.variance, ref["variance"], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(stats.l2_norm, ref["l2"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.mean_abs, ref["mean_abs"], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(stats.gram, ref["gram"], rtol=1e-12, atol=1e-10)


def test_batched_3d_input_is_flattened_over_tokens():
    x = _activations(seed=2, n=2 * 3 * 20, d=5)
    stats = InputStats(5, dtype=torch.float64)
    for chunk in x.reshape(2, 3, 20, 5):  # micro-batches of shape (batch, seq, dim)
        stats.update(chunk)
    ref = _direct(x)
    assert stats.count == x.shape[0]
    torch.testing.assert_close(stats.gram, ref["gram"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.variance, ref["variance"], rtol=1e-10, atol=1e-12)


def test_variance_is_clamped_non_negative():
    # a constant column: E[x^2] - E[x]^2 cancels and may go slightly negative in fp32
    x = torch.full((1000, 4), 0.1, dtype=torch.float32)
    x[:, 1] = 3.3
    x[:, 2] = -7.7
    stats = InputStats(4)
    for chunk in torch.split(x, 37):
        stats.update(chunk)
    assert (stats.variance >= 0).all()
    torch.testing.assert_close(stats.variance, torch.zeros(4), rtol=0, atol=1e-4)
    # the clamp must actually be active: the raw difference is negative in at least one column
    raw = stats.sum_sq / stats.count - stats.mean.square()
    if (raw < 0).any():
        assert (stats.variance[raw < 0] == 0).all()


def test_variance_clamp_with_forced_cancellation():
    stats = InputStats(2, dtype=torch.float64)
    stats.update(torch.tensor([[1.0, 2.0]], dtype=torch.float64))
    stats.sum_sq -= 1e-9  # force E[x^2] < E[x]^2
    assert (stats.variance == 0).all()


def test_hook_feeds_module_input():
    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 3).double()
    stats = InputStats(6, dtype=torch.float64)
    handle = lin.register_forward_pre_hook(stats.hook())
    xs = [torch.randn(4, 5, 6, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        for x in xs:
            lin(x)
    handle.remove()
    x = torch.cat([t.reshape(-1, 6) for t in xs])
    ref = _direct(x)
    assert stats.count == 60
    torch.testing.assert_close(stats.gram, ref["gram"], rtol=1e-12, atol=1e-10)
    torch.testing.assert_close(stats.mean, ref["mean"], rtol=1e-12, atol=1e-12)


def test_is_finite():
    stats = InputStats(3)
    stats.update(torch.ones(2, 3))
    assert stats.is_finite()
    stats.update(torch.tensor([[float("inf"), 0.0, 0.0]]))
    assert not stats.is_finite()


def test_paired_statistics_started_under_inference_mode_take_updates_outside_it():
    # The dense pass runs under inference mode; --compensate auto then adds the held-out tokens outside it.
    torch.manual_seed(0)
    stats, weight = PairedStats(4), torch.randn(3, 4)
    with torch.inference_mode():
        stats.update_pair(torch.randn(5, 4), torch.randn(5, 4), weight)
    stats.update_pair(torch.randn(2, 4), torch.randn(2, 4), weight)
    assert stats.count == 7 and stats.output_cross.shape == (3, 4)
