"""aecore.ops.topk_encode / sparse_decode: the fused sparse SAE kernels vs the reference."""

from __future__ import annotations

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

import aecore
from aecore import ops
from aecore.errors import ConfigError, ShapeError
from aecore.ops import reference

needs_ext = pytest.mark.skipif(
    ops.backend("topk_encode", "cpu") != "fused cpu", reason="CPU extension not loaded"
)

operand_kinds = {
    "dtype": st.sampled_from([torch.float32, torch.float64]),
    "noncontig": st.booleans(),
    "seed": st.integers(0, 2**16),
}
cases = st.fixed_dictionaries(
    {
        "B": st.sampled_from([0, 1, 2, 5, 17, 40]),
        "d": st.integers(1, 24),
        "n": st.integers(1, 90),
        "k": st.integers(1, 90),
        **operand_kinds,
    }
)


def tol(dtype):
    return {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {"rtol": 1e-9, "atol": 1e-11}


def assert_compiled_matches_eager(step, inputs, *extra, backward=True):
    """``step`` compiled in one graph and eager, on copies of ``inputs``: the same value
    and (with ``backward``) the same gradients for every input."""
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    got_in = [t.clone().requires_grad_() for t in inputs]
    want_in = [t.clone().requires_grad_() for t in inputs]
    got, want = compiled(*got_in, *extra), step(*want_in, *extra)
    torch.testing.assert_close(got, want)
    if backward:
        got.backward()
        want.backward()
        for a, b in zip(got_in, want_in):
            torch.testing.assert_close(a.grad, b.grad)
    return want


def operands(c, requires_grad=False):
    g = torch.Generator().manual_seed(c["seed"])
    B, d, n = c["B"], c["d"], c["n"]

    def make(*shape):
        t = torch.randn(*shape, generator=g, dtype=torch.float64).to(c["dtype"])
        if c["noncontig"] and t.dim() == 2:
            t = t.t().contiguous().t()
        return t.requires_grad_(requires_grad)

    return make(B, d), make(n, d), make(n), make(d), make(n, d)


def grads(outputs, inputs, weights):
    total = sum((o * w).sum() for o, w in zip(outputs, weights))
    return torch.autograd.grad(total, inputs, allow_unused=True)


@needs_ext
@settings(max_examples=60, deadline=None)
@given(c=cases)
def test_fused_equals_reference(c):
    k = min(c["k"], c["n"])
    x, W_enc, b_enc, b_dec, W_dec = operands(c, requires_grad=True)
    values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, k)
    ref_values, ref_indices = reference.topk_encode(x, W_enc, b_enc, b_dec, k)
    assert values.shape == indices.shape == (c["B"], k)
    assert indices.dtype == torch.int64
    torch.testing.assert_close(values, ref_values, **tol(c["dtype"]))
    # random continuous data: no ties, so the chosen latents agree wherever values do
    positive = ref_values > 0
    assert torch.equal(indices[positive], ref_indices[positive])
    out = ops.sparse_decode(values, indices, W_dec, b_dec)
    ref_out = reference.sparse_decode(ref_values, ref_indices, W_dec, b_dec)
    torch.testing.assert_close(out, ref_out, **tol(c["dtype"]))
    # one backward through both ops against the reference's
    w = torch.randn(out.shape, dtype=out.dtype)
    inputs = (x, W_enc, b_enc, b_dec, W_dec)
    got = grads([out], inputs, [w])
    want = grads([ref_out], inputs, [w])
    for a, b in zip(got, want):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol(c["dtype"]))


