"""Argument checks shared by the fused ops and the reference: every bad input becomes a
ShapeError (rank, sizes, mismatched operands) or ConfigError (type, dtype, device, k, ρ,
β, ...) raised here, in Python, before any kernel runs."""

from __future__ import annotations

import math
import numbers

import torch

from aecore.errors import ConfigError, ShapeError
from aecore.ops.types import UNITS, GibbsCall, GibbsNoise

FLOAT_DTYPES = (torch.float32, torch.float64)
#: the sparse SAE ops also take 16-bit floats (fused on CUDA, the reference elsewhere)
SAE_DTYPES = (*FLOAT_DTYPES, torch.float16, torch.bfloat16)

#: upper bound on k (Gibbs steps): a larger value is almost surely a mistake.
MAX_GIBBS_STEPS = 10_000


def _shape(t: torch.Tensor) -> str:
    return str(tuple(int(d) for d in t.shape))


def is_real(value) -> bool:
    """A real number, numpy's scalars included (np.float32 is no float); not a bool."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def tensor(
    op: str,
    name: str,
    t,
    rank: int,
    like: torch.Tensor | None = None,
    like_name: str = "v",
    dtypes: tuple[torch.dtype, ...] = FLOAT_DTYPES,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise ConfigError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != rank:
        raise ShapeError(f"{op}: {name} must be {rank}-D, got shape {_shape(t)}")
    if like is None:
        if t.dtype not in dtypes:
            names = [str(d).replace("torch.", "") for d in dtypes]
            expected = ", ".join(names[:-1]) + " or " + names[-1]
            raise ConfigError(f"{op}: {name} must be {expected}, got {t.dtype}")
    else:
        if t.dtype != like.dtype:
            raise ConfigError(f"{op}: {name} has dtype {t.dtype} but {like_name} has {like.dtype}")
        if t.device != like.device:
            raise ConfigError(f"{op}: {name} is on {t.device} but {like_name} is on {like.device}")


def int_arg(op: str, name: str, value, lo: int, hi: int) -> int:
    """``value`` as a Python int (numpy integers included) in [lo, hi]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{op}: {name} must be an int, got {value!r}")
    if not lo <= value <= hi:
        raise ConfigError(f"{op}: {name} must lie in [{lo}, {hi}], got {value}")
    return int(value)


def _gibbs_operands(op, v, W, b_v, b_h, k, chain, visible, hidden, sample_visible) -> None:
    """Checks the RBM operands and unit types."""
    tensor(op, "v", v, 2)
    tensor(op, "W", W, 2, like=v)
    tensor(op, "b_v", b_v, 1, like=v)
    tensor(op, "b_h", b_h, 1, like=v)
    V = v.shape[1]
    if W.shape[0] != V:
        raise ShapeError(
            f"{op}: W must have shape (V, H) with V = v.shape[1] = {V}, got {_shape(W)} "
            "(aecore uses W of shape (visible, hidden); pass W.T for an (H, V) matrix)"
        )
    H = W.shape[1]
    if b_v.shape[0] != V:
        raise ShapeError(f"{op}: b_v must have shape ({V},), got {_shape(b_v)}")
    if b_h.shape[0] != H:
        raise ShapeError(f"{op}: b_h must have shape ({H},), got {_shape(b_h)}")
    int_arg(op, "k", k, 1, MAX_GIBBS_STEPS)
    if chain is not None:
        tensor(op, "chain", chain, 2, like=v)
        if chain.shape[1] != H:
            raise ShapeError(f"{op}: chain must have shape (batch, {H}), got {_shape(chain)}")
    for name, unit in (("visible", visible), ("hidden", hidden)):
        if unit not in UNITS:
            raise ConfigError(f"{op}: {name} must be 'bernoulli' or 'gaussian', got {unit!r}")
    if visible == hidden == "gaussian":
        raise ConfigError(
            f"{op}: visible='gaussian' with hidden='gaussian' has no normalisable "
            "distribution (the chain diverges); make at least one layer 'bernoulli'"
        )
    if not isinstance(sample_visible, bool):
        raise ConfigError(f"{op}: sample_visible must be a bool, got {sample_visible!r}")


def generator_arg(op, generator, v) -> None:
    if generator is None:
        return
    if not isinstance(generator, torch.Generator):
        raise ConfigError(
            f"{op}: generator must be a torch.Generator or None, got {type(generator).__name__}"
        )
    if generator.device.type != v.device.type:
        raise ConfigError(f"{op}: generator is on {generator.device} but v is on {v.device}")


