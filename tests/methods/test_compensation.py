"""Compensation from the Gram matrix against direct computations on the activations (fp64)."""

from types import SimpleNamespace

import pytest
import torch

from rcpu_lite.methods import compensation as comp

GRAM_ONLY_METHODS = (
    "rotation",
    "rotation-scale",
    "none",
    "lstsq",
    "lstsq-rotation",
)  # the methods that need only the Gram


def _compensate(w, c, k, method, decomposition="eigh", **options):
    """comp.compensate on statistics that hold only the Gram C (what every method but +bias reads)."""
    stats = SimpleNamespace(gram=c, output_cross=None, target_energy=None, paired=False)
    return comp.compensate(w, stats, k, method, comp.CompensationOptions(decomposition, **options))


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
    y = torch.randn(d, d, generator=g, dtype=torch.float64) @ z + 0.5 * torch.randn(
        d, n, generator=g, dtype=torch.float64
    )
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


@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
def test_compensate_rotation_matches_activations(decomposition):
    w, x, c, k = _layer(seed=1)
    _, _, _, q = _direct(w, x, k)
    got = _compensate(w, c, k, "rotation", decomposition).weight
    assert got.shape == (w.shape[0], k.numel())
    torch.testing.assert_close(got, q @ w[:, k], rtol=1e-8, atol=1e-8)
    # not a no-op
    assert not torch.allclose(got, w[:, k], atol=1e-3)


@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
def test_compensate_rotation_scale_matches_activations(decomposition):
    w, x, c, k = _layer(seed=2)
    y, z, m, q = _direct(w, x, k)
    s = torch.trace(q.T @ y @ z.T) / (torch.linalg.norm(z) ** 2)
    got = _compensate(w, c, k, "rotation-scale", decomposition).weight
    torch.testing.assert_close(got, s * q @ w[:, k], rtol=1e-8, atol=1e-8)
    # s really differs from 1 here, so dropping the scale would fail the check above
    assert abs(float(s) - 1.0) > 1e-3

    # the scale is the least-squares optimum for the rotated weight: objective no worse than s*(1 +- eps)
    def obj(t):
        return torch.linalg.norm(y - t * q @ z)

    assert obj(s) <= obj(s * 1.01) and obj(s) <= obj(s * 0.99)


def test_compensate_fp32_close_to_fp64():
    w, x, c, k = _layer(seed=3)
    y, z, _, q = _direct(w, x, k)
    s = torch.trace(q.T @ y @ z.T) / (torch.linalg.norm(z) ** 2)
    got = _compensate(w.float(), c.float(), k, "rotation-scale").weight
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), s * q @ w[:, k], rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
def test_compensate_rotation_rank_deficient_cross_product(decomposition):
    # o_proj-like: d_out > |K|, so M is rank-deficient; Q W_K is still determined
    w, x, c, k = _layer(seed=4, d_out=10, d_in=10, kept=(0, 1, 4, 5, 8, 9))
    _, _, _, q = _direct(w, x, k)
    got = _compensate(w, c, k, "rotation", decomposition).weight
    torch.testing.assert_close(got, q @ w[:, k], rtol=1e-7, atol=1e-7)
    assert comp.relative_error(w, c, k, got) <= comp.relative_error(w, c, k, w[:, k]) + 1e-12


def test_compensate_none_is_slice():
    w, x, c, k = _layer(seed=5)
    got = _compensate(w, c, k, "none").weight
    assert torch.equal(got, w[:, k])
    got[0, 0] = 1234.0  # a copy, not a view into W
    assert w[0, k[0]] != 1234.0


@pytest.mark.parametrize("method", GRAM_ONLY_METHODS)
def test_compensate_nothing_removed_returns_weight(method):
    w, x, c, _ = _layer(seed=6)
    k = torch.arange(w.shape[1])
    got = _compensate(w, c, k, method)
    assert torch.equal(got.weight, w)
    assert got.error_pruned == got.error_compensated == 0.0


def test_compensate_unknown_method_raises():
    w, x, c, k = _layer()
    with pytest.raises(ValueError):
        _compensate(w, c, k, "ridge-typo")


def _direct_rel_err(w, x, k, new_w):
    y = w @ x
    z = new_w @ x[k]
    return float(torch.linalg.norm(y - z) / torch.linalg.norm(y))


def test_relative_error_matches_activations():
    w, x, c, k = _layer(seed=7)
    errs = {}
    for method in GRAM_ONLY_METHODS:
        new_w = _compensate(w, c, k, method).weight
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
    new_w = _compensate(w.float(), c.float(), k, "rotation").weight
    got = comp.relative_error(w.float(), c.float(), k, new_w)
    assert got == pytest.approx(_direct_rel_err(w, x, k, new_w.double()), rel=1e-4)