@needs_ext
def test_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    x, W_enc, W_dec = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in [(6, 5), (9, 5), (9, 5)]
    )
    b_enc, b_dec = torch.randn(9, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    params = [t.requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
    assert torch.autograd.gradcheck(lambda *a: ops.topk_encode(*a, 3)[0], params)
    values, indices = ops.topk_encode(x.detach(), W_enc.detach(), b_enc.detach(), b_dec.detach(), 3)
    dec = [values.requires_grad_(), W_dec.requires_grad_(), b_dec.detach().requires_grad_()]
    assert torch.autograd.gradcheck(lambda v, W, b: ops.sparse_decode(v, indices, W, b), dec)


@needs_ext
def test_straight_through_passes_every_kept_gradient_as_the_reference_does():
    # AuxK's selection: ReLU'd values forward, the gradient of every kept pair (negative
    # pre-activations too) backward; biased low so most kept pre-activations are negative
    g = torch.Generator().manual_seed(2)
    x, W_enc = torch.randn(7, 5, generator=g), torch.randn(40, 5, generator=g)
    b_enc, b_dec = torch.randn(40, generator=g) - 3.0, torch.randn(5, generator=g)
    w = torch.randn(7, 6, generator=g)
    got, want = [], []
    for impl, out in ((ops, got), (reference, want)):
        params = [t.clone().requires_grad_() for t in (x, W_enc, b_enc, b_dec)]
        values, indices = impl.topk_encode(*params, 6, straight_through=True)
        plain, _ = impl.topk_encode(*(t.detach() for t in params), 6)
        torch.testing.assert_close(values.detach(), plain)
        assert bool((plain == 0).any())  # kept pairs whose pre-activation is negative
        (values * w).sum().backward()
        out.extend([indices, *(t.grad for t in params)])
    assert torch.equal(got[0], want[0])
    for a, b in zip(got[1:], want[1:]):
        torch.testing.assert_close(a, b)
    # every kept latent's encoder row has a gradient, those behind zero values too
    assert bool((got[2][got[0].unique()].abs().sum(1) > 0).all())
    with pytest.raises(ConfigError, match="straight_through must be a bool, got 'yes'"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 2, straight_through="yes")


@needs_ext
def test_opcheck():
    from torch.library import opcheck

    g = torch.Generator().manual_seed(2)
    x, W = torch.randn(7, 4, generator=g), torch.randn(12, 4, generator=g)
    b_enc, b_dec = torch.randn(12, generator=g), torch.randn(4, generator=g)
    args = [t.requires_grad_() for t in (x, W, b_enc, b_dec)]
    opcheck(torch.ops.aecore.topk_encode, (*args, 3))
    dead = torch.arange(12) % 3 == 0
    opcheck(torch.ops.aecore.topk_encode, (*args, 3, 2, dead))
    opcheck(torch.ops.aecore.topk_encode, (*args, 3, 2, dead, False))
    values, indices, aux_values, _ = torch.ops.aecore.topk_encode(
        x.detach(), W.detach(), b_enc.detach(), b_dec.detach(), 3
    )
    assert aux_values.shape == (7, 0)
    opcheck(
        torch.ops.aecore.sparse_decode,
        (
            values.requires_grad_(),
            indices,
            W.detach().requires_grad_(),
            b_dec.detach().requires_grad_(),
        ),
    )
    opcheck(
        torch.ops.aecore.sparse_decode_backward,
        (torch.randn(7, 4), values.detach(), indices, W.detach()),
    )
    opcheck(
        torch.ops.aecore.topk_encode_backward,
        (torch.randn(7, 3), values.detach(), indices, x.detach(), W.detach(), b_dec.detach()),
    )


aux_cases = st.fixed_dictionaries(
    {
        "B": st.sampled_from([0, 1, 3, 17]),
        "d": st.integers(1, 12),
        "n": st.integers(1, 700),
        "k": st.integers(1, 8),
        "aux_k": st.integers(0, 12),
        "dead_every": st.integers(1, 9),
        **operand_kinds,
    }
)


@needs_ext
@settings(max_examples=40, deadline=None)
@given(c=aux_cases)
def test_auxk_from_the_same_pass_equals_the_reference(c):
    # AuxK's selection among the dead latents rides along the main top-k's tiles: the
    # same codes and, through one combined backward, the same gradients as the dense
    # reference (the main code's ReLU, AuxK's straight-through)
    k, n = min(c["k"], c["n"]), c["n"]
    aux_k = min(c["aux_k"], n)
    x, W_enc, b_enc, b_dec, W_dec = operands(c, requires_grad=True)
    dead = torch.arange(n) % c["dead_every"] == c["seed"] % c["dead_every"]
    got = ops.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k=aux_k, dead=dead)
    want = reference.topk_encode(x, W_enc, b_enc, b_dec, k, aux_k=aux_k, dead=dead)
    columns = min(aux_k, int(dead.sum()))
    assert got[2].shape == got[3].shape == (c["B"], aux_k)
    assert bool(dead[got[3][:, :columns]].all())  # AuxK picks dead latents only
    assert not got[2][:, columns:].any() and not got[3][:, columns:].any()  # the padding
    for a, b in zip(got[::2], want[::2]):
        torch.testing.assert_close(a, b, **tol(c["dtype"]))
    assert torch.equal(got[3], want[3])  # random data: no ties among the dead latents
    positive = want[0] > 0
    assert torch.equal(got[1][positive], want[1][positive])
    weights = [
        torch.randn(got[0].shape, dtype=c["dtype"]),
        torch.randn(got[2].shape, dtype=c["dtype"]),
    ]
    inputs = (x, W_enc, b_enc, b_dec)
    for a, b in zip(grads(got[::2], inputs, weights), grads(want[::2], inputs, weights)):
        a = torch.zeros_like(b) if a is None else a
        b = torch.zeros_like(a) if b is None else b
        torch.testing.assert_close(a, b, **tol(c["dtype"]))


@needs_ext
def test_an_auxk_past_the_devices_heaps_comes_from_the_dead_latents_alone(monkeypatch):
    # on CUDA the streaming heaps keep at most 256 a row while AuxK's k is d / 2: the
    # main code stays fused and AuxK's comes from the dead columns' pre-activations
    g = torch.Generator().manual_seed(6)
    x, W = torch.randn(9, 6, generator=g), torch.randn(50, 6, generator=g)
    b_enc, b_dec = torch.randn(50, generator=g), torch.randn(6, generator=g)
    dead = torch.arange(50) % 4 == 1
    monkeypatch.setattr(ops, "topk_encode_max_k", lambda t: 3)
    calls = []
    monkeypatch.setattr(reference, "sparse_code", _recording(reference.sparse_code, calls))
    got, want = [], []
    for impl, out in ((ops, got), (reference, want)):
        params = [t.clone().requires_grad_() for t in (x, W, b_enc, b_dec)]
        code = impl.topk_encode(*params, 2, aux_k=5, dead=dead)
        (code[0].sum() + (code[2] * torch.arange(5.0)).sum()).backward()
        out.extend([*code, *(t.grad for t in params)])
    assert calls[0] == (9, 13)  # the fused path's dense part: the 13 dead columns only
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


def _recording(fn, calls):
    def wrapper(x, W_enc, *args, **kwargs):
        calls.append((x.shape[0], W_enc.shape[0]))
        return fn(x, W_enc, *args, **kwargs)

    return wrapper


def test_auxk_arguments_say_what_was_expected():
    x, W, b_enc, b_dec = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(5), torch.zeros(3)
    dead = torch.tensor([True, False, True, False, False])
    with pytest.raises(ConfigError, match="aux_k=2 needs dead, the mask of dead latents"):
        ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=2)
    with pytest.raises(ConfigError, match="dead must be a bool tensor .* got torch.int64"):
        ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=2, dead=dead.long())
    with pytest.raises(ShapeError, match=r"dead must be \(5,\) for W_enc of shape \(5, 3\)"):
        ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=2, dead=dead[:4])
    with pytest.raises(ConfigError, match=r"aux_k must lie in \[0, 5\], got 6"):
        ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=6, dead=dead)
    # fewer dead latents than aux_k: still aux_k columns, the rest padding
    assert ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=4, dead=dead)[3].shape == (4, 4)
    assert ops.topk_encode(x, W, b_enc, b_dec, 2, aux_k=4, dead=dead & False)[2].shape == (4, 4)


