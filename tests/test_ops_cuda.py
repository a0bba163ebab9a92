"""CUDA kernels vs the reference (skipped without a CUDA device and the CUDA extension).

The development machines have no GPU: these run on a GPU machine with
``pytest tests/test_ops_cuda.py``.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from aecore import ops
from aecore.ops import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available() or ops.backend("cd_step", "cuda") != "fused cuda",
    reason="needs a CUDA device and the CUDA extension (aecore._C_cuda)",
)

DTYPES = [torch.float32, torch.float64]


def rbm(B, V, H, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    v = (torch.rand(B, V, generator=g) < 0.4).to(dtype)
    W = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    b_v = torch.randn(V, generator=g).to(dtype)
    b_h = torch.randn(H, generator=g).to(dtype)
    return [t.cuda() for t in (v, W, b_v, b_h)]


def uniform_noise(k, B, H, V, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return ops.GibbsNoise(
        torch.rand(B, H, generator=g, dtype=dtype).cuda(),
        torch.rand(k, B, H, generator=g, dtype=dtype).cuda(),
        torch.rand(k, B, V, generator=g, dtype=dtype).cuda(),
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("B", "V", "H", "k"), [(1, 1, 1, 1), (7, 13, 5, 2), (128, 784, 1000, 1)])
def test_cd_step_cuda_matches_reference_given_noise(B, V, H, k, dtype):
    v, W, b_v, b_h = rbm(B, V, H, dtype)
    noise = uniform_noise(k, B, H, V, dtype, 1)
    got = ops.cd_step(v, W, b_v, b_h, k, noise=noise)
    want = reference.cd_step(v, W, b_v, b_h, k, noise=noise)
    # samples may differ where a uniform sits within an ulp of its probability
    mismatch = (got.chain != want.chain).float().mean().item()
    assert mismatch < 1e-3
    if mismatch == 0:
        tol = {"rtol": 1e-4, "atol": 1e-5} if dtype == torch.float32 else {}
        for a, b in zip(got[:3], want[:3]):
            torch.testing.assert_close(a, b, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_linear_hidden_units_cuda_match_reference_given_noise(dtype):
    """Gaussian hidden units: the noise is standard normals, so states are exact sums."""
    B, V, H, k = 33, 21, 7, 2
    v, W, b_v, b_h = rbm(B, V, H, dtype)
    g = torch.Generator().manual_seed(2)
    noise = ops.GibbsNoise(
        torch.randn(B, H, generator=g, dtype=dtype).cuda(),
        torch.randn(k, B, H, generator=g, dtype=dtype).cuda(),
        torch.rand(k, B, V, generator=g, dtype=dtype).cuda(),
    )
    kw = {"hidden": "gaussian", "sample_visible": False, "noise": noise}
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    for got, want in [
        (ops.cd_step(v, W, b_v, b_h, k, **kw), reference.cd_step(v, W, b_v, b_h, k, **kw)),
        (ops.gibbs_chain(v, W, b_v, b_h, k, **kw), reference.gibbs_chain(v, W, b_v, b_h, k, **kw)),
    ]:
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, **tol, equal_nan=True)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gibbs_cuda_sampling_frequencies(dtype):
    n = 20000
    v, W, b_v, b_h = rbm(1, 6, 5, dtype)
    out = ops.gibbs_chain(v.expand(n, 6).contiguous(), W, b_v, b_h, 1)
    se = ((out.ph0 * (1 - out.ph0)).mean(0) / n).sqrt().clamp_min(1e-3)
    assert float(((out.h0.mean(0) - out.ph0.mean(0)).abs() / se).max()) < 5
    g1 = torch.Generator(device="cuda").manual_seed(3)
    g2 = torch.Generator(device="cuda").manual_seed(3)
    a = ops.gibbs_chain(v, W, b_v, b_h, 2, generator=g1)
    b = ops.gibbs_chain(v, W, b_v, b_h, 2, generator=g2)
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    z = ops.gibbs_chain(v.expand(n, 6).contiguous(), W, b_v, b_h, 1, visible="gaussian")
    noise = (z.v - z.v_mean).flatten().double()
    assert abs(noise.mean().item()) < 0.02 and abs(noise.std().item() - 1) < 0.02


@pytest.mark.parametrize("dtype", DTYPES)
# columns: none, one block's part, several blocks with a partial last one, many; 5000
# rows: row blocks taking four rows at a time and a tail; 70000 columns: more column
# blocks than the loss kernel's threads
@pytest.mark.parametrize(
    ("B", "H"), [(5, 0), (1, 1), (33, 17), (300, 600), (5000, 300), (2, 70000), (4096, 16384)]
)
def test_kl_cuda_matches_reference(B, H, dtype):
    h = (torch.rand(B, H, dtype=dtype, device="cuda") * 0.3).requires_grad_(True)
    got = ops.kl_sparsity(h, 0.05, 2.0)
    (g1,) = torch.autograd.grad(got, h)
    want = reference.kl_sparsity(h, 0.05, 2.0)
    (g2,) = torch.autograd.grad(want, h)
    tol = {"rtol": 1e-4, "atol": 1e-6} if dtype == torch.float32 else {}
    torch.testing.assert_close(got, want, **tol)
    torch.testing.assert_close(g1, g2, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "D", "k"), [(1, 1, 1), (9, 50, 7), (5, 40, 40), (3, 1000, 300), (4096, 16384, 32)]
)
def test_topk_cuda_matches_reference(B, D, k, dtype):
    # a permutation of 0..D-1 in each row: distinct values within a row in float32 too
    # (one permutation of all B * D entries would collapse neighbours past 2^24)
    perm = torch.rand(B, D, device="cuda").argsort(dim=1).to(dtype)
    z = ((perm + 0.25) / 7).requires_grad_(True)
    got = ops.topk_sparsify(z, k)
    assert torch.equal(got, reference.topk_sparsify(z, k))
    go = torch.randn_like(z)
    (g1,) = torch.autograd.grad(got, z, go)
    (g2,) = torch.autograd.grad(reference.topk_sparsify(z, k), z, go)
    assert torch.equal(g1, g2)


def test_opcheck_cuda():
    from torch.library import opcheck

    v, W, b_v, b_h = rbm(6, 5, 3, torch.float64)
    rng = torch.tensor([3, 4], device="cuda")
    args = (v, W, b_v, b_h, 2, None, False, False, True, rng, None, None, None)
    opcheck(torch.ops.aecore.cd_step, args)
    args = (v, W, b_v, b_h, 1, None, False, True, False, rng, None, None, None)
    opcheck(torch.ops.aecore.cd_step, args)
    args = (v, W, b_v, b_h, 1, True, False, True, rng, None, None, None)
    opcheck(torch.ops.aecore.gibbs_chain, args)
    h = torch.rand(7, 4, dtype=torch.float64, device="cuda", requires_grad=True)
    opcheck(torch.ops.aecore.kl_sparsity, (h, 0.1, 2.0))
    z = torch.randn(7, 9, dtype=torch.float64, device="cuda", requires_grad=True)
    opcheck(torch.ops.aecore.topk_sparsify, (z, 3))


# --- the sparse SAE ops ------------------------------------------------------------------


def sae_operands(B, d, n, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, W_enc, W_dec = (
        torch.randn(*s, generator=g, dtype=torch.float64) for s in [(B, d), (n, d), (n, d)]
    )
    b_enc, b_dec = (
        torch.randn(n, generator=g, dtype=torch.float64) * 0.1,
        torch.randn(d, generator=g, dtype=torch.float64),
    )
    return [t.to(dtype).cuda().requires_grad_() for t in (x, W_enc, b_enc, b_dec, W_dec)]


def sae_step(args, k, encode, decode):
    x, W_enc, b_enc, b_dec, W_dec = args
    values, indices = encode(x, W_enc, b_enc, b_dec, k)
    out = decode(values, indices, W_dec, b_dec)
    grads = torch.autograd.grad(out.float().pow(2).sum(), args)
    return values, indices, out, grads


def chosen(pre, indices, straight_through=False):
    """The reference's code at a given selection: the kernels' tiled GEMM rounds unlike
    cuBLAS, so in float32 two near-equal pre-activations may trade places (about one pair
    in 10^4 here); the selection is checked apart, by its values."""
    values = pre.gather(1, indices)
    relu = values.relu()
    return values + (relu - values).detach() if straight_through else relu


def assert_close_to_scale(got, want, dtype):
    """In float32 a sum of large terms that cancel keeps the terms' absolute error, so a
    small entry is judged against the tensor's scale, not its own size."""
    if dtype != torch.float32:
        return torch.testing.assert_close(got, want)
    scale = float(want.abs().max())
    return torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 + 1e-5 * scale)


