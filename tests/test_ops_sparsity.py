"""aecore.ops.kl_sparsity / topk_sparsify: fused kernels vs the reference oracle."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aecore import ops
from aecore.errors import ConfigError, ShapeError
from aecore.ops import reference

needs_ext = pytest.mark.skipif(
    ops.backend("kl_sparsity", "cpu") != "fused cpu", reason="CPU extension not loaded"
)

cases = st.fixed_dictionaries(
    {
        "B": st.sampled_from([1, 2, 3, 7, 16, 33]),
        "H": st.integers(1, 40),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        "noncontig": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


def strided(x, noncontig):
    """The same values, stored transposed (a non-contiguous view) when asked."""
    return x.t().contiguous().t() if noncontig else x


def tol(dtype):
    return (
        {"rtol": 2e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-12}
    )


# --- kl_sparsity -------------------------------------------------------------------------


def activations(c, dead=True):
    g = torch.Generator().manual_seed(c["seed"])
    h = torch.rand(c["B"], c["H"], generator=g, dtype=torch.float64) * 0.4
    if dead and c["H"] > 2:  # a dead and a saturated unit: the clamp must be active
        h[:, 0] = 0.0
        h[:, 1] = 1.0
    return strided(h.to(c["dtype"]), c["noncontig"])


@needs_ext
@settings(max_examples=40, deadline=None)
@given(c=cases, rho=st.floats(0.01, 0.5), beta=st.floats(0.0, 5.0))
def test_kl_fused_equals_reference(c, rho, beta):
    h = activations(c).requires_grad_(True)
    got = ops.kl_sparsity(h, rho, beta)
    (g_got,) = torch.autograd.grad(got * 1.7, h)
    want = reference.kl_sparsity(h, rho, beta)
    (g_want,) = torch.autograd.grad(want * 1.7, h)
    assert got.shape == () and got.dtype == c["dtype"]
    torch.testing.assert_close(got, want, **tol(c["dtype"]))
    torch.testing.assert_close(g_got, g_want, **tol(c["dtype"]))
    assert torch.isfinite(got)
    if c["H"] > 2:  # clamped columns get no gradient
        assert torch.count_nonzero(g_got[:, :2]) == 0


def test_kl_value_by_hand():
    h = torch.tensor([[0.2, 0.0], [0.4, 1.0]], dtype=torch.float64)
    rho, beta, eps = 0.1, 2.0, ops.KL_EPS
    assert eps == 1e-6

    def kl(q):
        return rho * math.log(rho / q) + (1 - rho) * math.log((1 - rho) / (1 - q))

    want = beta * (kl(0.3) + kl(0.5))
    assert float(ops.kl_sparsity(h, rho, beta)) == pytest.approx(want, rel=1e-12)
    h[:, 1] = 0.0  # dead unit: ρ̂ clamped to eps, finite penalty
    want = beta * (kl(0.3) + kl(eps))
    assert float(ops.kl_sparsity(h, rho, beta)) == pytest.approx(want, rel=1e-12)


def test_kl_gradcheck_float64():
    g = torch.Generator().manual_seed(0)
    h = (torch.rand(6, 5, generator=g, dtype=torch.float64) * 0.6 + 0.2).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.kl_sparsity(x, 0.15, 1.3), (h,))
    hs = strided(h.detach(), True).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.kl_sparsity(x, 0.3, 0.7), (hs,))


@needs_ext
def test_kl_opcheck_and_backward_op():
    from torch.library import opcheck

    h = torch.rand(7, 4, dtype=torch.float64, requires_grad=True)
    opcheck(torch.ops.aecore.kl_sparsity, (h, 0.1, 2.0))
    opcheck(torch.ops.aecore.kl_sparsity, (h.detach().float(), 0.3, 0.0))
    mean = h.detach().mean(0)
    opcheck(
        torch.ops.aecore.kl_sparsity_backward, (torch.tensor(1.5).double(), mean, mean, 7, 0.1, 2.0)
    )
    opcheck(
        torch.ops.aecore.kl_sparsity_backward, (torch.tensor(1.5).double(), None, mean, 3, 0.1, 2.0)
    )
    # the op's second output (the column means) is differentiable too
    loss, m = torch.ops.aecore.kl_sparsity(h, 0.1, 2.0)
    (g,) = torch.autograd.grad(m.sum(), h)
    torch.testing.assert_close(g, torch.full_like(h, 1 / 7))


BAD_KL = [
    ((torch.rand(3),), ShapeError, r"h must be 2-D, got shape \(3,\)"),
    ((torch.rand(0, 4),), ShapeError, "at least one row"),
    ((torch.rand(3, 4).half(),), ConfigError, "h must be float32 or float64, got torch.float16"),
    ((torch.rand(3, 4), 0.0), ConfigError, r"rho must lie in the open interval \(0, 1\), got 0.0"),
    ((torch.rand(3, 4), 1.0), ConfigError, r"rho must lie in the open interval \(0, 1\)"),
    ((torch.rand(3, 4), float("nan")), ConfigError, "rho must lie in the open interval"),
    ((torch.rand(3, 4), "0.1"), ConfigError, "rho must be a real number"),
    ((torch.rand(3, 4), 0.1, -1.0), ConfigError, "beta must be finite and >= 0, got -1.0"),
    ((torch.rand(3, 4), 0.1, float("inf")), ConfigError, "beta must be finite"),
    (([[0.1]], 0.1), ConfigError, "h must be a torch.Tensor, got list"),
]


@pytest.mark.parametrize("fn", [ops.kl_sparsity, reference.kl_sparsity])
@pytest.mark.parametrize(("args", "exc", "msg"), BAD_KL)
def test_kl_bad_inputs(fn, args, exc, msg):
    if len(args) == 1:
        args = (*args, 0.1)
    with pytest.raises(exc, match=msg):
        fn(*args)


# --- topk_sparsify -----------------------------------------------------------------------


def distinct_values(B, D, dtype, seed, noncontig):
    """A (B, D) matrix without ties (ties are implementation-defined in torch.topk)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(B * D, generator=g).reshape(B, D).to(torch.float64)
    z = (perm + 0.25 - B * D // 2) / 7  # distinct and never 0
    return strided(z.to(dtype), noncontig)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(c=cases, data=st.data())
def test_topk_fused_equals_reference(c, data):
    k = data.draw(st.integers(1, c["H"]))
    B = data.draw(st.sampled_from([0, c["B"]]))  # empty batch too
    z = distinct_values(B, c["H"], c["dtype"], c["seed"], c["noncontig"]).requires_grad_(True)
    got = ops.topk_sparsify(z, k)
    want = reference.topk_sparsify(z, k)
    assert torch.equal(got, want)
    assert got.is_contiguous() and got.dtype == c["dtype"]
    grad_out = torch.randn(B, c["H"], dtype=c["dtype"])
    (g_got,) = torch.autograd.grad(got, z, grad_out)
    (g_want,) = torch.autograd.grad(want, z, grad_out)
    assert torch.equal(g_got, g_want)
    assert int((got != 0).sum()) == B * k or B == 0  # values are never 0
    # the gradient reaches exactly the kept entries
    assert torch.equal(g_got != 0, (got != 0) & (grad_out != 0))


@needs_ext
def test_topk_ties_keep_lower_index_and_nan_is_largest():
    z = torch.tensor([[1.0, 5.0, 3.0, 5.0, 2.0, 0.0, 5.0], [0.0, float("nan"), 0.0, 0.0, -1, 0, 0]])
    out = ops.topk_sparsify(z, 2)
    assert out[0].tolist() == [0, 5, 0, 5, 0, 0, 0]
    assert math.isnan(out[1, 1]) and out[1].nan_to_num(9).tolist() == [0, 9, 0, 0, 0, 0, 0]
    # k == D keeps everything
    assert torch.equal(ops.topk_sparsify(z[:1], 7), z[:1])


def stable_topk_oracle(z, k):
    """Keeps the k first entries of a stable descending sort: ties to the lower index,
    NaN above everything (torch.sort puts NaN first when descending)."""
    idx = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :k]
    return torch.zeros_like(z).scatter(1, idx, z.gather(1, idx))


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 5, 16, 40])
def test_topk_wide_rows_ties_and_nans(k, dtype):
    """Rows wide enough for the filtered path (D >= 16 k), with heavy ties (small integers:
    more candidates than the filter keeps, so the heap takes over) and NaN rows."""
    g = torch.Generator().manual_seed(k)
    z = torch.randn(12, 1024, generator=g, dtype=torch.float64).to(dtype)
    z[3] = torch.randint(0, 4, (1024,), generator=g).to(dtype)  # massive ties
    z[4] = 0.0  # all equal: keeps the first k columns
    z[5, [7, 300, 900]] = float("nan")
    z[6] = -float("inf")
    z[7, 1000:] = float("inf")
    out = ops.topk_sparsify(z, k)
    torch.testing.assert_close(out, stable_topk_oracle(z, k), equal_nan=True, rtol=0, atol=0)
    assert torch.equal(ops.topk_sparsify(z[4:5], k) != 0, torch.zeros_like(z[4:5]) != 0)
    kept = ops.topk_sparsify(z[4:5] + 1.0, k)
    assert kept[0, :k].tolist() == [1.0] * k and torch.count_nonzero(kept[0, k:]) == 0