@needs_ext
def test_an_infinite_gradient_at_a_zero_value_stays_behind_the_relu():
    # sqrt's gradient at 0 is inf: the ReLU passes nothing there (reference: a select),
    # and inf * 0 must not turn into NaN gradients
    x = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    W = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)
    W.requires_grad_()
    zeros = (torch.zeros(3, dtype=torch.float64), torch.zeros(2, dtype=torch.float64))
    got = torch.autograd.grad(ops.topk_encode(x, W, *zeros, 3)[0].sqrt().sum(), (x, W))
    want = torch.autograd.grad(reference.topk_encode(x, W, *zeros, 3)[0].sqrt().sum(), (x, W))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_auxk_padding_past_the_dead_latents_is_inert(impl):
    # two dead latents, aux_k = 4: the last two columns are (0, latent 0) and no gradient
    # reaches latent 0 (alive) through them, whatever weights the caller gives them
    if impl == "fused" and ops.backend("topk_encode", "cpu") != "fused cpu":
        pytest.skip("CPU extension not loaded")
    g = torch.Generator().manual_seed(8)
    params = [torch.randn(*s, generator=g).requires_grad_() for s in ((6, 3), (5, 3), (5,), (3,))]
    dead = torch.tensor([False, True, False, True, False])
    encode = ops.topk_encode if impl == "fused" else reference.topk_encode
    values, indices, aux_values, aux_indices = encode(*params, 2, aux_k=4, dead=dead)
    assert aux_indices[:, 2:].eq(0).all() and aux_values[:, 2:].eq(0).all()
    assert set(aux_indices[:, :2].flatten().tolist()) <= {1, 3}
    (aux_values * torch.arange(1.0, 5.0)).sum().backward()
    W_grad = params[1].grad
    assert W_grad[[0, 2, 4]].eq(0).all() and W_grad[[1, 3]].ne(0).any()


