"""aecore.ops.momentum_step_ and cd_update_: the fused updates against the reference, all
or nothing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_ops_rbm import make_rbm, rbm_cases, safe_noise, tol

from aecore import ops
from aecore.errors import ConfigError, ShapeError
from aecore.ops import reference

FUSED_CPU = ops.backend("momentum_step_", "cpu") == "fused cpu"
needs_ext = pytest.mark.skipif(not FUSED_CPU, reason="CPU extension not loaded")


def operands(shapes, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    made = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    return made  # params, velocities, steps


def clone(ts):
    return [t.clone() for t in ts]


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(
        st.sampled_from([(1,), (7,), (3, 5), (64, 33), (300, 200)]), min_size=1, max_size=4
    ),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    lr=st.floats(0.0, 1.0),
    momentum=st.floats(0.0, 0.99),
    decay=st.floats(0.0, 0.1),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_reference(shapes, dtype, lr, momentum, decay, seed):
    params, velocities, steps = operands(shapes, dtype, seed)
    decays = [decay] + [0.0] * (len(shapes) - 1)
    p_ref, v_ref = clone(params), clone(velocities)
    assert bool(ops.momentum_step_(params, velocities, steps, lr, momentum, decays))
    assert bool(reference.momentum_step_(p_ref, v_ref, steps, lr, momentum, decays))
    tol = 1e-6 if dtype == torch.float32 else 1e-12
    for got, want in zip(params + velocities, p_ref + v_ref):
        torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1])
def test_a_non_finite_step_changes_nothing(bad, where):
    params, velocities, steps = operands([(300, 200), (200,)], torch.float32, 0)
    steps[where].view(-1)[-1] = bad
    before = clone(params) + clone(velocities)
    applied = ops.momentum_step_(params, velocities, steps, 0.1, 0.5)
    assert applied.dtype == torch.bool and not bool(applied)
    assert all(torch.equal(a, b) for a, b in zip(params + velocities, before))


def test_non_contiguous_parameters_take_the_reference():
    params, velocities, steps = operands([(6, 4)], torch.float64, 1)
    p_t = [params[0].t().contiguous().t()]
    p_ref, v_ref = clone(params), clone(velocities)
    assert bool(ops.momentum_step_(p_t, velocities, steps, 0.2, 0.9, [0.01]))
    reference.momentum_step_(p_ref, v_ref, steps, 0.2, 0.9, [0.01])
    torch.testing.assert_close(p_t[0], p_ref[0])
    torch.testing.assert_close(velocities[0], v_ref[0])


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(steps=[a["steps"][0][:2]]), ShapeError, r"steps\[0\] has shape"),
        (lambda a: a.update(velocities=[]), ConfigError, "one velocity, step"),
        (lambda a: a.update(steps=[a["steps"][0].double()]), ConfigError, "dtype"),
        (lambda a: a.update(lr=math.nan), ConfigError, "lr must be a finite"),
        (lambda a: a.update(momentum="0.9"), ConfigError, "momentum must be a finite"),
        (lambda a: a.update(weight_decay=[math.inf]), ConfigError, "weight_decay"),
        (lambda a: a.update(params=(a["params"][0],)), None, None),  # a tuple is fine
        (lambda a: a.update(params=[]), ConfigError, "params is empty"),
        (lambda a: a.update(steps=a["steps"][0]), ConfigError, "list of tensors"),
    ],
)
def test_bad_operands_are_named_and_nothing_changes(change, error, match):
    params, velocities, steps = operands([(3, 4)], torch.float32, 2)
    args = dict(params=params, velocities=velocities, steps=steps, lr=0.1, momentum=0.5,
                weight_decay=[0.0])  # fmt: skip
    change(args)
    before = [t.clone() for t in params + velocities]
    if error is None:
        ops.momentum_step_(**args)
        return
    with pytest.raises(error, match=match):
        ops.momentum_step_(**args)
    assert all(torch.equal(a, b) for a, b in zip(params + velocities, before))


@needs_ext
def test_opcheck():
    from torch.library import opcheck

    params, velocities, steps = operands([(5, 3), (3,)], torch.float64, 3)
    opcheck(torch.ops.aecore.momentum_step_, (params, velocities, steps, 0.1, 0.5, [0.01, 0.0]))


# --- cd_update_: cd_step, momentum_step_ and the chain advanced, in one call ------------


def rbm_state(c, pcd, Bc):
    """Operands of a cd_update_ call for a test_ops_rbm case: contiguous parameters (the
    kernels update them in place) with random velocities, and a PCD chain or None."""
    v, W, b_v, b_h = make_rbm(c["B"], c["V"], c["H"], c["dtype"], c["seed"], c["noncontig"])
    W, b_v, b_h = (t.contiguous() for t in (W, b_v, b_h))
    g = torch.Generator().manual_seed(c["seed"] + 2)
    velocities = [torch.randn(t.shape, generator=g).to(c["dtype"]) * 0.1 for t in (W, b_v, b_h)]
    chain = (torch.rand(Bc, c["H"], generator=g) < 0.5).to(c["dtype"]) if pcd else None
    return v, [W, b_v, b_h], velocities, chain


@needs_ext
@settings(max_examples=30, deadline=None)
@given(
    c=rbm_cases,
    pcd=st.booleans(),
    Bc=st.integers(1, 6),
    lr=st.floats(0.0, 0.5),
    momentum=st.floats(0.0, 0.9),
    decay=st.floats(0.0, 0.01),
)
def test_cd_update_fused_equals_reference_given_noise(c, pcd, Bc, lr, momentum, decay):
    v, params, velocities, chain = rbm_state(c, pcd, Bc)
    noise = safe_noise(v, *params, c["k"], chain, c["units"], c["sample_visible"], c["seed"], pcd)
    visible, hidden = c["units"]
    kw = {"visible": visible, "hidden": hidden, "sample_visible": c["sample_visible"]}
    ref = [clone(params), clone(velocities), None if chain is None else chain.clone()]
    got = ops.cd_update_(
        v, *params, velocities, lr, momentum, decay, c["k"], chain=chain, noise=noise, **kw
    )
    want = reference.cd_update_(
        v, *ref[0], ref[1], lr, momentum, decay, c["k"], chain=ref[2], noise=noise, **kw
    )
    assert bool(got[1]) and bool(want[1])
    t = tol(c["dtype"])
    if "gaussian" in c["units"]:  # Gaussian states are O(1) reals: more rounding
        t = {"rtol": t["rtol"] * 10, "atol": t["atol"] * 10}
    torch.testing.assert_close(got[0], want[0], **t)
    for a, b in zip(params + velocities, ref[0] + ref[1]):
        torch.testing.assert_close(a, b, **t)
    if pcd:
        torch.testing.assert_close(chain, ref[2], rtol=0 if hidden == "bernoulli" else t["rtol"],
                                   atol=0 if hidden == "bernoulli" else t["atol"])  # fmt: skip


@pytest.mark.parametrize("pcd", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("strided", [False, True])
def test_cd_update_is_cd_step_then_momentum_step_then_the_chain(pcd, dtype, strided):
    """Same generator state, same samples: the one call changes exactly what the three
    calls it replaces change, with parameters the kernels update in place and with
    strided ones (scikit-learn's components_.T as W) alike."""
    c = {"B": 9, "V": 7, "H": 5, "dtype": dtype, "seed": 4, "noncontig": False}
    v, params, velocities, chain = rbm_state(c, pcd, 6)
    if strided:
        params[0] = params[0].t().contiguous().t()
        velocities[2] = torch.stack([velocities[2], velocities[2]], 1)[:, 0]
    p2, vel2 = clone(params), clone(velocities)
    chain2 = None if chain is None else chain.clone()
    recon, applied = ops.cd_update_(
        v, *params, velocities, 0.1, 0.5, 0.01, 2, chain=chain,
        generator=torch.Generator().manual_seed(7),
    )  # fmt: skip
    stats = ops.cd_step(v, *p2, 2, chain=chain2, generator=torch.Generator().manual_seed(7))
    assert bool(ops.momentum_step_(p2, vel2, [stats.dW, stats.db_v, stats.db_h], 0.1, 0.5,
                                   [0.01, 0.0, 0.0]))  # fmt: skip
    assert applied.dtype == torch.bool and bool(applied)
    assert recon.shape == () and torch.equal(recon, stats.recon_error)
    assert all(torch.equal(a, b) for a, b in zip(params + velocities, p2 + vel2))
    if pcd:
        assert torch.equal(chain, stats.chain)


@pytest.mark.parametrize("op", ["cd_update_", "cd_update_own_"])
def test_cd_update_refuses_operands_it_would_write_to_twice(op):
    c = {"B": 8, "V": 6, "H": 4, "dtype": torch.float32, "seed": 5, "noncontig": False}
    v, params, velocities, _ = rbm_state(c, False, 3)
    before = clone(params) + clone(velocities)
    for change in (
        {"chain": torch.zeros(1, 4).expand(3, 4)},
        {"velocities": [velocities[0], torch.zeros(1).expand(6), velocities[2]]},
    ):
        kw = {"velocities": velocities, **change}
        with pytest.raises(ConfigError, match="written in place, but its elements share memory"):
            CD_UPDATES[op](v, *params, lr=0.1, momentum=0.5, **kw)
        assert all(torch.equal(a, b) for a, b in zip(params + velocities, before))


@pytest.mark.parametrize("pcd", [False, True])
def test_cd_update_with_non_finite_statistics_changes_nothing(pcd):
    c = {"B": 8, "V": 6, "H": 4, "dtype": torch.float32, "seed": 5, "noncontig": False}
    v, params, velocities, chain = rbm_state(c, pcd, 3)
    v[2, 1] = math.nan
    before = clone(params) + clone(velocities) + ([] if chain is None else [chain.clone()])
    recon, applied = ops.cd_update_(v, *params, velocities, 0.1, 0.5, chain=chain)
    assert applied.dtype == torch.bool and not bool(applied)
    after = params + velocities + ([] if chain is None else [chain])
    assert all(torch.equal(a, b) for a, b in zip(after, before))


@pytest.mark.parametrize(
    ("change", "error", "match"),
    [
        (lambda a: a.update(velocities=a["velocities"][:2]), ConfigError, "list of three"),
        (lambda a: a.update(velocities=a["velocities"][0]), ConfigError, "list of three"),
        (
            lambda a: a["velocities"].__setitem__(0, torch.zeros(3, 6)),
            ShapeError,
            r"velocity of W must have W's shape \(6, 3\), got \(3, 6\)",
        ),
        (
            lambda a: a["velocities"].__setitem__(2, torch.zeros(3).double()),
            ConfigError,
            "velocity of b_h has dtype",
        ),
        (lambda a: a.update(weight_decay=math.nan), ConfigError, "weight_decay must be a finite"),
        (lambda a: a.update(momentum="0.9"), ConfigError, "momentum must be a real number"),
        (lambda a: a.update(k=0), ConfigError, "k must lie in"),
        (lambda a: a.update(chain=torch.zeros(4, 5)), ShapeError, "chain must have shape"),
        (lambda a: a.update(k=10_001), ConfigError, "k must lie in"),
        (lambda a: a.update(visible="gaussian", hidden="gaussian"), ConfigError, "no normalis"),
        (lambda a: a.update(hidden="Bernoulli"), ConfigError, "hidden must be 'bernoulli' or"),
    ],
)
@pytest.mark.parametrize("op", ["cd_update_", "cd_update_own_"])
def test_cd_update_bad_operands_are_named_and_nothing_changes(change, error, match, op):
    """cd_update_own_ skips the checks, but a call the kernels refuse gets cd_update_'s
    message, with nothing changed, all the same."""
    v, W, b_v, b_h = make_rbm(4, 6, 3, torch.float32, 8)
    velocities = [torch.zeros(t.shape) for t in (W, b_v, b_h)]
    args = dict(v=v, W=W, b_v=b_v, b_h=b_h, velocities=velocities, lr=0.1, momentum=0.5)
    change(args)
    before = [t.clone() for t in (W, b_v, b_h)]
    with pytest.raises(error, match=f"cd_update_: .*{match}"):
        CD_UPDATES[op](**args)
    assert all(torch.equal(a, b) for a, b in zip((W, b_v, b_h), before))


def own_update(v, W, b_v, b_h, velocities, lr, momentum, weight_decay=0.0, k=1, *, chain=None,
               visible="bernoulli", hidden="bernoulli", sample_visible=True):  # fmt: skip
    """cd_update_own_ with cd_update_'s defaults."""
    return ops.cd_update_own_(
        v, W, b_v, b_h, velocities, lr, momentum, weight_decay, k, chain=chain,
        visible=visible, hidden=hidden, sample_visible=sample_visible,
    )  # fmt: skip


CD_UPDATES = {"cd_update_": ops.cd_update_, "cd_update_own_": own_update}


@pytest.mark.parametrize("pcd", [False, True])
@pytest.mark.parametrize("strided", [False, True])
@pytest.mark.parametrize("grad", [False, True])
def test_cd_update_own_is_cd_update(pcd, strided, grad):
    """The same step as cd_update_ for the same generator state: on the kernels, on the
    reference's update where a parameter is strided, with or without grad mode."""
    c = {"B": 9, "V": 7, "H": 5, "dtype": torch.float32, "seed": 4, "noncontig": False}
    v, params, velocities, chain = rbm_state(c, pcd, 6)
    if strided:
        params[0] = params[0].t().contiguous().t()
    p2, vel2 = clone(params), clone(velocities)
    chain2 = None if chain is None else chain.clone()
    torch.manual_seed(3)
    with torch.set_grad_enabled(grad):
        got = own_update(v, *params, velocities, 0.1, 0.5, 0.01, 2, chain=chain)
    torch.manual_seed(3)
    want = ops.cd_update_(v, *p2, vel2, 0.1, 0.5, 0.01, 2, chain=chain2)
    assert torch.equal(got[0], want[0]) and bool(got[1]) and bool(want[1])
    assert all(torch.equal(a, b) for a, b in zip(params + velocities, p2 + vel2))
    if pcd:
        assert torch.equal(chain, chain2)


@needs_ext
def test_cd_update_opcheck():
    from torch.library import opcheck

    v, W, b_v, b_h = make_rbm(6, 5, 3, torch.float64, 9)
    velocities = [torch.zeros(t.shape, dtype=torch.float64) for t in (W, b_v, b_h)]
    rng = torch.tensor([3, 4])
    chain = torch.ones(4, 3, dtype=torch.float64)
    for k, c, units in [(2, None, (False, False, True)), (1, chain, (True, False, False))]:
        args = (v, W, b_v, b_h, *velocities, k, c, *units, rng, 0.1, 0.5, 0.01, None, None, None)
        opcheck(torch.ops.aecore.cd_update_, args)


def test_momentum_step_refuses_operands_it_cannot_write_before_changing_anything():
    # an expanded velocity once failed half-way, after the first parameter had moved
    params, steps = [torch.zeros(4), torch.zeros(3)], [torch.ones(4), torch.ones(3)]
    velocities = [torch.zeros(4), torch.zeros(1).expand(3)]
    with pytest.raises(ConfigError, match=r"velocities\[1\] is written in place, but its elem"):
        ops.momentum_step_(params, velocities, steps, 0.1, 0.5)
    assert not params[0].any() and not velocities[0].any()
    fresh = [torch.zeros(4), torch.zeros(3)]
    with pytest.raises(ConfigError, match="params must be a list of tensors, got Tensor"):
        ops.momentum_step_(torch.zeros(4), fresh, steps, 0.1, 0.5)
    with pytest.raises(ConfigError, match="weight_decay must be a list of numbers, one per"):
        ops.momentum_step_(params, fresh, steps, 0.1, 0.5, weight_decay=0.1)


@pytest.mark.parametrize("impl", ["fused", "reference"])
@pytest.mark.parametrize(
    "op", ["momentum_step_", "cd_update_", "cd_update_own_", "set_row_norms_", "remove_parallel_"]
)
def test_in_place_ops_bump_the_version_so_autograd_sees_the_change(impl, op, monkeypatch):
    # a backward that saved a tensor one of these ops changed must be refused, as after
    # torch's own in-place ops, not run with the new values
    if impl == "fused" and not FUSED_CPU:
        pytest.skip("CPU extension not loaded")
    if impl == "reference":
        monkeypatch.setattr(ops, "fused", lambda t: False)
        monkeypatch.setattr(ops.updates, "fused", lambda t: False)
        monkeypatch.setattr(ops, "_fused_sae", lambda t: False)
    W = torch.randn(6, 4)
    with torch.no_grad():
        if op == "momentum_step_":
            ops.momentum_step_([W], [torch.zeros(6, 4)], [torch.randn(6, 4)], 0.1, 0.5)
        elif op in ("cd_update_", "cd_update_own_"):
            v = torch.rand(3, 6)
            velocities = [torch.zeros(6, 4), torch.zeros(6), torch.zeros(4)]
            CD_UPDATES[op](v, W, torch.zeros(6), torch.zeros(4), velocities, 0.1, 0.5)
        elif op == "set_row_norms_":
            ops.set_row_norms_(W, 2.0)
        else:
            ops.remove_parallel_(W, torch.randn(6, 4))
    assert W._version > 0


def test_the_references_validate_as_the_ops_do():
    # the reference is the drop-in its docstring promises: a negative norm flipped every
    # row, one weight row was broadcast over all, a NaN lr made the parameters NaN and
    # returned applied=True, and the ops' keywords were refused
    from aecore.errors import NonFiniteError

    w, g = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.raises(ConfigError, match="norm"):
        reference.set_row_norms_(w, -1.0)
    with pytest.raises(ShapeError):
        reference.remove_parallel_(g, w[:1])
    p, v = torch.zeros(3), torch.zeros(3)
    with pytest.raises(ConfigError):
        reference.momentum_step_([p], [v], [torch.ones(3)], float("nan"), 0.5)
    assert bool(reference.momentum_step_([p], [v], [torch.ones(3)], 0.1, 0.5))  # decay: None
    x, W = torch.randn(2, 3), torch.randn(5, 3)
    b_enc = torch.zeros(5)
    b_enc[1] = float("nan")
    with pytest.raises(NonFiniteError):
        reference.topk_encode(x, W, b_enc, torch.zeros(3), 2)
    reference.topk_encode(x, W, b_enc, torch.zeros(3), 2, check_finite=False)
    values, indices = torch.rand(2, 2), torch.tensor([[0, 1], [2, 3]])
    reference.sparse_decode(values, indices, torch.randn(5, 3), torch.zeros(3), check_indices=False)


def test_in_place_ops_refuse_inference_tensors_outside_inference_mode():
    # the kernels write through raw pointers, so torch's own refusal never fired
    with torch.inference_mode():
        frozen = torch.randn(6, 5)
        frozen_vector = torch.zeros(3)
    before = frozen.clone()
    with pytest.raises(ConfigError, match="weight is an inference tensor"):
        ops.set_row_norms_(frozen, 1.0)
    with pytest.raises(ConfigError, match="grad is an inference tensor"):
        ops.remove_parallel_(frozen, torch.randn(6, 5))
    with pytest.raises(ConfigError, match=r"params\[1\] is an inference tensor"):
        ops.momentum_step_([torch.zeros(4), frozen_vector], [torch.zeros(4), torch.zeros(3)],
                           [torch.ones(4), torch.ones(3)], 0.1, 0.5)  # fmt: skip
    assert torch.equal(frozen, before) and not frozen_vector.any()
    with torch.inference_mode():  # inside inference mode the write is allowed
        ops.set_row_norms_(frozen, 2.0)
    torch.testing.assert_close(frozen.norm(dim=1), torch.full((6,), 2.0))


@pytest.mark.parametrize("op", ["cd_update_", "cd_update_own_"])
def test_cd_update_refuses_inference_tensors_outside_inference_mode(op):
    c = {"B": 8, "V": 6, "H": 4, "dtype": torch.float32, "seed": 5, "noncontig": False}
    v, params, velocities, _ = rbm_state(c, False, 3)
    with torch.inference_mode():
        frozen_W = params[0].clone()
    before = clone(params[1:]) + clone(velocities)
    with pytest.raises(ConfigError, match="W is an inference tensor"):
        CD_UPDATES[op](v, frozen_W, *params[1:], lr=0.1, momentum=0.5, velocities=velocities)
    assert torch.equal(frozen_W, params[0])
    assert all(torch.equal(a, b) for a, b in zip(params[1:] + velocities, before))