def noise_arg(op, noise, v, W, k, chain, sample_visible) -> None:
    if noise is None:
        return
    if not isinstance(noise, GibbsNoise):
        raise ConfigError(f"{op}: noise must be an aecore.ops.GibbsNoise, got {type(noise)}")
    B, V, H = v.shape[0], v.shape[1], W.shape[1]
    Bc = chain.shape[0] if chain is not None else B
    want = {"h0": (B, H), "h": (k, Bc, H), "v": (k, Bc, V)}
    optional = {"h0": chain is not None and op != "gibbs_chain", "v": not sample_visible}
    for name, shape in want.items():
        t = getattr(noise, name)
        if t is None:
            if optional.get(name, False):
                continue
            raise ConfigError(f"{op}: noise.{name} is required here (shape {shape})")
        tensor(op, f"noise.{name}", t, len(shape), like=v)
        if tuple(t.shape) != shape:
            raise ShapeError(f"{op}: noise.{name} must have shape {shape}, got {_shape(t)}")


def gibbs_call(
    op: str,
    v,
    W,
    b_v,
    b_h,
    *,
    k,
    chain,
    visible,
    hidden,
    sample_visible,
    generator,
    noise,
) -> GibbsCall:
    """Every check of the Gibbs operands of a gibbs_chain (``op="gibbs_chain"``),
    cd_step or cd_update_ call: the public op and the reference make the same ones and
    run the GibbsCall this returns (with the statistics unless it is gibbs_chain)."""
    stats = op != "gibbs_chain"
    _gibbs_operands(op, v, W, b_v, b_h, k, chain, visible, hidden, sample_visible)
    generator_arg(op, generator, v)
    if generator is not None and noise is not None:  # noise holds every draw: none is left
        raise ConfigError(f"{op}: pass generator or noise, not both: noise supplies every draw")
    noise_arg(op, noise, v, W, k, chain, sample_visible)
    return GibbsCall(
        v=v,
        W=W,
        b_v=b_v,
        b_h=b_h,
        k=k,
        chain=chain,
        gaussian_visible=visible == "gaussian",
        gaussian_hidden=hidden == "gaussian",
        sample_visible=sample_visible,
        generator=generator,
        noise=noise,
        stats=stats,
    )


def finite(value) -> bool:
    """math.isfinite, but under torch.compile a number passes: there it may be symbolic
    (a float argument that varies between calls), and the kernels check it when they run."""
    return torch.compiler.is_compiling() or math.isfinite(value)


def real_arg(op, name, value) -> float:
    if not is_real(value):
        raise ConfigError(f"{op}: {name} must be a real number, got {value!r}")
    return float(value)


def kl_args(h, rho, beta) -> tuple[float, float]:
    op = "kl_sparsity"
    tensor(op, "h", h, 2)
    if h.shape[0] == 0:
        raise ShapeError(
            f"{op}: h must have at least one row (the mean is undefined), got {_shape(h)}"
        )
    rho = real_arg(op, "rho", rho)
    beta = real_arg(op, "beta", beta)
    if not 0.0 < rho < 1.0:
        raise ConfigError(f"{op}: rho must lie in the open interval (0, 1), got {rho}")
    if not (beta >= 0.0 and finite(beta)):
        raise ConfigError(f"{op}: beta must be finite and >= 0, got {beta}")
    return rho, beta


def topk_args(z, k) -> int:
    op = "topk_sparsify"
    tensor(op, "z", z, 2, dtypes=SAE_DTYPES)
    D = z.shape[1]
    if D == 0:
        raise ShapeError(f"{op}: z must have at least one column, got {_shape(z)}")
    return int_arg(op, "k", k, 1, D)


def _size(op: str, name: str, t: torch.Tensor, expected: tuple[int, ...], what) -> None:
    """``what()``: the expected shape in words, built only for the error (under
    torch.compile, formatting symbolic sizes on every call would break the graph)."""
    if tuple(t.shape) != expected:
        raise ShapeError(f"{op}: {name} must be {what()}, got {_shape(t)}")


def topk_encode_args(x, W_enc, b_enc, b_dec, k) -> int:
    """Checks topk_encode's operands: x (B, d), W_enc (n, d), b_enc (n,), b_dec (d,)."""
    op = "topk_encode"
    tensor(op, "x", x, 2, dtypes=SAE_DTYPES)
    tensor(op, "W_enc", W_enc, 2, like=x, like_name="x")
    tensor(op, "b_enc", b_enc, 1, like=x, like_name="x")
    tensor(op, "b_dec", b_dec, 1, like=x, like_name="x")
    d, n = x.shape[1], W_enc.shape[0]
    _size(op, "W_enc", W_enc, (n, d), lambda: f"(n, {d}) for x of shape {_shape(x)}")
    if n == 0:
        raise ShapeError(f"{op}: W_enc must have at least one row (latent), got {_shape(W_enc)}")
    _size(op, "b_enc", b_enc, (n,), lambda: f"({n},) for W_enc of shape {_shape(W_enc)}")
    _size(op, "b_dec", b_dec, (d,), lambda: f"({d},) for x of shape {_shape(x)}")
    return int_arg(op, "k", k, 1, n)