@needs_ext
def test_compiles_without_graph_breaks():
    g = torch.Generator().manual_seed(3)
    x, W_enc, W_dec = (
        torch.randn(8, 6, generator=g),
        torch.randn(20, 6, generator=g),
        torch.randn(20, 6, generator=g),
    )
    b_enc, b_dec = torch.zeros(20), torch.randn(6, generator=g)

    def step(x, W_enc, b_enc, b_dec, W_dec):
        values, indices = ops.topk_encode(x, W_enc, b_enc, b_dec, 4)
        return (ops.sparse_decode(values, indices, W_dec, b_dec) - x).pow(2).sum()

    assert_compiled_matches_eager(step, (x, W_enc, b_enc, b_dec, W_dec))


@needs_ext
def test_auxk_compiles_without_graph_breaks_or_host_reads():
    # the AuxK code's width is aux_k whatever the mask holds: no count read on the host,
    # one graph however many latents are dead
    g = torch.Generator().manual_seed(5)
    x, W_enc, W_dec = (torch.randn(*s, generator=g) for s in ((8, 6), (20, 6), (20, 6)))
    b_enc, b_dec = torch.zeros(20), torch.randn(6, generator=g)

    def step(x, W_enc, b_enc, b_dec, W_dec, dead):
        values, indices, aux_values, aux_indices = ops.topk_encode(
            x, W_enc, b_enc, b_dec, 4, aux_k=5, dead=dead
        )
        recon = ops.sparse_decode(values, indices, W_dec, b_dec)
        aux = ops.sparse_decode(aux_values, aux_indices, W_dec, torch.zeros_like(b_dec))
        return (recon - x).pow(2).sum() + (aux - x).pow(2).sum()

    for dead in (torch.arange(20) % 7 == 0, torch.zeros(20, dtype=torch.bool)):
        assert_compiled_matches_eager(step, (x, W_enc, b_enc, b_dec, W_dec), dead)


@needs_ext
def test_ties_keep_the_lower_latent_and_short_rows_pad_with_zeros():
    x = torch.ones(2, 3)
    W = torch.zeros(6, 3)
    b_enc = torch.tensor([1.0, 2.0, 2.0, -1.0, 2.0, -3.0])
    values, indices = ops.topk_encode(x, W, b_enc, torch.zeros(3), 5)
    assert indices[0].tolist()[:3] == [1, 2, 4]
    assert values[0].tolist() == [2.0, 2.0, 2.0, 1.0, 0.0]  # -1 is ReLU'd to 0


@needs_ext
def test_a_large_dictionary_is_encoded_in_tiles():
    # more latents than one tile holds: the running top-k crosses tile borders
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(3, 8, generator=g), torch.randn(70_000, 8, generator=g)
    b_enc, b_dec = torch.randn(70_000, generator=g), torch.randn(8, generator=g)
    values, indices = ops.topk_encode(x, W, b_enc, b_dec, 16)
    ref_values, ref_indices = reference.topk_encode(x, W, b_enc, b_dec, 16)
    torch.testing.assert_close(values, ref_values)
    assert torch.equal(indices, ref_indices)