@needs_ext
@pytest.mark.parametrize("D", [257, 1031, 4096])
@pytest.mark.parametrize("k", [3, 17, 33, 70])
def test_topk_filtered_rows_of_any_width(D, k):
    """The filtered path's vector blocks: group counts and row widths that are not whole
    vectors, and more groups than one pass holds in registers (rows too narrow for it
    take the heap)."""
    g = torch.Generator().manual_seed(D + k)
    z = torch.randn(9, D, generator=g)
    z[1, -1] = 50.0  # the largest entry in the row's partial last step
    z[2, :8] = 40.0 + torch.arange(8.0)  # the largest entries in the first groups
    torch.testing.assert_close(ops.topk_sparsify(z, k), stable_topk_oracle(z, k), rtol=0, atol=0)


def test_topk_gradcheck_float64():
    z = distinct_values(5, 9, torch.float64, 1, False).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: ops.topk_sparsify(x, 3), (z,))
    assert torch.autograd.gradcheck(lambda x: reference.topk_sparsify(x, 3), (z,))


@needs_ext
def test_topk_opcheck():
    from torch.library import opcheck

    z = distinct_values(6, 9, torch.float64, 2, False).requires_grad_(True)
    opcheck(torch.ops.aecore.topk_sparsify, (z, 3))
    opcheck(torch.ops.aecore.topk_sparsify, (z.detach().float(), 9))
    _, idx = torch.ops.aecore.topk_sparsify(z.detach(), 3)
    opcheck(torch.ops.aecore.topk_sparsify_backward, (torch.randn(6, 9, dtype=torch.float64), idx))


