"""aecore.ops.gibbs_chain / cd_step: fused kernels vs the reference oracle."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aecore import ops
from aecore.errors import ConfigError, ShapeError
from aecore.ops import reference

FUSED_CPU = ops.backend("cd_step", "cpu") == "fused cpu"
needs_ext = pytest.mark.skipif(not FUSED_CPU, reason="CPU extension not loaded")

# The margin kept between a uniform and its probability in the exact-comparison tests:
# the fused sigmoid and torch.sigmoid may differ by an ulp, which must not flip a sample.
MARGIN = 1e-4


def make_rbm(B, V, H, dtype, seed, noncontig=False, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(B, V, generator=g) < 0.4).to(dtype)
    W = (torch.randn(V, H, generator=g) * scale).to(dtype)
    b_v = (torch.randn(V, generator=g) * 0.5).to(dtype)
    b_h = (torch.randn(H, generator=g) * 0.5).to(dtype)
    if noncontig:  # same values, transposed storage / strided views
        v = v.t().contiguous().t()
        W = W.t().contiguous().t()
        b_v = torch.stack([b_v, b_v], 1)[:, 0]
        b_h = torch.stack([b_h, b_h], 1)[:, 1]
        assert not v.is_contiguous() or B <= 1 or V <= 1
    return v, W, b_v, b_h


def safe_noise(v, W, b_v, b_h, k, chain, units, sample_visible, seed, pcd_stats=False):
    """GibbsNoise for (visible, hidden) ``units`` whose uniforms stay MARGIN away from
    every probability they decide (Gaussian units get standard normals).

    Runs the chain in float64 alongside (probabilities differ from either implementation
    by far less than MARGIN) and nudges each uniform that lands too close.
    """
    g = torch.Generator().manual_seed(seed)
    d = torch.float64
    v64, W64, bv64, bh64 = v.to(d), W.to(d), b_v.to(d), b_h.to(d)
    gaussian_v, gaussian_h = (u == "gaussian" for u in units)

    def mean(pre, gaussian):
        return pre if gaussian else torch.sigmoid(pre)

    def draw(m, gaussian):
        """(noise, sample) for means m."""
        if gaussian:
            z = torch.randn(m.shape, generator=g, dtype=d)
            return z, m + z
        u = torch.rand(m.shape, generator=g, dtype=d)
        close = (u - m).abs() < MARGIN
        u = torch.where(close, torch.where(m < 0.5, m + 2 * MARGIN, m - 2 * MARGIN), u)
        u = u.clamp(0.0, 1.0 - 2**-24)
        return u, (u < m).to(d)

    n_h0, h0 = draw(mean(v64 @ W64 + bh64, gaussian_h), gaussian_h)
    h = chain.to(d) if chain is not None else h0.to(v.dtype).to(d)
    ns_h, ns_v = [], []
    for _ in range(k):
        pv = mean(h @ W64.t() + bv64, gaussian_v)
        n_v, vs = draw(pv, gaussian_v)
        ns_v.append(n_v)
        # the state actually fed on is computed in v's dtype by both implementations
        vs = (vs if sample_visible else pv).to(v.dtype).to(d)
        n_h, h = draw(mean(vs @ W64 + bh64, gaussian_h), gaussian_h)
        ns_h.append(n_h)
        h = h.to(v.dtype).to(d)
    dt = v.dtype
    return ops.GibbsNoise(
        None if pcd_stats else n_h0.to(dt),
        torch.stack(ns_h).to(dt),
        torch.stack(ns_v).to(dt) if sample_visible else None,
    )


def tol(dtype):
    return (
        {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1e-10, "atol": 1e-10}
    )


rbm_cases = st.fixed_dictionaries(
    {
        "B": st.sampled_from([0, 1, 2, 3, 5, 8, 17]),
        "V": st.integers(1, 13),
        "H": st.integers(1, 11),
        "k": st.integers(1, 3),
        "dtype": st.sampled_from([torch.float32, torch.float64]),
        # (visible, hidden) unit types; both Gaussian has no distribution
        "units": st.sampled_from(
            [("bernoulli", "bernoulli"), ("gaussian", "bernoulli"), ("bernoulli", "gaussian")]
        ),
        "sample_visible": st.booleans(),
        "noncontig": st.booleans(),
        "seed": st.integers(0, 2**16),
    }
)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(c=rbm_cases)
def test_gibbs_chain_fused_equals_reference_given_noise(c):
    v, W, b_v, b_h = make_rbm(c["B"], c["V"], c["H"], c["dtype"], c["seed"], c["noncontig"])
    visible, hidden = c["units"]
    noise = safe_noise(v, W, b_v, b_h, c["k"], None, c["units"], c["sample_visible"], c["seed"])
    kw = {"visible": visible, "hidden": hidden, "sample_visible": c["sample_visible"]}
    got = ops.gibbs_chain(v, W, b_v, b_h, c["k"], noise=noise, **kw)
    want = reference.gibbs_chain(v, W, b_v, b_h, c["k"], noise=noise, **kw)
    assert isinstance(got, ops.GibbsChain)
    # Bernoulli samples are exact (the noise keeps clear of every threshold)
    exact = ("h0", "h") if hidden == "bernoulli" else ()
    if visible == "bernoulli" and c["sample_visible"]:
        exact += ("v",)
    for name in exact:
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    t = tol(c["dtype"])
    if "gaussian" in c["units"]:  # O(1) real states: more rounding reaches the end
        t = {"rtol": t["rtol"] * 10, "atol": t["atol"] * 10}
    for name in ("ph0", "h0", "v", "v_mean", "ph", "h"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **t)
    B, V, H = c["B"], c["V"], c["H"]
    assert [tuple(t.shape) for t in got] == [(B, H), (B, H), (B, V), (B, V), (B, H), (B, H)]
    assert all(t.dtype == c["dtype"] for t in got)


@needs_ext
@settings(max_examples=30, deadline=None)
@given(c=rbm_cases, pcd=st.booleans(), Bc=st.integers(1, 6))
def test_cd_step_fused_equals_reference_given_noise(c, pcd, Bc):
    v, W, b_v, b_h = make_rbm(c["B"], c["V"], c["H"], c["dtype"], c["seed"], c["noncontig"])
    chain = None
    if pcd:
        g = torch.Generator().manual_seed(c["seed"] + 1)
        chain = (torch.rand(Bc, c["H"], generator=g) < 0.5).to(c["dtype"])
    visible, hidden = c["units"]
    noise = safe_noise(
        v, W, b_v, b_h, c["k"], chain, c["units"], c["sample_visible"], c["seed"], pcd
    )
    kw = {"chain": chain, "visible": visible, "hidden": hidden}
    kw["sample_visible"] = c["sample_visible"]
    got = ops.cd_step(v, W, b_v, b_h, c["k"], noise=noise, **kw)
    want = reference.cd_step(v, W, b_v, b_h, c["k"], noise=noise, **kw)
    assert isinstance(got, ops.CDStats)
    t = tol(c["dtype"])
    if "gaussian" in c["units"]:  # Gaussian states are O(1) reals: more rounding
        t = {"rtol": t["rtol"] * 10, "atol": t["atol"] * 10}
    if hidden == "bernoulli":
        assert torch.equal(got.chain, want.chain)
    else:
        torch.testing.assert_close(got.chain, want.chain, **t)
    for name in ("dW", "db_v", "db_h"):
        torch.testing.assert_close(getattr(got, name), getattr(want, name), **t)
    torch.testing.assert_close(got.recon_error, want.recon_error, **t)
    V, H = c["V"], c["H"]
    assert got.dW.shape == (V, H) and got.db_v.shape == (V,) and got.db_h.shape == (H,)
    assert got.chain.shape == (Bc if pcd else c["B"], H) and got.recon_error.shape == ()


def test_cd_step_statistics_by_hand():
    """CD-1 with explicit noise, checked against the formulas written out directly."""
    v, W, b_v, b_h = make_rbm(6, 5, 4, torch.float64, 3)
    noise = safe_noise(v, W, b_v, b_h, 1, None, ("bernoulli", "bernoulli"), True, 3)
    s = ops.cd_step(v, W, b_v, b_h, 1, noise=noise)
    ph0 = torch.sigmoid(v @ W + b_h)
    h0 = (noise.h0 < ph0).double()
    pv = torch.sigmoid(h0 @ W.t() + b_v)
    v1 = (noise.v[0] < pv).double()
    ph1 = torch.sigmoid(v1 @ W + b_h)
    torch.testing.assert_close(s.dW, (v.t() @ ph0 - v1.t() @ ph1) / 6)
    torch.testing.assert_close(s.db_v, (v - v1).mean(0))
    torch.testing.assert_close(s.db_h, (ph0 - ph1).mean(0))
    torch.testing.assert_close(s.recon_error, ((v - pv) ** 2).sum(1).mean())
    torch.testing.assert_close(s.chain, (noise.h[0] < ph1).double())


def test_empty_batch_gives_zero_statistics():
    v, W, b_v, b_h = make_rbm(0, 5, 4, torch.float32, 0)
    s = ops.cd_step(v, W, b_v, b_h, 2)
    assert torch.count_nonzero(s.dW) == 0 and torch.count_nonzero(s.db_v) == 0
    assert s.chain.shape == (0, 4) and float(s.recon_error) == 0.0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("op", ["fused", "reference"])
def test_sampling_frequencies_match_probabilities(op, dtype):
    """Without explicit noise: sample means agree with the probabilities (5 sigma)."""
    if op == "fused" and not FUSED_CPU:
        pytest.skip("CPU extension not loaded")
    fn = ops.gibbs_chain if op == "fused" else reference.gibbs_chain
    n = 4000
    g = torch.Generator().manual_seed(11)
    W = (torch.randn(6, 5, generator=g) * 1.5).to(dtype)
    b_v = torch.linspace(-2, 2, 6, dtype=dtype)
    b_h = torch.linspace(-1, 1, 5, dtype=dtype)
    v = (torch.rand(1, 6, generator=g) < 0.5).to(dtype).expand(n, 6).contiguous()
    out = fn(v, W, b_v, b_h, 1, generator=g)

    def check(samples, probs):
        # Var(mean_i (s_i - p_i)) = mean_i p_i (1 - p_i) / n for independent draws
        se = ((probs * (1 - probs)).mean(0) / n).sqrt().clamp_min(1e-3)
        z = (samples.mean(0) - probs.mean(0)).abs() / se
        assert float(z.max()) < 5.0, z

    check(out.h0, out.ph0)  # every row has the same ph0
    check(out.h, out.ph)  # E[h] = E[ph] over the chain
    check(out.v, out.v_mean)
    assert set(out.h0.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("layer", ["visible", "hidden"])
@pytest.mark.parametrize("op", ["fused", "reference"])
def test_gaussian_unit_noise_is_standard_normal(op, layer):
    if op == "fused" and not FUSED_CPU:
        pytest.skip("CPU extension not loaded")
    fn = ops.gibbs_chain if op == "fused" else reference.gibbs_chain
    v, W, b_v, b_h = make_rbm(3000, 8, 4, torch.float64, 5)
    out = fn(v, W, b_v, b_h, 1, generator=torch.Generator().manual_seed(1), **{layer: "gaussian"})
    pairs = [(out.v, out.v_mean)] if layer == "visible" else [(out.h0, out.ph0), (out.h, out.ph)]
    for sample, mean in pairs:
        z = (sample - mean).flatten()
        assert abs(float(z.mean())) < 0.03 and abs(float(z.std()) - 1.0) < 0.03
        assert abs(float((z**3).mean())) < 0.1 and abs(float((z**4).mean()) - 3.0) < 0.2
    if layer == "hidden":  # linear means: E[h | v] = v W + b_h
        torch.testing.assert_close(out.ph0, v @ W + b_h)


@pytest.mark.parametrize("fn", [ops.gibbs_chain, ops.cd_step, reference.cd_step])
def test_seeded_runs_reproduce(fn):
    v, W, b_v, b_h = make_rbm(9, 7, 5, torch.float32, 2)

    def run(seed):
        return fn(v, W, b_v, b_h, 2, generator=torch.Generator().manual_seed(seed))

    a, b, c = run(123), run(123), run(124)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))
    torch.manual_seed(7)
    d = fn(v, W, b_v, b_h, 2)
    torch.manual_seed(7)
    e = fn(v, W, b_v, b_h, 2)
    assert all(torch.equal(x, y) for x, y in zip(d, e))


@needs_ext
def test_samples_do_not_depend_on_thread_count():
    v, W, b_v, b_h = make_rbm(300, 200, 150, torch.float32, 4)  # large enough to thread
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        a = ops.gibbs_chain(v, W, b_v, b_h, 1, generator=torch.Generator().manual_seed(5))
        torch.set_num_threads(max(2, threads))
        b = ops.gibbs_chain(v, W, b_v, b_h, 1, generator=torch.Generator().manual_seed(5))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(a.h0, b.h0)


def test_pcd_chain_round_trip_and_learning_signal():
    """PCD: the returned chain feeds the next call; CD-1 training lowers the error."""
    torch.manual_seed(0)
    data = (torch.rand(64, 20) < torch.linspace(0.05, 0.95, 20)).float()
    W = torch.zeros(20, 8)
    b_v = torch.zeros(20)
    b_h = torch.zeros(8)
    g = torch.Generator().manual_seed(0)
    first = ops.cd_step(data, W, b_v, b_h, generator=g).recon_error
    chain = torch.zeros(16, 8)
    for _ in range(200):
        s = ops.cd_step(data, W, b_v, b_h, generator=g)
        W += 0.1 * s.dW
        b_v += 0.1 * s.db_v
        b_h += 0.1 * s.db_h
        p = ops.cd_step(data, W, b_v, b_h, chain=chain, generator=g)
        assert p.chain.shape == (16, 8)
        # PCD's monitor: the mean-field reconstruction of the batch
        mean_field = torch.sigmoid(torch.sigmoid(data @ W + b_h) @ W.t() + b_v)
        torch.testing.assert_close(p.recon_error, ((data - mean_field) ** 2).sum(1).mean())
        chain = p.chain
    last = ops.cd_step(data, W, b_v, b_h, generator=g).recon_error
    assert float(last) < 0.8 * float(first)
    # the visible biases learn the per-pixel means
    assert float(torch.corrcoef(torch.stack([b_v, data.mean(0)]))[0, 1]) > 0.9


def test_inputs_requiring_grad_are_detached():
    v, W, b_v, b_h = make_rbm(4, 5, 3, torch.float32, 0)
    W.requires_grad_(True)
    s = ops.cd_step(v, W, b_v, b_h)
    assert not s.dW.requires_grad


@needs_ext
def test_opcheck_gibbs_ops():
    from torch.library import opcheck

    v, W, b_v, b_h = make_rbm(6, 5, 3, torch.float64, 1)
    rng = torch.tensor([3, 4])
    chain = torch.ones(4, 3, dtype=torch.float64)  # PCD state with Bc != B
    noise = safe_noise(v, W, b_v, b_h, 2, None, ("bernoulli", "bernoulli"), True, 1)
    for args in [
        (v, W, b_v, b_h, 2, False, False, True, rng, None, None, None),
        (v, W, b_v, b_h, 1, True, False, False, rng, None, None, None),
        (v, W, b_v, b_h, 1, False, True, True, rng, None, None, None),
        (v, W, b_v, b_h, 2, False, False, True, rng, *noise),
    ]:
        opcheck(torch.ops.aecore.gibbs_chain, args)
    for args in [
        (v, W, b_v, b_h, 2, None, False, False, True, rng, None, None, None),
        (v, W, b_v, b_h, 1, None, True, False, False, rng, None, None, None),
        (v, W, b_v, b_h, 1, None, False, True, False, rng, None, None, None),
    ]:
        opcheck(torch.ops.aecore.cd_step, args)
    opcheck(
        torch.ops.aecore.cd_step,
        (v, W, b_v, b_h, 1, chain, True, False, True, rng, None, None, None),
    )


@needs_ext
def test_torch_compile_fullgraph():
    v, W, b_v, b_h = make_rbm(8, 6, 4, torch.float32, 1)

    @torch.compile(fullgraph=True, backend="aot_eager")
    def step(v, W, b_v, b_h, chain):
        s = ops.cd_step(v, W, b_v, b_h, 2, chain=chain)
        g = ops.gibbs_chain(v, W, b_v, b_h, 1, visible="gaussian")
        lin = ops.cd_step(v, W, b_v, b_h, 1, hidden="gaussian")
        return W + 0.1 * s.dW, s.chain, g.v_mean, lin.dW

    W2, chain, vm, dW = step(v, W, b_v, b_h, torch.zeros(3, 4))
    assert W2.shape == W.shape and chain.shape == (3, 4) and vm.shape == (8, 6)
    assert dW.shape == W.shape
    assert set(chain.unique().tolist()) <= {0.0, 1.0}


# --- bad inputs: a clear Python error, before any kernel runs ---------------------------

V5 = torch.zeros(4, 5)
W53 = torch.zeros(5, 3)
BV = torch.zeros(5)
BH = torch.zeros(3)

BAD = [
    ((V5[0], W53, BV, BH), {}, ShapeError, r"v must be 2-D, got shape \(5,\)"),
    ((V5.long(), W53, BV, BH), {}, ConfigError, "v must be float32 or float64"),
    ((V5, W53.double(), BV, BH), {}, ConfigError, "W has dtype torch.float64 but v has"),
    ((V5, torch.zeros(3, 5), BV, BH), {}, ShapeError, r"W must have shape \(V, H\) with V"),
    ((V5, W53, torch.zeros(4), BH), {}, ShapeError, r"b_v must have shape \(5,\)"),
    ((V5, W53, BV, torch.zeros(5)), {}, ShapeError, r"b_h must have shape \(3,\)"),
    ((V5, W53, BV, BH.to("meta")), {}, ConfigError, "b_h is on meta but v is on cpu"),
    ((V5, W53, BV, BH, 0), {}, ConfigError, r"k must lie in \[1, 10000\], got 0"),
    ((V5, W53, BV, BH, 2.0), {}, ConfigError, "k must be an int"),
    ((V5, W53, BV, BH, True), {}, ConfigError, "k must be an int"),
    ((V5, W53, BV, BH), {"visible": "poisson"}, ConfigError, "visible must be 'bernoulli'"),
    ((V5, W53, BV, BH), {"hidden": "relu"}, ConfigError, "hidden must be 'bernoulli'"),
    (
        (V5, W53, BV, BH),
        {"visible": "gaussian", "hidden": "gaussian"},
        ConfigError,
        "visible='gaussian' with hidden='gaussian' has no normalisable distribution",
    ),
    ((V5, W53, BV, BH), {"generator": 3}, ConfigError, "generator must be a torch.Generator"),
    ((V5, W53, BV, BH), {"noise": (1, 2, 3)}, ConfigError, "noise must be an aecore.ops"),
    (
        (V5, W53, BV, BH),
        {"noise": ops.GibbsNoise(torch.zeros(4, 3), torch.zeros(2, 4, 3), torch.zeros(1, 4, 5))},
        ShapeError,
        r"noise.h must have shape \(1, 4, 3\)",
    ),
]


@pytest.mark.parametrize("fn", [ops.gibbs_chain, ops.cd_step, reference.cd_step])
@pytest.mark.parametrize(("args", "kwargs", "exc", "msg"), BAD)
def test_bad_inputs_raise_clear_errors(fn, args, kwargs, exc, msg):
    with pytest.raises(exc, match=msg) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, ValueError)


def test_bad_chain():
    with pytest.raises(ShapeError, match=r"chain must have shape \(batch, 3\), got \(2, 4\)"):
        ops.cd_step(V5, W53, BV, BH, chain=torch.zeros(2, 4))
    with pytest.raises(ConfigError, match="chain has dtype torch.float64"):
        ops.cd_step(V5, W53, BV, BH, chain=torch.zeros(2, 3, dtype=torch.float64))


@needs_ext
def test_small_problems_restore_the_thread_settings():
    """Small Gibbs problems run serially inside the op (per-thread OpenMP / MKL settings);
    the caller's thread count is back afterwards, also when the op raises, and the samples
    do not depend on it."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        v, W, b_v, b_h = make_rbm(16, 8, 6, torch.float32, 5)
        a = ops.cd_step(v, W, b_v, b_h, generator=torch.Generator().manual_seed(1))
        assert torch.get_num_threads() == 2
        rng = torch.zeros(2, dtype=torch.int64)
        with pytest.raises(RuntimeError):
            torch.ops.aecore.cd_step(
                v, W, b_v[:3], b_h, 1, None, False, False, True, rng, None, None, None
            )
        assert torch.get_num_threads() == 2
        torch.set_num_threads(1)
        b = ops.cd_step(v, W, b_v, b_h, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a.chain, b.chain, rtol=0, atol=0)
    finally:
        torch.set_num_threads(before)


def test_noise_and_a_generator_together_are_refused():
    # the generator was silently ignored: noise supplies every draw
    from aecore.errors import ConfigError

    v, W = torch.rand(4, 3), torch.randn(3, 2)
    noise = ops.GibbsNoise(h0=torch.rand(4, 2), h=torch.rand(1, 4, 2), v=torch.rand(1, 4, 3))
    ops.gibbs_chain(v, W, torch.zeros(3), torch.zeros(2), noise=noise)  # alone: fine
    with pytest.raises(ConfigError, match="pass generator or noise, not both"):
        ops.gibbs_chain(v, W, torch.zeros(3), torch.zeros(2), generator=torch.Generator(),
                        noise=noise)  # fmt: skip