@needs_ext
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("latent", [5, 68])  # in a block of 32 columns, in the tail
@pytest.mark.parametrize("auxk", [False, True])
def test_non_finite_pre_activations_raise(bad, latent, auxk):
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(4, 3, generator=g), torch.randn(70, 3, generator=g)
    b_enc = torch.zeros(70)
    b_enc[latent] = bad  # -inf too: it could never be kept, so rows would come out short
    dead = torch.zeros(70, dtype=torch.bool)
    dead[latent] = auxk
    extra = {"aux_k": 2, "dead": dead} if auxk else {}
    with pytest.raises(RuntimeError, match="NaN or infinite pre-activation"):
        ops.topk_encode(x, W, b_enc, torch.zeros(3), 2, **extra)
    # unchecked: no raise, and every value (AuxK's too) NaN, the indices still in range
    out = ops.topk_encode(x, W, b_enc, torch.zeros(3), 2, check_finite=False, **extra)
    assert len(out) == (4 if auxk else 2)
    for values in out[0::2]:
        assert values.shape == (4, 2) and bool(values.isnan().all())
    for indices in out[1::2]:
        assert bool(((indices >= 0) & (indices < 70)).all())
    # and finite operands are not touched by it
    b_enc[latent] = 0.0
    want = ops.topk_encode(x, W, b_enc, torch.zeros(3), 2, **extra)
    got = ops.topk_encode(x, W, b_enc, torch.zeros(3), 2, check_finite=False, **extra)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    with pytest.raises(ConfigError, match="check_finite must be a bool, got 0"):
        ops.topk_encode(x, W, b_enc, torch.zeros(3), 2, check_finite=0)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_the_reference_path_checks_finiteness_too(bad):
    # 16-bit on the CPU (and no extension, and CUDA's k > 256) runs the reference, which
    # returned NaN values under the default check_finite=True without a word
    from aecore.errors import NonFiniteError

    x, W = torch.randn(4, 3).bfloat16(), torch.randn(8, 3).bfloat16()
    b_enc = torch.zeros(8, dtype=torch.bfloat16)
    b_enc[5] = bad
    with pytest.raises(NonFiniteError, match="NaN or infinite pre-activation"):
        ops.topk_encode(x, W, b_enc, torch.zeros(3, dtype=torch.bfloat16), 2)
    ops.topk_encode(x, W, b_enc, torch.zeros(3).bfloat16(), 2, check_finite=False)  # no raise


def test_bad_arguments_say_what_was_expected():
    x, W, b_enc, b_dec = torch.randn(4, 3), torch.randn(5, 3), torch.zeros(5), torch.zeros(3)
    with pytest.raises(ShapeError, match=r"W_enc must be \(n, 3\)"):
        ops.topk_encode(x, torch.randn(5, 2), b_enc, b_dec, 2)
    with pytest.raises(ShapeError, match=r"b_enc must be \(5,\)"):
        ops.topk_encode(x, W, torch.zeros(4), b_dec, 2)
    with pytest.raises(ConfigError, match=r"k must lie in \[1, 5\], got 6"):
        ops.topk_encode(x, W, b_enc, b_dec, 6)
    with pytest.raises(ConfigError, match="W_enc has dtype torch.float64 but x has torch.float32"):
        ops.topk_encode(x, W.double(), b_enc, b_dec, 2)
    values, indices = ops.topk_encode(x, W, b_enc, b_dec, 2)
    bad = indices.clone()
    bad[1, 1] = -1
    with pytest.raises(
        ConfigError, match=r"indices must lie in \[0, 5\) \(W_dec's rows\), got values in \[-1, "
    ):
        ops.sparse_decode(values, bad, W, b_dec)
    with pytest.raises(ConfigError, match="indices must be an int64 tensor, got torch.int32"):
        ops.sparse_decode(values, indices.int(), W, b_dec)
    with pytest.raises(ShapeError, match=r"indices must be the values' shape \(4, 2\)"):
        ops.sparse_decode(values, indices[:, :1], W, b_dec)
    with pytest.raises(ShapeError, match=r"b_dec must be \(3,\)"):
        ops.sparse_decode(values, indices, W, torch.zeros(2))