@needs_ext
def test_sparsity_ops_under_torch_compile_fullgraph():
    h = torch.rand(8, 6, requires_grad=True)
    z = distinct_values(8, 6, torch.float32, 3, False).requires_grad_(True)

    def loss(h, z):
        return ops.kl_sparsity(h, 0.1, 2.0) + (ops.topk_sparsify(z, 2) ** 2).sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    got = compiled(h, z)
    g_got = torch.autograd.grad(got, (h, z))
    want = loss(h, z)
    g_want = torch.autograd.grad(want, (h, z))
    torch.testing.assert_close(got, want)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b)


BAD_TOPK = [
    ((torch.rand(3), 1), ShapeError, r"z must be 2-D, got shape \(3,\)"),
    ((torch.rand(2, 3, 4), 1), ShapeError, "z must be 2-D"),
    ((torch.rand(3, 0), 1), ShapeError, "at least one column"),
    ((torch.rand(3, 4), 0), ConfigError, r"k must lie in \[1, 4\], got 0"),
    ((torch.rand(3, 4), 5), ConfigError, r"k must lie in \[1, 4\], got 5"),
    ((torch.rand(3, 4), 2.0), ConfigError, "k must be an int"),
    ((torch.arange(12).reshape(3, 4), 2), ConfigError, "z must be float32, float64, float16"),
]


@pytest.mark.parametrize("fn", [ops.topk_sparsify, reference.topk_sparsify])
@pytest.mark.parametrize(("args", "exc", "msg"), BAD_TOPK)
def test_topk_bad_inputs(fn, args, exc, msg):
    with pytest.raises(exc, match=msg):
        fn(*args)


@needs_ext
def test_all_ops_under_inductor_fullgraph():
    """The default torch.compile backend (inductor) calls the fused ops as extern kernels,
    forward and backward, in one graph."""
    g = torch.Generator().manual_seed(0)
    v = (torch.rand(8, 6, generator=g) < 0.5).float()
    W, b_v, b_h = torch.randn(6, 4, generator=g), torch.zeros(6), torch.zeros(4)
    h = torch.rand(8, 6, generator=g, requires_grad=True)
    z = distinct_values(8, 6, torch.float32, 4, False).requires_grad_(True)

    def penalties(h, z):
        return ops.kl_sparsity(h, 0.1, 2.0) + (ops.topk_sparsify(z, 2) ** 2).sum()

    @torch.compile(fullgraph=True)
    def step(v, W, b_v, b_h, h, z):
        s = ops.cd_step(v, W, b_v, b_h, 1)
        return W + 0.1 * s.dW, s.chain, penalties(h, z)

    W2, chain, loss = step(v, W, b_v, b_h, h, z)
    grads = torch.autograd.grad(loss, (h, z))
    want = penalties(h, z)
    torch.testing.assert_close(loss, want)
    for a, b in zip(grads, torch.autograd.grad(want, (h, z))):
        torch.testing.assert_close(a, b)
    assert W2.shape == (6, 4) and set(chain.unique().tolist()) <= {0.0, 1.0}


