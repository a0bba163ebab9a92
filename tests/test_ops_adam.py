"""aecore.ops.adam_step_: the fused step against the reference and torch.optim's Adam and
AdamW, all or nothing, its argument errors; and the trainer's use of it, which must train
exactly as torch's optimizer does."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import aecore
from aecore import ops
from aecore.errors import ConfigError, ShapeError, TrainingError
from aecore.ops import reference
from aecore.training import optim

FUSED_CPU = ops.backend("adam_step_", "cpu") == "fused cpu"
needs_ext = pytest.mark.skipif(not FUSED_CPU, reason="CPU extension not loaded")
SHAPES = [(1,), (7,), (3, 5), (64, 33), (300, 200)]


def operands(shapes, dtype, seed, start=0.0):
    """params, grads, exp_avgs, exp_avg_sqs, steps: moments as after some steps."""
    g = torch.Generator().manual_seed(seed)
    made = [[torch.randn(s, generator=g).to(dtype) for s in shapes] for _ in range(3)]
    made.append([torch.rand(s, generator=g).to(dtype) for s in shapes])
    made.append([torch.tensor(float(start)) for _ in shapes])
    return made


def clone(groups):
    return [[t.clone() for t in group] for group in groups]


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    shapes=st.lists(st.sampled_from(SHAPES), min_size=1, max_size=4),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    lr=st.floats(0.0, 0.1),
    betas=st.tuples(st.floats(0.0, 0.99), st.floats(0.0, 0.9999)),
    eps=st.floats(1e-10, 1e-3),
    weight_decay=st.floats(0.0, 0.1),
    decoupled=st.booleans(),
    max_norm=st.one_of(st.none(), st.floats(1e-3, 1e3)),
    start=st.integers(0, 1000),
    seed=st.integers(0, 2**16),
)
def test_fused_matches_reference(
    shapes, dtype, lr, betas, eps, weight_decay, decoupled, max_norm, start, seed
):
    fused = operands(shapes, dtype, seed, start)
    ref = clone(fused)
    kw = {"decoupled": decoupled, "max_norm": max_norm}
    got = ops.adam_step_(*fused, lr, betas, eps, weight_decay, **kw)
    want = reference.adam_step_(*ref, lr, betas, eps, weight_decay, **kw)
    tol = 2e-6 if dtype == torch.float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0.0)
    assert got.dtype == torch.float64 and got.dim() == 0
    for got_group, want_group in zip(fused, ref):
        for a, b in zip(got_group, want_group):
            torch.testing.assert_close(a, b, rtol=tol, atol=tol)
    assert [float(s) for s in fused[4]] == [start + 1.0] * len(shapes)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("cls", "decoupled"), [(torch.optim.Adam, False), (torch.optim.AdamW, True)]
)
@pytest.mark.parametrize("max_norm", [None, 0.5])
def test_it_is_torch_optim_adam(dtype, cls, decoupled, max_norm):
    """Three steps with weight decay (and clipping) as torch's Adam or AdamW takes them."""
    params, *_ = operands([(40, 30), (30,), (1,)], dtype, 1)
    leaves = [p.clone().requires_grad_() for p in params]
    optimizer = cls(leaves, lr=0.01, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)
    moments = [[torch.zeros_like(p) for p in params] for _ in range(2)]
    steps = [torch.tensor(0.0) for _ in params]
    g = torch.Generator().manual_seed(2)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(dtype) * 3 for p in params]
        for leaf, grad in zip(leaves, grads):
            leaf.grad = grad.clone()
        want = torch.nn.utils.get_total_norm(grads)
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(leaves, max_norm)
        optimizer.step()
        norm = ops.adam_step_(params, grads, *moments, steps, 0.01, (0.8, 0.99), 1e-6, 0.1,
                              decoupled=decoupled, max_norm=max_norm)  # fmt: skip
        torch.testing.assert_close(norm, want.double(), rtol=1e-6, atol=0.0)
    # within a few roundings: 1 - beta2 rounded from a rounded beta2 once biased every
    # second moment by 1.3e-5 of itself
    tol = 1e-6 if dtype == torch.float32 else 1e-13
    for got, leaf in zip(params, leaves):
        torch.testing.assert_close(got, leaf.detach(), rtol=tol, atol=tol)
    state = [optimizer.state[leaf] for leaf in leaves]
    for got, s in zip(moments[0] + moments[1], [s["exp_avg"] for s in state] + [s["exp_avg_sq"] for s in state]):  # fmt: skip
        torch.testing.assert_close(got, s, rtol=tol, atol=tol * float(s.abs().max()))
    assert [float(s) for s in steps] == [3.0] * 3


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", [0, 1])
@pytest.mark.parametrize("impl", [ops.adam_step_, reference.adam_step_])
def test_a_non_finite_gradient_changes_nothing(bad, where, impl):
    groups = operands([(300, 200), (200,)], torch.float32, 0, start=4)
    groups[1][where].view(-1)[-1] = bad
    before = clone(groups)
    norm = impl(*groups, 0.1, max_norm=1.0)
    assert not math.isfinite(float(norm))
    for group, old in zip(groups, before):
        for a, b in zip(group, old):
            torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", [ops.adam_step_, reference.adam_step_])