def test_the_dense_auxk_term_compiles_in_one_graph():
    # eagerly it ranks only the dead columns (their count read back); compiled, all of
    # them with the live ones masked: one graph, the same term and gradients
    from aecore.sae.recipe import aux_loss

    g = torch.Generator().manual_seed(6)
    residual, pre, decoder = (torch.randn(*s, generator=g) for s in ((8, 6), (8, 20), (20, 6)))

    def term(pre, decoder, dead):
        return aux_loss(residual, pre, dead, decoder, 5, torch.tensor(3.0))

    some = torch.arange(20) % 7 == 0
    assert float(assert_compiled_matches_eager(term, (pre, decoder), some).detach()) > 0
    # none dead: eagerly a constant zero (no graph to differentiate)
    none = torch.zeros(20, dtype=torch.bool)
    assert_compiled_matches_eager(term, (pre, decoder), none, backward=False)


@needs_ext
def test_the_models_step_reads_back_only_its_dead_count():
    # a value read back is a host sync on CUDA: the door's range check reads the indices'
    # range, but the model's indices come from topk_encode, so its step skips it; what it
    # still reads is the number of dead latents (AuxK's width). Bad indices from a caller
    # who skips the check still fail, in the kernel's own check
    reads = []

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            reads.append(func.__name__.split(".")[0])
            return func(*args, **(kwargs or {}))

    model = aecore.create("sae-topk", input_shape=(6,), latent_dim=16, k=2).train()
    with Ops():
        model.loss(torch.randn(8, 6))["loss"].backward()
    assert "sparse_decode" in reads and "aminmax" not in reads
    assert reads.count("_local_scalar_dense") == 1
    values, W, b = torch.ones(2, 2), torch.randn(4, 3), torch.zeros(3)
    bad = torch.tensor([[0, 4], [1, 2]])
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 4\)"):
        ops.sparse_decode(values, bad, W, b, check_indices=False)


@needs_ext
@pytest.mark.parametrize(
    ("name", "settings", "per_step"),
    [
        ("sae-topk", {}, 2),
        ("sae-batchtopk", {"topk_warmup": 1.0}, 2),  # each row's top k, the threshold trained
        ("sae-batchtopk", {"topk_warmup": 0.0}, 3),  # + whether the candidates were enough
    ],
)
def test_a_trainer_step_of_a_top_k_sae_reads_back_little(
    step_ops, step_reads, name, settings, per_step
):
    # the dead count (AuxK's width) at the start and the loss and gradient flags (one
    # number) at the end; not the encoder's NaN flag (the code turns NaN instead), the
    # latents that fired (no boolean mask), the batch threshold's update (on the device)
    # nor the decoder rows' norm (read once)
    model = aecore.create(name, input_shape=(6,), latent_dim=16, k=2, dead_window=1, **settings)
    aecore.Trainer(epochs=1, batch_size=10, progress=False, seed=0).fit(model, torch.randn(50, 6))
    reads = step_reads()
    # five steps, and the decoder rows' norm read at the first
    assert reads.count("_local_scalar_dense") == per_step * 5 + 1
    assert len(reads) == per_step * 5 + 1
    encoder_calls = [args[7:] for op, args in step_ops if op == "topk_encode"]
    assert encoder_calls and all(call == (False,) for call in encoder_calls)


@needs_ext
def test_the_compiled_op_checks_indices_itself():
    values, W, b = torch.ones(2, 2), torch.randn(4, 3), torch.zeros(3)
    with pytest.raises(RuntimeError, match=r"indices must lie in \[0, 4\)"):
        torch.ops.aecore.sparse_decode(values, torch.tensor([[0, 4], [1, 2]]), W, b)


def test_the_step_benchmark_reports_every_implementation(tmp_path, capsys):
    from aecore_benchmarks import sae_step

    report = tmp_path / "step.json"
    args = ["--shapes", "16:128:4", "--batch-size", "32", "--rounds", "1", "--threads", "1"]
    assert sae_step.main([*args, "--no-compile", "--json", str(report)]) == 0
    runs = json.loads(report.read_text())["runs"]
    timed = {r["impl"]: r for r in runs if "ms" in r}
    assert {"aecore fused", "aecore dense", "stock sparse"} <= set(timed)
    assert all(r["ms"] > 0 for r in timed.values())
    assert "aecore fused" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="expected small, large or d:n:k"):
        sae_step.main(["--shapes", "16:128"])