@needs_ext
@pytest.mark.parametrize("op", ["kl_sparsity", "topk_sparsify", "topk_encode", "sparse_decode"])
def test_second_derivatives_through_the_fused_ops_are_refused_not_wrong(op, monkeypatch):
    # the backward kernels have no derivatives: a Hessian-vector product through
    # kl_sparsity came out zero where the reference gives [3.10, 5.25, ...]
    g = torch.Generator().manual_seed(0)
    h = torch.rand(6, 8, generator=g, dtype=torch.float64, requires_grad=True)
    W = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    b_enc, b_dec = torch.zeros(9, dtype=torch.float64), torch.zeros(8, dtype=torch.float64)
    calls = {
        "kl_sparsity": lambda: ops.kl_sparsity(h, 0.2, 2.0),
        "topk_sparsify": lambda: ops.topk_sparsify(h, 3).pow(2).sum(),
        "topk_encode": lambda: ops.topk_encode(h, W, b_enc, b_dec, 3)[0].pow(2).sum(),
        "sparse_decode": lambda: (
            ops.sparse_decode(h[:, :3], torch.arange(3).repeat(6, 1), W, b_dec).pow(2).sum()
        ),
    }
    first = torch.autograd.grad(calls[op](), h)[0]  # first derivatives are fine
    assert torch.isfinite(first).all()
    with pytest.raises(NotImplementedError, match=f"{op}'s fused backward has no derivative"):
        torch.autograd.grad(calls[op](), h, create_graph=True)
    # and the reference the message names does differentiate twice (sparse_decode's did
    # not: torch's embedding bag has no second derivative)
    ops_of = {
        "kl_sparsity": reference.kl_sparsity,
        "topk_sparsify": reference.topk_sparsify,
        "topk_encode": reference.topk_encode,
        "sparse_decode": reference.sparse_decode,
    }
    with monkeypatch.context() as patched:
        patched.setattr(ops, op, ops_of[op])
        grad = torch.autograd.grad(calls[op](), h, create_graph=True)[0]
        (hessian_row,) = torch.autograd.grad(grad.sum(), h, allow_unused=True)
    assert hessian_row is None or torch.isfinite(hessian_row).all()


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_kl_of_a_nan_is_nan_and_a_rho_below_floats_range_is_finite(dtype):
    h = torch.rand(6, 5, dtype=dtype)
    torch.testing.assert_close(ops.kl_sparsity(h, 1e-46), reference.kl_sparsity(h, 1e-46))
    h[2, 3] = math.nan  # a NaN activation reaches the caller's finiteness check
    assert ops.kl_sparsity(h, 0.1).isnan()


@needs_ext
def test_the_raw_backward_ops_check_what_a_direct_caller_passes():
    grad = torch.randn(3, 4)
    for bad in (4, -3, 10**8):  # into the next row, before the row, far outside
        with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 4\); 3 do not"):
            torch.ops.aecore.topk_sparsify_backward(grad, torch.full((3, 1), bad))
    with pytest.raises(RuntimeError, match=r"grad_mean must be \(10\), got \[2\]"):
        torch.ops.aecore.kl_sparsity_backward(
            torch.tensor(1.0), torch.zeros(2), torch.rand(10), 4, 0.1, 1.0
        )


@needs_ext
def test_a_float_argument_that_varies_compiles_and_is_still_checked():
    # a schedule passes a new beta (or row norm) each call: the checks must not stop a
    # fullgraph compile on the symbolic number, and the kernels still refuse a bad one
    h = torch.rand(6, 20)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(h, beta, norm):
        w = h.clone()
        ops.set_row_norms_(w, norm)
        return ops.kl_sparsity(h, 0.05, beta), w

    for beta, norm in ((1.0, 1.0), (2.0, 2.0), (3.0, 0.5)):
        loss, w = step(h, beta, norm)
        torch.testing.assert_close(loss, reference.kl_sparsity(h, 0.05, beta))
        torch.testing.assert_close(w.norm(dim=1), torch.full((6,), norm))
    with pytest.raises(RuntimeError, match="beta must be finite and >= 0, got inf"):
        step(h, math.inf, 1.0)
    with pytest.raises(RuntimeError, match="norm must be positive and finite, got inf"):
        step(h, 1.0, math.inf)
