"""Compensation from the Gram matrix against direct computations on the activations (fp64)."""
import pytest
import torch

from rcpu_lite import compensation as comp


def _orthogonal(d, g):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q


def _layer(seed=0, d_out=6, d_in=12, n=400, kept=(0, 2, 3, 5, 6, 8, 9, 11)):
    """W (d_out x d_in), activations X (d_in x N, correlated, non-zero mean), Gram C = X X^T, kept K."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d_out, d_in, generator=g, dtype=torch.float64)
    mix = torch.randn(d_in, d_in, generator=g, dtype=torch.float64)
    x = mix @ torch.randn(d_in, n, generator=g, dtype=torch.float64) + 0.3
    c = x @ x.T
    k = torch.tensor(kept)
    return w, x, c, k


def _direct(w, x, k):
    y = w @ x
    z = w[:, k] @ x[k]
    m = y @ z.T
    u, _, vh = torch.linalg.svd(m)
    q = u @ vh
    return y, z, m, q


def test_procrustes_recovers_planted_rotation():
    g = torch.Generator().manual_seed(0)
    d, n = 7, 50
    z = torch.randn(d, n, generator=g, dtype=torch.float64)
    r = _orthogonal(d, g)
    y = r @ z
    q, s = comp.procrustes(y @ z.T)
    torch.testing.assert_close(q, r, rtol=0, atol=1e-10)
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-12)
    # singular values of R Z Z^T are the eigenvalues of Z Z^T
    torch.testing.assert_close(s, torch.linalg.eigvalsh(z @ z.T).flip(0), rtol=1e-10, atol=1e-10)


def test_procrustes_recovers_planted_reflection():
    g = torch.Generator().manual_seed(1)
    d = 5
    z = torch.randn(d, 30, generator=g, dtype=torch.float64)
    r = _orthogonal(d, g)
    if torch.linalg.det(r) > 0:
        r[:, 0] = -r[:, 0]
    q, _ = comp.procrustes((r @ z) @ z.T)
    torch.testing.assert_close(q, r, rtol=0, atol=1e-10)  # reflections allowed, no det correction


def test_procrustes_keeps_dtype():
    m = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))
    q, s = comp.procrustes(m)
    assert q.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(q.T @ q, torch.eye(4), rtol=0, atol=1e-5)


def test_procrustes_beats_random_orthogonal():
    g = torch.Generator().manual_seed(2)
    d, n = 6, 40
    z = torch.randn(d, n, generator=g, dtype=torch.float64)
    y = torch.randn(d, d, generator=g, dtype=torch.float64) @ z + 0.5 * torch.randn(d, n, generator=g, dtype=torch.float64)
    q, _ = comp.procrustes(y @ z.T)
    best = torch.linalg.norm(y - q @ z)
    rs, _ = torch.linalg.qr(torch.randn(100, d, d, generator=g, dtype=torch.float64))  # 100 random orthogonal
    flipped = rs.clone()
    flipped[:, :, 0] = -flipped[:, :, 0]  # the other determinant sign too
    for batch in (rs, flipped):
        others = torch.linalg.norm(y - batch @ z, dim=(1, 2))
        assert others.shape == (100,)
        assert (best <= others + 1e-12).all()
    assert best < others.min() - 1e-6


def test_cross_product_matches_activations():
    w, x, c, k = _layer()
    _, _, m, _ = _direct(w, x, k)
    got = comp.cross_product(w, c, k)
    assert got.shape == (w.shape[0], w.shape[0])
    assert torch.linalg.norm(got - m) <= 1e-6 * torch.linalg.norm(m)
    torch.testing.assert_close(got, m, rtol=1e-9, atol=1e-9 * float(m.abs().max()))


def test_compensate_rotation_matches_activations():
    w, x, c, k = _layer(seed=1)
    _, _, _, q = _direct(w, x, k)
    got = comp.compensate(w, c, k, "rotation")
    assert got.shape == (w.shape[0], k.numel())
    torch.testing.assert_close(got, q @ w[:, k], rtol=1e-8, atol=1e-8)
    # not a no-op
    assert not torch.allclose(got, w[:, k], atol=1e-3)


def test_compensate_rotation_scale_matches_activations():
    w, x, c, k = _layer(seed=2)
    y, z, m, q = _direct(w, x, k)
    s = torch.trace(q.T @ y @ z.T) / (torch.linalg.norm(z) ** 2)
    got = comp.compensate(w, c, k, "rotation-scale")
    torch.testing.assert_close(got, s * q @ w[:, k], rtol=1e-8, atol=1e-8)
    # s really differs from 1 here, so dropping the scale would fail the check above
    assert abs(float(s) - 1.0) > 1e-3
    # the scale is the least-squares optimum for the rotated weight: objective no worse than s*(1 +- eps)
    obj = lambda t: torch.linalg.norm(y - t * q @ z)
    assert obj(s) <= obj(s * 1.01) and obj(s) <= obj(s * 0.99)


def test_compensate_fp32_close_to_fp64():
    w, x, c, k = _layer(seed=3)
    y, z, _, q = _direct(w, x, k)
    s = torch.trace(q.T @ y @ z.T) / (torch.linalg.norm(z) ** 2)
    got = comp.compensate(w.float(), c.float(), k, "rotation-scale")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), s * q @ w[:, k], rtol=1e-3, atol=1e-3)


def test_compensate_rotation_rank_deficient_cross_product():
    # o_proj-like: d_out > |K|, so M is rank-deficient; Q W_K is still determined
    w, x, c, k = _layer(seed=4, d_out=10, d_in=10, kept=(0, 1, 4, 5, 8, 9))
    _, _, _, q = _direct(w, x, k)
    got = comp.compensate(w, c, k, "rotation")
    torch.testing.assert_close(got, q @ w[:, k], rtol=1e-7, atol=1e-7)
    assert comp.relative_error(w, c, k, got) <= comp.relative_error(w, c, k, w[:, k]) + 1e-12


def test_compensate_none_is_slice():
    w, x, c, k = _layer(seed=5)
    got = comp.compensate(w, c, k, "none")
    assert torch.equal(got, w[:, k])
    got[0, 0] = 1234.0  # a copy, not a view into W
    assert w[0, k[0]] != 1234.0


@pytest.mark.parametrize("method", comp.METHODS)
def test_compensate_nothing_removed_returns_weight(method):
    w, x, c, _ = _layer(seed=6)
    k = torch.arange(w.shape[1])
    got = comp.compensate(w, c, k, method)
    assert torch.equal(got, w)


def test_compensate_unknown_method_raises():
    w, x, c, k = _layer()
    with pytest.raises(ValueError):
        comp.compensate(w, c, k, "ridge-typo")


def _direct_rel_err(w, x, k, new_w):
    y = w @ x
    z = new_w @ x[k]
    return float(torch.linalg.norm(y - z) / torch.linalg.norm(y))


def test_relative_error_matches_activations():
    w, x, c, k = _layer(seed=7)
    errs = {}
    for method in comp.METHODS:
        new_w = comp.compensate(w, c, k, method)
        errs[method] = comp.relative_error(w, c, k, new_w)
        assert errs[method] == pytest.approx(_direct_rel_err(w, x, k, new_w), rel=1e-7)
    # arbitrary new weight too
    other = torch.randn(w.shape[0], k.numel(), generator=torch.Generator().manual_seed(9), dtype=torch.float64)
    assert comp.relative_error(w, c, k, other) == pytest.approx(_direct_rel_err(w, x, k, other), rel=1e-7)
    assert errs["rotation"] <= errs["none"]
    assert errs["rotation"] < errs["none"] - 1e-6
    assert errs["none"] > 0.01


def test_relative_error_fp32_inputs():
    w, x, c, k = _layer(seed=8)
    new_w = comp.compensate(w.float(), c.float(), k, "rotation")
    got = comp.relative_error(w.float(), c.float(), k, new_w)
    assert got == pytest.approx(_direct_rel_err(w, x, k, new_w.double()), rel=1e-4)


def test_relative_error_zero_when_nothing_removed():
    w, x, c, _ = _layer(seed=9)
    k = torch.arange(w.shape[1])
    assert comp.relative_error(w, c, k, w) == pytest.approx(0.0, abs=1e-6)