def aux_args(x, W_enc, aux_k, dead) -> int:
    """Checks topk_encode's AuxK arguments; returns aux_k as an int (0 without dead)."""
    op = "topk_encode"
    n = W_enc.shape[0]
    if dead is None:
        if aux_k != 0:
            raise ConfigError(f"{op}: aux_k={aux_k!r} needs dead, the mask of dead latents")
        return 0
    aux_k = int_arg(op, "aux_k", aux_k, 0, n)
    if not isinstance(dead, torch.Tensor) or dead.dtype != torch.bool:
        got = dead.dtype if isinstance(dead, torch.Tensor) else type(dead).__name__
        raise ConfigError(f"{op}: dead must be a bool tensor (one flag per latent), got {got}")
    if dead.device != x.device:
        raise ConfigError(f"{op}: dead is on {dead.device} but x is on {x.device}")
    _size(op, "dead", dead, (n,), lambda: f"({n},) for W_enc of shape {_shape(W_enc)}")
    return aux_k


def sparse_decode_args(values, indices, W_dec, b_dec, check_indices: bool = True) -> None:
    """Checks sparse_decode's operands: values and indices (B, m), W_dec (n, d), b_dec (d,)
    and, with check_indices, every index in [0, n)."""
    op = "sparse_decode"
    tensor(op, "values", values, 2, dtypes=SAE_DTYPES)
    if not isinstance(indices, torch.Tensor) or indices.dtype != torch.int64:
        got = indices.dtype if isinstance(indices, torch.Tensor) else type(indices).__name__
        raise ConfigError(f"{op}: indices must be an int64 tensor, got {got}")
    if indices.device != values.device:
        raise ConfigError(
            f"{op}: indices are on {indices.device} but values are on {values.device}"
        )
    _size(
        op, "indices", indices, tuple(values.shape), lambda: f"the values' shape {_shape(values)}"
    )
    tensor(op, "W_dec", W_dec, 2, like=values, like_name="values")
    tensor(op, "b_dec", b_dec, 1, like=values, like_name="values")
    n, d = W_dec.shape
    _size(op, "b_dec", b_dec, (d,), lambda: f"({d},) for W_dec of shape {_shape(W_dec)}")
    # under torch.compile the range is data the graph cannot branch on: the compiled CPU
    # kernel checks it there; a meta tensor has no data
    skip = not check_indices or indices.device.type == "meta" or torch.compiler.is_compiling()
    if indices.numel() and not skip:
        lo, hi = (int(v) for v in torch.aminmax(indices))
        if lo < 0 or hi >= n:
            raise ConfigError(
                f"{op}: indices must lie in [0, {n}) (W_dec's rows), got values in [{lo}, {hi}]"
            )


def positive(op: str, name: str, value) -> float:
    if not is_real(value) or not (finite(value) and value > 0):
        raise ConfigError(f"{op}: {name} must be a positive finite number, got {value!r}")
    return float(value)


def writable(op: str, name: str, t: torch.Tensor) -> None:
    """Only a strided view (expand, as_strided) can repeat elements: an in-place write
    there would fail half-way through an update, after other tensors changed. An inference
    tensor is refused outside inference mode, as torch's own in-place ops refuse it (the
    kernels write through raw pointers, which torch would not stop; a compiled graph has
    no inference tensors to ask about)."""
    if frozen(t):
        raise ConfigError(
            f"{op}: {name} is an inference tensor (made under torch.inference_mode()), which "
            f"cannot be written in place outside inference mode; call the op inside "
            f"torch.inference_mode() or pass a normal tensor (.clone() outside inference mode)"
        )
    if not t.is_contiguous() and torch._debug_has_internal_overlap(t) == 1:
        raise ConfigError(
            f"{op}: {name} is written in place, but its elements share memory (a view "
            f"such as expand's); pass a tensor of its own (.clone())"
        )


def frozen(t) -> bool:
    """An inference tensor outside inference mode: one torch refuses to write in place."""
    if torch.compiler.is_compiling() or not isinstance(t, torch.Tensor):
        return False
    return t.is_inference() and not torch.is_inference_mode_enabled()


def any_inference_tensor(*groups) -> bool:
    """Whether a list in ``groups`` holds a tensor ``writable`` refuses as ``frozen`` (a
    cheap test, so the fused fast paths can skip to the checks that explain it)."""
    return any(frozen(t) for group in groups if isinstance(group, (list, tuple)) for t in group)