def assert_a_top_k(values, indices, pre, k, **tol):
    """``values`` are each row's k largest of ``pre`` ReLU'd, best first, and each index
    holds its value."""
    torch.testing.assert_close(values, pre.topk(k, dim=1).values.relu(), **tol)
    torch.testing.assert_close(values, pre.gather(1, indices).relu(), **tol)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("B", "d", "n", "k"), [(1, 3, 5, 1), (37, 20, 300, 7), (512, 64, 70_000, 32)]
)
def test_sae_ops_cuda_match_reference(B, d, n, k, dtype):
    args = sae_operands(B, d, n, dtype)
    values, indices, out, grads = sae_step(args, k, ops.topk_encode, ops.sparse_decode)
    x, W_enc, b_enc, b_dec, W_dec = args
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    pre = F.linear(x - b_dec, W_enc, b_enc)
    assert_a_top_k(values, indices, pre, k, **tol)
    ref_out = reference.sparse_decode(chosen(pre, indices), indices, W_dec, b_dec)
    ref_grads = torch.autograd.grad(ref_out.float().pow(2).sum(), args)
    assert_close_to_scale(out, ref_out, dtype)
    for a, b in zip(grads, ref_grads):
        assert_close_to_scale(a, b, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_auxk_cuda_from_the_same_pass_matches_reference(dtype):
    x, W_enc, b_enc, b_dec, _ = sae_operands(300, 32, 70_000, dtype)
    dead = torch.arange(70_000, device="cuda") % 5 == 1
    got = ops.topk_encode(x, W_enc, b_enc, b_dec, 16, aux_k=64, dead=dead)
    tol = {"rtol": 1e-4, "atol": 1e-4} if dtype == torch.float32 else {}
    pre = F.linear(x - b_dec, W_enc, b_enc)
    assert_a_top_k(got[0], got[1], pre, 16, **tol)
    assert bool(dead[got[3]].all())
    torch.testing.assert_close(got[2], pre[:, dead].topk(64, dim=1).values.relu(), **tol)
    torch.testing.assert_close(got[2], pre.gather(1, got[3]).relu(), **tol)
    want = (chosen(pre, got[1]), chosen(pre, got[3], straight_through=True))
    inputs = (x, W_enc, b_enc, b_dec)
    weights = [torch.linspace(0, 1, o.shape[1], device="cuda") for o in want]
    loss = sum((o.float() * w).sum() for o, w in zip(got[::2], weights))
    ref = sum((o.float() * w).sum() for o, w in zip(want, weights))
    for a, b in zip(torch.autograd.grad(loss, inputs), torch.autograd.grad(ref, inputs)):
        assert_close_to_scale(a, b, dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sae_ops_cuda_in_16_bits_match_float32(dtype):
    # float32 accumulation, but pre-activations rounded to the 16-bit format, as any 16-bit
    # GEMM leaves them: latents closer than that rounding may trade places at the k-th
    # position (a row in ten in bfloat16 here), so the selection is judged by its float32
    # pre-activations and the decoder and gradients at that same selection
    args = sae_operands(64, 128, 4096, dtype)
    values, indices = ops.topk_encode(*args[:4], 16)
    out = ops.sparse_decode(values, indices, args[4], args[3])
    assert values.dtype == out.dtype == dtype
    # a loss whose gradients stay well inside float16's range
    weight = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).cuda() / 64
    grads = torch.autograd.grad((out.float() * weight).sum(), args)
    x, W_enc, b_enc, b_dec, W_dec = args32 = [a.detach().float().requires_grad_() for a in args]
    few = 4 * torch.finfo(dtype).eps  # a few roundings of the format
    pre = F.linear(x - b_dec, W_enc, b_enc)
    # each row's values within a few roundings of the float32 top k: a near-tie may trade
    # places, a latent ranked lower by more than that may not be chosen
    atol = few * float(values.detach().float().abs().max())
    assert_a_top_k(values.float(), indices, pre.detach(), 16, rtol=0, atol=atol)
    ref_out = reference.sparse_decode(chosen(pre, indices), indices, W_dec, b_dec)
    ref_grads = torch.autograd.grad((ref_out * weight).sum(), args32)
    for got, want in zip([out, *grads], [ref_out, *ref_grads]):
        want = want.detach()
        torch.testing.assert_close(got.float(), want, rtol=few, atol=few * float(want.abs().max()))


def test_sae_ops_cuda_edge_cases():
    from torch.library import opcheck

    x, W_enc, b_enc, b_dec, W_dec = sae_operands(6, 5, 9, torch.float64)
    opcheck(torch.ops.aecore.topk_encode, (x, W_enc, b_enc, b_dec, 3))
    dead = torch.arange(9, device="cuda") % 2 == 0
    opcheck(torch.ops.aecore.topk_encode, (x, W_enc, b_enc, b_dec, 3, 2, dead))
    values, indices, _, _ = torch.ops.aecore.topk_encode(
        x.detach(), W_enc.detach(), b_enc.detach(), b_dec.detach(), 3
    )
    opcheck(torch.ops.aecore.sparse_decode, (values.requires_grad_(), indices, W_dec, b_dec))
    # k past the CUDA heap runs the reference; a NaN raises
    big = sae_operands(4, 3, 400, torch.float32)
    v, i = ops.topk_encode(*big[:4], 300)
    assert v.shape == (4, 300)
    bad = x.detach().clone()
    bad[1, 2] = float("nan")
    with pytest.raises(RuntimeError, match="NaN or infinite pre-activation"):
        ops.topk_encode(bad, W_enc.detach(), b_enc.detach(), b_dec.detach(), 2)


def off_boundary(t):
    """``t``'s values in a contiguous buffer that starts one element past a 16-byte
    boundary, where the kernels cannot use 16-byte packs and take their scalar loads."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return flat[1:].view(t.shape).copy_(t)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16, torch.bfloat16])
@pytest.mark.parametrize(("d", "m"), [(136, 8), (1040, 600)])
def test_packed_and_scalar_sae_kernels_agree(dtype, d, m):
    # d = 136 and 1040 are whole numbers of 16-byte packs for every dtype (1040: more
    # packs than a block has threads; m = 600: a code longer than one staged chunk); the
    # same operands one element off a 16-byte boundary take the scalar kernels. Both sum
    # each column in the same order, so the decoder and the per-latent sums agree exactly;
    # the dot products' lanes split the row differently
    B, n = 33, 500
    g = torch.Generator().manual_seed(3)
    values = torch.randn(B, m, generator=g).relu().to(dtype).cuda()  # about half zeros
    indices = torch.randint(0, n, (B, m), generator=g).cuda()
    W_dec, W_enc = (torch.randn(n, d, generator=g).to(dtype).cuda() for _ in range(2))
    b_dec = torch.randn(d, generator=g).to(dtype).cuda()
    decode = torch.ops.aecore.sparse_decode
    packed = decode(values, indices, W_dec, b_dec)
    assert torch.equal(packed, decode(values, indices, off_boundary(W_dec), off_boundary(b_dec)))
    grad_out = torch.randn(packed.shape, generator=g).to(dtype).cuda()
    backward = torch.ops.aecore.sparse_decode_backward
    want = backward(grad_out, values, indices, W_dec)
    got = backward(off_boundary(grad_out), values, indices, off_boundary(W_dec))
    assert torch.equal(got[1], want[1])
    assert_close_to_scale(got[0], want[0], dtype)  # (16 bits: a rounding either way)
    for project in (True, False):
        weight, target = W_dec.clone(), W_enc.clone()
        weight_off, target_off = off_boundary(weight), off_boundary(target)
        if project:
            ops.remove_parallel_(target, weight)
            ops.remove_parallel_(target_off, weight_off)
        else:
            ops.set_row_norms_(target, 1.5)
            ops.set_row_norms_(target_off, 1.5)
        assert_close_to_scale(target_off, target, dtype)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float16, torch.bfloat16])
# 70: single values (float64 aside); 72: 16-byte packs, a warp per row; 1040: a block of
# 64 to 160 threads holds each row, the last slots part filled; 4096: 128 to 256 threads
# (float64: past a block); 8192: 16-bit rows at the block's limit; 8200: past it for all
@pytest.mark.parametrize("d", [70, 72, 1040, 4096, 8192, 8200])
def test_decoder_row_passes_cuda_match_reference(dtype, d):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(300, d, generator=g).to(dtype).cuda()
    grad = torch.randn(300, d, generator=g).to(dtype).cuda()
    weight[3] = 0
    want, got = grad.float().clone(), grad.clone()
    reference.remove_parallel_(want, weight.float())
    ops.remove_parallel_(got, weight)
    tol = {"rtol": 2e-2, "atol": 2e-2} if dtype in (torch.float16, torch.bfloat16) else {}
    torch.testing.assert_close(got.float(), want, **tol)
    want_w, got_w = weight.float().clone(), weight.clone()
    reference.set_row_norms_(want_w, 1.5)
    ops.set_row_norms_(got_w, 1.5)
    torch.testing.assert_close(got_w.float(), want_w, **tol)


@pytest.mark.parametrize("dtype", DTYPES)
def test_momentum_step_cuda_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    shapes = [(784, 1000), (784,), (1000,)]
    made = [[torch.randn(s, generator=g, dtype=dtype).cuda() for s in shapes] for _ in range(3)]
    params, velocities, steps = made
    p_ref, v_ref = [t.clone() for t in params], [t.clone() for t in velocities]
    assert bool(ops.momentum_step_(params, velocities, steps, 0.1, 0.5, [0.01, 0.0, 0.0]))
    reference.momentum_step_(p_ref, v_ref, steps, 0.1, 0.5, [0.01, 0.0, 0.0])
    for got, want in zip(params + velocities, p_ref + v_ref):
        torch.testing.assert_close(got, want)
    steps[2][5] = float("nan")
    before = [t.clone() for t in params + velocities]
    assert not bool(ops.momentum_step_(params, velocities, steps, 0.1, 0.5))
    assert all(torch.equal(a, b) for a, b in zip(params + velocities, before))


@pytest.mark.parametrize("dtype", DTYPES)
def test_cd_update_cuda_is_cd_step_then_momentum_step(dtype):
    """The one-call training step changes what cd_step + momentum_step_ + the chain copy
    change (same generator state, same samples), and nothing when a statistic is NaN."""
    v, W, b_v, b_h = rbm(64, 784, 500, dtype)
    g = torch.Generator(device="cuda")
    chain = (torch.rand(32, 500, device="cuda") < 0.5).to(dtype)
    velocities = [torch.full_like(t, 0.01) for t in (W, b_v, b_h)]
    p2, vel2, chain2 = (
        [W.clone(), b_v.clone(), b_h.clone()],
        [t.clone() for t in velocities],
        chain.clone(),
    )
    recon, applied = ops.cd_update_(
        v, W, b_v, b_h, velocities, 0.1, 0.5, 0.01, chain=chain, generator=g.manual_seed(3)
    )
    stats = ops.cd_step(v, *p2, chain=chain2, generator=g.manual_seed(3))
    ops.momentum_step_(p2, vel2, [stats.dW, stats.db_v, stats.db_h], 0.1, 0.5, [0.01, 0.0, 0.0])
    assert bool(applied) and torch.equal(recon, stats.recon_error)
    for a, b in zip([W, b_v, b_h, *velocities, chain], [*p2, *vel2, stats.chain]):
        assert torch.equal(a, b)
    v[0, 0] = float("nan")
    before = [t.clone() for t in (W, b_v, b_h, *velocities, chain)]
    _, applied = ops.cd_update_(v, W, b_v, b_h, velocities, 0.1, 0.5, chain=chain)
    assert not bool(applied)
    assert all(torch.equal(a, b) for a, b in zip((W, b_v, b_h, *velocities, chain), before))


def test_an_index_out_of_range_stops_the_kernels_instead_of_reading_past_the_dictionary():
    """Under torch.compile aecore.ops cannot check the range (it is data), so the op
    asserts it on the device. A device-side assert spoils the process's CUDA context, so
    this runs in a child process."""
    import subprocess
    import sys

    code = (
        "import torch, aecore.ops\n"
        "W = torch.randn(5, 3, device='cuda')\n"
        "v = torch.ones(2, 2, device='cuda')\n"
        "i = torch.tensor([[0, 7], [1, 2]], device='cuda')\n"
        "torch.ops.aecore.sparse_decode(v, i, W, torch.zeros(3, device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode != 0
    # the assert's own text goes to the device's printf stream (stdout), torch's error to
    # stderr; some torch versions drop the message and report the failed assert alone
    said = done.stdout + done.stderr
    assert "indices must lie in [0, 5)" in said or "device-side assert" in said, said


def test_cd_update_cuda_opcheck():
    from torch.library import opcheck

    v, W, b_v, b_h = rbm(6, 5, 3, torch.float64)
    velocities = [torch.zeros_like(t) for t in (W, b_v, b_h)]
    rng = torch.tensor([3, 4], device="cuda")
    chain = torch.ones(4, 3, dtype=torch.float64, device="cuda")
    for k, c, units in [(2, None, (False, False, True)), (1, chain, (True, False, False))]:
        args = (v, W, b_v, b_h, *velocities, k, c, *units, rng, 0.1, 0.5, 0.01, None, None, None)
        opcheck(torch.ops.aecore.cd_update_, args)


def test_cuda_statistics_repeat_exactly():
    # column sums add per-block partials in a fixed order: two calls agree to the bit,
    # also past the 64 blocks of rows where each thread sums several rows
    v, W, b_v, b_h = rbm(3000, 784, 500, torch.float64)
    a = ops.cd_step(v, W, b_v, b_h, generator=torch.Generator(device="cuda").manual_seed(1))
    b = ops.cd_step(v, W, b_v, b_h, generator=torch.Generator(device="cuda").manual_seed(1))
    for x, y in zip(a, b):
        assert torch.equal(x, y)
    h = torch.rand(4096, 16384, dtype=torch.float64, device="cuda")
    assert torch.equal(ops.kl_sparsity(h, 0.05, 2.0), ops.kl_sparsity(h, 0.05, 2.0))


def test_cuda_sparse_backward_of_an_empty_code_and_of_zero_values():
    W, b = torch.randn(6, 4, device="cuda", requires_grad=True), torch.zeros(4, device="cuda")
    for shape in [(0, 3), (5, 0)]:
        values = torch.zeros(shape, device="cuda", requires_grad=True)
        indices = torch.zeros(shape, dtype=torch.long, device="cuda")
        out = ops.sparse_decode(values, indices, W, b)
        (g,) = torch.autograd.grad(out.sum(), W)
        assert torch.equal(g, torch.zeros_like(W))
    # a zero value takes nothing from its row's gradient, even an infinite one (as on CPU)
    values = torch.tensor([[0.0, 1.0]], device="cuda", requires_grad=True)
    indices = torch.tensor([[2, 3]], device="cuda")
    out = ops.sparse_decode(values, indices, W, b)
    (g,) = torch.autograd.grad(out, W, torch.full_like(out, math.inf))
    assert torch.equal(g[2], torch.zeros(4, device="cuda")) and torch.isinf(g[3]).all()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_topk_encode_cuda_raises_on_non_finite_pre_activations(bad):
    x, W_enc, b_enc, b_dec, _ = sae_operands(4, 8, 70, torch.float32)
    with torch.no_grad():
        b_enc[68] = bad
    with pytest.raises(RuntimeError, match="NaN or infinite pre-activation"):
        ops.topk_encode(x, W_enc, b_enc, b_dec, 2)
    # unchecked (the trainer's way: no read of the kernels' flag): every value NaN
    dead = torch.zeros(70, dtype=torch.bool, device="cuda")
    dead[60:] = True
    out = ops.topk_encode(x, W_enc, b_enc, b_dec, 2, aux_k=3, dead=dead, check_finite=False)
    assert bool(out[0].isnan().all()) and bool(out[2].isnan().all())
    assert all(bool(((i >= 0) & (i < 70)).all()) for i in out[1::2])
