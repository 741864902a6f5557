"""The compensations added beside the rotation, against direct fp64 computations on activations:
ridge least squares (normal equations), FLAP's bias, and their composition."""

import pytest
import torch

from rcpu_lite.methods import compensation as comp
from rcpu_lite.methods.stats import InputStats


def _problem(seed=0, d_out=6, d_in=12, n=300, kept=(0, 2, 3, 5, 6, 8, 9, 11)):
    """W, activations X (tokens x d_in, correlated, non-zero mean), their fp64 statistics, kept K."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    x = (
        torch.randn(n, d_in, generator=g, dtype=torch.float64)
        @ torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
        + 0.4
    )
    stats = InputStats(d_in, dtype=torch.float64)
    for chunk in x.split(64):
        stats.update(chunk)
    return w, x, stats, torch.tensor(kept)


def _rel(y, z):
    return float((y - z).norm() / y.norm())


@pytest.mark.parametrize("damp", [0.01, 0.1])
def test_lstsq_solves_the_ridge_normal_equations(damp):
    w, x, stats, k = _problem(seed=1)
    c_kk = x[:, k].T @ x[:, k]
    lam = damp * float(c_kk.diagonal().mean())  # GPTQ's relative damping
    direct = torch.linalg.solve(
        c_kk + lam * torch.eye(k.numel(), dtype=torch.float64), (w @ x.T @ x[:, k] + lam * w[:, k]).T
    ).T
    got = comp.compensate(w, stats, k, "lstsq", comp.CompensationOptions(damp=damp))
    torch.testing.assert_close(got.weight, direct, rtol=1e-9, atol=1e-9)
    assert got.damp_used == pytest.approx(lam, rel=1e-12)
    y = x @ w.T
    assert got.error_pruned == pytest.approx(_rel(y, x[:, k] @ w[:, k].T), rel=1e-9)
    assert got.error_compensated == pytest.approx(_rel(y, x[:, k] @ direct.T), rel=1e-9)


def test_lstsq_absolute_damping_and_it_beats_rotation_with_many_tokens():
    w, x, stats, k = _problem(seed=2, n=2000)
    got = comp.compensate(w, stats, k, "lstsq", comp.CompensationOptions(damp_abs=1e-4))
    c_kk = x[:, k].T @ x[:, k]
    direct = torch.linalg.solve(
        c_kk + 1e-4 * torch.eye(k.numel(), dtype=torch.float64), (w @ x.T @ x[:, k] + 1e-4 * w[:, k]).T
    ).T
    torch.testing.assert_close(got.weight, direct, rtol=1e-9, atol=1e-9)
    assert got.damp_used == 1e-4
    # Nearly unconstrained least squares is the best linear fit on these tokens: below the rotation's error.
    rotation = comp.compensate(w, stats, k, "rotation")
    assert got.error_compensated < rotation.error_compensated < got.error_pruned


def test_lstsq_retries_with_more_damping_and_reports_it():
    """A Gram that is not positive definite (here: negated) fails the Cholesky until lambda outgrows it."""
    w, _, stats, k = _problem(seed=3)
    stats.gram = -torch.eye(w.shape[1], dtype=torch.float64)
    got = comp.compensate(w, stats, k, "lstsq", comp.CompensationOptions(damp_abs=1e-3))
    assert got.damp_used == pytest.approx(10.0)  # 1e-3 -> ... -> 10: the first lambda with C_KK + l I > 0
    c = -torch.eye(w.shape[1], dtype=torch.float64)  # the solution is that of the lambda used, not of a sum of tries
    direct = torch.linalg.solve(
        c[k][:, k] + 10.0 * torch.eye(k.numel(), dtype=torch.float64), (w @ c[:, k] + 10.0 * w[:, k]).T
    ).T
    torch.testing.assert_close(got.weight, direct, rtol=1e-10, atol=1e-12)
    stats.gram = -torch.eye(w.shape[1], dtype=torch.float64)
    with pytest.raises(ValueError, match="not positive definite"):
        comp.compensate(w, stats, k, "lstsq", comp.CompensationOptions(damp_abs=1e-3, max_damp_retries=2))


def test_bias_is_the_removed_columns_mean_contribution():
    w, x, stats, k = _problem(seed=4)
    removed = [j for j in range(w.shape[1]) if j not in k.tolist()]
    got = comp.compensate(w, stats, k, "bias")
    direct_bias = w[:, removed] @ x[:, removed].mean(0)  # FLAP: b = W[:, not K] mu_not K
    torch.testing.assert_close(got.bias, direct_bias, rtol=1e-10, atol=1e-12)
    assert torch.equal(got.weight, w[:, k])
    y = x @ w.T
    assert got.error_compensated == pytest.approx(_rel(y, x[:, k] @ w[:, k].T + got.bias), rel=1e-8)
    assert got.error_compensated < got.error_pruned


@pytest.mark.parametrize("method", ["rotation+bias", "rotation-scale+bias", "lstsq+bias"])
def test_bias_composes_with_each_weight_compensation(method):
    """b = mean(Y - W' X_K): the residual of the weight compensation loses its mean, and the error
    the method reports is the direct one."""
    w, x, stats, k = _problem(seed=5)
    base = comp.compensate(w, stats, k, method.split("+")[0])
    got = comp.compensate(w, stats, k, method)
    torch.testing.assert_close(got.weight, base.weight, rtol=0, atol=0)
    y = x @ w.T
    residual_mean = (y - x[:, k] @ base.weight.T).mean(0)
    torch.testing.assert_close(got.bias, residual_mean, rtol=1e-9, atol=1e-10)
    assert got.error_compensated == pytest.approx(_rel(y, x[:, k] @ got.weight.T + got.bias), rel=1e-8)
    assert got.error_compensated <= base.error_compensated


def test_method_names_and_refusals():
    names = comp.method_names()
    for name in ("none", "rotation", "rotation-scale", "lstsq", "bias", "rotation+bias", "lstsq+bias"):
        assert name in names
    assert comp.parse_method("lstsq+bias") == ("lstsq", True) and comp.parse_method("bias") == ("none", True)
    for bad in ("none+bias", "ridge", "rotation+bias+bias", ""):
        with pytest.raises(ValueError, match="unknown compensation"):
            comp.parse_method(bad)


@pytest.mark.parametrize("method", ["lstsq", "bias", "lstsq+bias", "rotation+bias"])
def test_nothing_removed_leaves_the_weight_and_adds_no_bias(method):
    w, _, stats, _ = _problem(seed=6)
    got = comp.compensate(w, stats, torch.arange(w.shape[1]), method)
    assert torch.equal(got.weight, w) and got.bias is None and got.error_compensated == 0.0


def test_release_frees_the_gram():
    w, _, stats, k = _problem(seed=7)
    comp.compensate(w, stats, k, "lstsq+bias", release=True)
    assert stats.gram is None


# ---------------------------------------------------------------------------------------------
# dense targets: the pruned stream's inputs x_hat aim at the dense model's outputs W x


def _dense_problem(seed=20, d_out=6, d_in=12, n=400, kept=(0, 2, 3, 5, 6, 8, 9, 11)):
    """x (the dense stream's inputs) and x_hat = x + drift (what the already pruned layers pass on)."""
    from rcpu_lite.methods.stats import PairedStats

    w, x, _, k = _problem(seed, d_out, d_in, n, kept)
    g = torch.Generator().manual_seed(seed + 1)
    x_hat = (
        x
        + 0.3
        * torch.randn(x.shape, generator=g, dtype=torch.float64)
        @ torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
        * 0.3
    )
    stats = PairedStats(d_in, dtype=torch.float64)
    for a, b in zip(x_hat.split(64), x.split(64)):
        stats.update_pair(a, b, w)
    return w, x, x_hat, stats, k


@pytest.mark.parametrize("method", ["none", "rotation", "rotation-scale"])
def test_dense_target_rotation_uses_the_cross_gram(method):
    w, x, x_hat, stats, k = _dense_problem()
    y, z = x @ w.T, x_hat[:, k] @ w[:, k].T  # tokens x d_out
    u, sing, vh = torch.linalg.svd(y.T @ z)  # M = Y Z^T with Y, Z as d_out x N
    q = u @ vh
    direct = {
        "none": w[:, k],
        "rotation": q @ w[:, k],
        "rotation-scale": float(sing.sum() / z.square().sum()) * q @ w[:, k],
    }[method]
    got = comp.compensate(w, stats, k, method)
    torch.testing.assert_close(got.weight, direct, rtol=1e-8, atol=1e-8)
    assert got.error_pruned == pytest.approx(_rel(y, z), rel=1e-8)
    assert got.error_compensated == pytest.approx(_rel(y, x_hat[:, k] @ direct.T), rel=1e-8)


def test_dense_target_least_squares_and_bias():
    w, x, x_hat, stats, k = _dense_problem(seed=21)
    xk = x_hat[:, k]
    lam = 0.01 * float((xk.T @ xk).diagonal().mean())
    direct = torch.linalg.solve(
        xk.T @ xk + lam * torch.eye(k.numel(), dtype=torch.float64), (w @ x.T @ xk + lam * w[:, k]).T
    ).T
    got = comp.compensate(w, stats, k, "lstsq+bias", comp.CompensationOptions(damp=0.01))
    torch.testing.assert_close(got.weight, direct, rtol=1e-8, atol=1e-8)
    y = x @ w.T
    torch.testing.assert_close(got.bias, (y - xk @ direct.T).mean(0), rtol=1e-8, atol=1e-9)
    assert got.error_pruned == pytest.approx(_rel(y, xk @ w[:, k].T), rel=1e-8)
    assert got.error_compensated == pytest.approx(_rel(y, xk @ direct.T + got.bias), rel=1e-8)


def test_dense_targets_on_the_same_stream_are_local_targets():
    """When the pruned stream is the dense one (nothing pruned before), dense and local targets agree."""
    from rcpu_lite.methods.stats import PairedStats

    w, x, local, k = _problem(seed=22)
    paired = PairedStats(x.shape[1], dtype=torch.float64)
    for chunk in x.split(64):
        paired.update_pair(chunk, chunk, w)
    for method in ("rotation", "lstsq+bias"):
        a, b = comp.compensate(w, local, k, method), comp.compensate(w, paired, k, method)
        torch.testing.assert_close(a.weight, b.weight, rtol=1e-9, atol=1e-9)
        assert a.error_compensated == pytest.approx(b.error_compensated, rel=1e-7)


@pytest.mark.parametrize("damp", [0.01, 1.0])
def test_lstsq_rotation_solves_the_ridge_toward_the_rotated_weights(damp):
    w, x, stats, k = _problem(seed=4)
    c_kk = x[:, k].T @ x[:, k]
    lam = damp * float(c_kk.diagonal().mean())
    y = x @ w.T
    u, _, vh = torch.linalg.svd(y.T @ (x[:, k] @ w[:, k].T))  # M = Y Z^T
    prior = (u @ vh) @ w[:, k]  # the rotation's weights
    direct = torch.linalg.solve(
        c_kk + lam * torch.eye(k.numel(), dtype=torch.float64), (w @ x.T @ x[:, k] + lam * prior).T
    ).T
    got = comp.compensate(w, stats, k, "lstsq-rotation", comp.CompensationOptions(damp=damp))
    torch.testing.assert_close(got.weight, direct, rtol=1e-9, atol=1e-9)
    assert got.error_compensated == pytest.approx(_rel(y, x[:, k] @ direct.T), rel=1e-9)


def test_lstsq_rotation_moves_from_least_squares_to_the_rotation():
    w, x, stats, k = _problem(seed=5)
    rotation = comp.compensate(w, stats, k, "rotation").weight
    lstsq = comp.compensate(w, stats, k, "lstsq", comp.CompensationOptions(damp_abs=1e-9)).weight
    small = comp.compensate(w, stats, k, "lstsq-rotation", comp.CompensationOptions(damp_abs=1e-9)).weight
    large = comp.compensate(w, stats, k, "lstsq-rotation", comp.CompensationOptions(damp=1e9)).weight
    torch.testing.assert_close(small, lstsq, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(large, rotation, rtol=1e-6, atol=1e-6)


def test_dense_target_lstsq_rotation_pulls_toward_the_cross_gram_rotation():
    w, x, x_hat, stats, k = _dense_problem(seed=22)
    xk = x_hat[:, k]
    y, z = x @ w.T, xk @ w[:, k].T
    u, _, vh = torch.linalg.svd(y.T @ z)
    lam = 0.1 * float((xk.T @ xk).diagonal().mean())
    direct = torch.linalg.solve(
        xk.T @ xk + lam * torch.eye(k.numel(), dtype=torch.float64), (w @ x.T @ xk + lam * (u @ vh) @ w[:, k]).T
    ).T
    got = comp.compensate(w, stats, k, "lstsq-rotation", comp.CompensationOptions(damp=0.1))
    torch.testing.assert_close(got.weight, direct, rtol=1e-8, atol=1e-8)
    assert got.error_compensated == pytest.approx(_rel(y, xk @ direct.T), rel=1e-8)