def weight_decays(weight_decay, n: int) -> list[float]:
    """momentum_step_'s weight_decay as floats, one per parameter (None: zeros)."""
    decay = [0.0] * n if weight_decay is None else weight_decay
    if not isinstance(decay, (list, tuple)) or not all(is_real(w) for w in decay):
        raise ConfigError(
            f"momentum_step_: weight_decay must be a list of numbers, one per parameter, or "
            f"None; got {weight_decay!r}"
        )
    return [float(w) for w in decay]


def momentum_step_args(params, velocities, steps, lr, momentum, weight_decay) -> None:
    op = "momentum_step_"
    for name, seq in (("params", params), ("velocities", velocities), ("steps", steps)):
        if not isinstance(seq, (list, tuple)):
            raise ConfigError(f"{op}: {name} must be a list of tensors, got {type(seq).__name__}")
    n = len(params)
    if n == 0:
        raise ConfigError(f"{op}: params is empty")
    if not len(velocities) == len(steps) == len(weight_decay) == n:
        raise ConfigError(
            f"{op}: one velocity, step and weight decay per parameter: got {n} params, "
            f"{len(velocities)} velocities, {len(steps)} steps, {len(weight_decay)} weight decays"
        )
    first = params[0]
    for i in range(n):
        for name, t in (("params", params[i]), ("velocities", velocities[i]), ("steps", steps[i])):
            like = None if t is first else first  # any rank; the shape check follows
            tensor(op, f"{name}[{i}]", t, t.dim(), like=like, like_name="params[0]")
            if t.shape != params[i].shape:
                raise ShapeError(
                    f"{op}: {name}[{i}] has shape {_shape(t)}, params[{i}] {_shape(params[i])}"
                )
            if name != "steps":
                writable(op, f"{name}[{i}]", t)
    for name, value in (("lr", lr), ("momentum", momentum)):
        if not is_real(value) or not finite(value):
            raise ConfigError(f"{op}: {name} must be a finite number, got {value!r}")
    if any(not finite(w) for w in weight_decay):
        raise ConfigError(f"{op}: weight_decay must be finite numbers, got {weight_decay!r}")


def cd_update_args(
    v, W, b_v, b_h, velocities, lr, momentum, weight_decay, k, *, chain=None,
    visible="bernoulli", hidden="bernoulli", sample_visible=True, generator=None, noise=None,
) -> tuple[GibbsCall, list, float, float, float]:  # fmt: skip
    """Every check of a cd_update_ call: (the Gibbs call, the velocities as a list, lr,
    momentum, weight_decay as floats)."""
    op = "cd_update_"
    call = gibbs_call(
        op, v, W, b_v, b_h, k=k, chain=chain, visible=visible, hidden=hidden,
        sample_visible=sample_visible, generator=generator, noise=noise,
    )  # fmt: skip
    if not isinstance(velocities, (list, tuple)) or len(velocities) != 3:
        raise ConfigError(
            f"{op}: velocities must be a list of three tensors (for W, b_v and b_h), "
            f"got {type(velocities).__name__}"
            + (f" of {len(velocities)}" if isinstance(velocities, (list, tuple)) else "")
        )
    for name, velocity, param in zip(("W", "b_v", "b_h"), velocities, (W, b_v, b_h)):
        tensor(op, f"the velocity of {name}", velocity, param.dim(), like=param, like_name=name)
        if velocity.shape != param.shape:
            raise ShapeError(
                f"{op}: the velocity of {name} must have {name}'s shape {_shape(param)}, "
                f"got {_shape(velocity)}"
            )
    written = {"W": W, "b_v": b_v, "b_h": b_h, "chain": chain}
    written.update({f"the velocity of {k}": t for k, t in zip(("W", "b_v", "b_h"), velocities)})
    for name, t in written.items():
        if t is not None:
            writable(op, name, t)
    rates = {"lr": lr, "momentum": momentum, "weight_decay": weight_decay}
    for name, value in rates.items():
        if not finite(real_arg(op, name, value)):
            raise ConfigError(f"{op}: {name} must be a finite number, got {value!r}")
    return call, list(velocities), float(lr), float(momentum), float(weight_decay)


def rows_args(op: str, written: str, **tensors: torch.Tensor) -> None:
    """Checks a decoder-row op's operands: 2-D, one shape, and ``written`` writable."""
    first = None
    for name, t in tensors.items():
        tensor(op, name, t, 2, like=first, like_name="weight", dtypes=SAE_DTYPES)
        first = first if first is not None else t
    shapes = {tuple(t.shape) for t in tensors.values()}
    if len(shapes) > 1:
        raise ShapeError(f"{op}: grad and weight must have one shape, got {sorted(shapes)}")
    writable(op, written, tensors[written])