def test_relative_error_zero_when_nothing_removed():
    w, x, c, _ = _layer(seed=9)
    k = torch.arange(w.shape[1])
    assert comp.relative_error(w, c, k, w) == pytest.approx(0.0, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# compensate() reports its errors from the products it already has; relative_error() is the reference


@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
@pytest.mark.parametrize("method", GRAM_ONLY_METHODS)
@pytest.mark.parametrize("shape", [dict(seed=10), dict(seed=11, d_out=10, d_in=10, kept=(0, 1, 4, 5, 8, 9))])
def test_compensate_errors_match_direct_computation(method, decomposition, shape):
    w, x, c, k = _layer(**shape)
    got = _compensate(w, c, k, method, decomposition)
    assert got.error_pruned == pytest.approx(_direct_rel_err(w, x, k, w[:, k]), rel=1e-9)
    assert got.error_compensated == pytest.approx(_direct_rel_err(w, x, k, got.weight), rel=1e-9)
    assert got.error_pruned > 0.01
    if method != "none":
        assert got.error_compensated < got.error_pruned - 1e-6


def test_compensate_errors_fp32_close_to_fp64():
    w, x, c, k = _layer(seed=12)
    got = _compensate(w.float(), c.float(), k, "rotation-scale")
    ref = _compensate(w, c, k, "rotation-scale")
    assert got.error_pruned == pytest.approx(ref.error_pruned, rel=1e-4)
    assert got.error_compensated == pytest.approx(ref.error_compensated, rel=1e-4)


@pytest.mark.parametrize("method", ["rotation-scale", "lstsq"])
def test_compensate_gathers_in_blocks(monkeypatch, method):
    """Gathering C (and C_KK, C_RR) a block of rows at a time gives the same result as one gather."""
    w, x, c, k = _layer(seed=13, d_out=6, d_in=40, kept=tuple(range(0, 40, 2)) + (1, 3, 5))
    whole = _compensate(w, c, k, method)
    monkeypatch.setattr(comp, "_GATHER_ROWS", 3)
    blocks = _compensate(w, c, k, method)
    assert blocks.error_pruned == pytest.approx(whole.error_pruned, rel=1e-12)
    torch.testing.assert_close(blocks.weight, whole.weight, rtol=1e-12, atol=1e-12)
    assert blocks.error_compensated == pytest.approx(whole.error_compensated, rel=1e-12)


# ---------------------------------------------------------------------------------------------
# polar_eigh (the default decomposition) against the SVD reference


def _random_m(d, rank, seed, condition=10.0):
    g = torch.Generator().manual_seed(seed)
    u, v = _orthogonal(d, g), _orthogonal(d, g)
    s = torch.logspace(0, -torch.log10(torch.tensor(condition)).item(), d, dtype=torch.float64)
    s[rank:] = 0
    return u @ torch.diag(s) @ v.T


@pytest.mark.parametrize("condition", [10.0, 1e3])
def test_polar_eigh_equals_svd_on_full_rank(condition):
    m = _random_m(48, 48, seed=0, condition=condition)
    q_svd, s_svd = comp.procrustes(m)
    q_eig, s_eig = comp.polar_eigh(m)
    torch.testing.assert_close(q_eig, q_svd, rtol=0, atol=1e-9)
    torch.testing.assert_close(s_eig, s_svd, rtol=1e-9, atol=1e-12)


def test_polar_eigh_on_ill_conditioned_matches_svd_objective_and_is_orthogonal():
    # singular values down to 1e-6 s_max: below eps^(1/4) the columns of U are re-orthonormalised
    m = _random_m(64, 64, seed=5, condition=1e6)
    q_svd, _ = comp.procrustes(m)
    q, _ = comp.polar_eigh(m)
    torch.testing.assert_close(q.T @ q, torch.eye(64, dtype=torch.float64), rtol=0, atol=1e-9)
    assert float((q * m).sum()) == pytest.approx(float((q_svd * m).sum()), rel=1e-12)
    torch.testing.assert_close(q, q_svd, rtol=0, atol=1e-5)


def test_polar_eigh_recovers_planted_reflection():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, 40, generator=g, dtype=torch.float64)
    r = _orthogonal(6, g)
    if torch.linalg.det(r) > 0:
        r[:, 0] = -r[:, 0]
    q, _ = comp.polar_eigh((r @ z) @ z.T)
    torch.testing.assert_close(q, r, rtol=0, atol=1e-10)


@pytest.mark.parametrize("rank", [4, 12])  # a low rank completes in span[V_r, U_r], a high one in the null space
def test_polar_eigh_on_rank_deficient_is_optimal_and_closest_to_identity(rank):
    d = 32
    m = _random_m(d, rank, seed=2)
    q_svd, _ = comp.procrustes(m)
    q, s = comp.polar_eigh(m)
    eye = torch.eye(d, dtype=torch.float64)
    torch.testing.assert_close(q.T @ q, eye, rtol=0, atol=1e-10)  # orthogonal
    # as optimal as the SVD: tr(Q^T M) is the sum of singular values
    assert float((q * m).sum()) == pytest.approx(float((q_svd * m).sum()), rel=1e-10)
    assert (s[rank:] == 0).all() and s[0] == pytest.approx(1.0)
    # identical on M's row space, where the optimum is unique
    _, _, vh = torch.linalg.svd(m)
    torch.testing.assert_close(q @ vh[:rank].T, q_svd @ vh[:rank].T, rtol=0, atol=1e-9)
    # on the null space it is deterministic and no farther from the identity than the SVD's choice
    null = vh[rank:].T
    assert torch.linalg.norm(q @ null - null) <= torch.linalg.norm(q_svd @ null - null) + 1e-9


