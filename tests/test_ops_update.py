"""aecore.ops.momentum_step_: the fused update against the reference, all or nothing."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

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