def test_a_norm_beyond_the_dtype_is_refused_as_torch_refuses_it(impl):
    # finite in float64, but the squares overflow the gradients' float32, where torch
    # takes the norm (inf): the step was applied
    groups = operands([(30, 20), (20,)], torch.float32, 0)
    groups[1] = [torch.full_like(g, 3e19) for g in groups[1]]
    before = clone(groups)
    assert not torch.isfinite(torch.nn.utils.get_total_norm(groups[1]))
    assert float(impl(*groups, 0.1)) == math.inf
    for group, old in zip(groups, before):
        assert all(torch.equal(a, b) for a, b in zip(group, old))


@pytest.mark.parametrize("impl", [ops.adam_step_, reference.adam_step_])
def test_no_weight_decay_adds_no_term(impl):
    # 0 * an infinite parameter is NaN: torch adds no decay term at weight_decay=0
    groups = [[torch.tensor([math.inf, 1.0])], [torch.tensor([0.0, 1.0])],
              [torch.zeros(2)], [torch.zeros(2)], [torch.tensor(0.0)]]  # fmt: skip
    impl(*groups, 0.1)
    assert groups[0][0][0] == math.inf and groups[2][0][0] == 0.0


@needs_ext
def test_strided_operands_take_the_reference_with_the_same_result():
    groups = operands([(8, 6), (6,)], torch.float64, 5)
    ref = clone(groups)
    wide = torch.zeros(8, 12, dtype=torch.float64)
    wide[:, ::2] = groups[0][0]
    groups[0][0] = wide[:, ::2]  # a strided parameter: the kernels refuse it
    ops.adam_step_(*groups, 0.01, weight_decay=0.01)
    reference.adam_step_(*ref, 0.01, weight_decay=0.01)
    torch.testing.assert_close(wide[:, ::2], ref[0][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(groups[2][1], ref[2][1], rtol=1e-12, atol=1e-12)


def bad_calls():
    def args(**changes):
        groups = operands([(4, 3), (3,)], torch.float32, 0)
        call = dict(zip(("params", "grads", "exp_avgs", "exp_avg_sqs", "steps"), groups))
        call["lr"] = 0.01
        for key, change in changes.items():
            call[key] = change(call) if callable(change) else change
        return call

    return [
        (args(params=[]), ConfigError, "params is empty"),
        (args(grads=lambda c: c["grads"][:1]), ConfigError, "got 2 params, 1 grads"),
        (args(params=lambda c: c["params"][0]), ConfigError, "params must be a list of tensors"),
        (args(grads=lambda c: [c["grads"][0], c["grads"][1].double()]), ConfigError,
         r"grads\[1\] has dtype torch.float64 but params\[0\] has torch.float32"),
        (args(exp_avgs=lambda c: [c["exp_avgs"][0], torch.zeros(4)]), ShapeError,
         r"exp_avgs\[1\] has shape \(4,\), params\[1\] \(3,\)"),
        (args(steps=lambda c: [torch.zeros(2), c["steps"][1]]), ShapeError,
         r"steps\[0\] must be one number"),
        (args(steps=lambda c: [torch.tensor(-2.0), c["steps"][1]]), ConfigError,
         "step counts must be finite numbers >= 0"),
        (args(steps=lambda c: [torch.tensor(math.nan), c["steps"][1]]), ConfigError,
         "step counts must be finite numbers >= 0"),
        (args(exp_avg_sqs=lambda c: c["exp_avgs"]), ConfigError,
         r"exp_avg(_sq)?s\[(\d)\] shares memory with exp_avg(_sq)?s\[\2\]"),
        (args(steps=lambda c: [c["steps"][0], c["steps"][0]]), ConfigError,
         r"steps\[\d\] shares memory with steps\[\d\]"),
        (args(params=lambda c: [c["params"][0].half(), c["params"][1]]), ConfigError,
         r"params\[0\] must be float32 or float64, got torch.float16"),
        (args(grads=lambda c: [c["grads"][0].to_sparse(), c["grads"][1]]), ConfigError,
         "torch.optim.SparseAdam takes sparse gradients"),
        (args(lr=-0.1), ConfigError, r"adam_step_: lr must be a number in \[0, inf\); got -0.1"),
        (args(lr=math.nan), ConfigError, r"lr must be a number in \[0, inf\); got nan"),
        (args(betas=(0.9, 1.0)), ConfigError, r"betas\[1\] must be a number in \[0, 1\); got 1.0"),
        (args(betas=0.9), ConfigError, r"betas must be a pair \(beta1, beta2\), got 0.9"),
        (args(eps=-1e-8), ConfigError, r"eps must be a number in \[0, inf\); got -1e-08"),
        (args(weight_decay=-0.1), ConfigError, r"weight_decay must be a number in \[0, inf\); got -0.1"),
        (args(max_norm=0.0), ConfigError, r"max_norm must be a number in \(0, inf\), or None; got 0.0"),
        (args(exp_avgs=lambda c: [c["exp_avgs"][0].expand(4, 3), c["exp_avgs"][1]]),
         None, None),  # a view that repeats nothing is written as any tensor
        (args(exp_avgs=lambda c: [torch.zeros(1, 3).expand(4, 3), c["exp_avgs"][1]]),
         ConfigError, "elements share memory"),
    ]  # fmt: skip


@pytest.mark.parametrize(("call", "error", "match"), bad_calls())
@pytest.mark.parametrize("impl", [ops.adam_step_, reference.adam_step_])
def test_bad_arguments_are_named_and_change_nothing(call, error, match, impl):
    written = [t for key in ("params", "exp_avgs", "exp_avg_sqs", "steps")
               if isinstance(call[key], list) for t in call[key]]  # fmt: skip
    before = [t.clone() for t in written]
    if error is None:
        impl(**call)
        return
    with pytest.raises(error, match=match):
        impl(**call)
    for a, b in zip(written, before):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_an_inference_tensor_is_refused_outside_inference_mode():
    with torch.inference_mode():
        groups = operands([(4, 3)], torch.float32, 0)
    with pytest.raises(ConfigError, match=r"params\[0\] is an inference tensor"):
        ops.adam_step_(*groups, 0.01)
    with torch.inference_mode():
        ops.adam_step_(*groups, 0.01)
    assert float(groups[4][0]) == 1.0


@needs_ext
def test_opcheck():
    from torch.library import opcheck

    groups = operands([(5, 3), (3,)], torch.float64, 3)
    opcheck(torch.ops.aecore.adam_step_, (*groups, 0.01, 0.9, 0.999, 1e-8, 0.01, True, 1.0))


def test_backend_is_the_cpu_alone():
    assert ops.backend("adam_step_", "cuda").startswith("reference: ")
    assert ops.backend("adam_step_", "cpu") == ops.backend("cd_step", "cpu")


# --- the trainer's step -----------------------------------------------------------------

X = np.random.default_rng(0).random((120, 10)).astype(np.float32)


def train(monkeypatch, fused: bool, **settings):
    if not fused:
        monkeypatch.setattr(optim, "fused_adam_step", lambda optimizer, grad_clip: None)
    torch.manual_seed(0)
    # a random start and no validation rows: the run keeps its trained weights (a PCA
    # start could be kept instead, and two runs compared on that would agree vacuously)
    model = aecore.create("ae", input_shape=(10,), latent_dim=3, hidden=[16], init="random")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = aecore.Trainer(epochs=4, batch_size=32, progress=False, device="cpu", seed=0,
                             val_fraction=0.0, **settings)  # fmt: skip
    history = trainer.fit(model, X)
    monkeypatch.undo()
    assert history.kept_epoch == 4
    assert not any(torch.equal(v, start[k]) for k, v in model.state_dict().items())
    return model, trainer


@needs_ext
@pytest.mark.parametrize(
    "settings",
    [{}, {"grad_clip": 0.05}, {"optimizer": "adamw", "weight_decay": 0.01},
     {"optimizer": "adam", "weight_decay": 0.01}],
)  # fmt: skip
def test_the_trainer_steps_as_torch_optim_does(monkeypatch, settings):
    calls = []
    real = optim.fused_adam_step
    monkeypatch.setattr(optim, "fused_adam_step", lambda *a: calls.append(1) or real(*a))
    fused, _ = train(monkeypatch, True, **settings)
    assert len(calls) == 16  # every step fused (4 epochs of 4 batches)
    torch_, _ = train(monkeypatch, False, **settings)
    for (name, a), b in zip(fused.state_dict().items(), torch_.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@needs_ext
def test_its_optimizer_state_is_torch_adams(monkeypatch):
    """A checkpoint of the fused step's state loads into torch's Adam and steps on alike."""
    model, _ = train(monkeypatch, True)
    leaves = list(model.parameters())
    optimizer = torch.optim.Adam(leaves, lr=1e-3)
    for p in leaves:
        p.grad = torch.ones_like(p)
    fused = optim.fused_adam_step(optimizer, None)
    assert fused is not None and math.isfinite(fused)
    saved = optimizer.state_dict()
    assert {k for s in saved["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    other = torch.optim.Adam([p.detach().clone().requires_grad_() for p in leaves], lr=1e-3)
    other.load_state_dict(saved)
    assert all(float(s["step"]) == 1.0 for s in other.state.values())


@needs_ext
def test_a_non_finite_gradient_stops_the_fused_step_before_it_changes_a_weight(monkeypatch):
    model = aecore.create("ae", input_shape=(10,), latent_dim=3, hidden=[16])
    at_the_step = {}

    def poisoned():  # a finite loss whose gradient overflows
        at_the_step.update({k: v.clone() for k, v in model.state_dict().items()})
        for p in model.parameters():
            p.grad[...] = float("inf")

    model.before_optimizer_step = poisoned
    trainer = aecore.Trainer(epochs=1, batch_size=32, progress=False, device="cpu",
                             val_fraction=0.0)  # fmt: skip
    with pytest.raises(TrainingError, match=r"non-finite gradient at epoch 1, step 1"):
        trainer.fit(model, X)
    assert at_the_step
    assert all(torch.equal(model.state_dict()[k], v) for k, v in at_the_step.items())