@pytest.mark.parametrize("rank", [3, 8, 20])
def test_the_two_null_space_completions_agree(rank):
    d = 30
    m = _random_m(d, rank, seed=7)
    u, _, vh = torch.linalg.svd(m)
    u_r, v_r, v_0 = u[:, :rank], vh[:rank].T, vh[rank:].T
    in_null = comp._completion_in_null_space(u_r, v_r, v_0)
    in_span = comp._completion_in_span(u_r, v_r, v_0)
    torch.testing.assert_close(in_span, in_null, rtol=0, atol=1e-10)
    q = u_r @ v_r.T + in_span
    torch.testing.assert_close(q.T @ q, torch.eye(d, dtype=torch.float64), rtol=0, atol=1e-10)


def test_polar_eigh_of_symmetric_psd_is_identity():
    g = torch.Generator().manual_seed(8)
    x = torch.randn(20, 5, generator=g, dtype=torch.float64)
    q, _ = comp.polar_eigh(x @ x.T)  # rank 5 of 20, U_r = V_r: nothing to rotate
    torch.testing.assert_close(q, torch.eye(20, dtype=torch.float64), rtol=0, atol=1e-9)


def test_polar_eigh_of_zero_is_identity():
    q, s = comp.polar_eigh(torch.zeros(5, 5, dtype=torch.float64))
    torch.testing.assert_close(q, torch.eye(5, dtype=torch.float64))
    assert (s == 0).all()


def test_polar_eigh_keeps_dtype_and_device():
    m = _random_m(8, 8, seed=3).float()
    q, s = comp.polar_eigh(m)
    assert q.dtype == torch.float32 and s.dtype == torch.float32
    torch.testing.assert_close(q, comp.procrustes(m)[0], rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# where the fp64 decomposition runs (--decomposition-device)

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("rank", [48, 12])
@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
def test_decomposition_with_device_cpu_is_the_reference(decomposition, rank):
    # the code path a CUDA run takes, with the device argument set to the CPU: the same Q as the reference
    m = _random_m(48, rank, seed=4, condition=1e3).float()
    q, s = comp.DECOMPOSE[decomposition](m, device="cpu")
    q_ref, s_ref = comp.DECOMPOSE[decomposition](m)
    torch.testing.assert_close(q, q_ref, rtol=0, atol=0)
    torch.testing.assert_close(s, s_ref, rtol=0, atol=0)
    assert q.device == m.device and q.dtype == m.dtype
    if rank == 48:  # full rank: Q is unique, and equals the SVD reference's
        torch.testing.assert_close(q, comp.procrustes(m.double())[0].float(), rtol=0, atol=1e-5)


def test_compensate_threads_the_decomposition_device():
    g = torch.Generator().manual_seed(9)
    w, x = torch.randn(6, 10, generator=g, dtype=torch.float64), torch.randn(10, 40, generator=g, dtype=torch.float64)
    k = torch.tensor([0, 2, 3, 5, 7, 9])
    default = _compensate(w, x @ x.T, k, "rotation")
    on_cpu = _compensate(w, x @ x.T, k, "rotation", decomposition_device="cpu")
    torch.testing.assert_close(on_cpu.weight, default.weight, rtol=0, atol=0)
    assert comp.CompensationOptions().decomposition_device == "cpu"


@CUDA
@pytest.mark.parametrize("rank", [64, 16])
@pytest.mark.parametrize("decomposition", comp.DECOMPOSITIONS)
def test_decomposition_on_cuda_gives_the_cpu_q(decomposition, rank):
    m = _random_m(64, rank, seed=6, condition=1e3)
    q_cpu, s_cpu = comp.DECOMPOSE[decomposition](m, device="cpu")
    q_gpu, s_gpu = comp.DECOMPOSE[decomposition](m, device="cuda")
    assert q_gpu.device.type == "cpu"  # Q comes back to M's device
    torch.testing.assert_close(q_gpu, q_cpu, rtol=0, atol=1e-9)
    torch.testing.assert_close(s_gpu, s_cpu, rtol=1e-9, atol=1e-12)
    q_back, _ = comp.DECOMPOSE[decomposition](m.cuda().float(), device="cuda")  # M on the GPU, Q stays there
    assert q_back.device.type == "cuda" and q_back.dtype == torch.float32
    torch.testing.assert_close(q_back.cpu(), q_cpu.float(), rtol=0, atol=1e-5)