@needs_ext
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(0, 40),
    d=st.integers(1, 70),
    dtype=st.sampled_from([torch.float32, torch.float64]),
    seed=st.integers(0, 2**16),
)
def test_the_decoder_row_passes_match_the_reference(n, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    grad = torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)
    if n > 2:
        weight[1] = 0.0  # a row of zeros is left alone
    want, got = grad.clone(), grad.clone()
    reference.remove_parallel_(want, weight)
    torch.ops.aecore.remove_parallel_(got, weight)
    torch.testing.assert_close(got, want, **tol(dtype))
    if n:
        assert (got * weight).sum(1).abs().max() < 1e-3 * (1 + grad.abs().max())
    want_w, got_w = weight.clone(), weight.clone()
    reference.set_row_norms_(want_w, 2.5)
    torch.ops.aecore.set_row_norms_(got_w, 2.5)
    torch.testing.assert_close(got_w, want_w, **tol(dtype))


@needs_ext
def test_the_row_passes_pass_opcheck_and_refuse_bad_input():
    from torch.library import opcheck

    w, g = torch.randn(6, 5), torch.randn(6, 5)
    opcheck(torch.ops.aecore.remove_parallel_, (g, w))
    opcheck(torch.ops.aecore.set_row_norms_, (w.clone(), 1.5))
    with pytest.raises(ShapeError, match="grad and weight must have one shape"):
        ops.remove_parallel_(torch.randn(6, 4), w)
    with pytest.raises(ConfigError, match="norm must be a positive finite number, got 0"):
        ops.set_row_norms_(w, 0)
    # a non-contiguous view still gets the right answer (through the reference)
    wt = torch.randn(5, 6).t()
    expected = wt.clone()
    reference.set_row_norms_(expected, 1.0)
    ops.set_row_norms_(wt, 1.0)
    torch.testing.assert_close(wt, expected)


@needs_ext
def test_topk_encode_compiles_with_dynamic_shapes():
    def encode(x, W, b_enc, b_dec):
        return ops.topk_encode(x, W, b_enc, b_dec, 3)

    compiled = torch.compile(encode, backend="aot_eager", dynamic=True)
    g = torch.Generator().manual_seed(5)
    for B, n in ((4, 9), (6, 11)):
        args = (torch.randn(B, 5, generator=g), torch.randn(n, 5, generator=g),
                torch.randn(n, generator=g), torch.randn(5, generator=g))  # fmt: skip
        for got, want in zip(compiled(*args), encode(*args)):
            torch.testing.assert_close(got, want)


@needs_ext
def test_straight_through_values_may_be_changed_in_place_before_backward():
    g = torch.Generator().manual_seed(6)
    x, W0 = torch.randn(5, 6, generator=g), torch.randn(9, 6, generator=g)
    b_enc, b_dec = torch.randn(9, generator=g), torch.randn(6, generator=g)
    grads = []
    for encode in (ops.topk_encode, reference.topk_encode):
        W = W0.clone().requires_grad_()
        values, _ = encode(x, W, b_enc, b_dec, 3, straight_through=True)
        values.mul_(2)  # the straight-through gate is ones: the values are not read
        values.sum().backward()
        grads.append(W.grad)
    torch.testing.assert_close(*grads)


@needs_ext
def test_numpy_scalars_meta_tensors_and_shared_rows():
    np = pytest.importorskip("numpy")
    w = torch.randn(6, 5)
    ops.set_row_norms_(w, np.float32(2.0))  # numpy's scalars are numbers too
    torch.testing.assert_close(w.norm(dim=1), torch.full((6,), 2.0))
    assert ops.kl_sparsity(torch.rand(4, 3), np.float32(0.1)).isfinite()
    meta = dict(device="meta")  # shape inference: no index range to read
    out = ops.sparse_decode(torch.randn(2, 3, **meta), torch.zeros(2, 3, dtype=torch.long, **meta),
                            torch.randn(7, 5, **meta), torch.randn(5, **meta))  # fmt: skip
    assert out.shape == (2, 5) and out.device.type == "meta"
    shared = torch.randn(1, 5).expand(6, 5)  # rows that are one row: written in place
    with pytest.raises(ConfigError, match="weight is written in place"):
        ops.set_row_norms_(shared, 1.0)
    with pytest.raises(ConfigError, match="grad is written in place"):
        ops.remove_parallel_(shared, w)
