"""Conformance checks for autoencoder plugins, like scikit-learn's ``check_estimator``.

A third-party plugin runs them in its own test suite::

    from aecore.testing import check_autoencoder
    def test_conformance():
        check_autoencoder(MyAutoencoder)

Each failure is an ``AssertionError`` naming the model, the check and what was wrong.
The ONNX parity check needs ``pip install aecore[onnx]``.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from aecore.testing_onnx import check_onnx_parity

VECTOR_SHAPE = (12,)
IMAGE_SHAPE = (1, 8, 8)
LATENT_DIM = 3


class ConformanceError(AssertionError):
    """A plugin breaks the aecore model contract."""


def _fail(cls: type, check: str, message: str) -> None:
    raise ConformanceError(f"{cls.__name__}: {check}: {message}")


def _batch(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    # values in [0, 1]: valid for BCE and Bernoulli-visible models alike
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _registered(cls: type) -> Iterator[str]:
    """A registry name for ``cls`` (registering it in-process if it has none)."""
    from aecore import registry

    try:
        yield registry.name_of(cls)
        return
    except registry.RegistryError:
        pass
    name = f"conformance-{cls.__name__.lower()}"
    registry.register(name, cls)
    try:
        yield name
    finally:
        registry.unregister(name)


def _fresh(cls: type, shape: tuple[int, ...], hparams: dict[str, Any]):
    torch.manual_seed(0)
    model = cls(input_shape=shape, latent_dim=LATENT_DIM, **hparams)
    init = getattr(model, "init_from_data", None)
    if init is not None:
        init(_batch(shape, 32, seed=1))
    return model


def check_construction(cls, shape, hparams) -> None:
    model = _fresh(cls, shape, hparams)
    if tuple(model.input_shape) != shape or model.latent_dim != LATENT_DIM:
        _fail(
            cls,
            "construction",
            f"input_shape/latent_dim not kept: {model.input_shape}, {model.latent_dim}",
        )


def check_config_round_trip(cls, shape, hparams) -> None:
    model = _fresh(cls, shape, hparams)
    config = model.get_config()
    try:
        text = json.dumps(config)
    except TypeError as exc:
        _fail(cls, "config round trip", f"get_config() is not JSON-serialisable: {exc}")
    for key in ("input_shape", "latent_dim"):
        if key not in config:
            _fail(cls, "config round trip", f"get_config() lacks {key!r}")
    rebuilt = cls(**json.loads(text))
    if rebuilt.get_config() != config:
        _fail(cls, "config round trip", f"{rebuilt.get_config()} != {config}")
    own = {k: v.shape for k, v in model.state_dict().items()}
    other = {k: v.shape for k, v in rebuilt.state_dict().items()}
    if own != other:
        _fail(cls, "config round trip", "rebuilt model has different parameters")


def check_shapes(cls, shape, hparams) -> None:
    from aecore.errors import ShapeError

    model = _fresh(cls, shape, hparams).eval()
    for n in (1, 5):
        x = _batch(shape, n, seed=2)
        with torch.no_grad():
            z = model.encode(x)
            if tuple(z.shape) != (n, LATENT_DIM):
                _fail(cls, "shapes", f"encode gave {tuple(z.shape)}, expected {(n, LATENT_DIM)}")
            x_hat = model.decode(z)
            y1, y2 = model(x), model(x)
        if tuple(x_hat.shape) != (n, *shape):
            _fail(cls, "shapes", f"decode gave {tuple(x_hat.shape)}, expected {(n, *shape)}")
        if not torch.equal(y1, y2):
            _fail(cls, "shapes", "model(x) is not deterministic in eval mode")
        if not torch.isfinite(y1).all():
            _fail(cls, "shapes", "model(x) has non-finite values")
        score = model.score(x)
        if tuple(score.shape) != (n,) or not torch.isfinite(score).all():
            _fail(
                cls, "shapes", f"score(x) must be finite of shape ({n},); got {tuple(score.shape)}"
            )
    bad = _batch((*shape[:-1], shape[-1] + 1), 2, seed=3)
    try:
        model(bad)
    except ShapeError:
        pass
    else:
        _fail(
            cls, "shapes", f"input of shape {tuple(bad.shape)} was accepted; expected a ShapeError"
        )


def check_loss(cls, shape, hparams) -> None:
    model = _fresh(cls, shape, hparams).train()
    x = _batch(shape, 8, seed=4)
    terms = model.loss(x) if model.uses_optimizer else model.train_step(x)
    if not isinstance(terms, dict) or "loss" not in terms:
        _fail(cls, "loss", f"expected a dict with key 'loss'; got {type(terms).__name__}")
    for key, value in terms.items():
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            _fail(cls, "loss", f"term {key!r} must be a scalar tensor")
        if not torch.isfinite(value):
            _fail(cls, "loss", f"term {key!r} is not finite: {value}")
    if model.uses_optimizer and not terms["loss"].requires_grad:
        _fail(cls, "loss", "'loss' does not require grad")


def check_training_lowers_loss(cls, shape, hparams) -> None:
    """A few steps on one fixed batch lower the loss (noise fixed by a seed)."""
    model = _fresh(cls, shape, hparams).train()
    x = _batch(shape, 16, seed=5)

    def measure() -> float:
        with torch.random.fork_rng():
            torch.manual_seed(123)
            with torch.no_grad():
                return float(model.loss(x)["loss"])

    before = measure()
    if model.uses_optimizer:
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(10):
            torch.manual_seed(123)
            opt.zero_grad()
            model.loss(x)["loss"].backward()
            opt.step()
    else:
        for _ in range(10):
            model.train_step(x)
    after = measure()
    if not after < before:
        _fail(
            cls,
            "training",
            f"10 steps on a fixed batch did not lower the loss ({before:.6g} -> {after:.6g})",
        )


def check_save_load(cls, shape, hparams) -> None:
    from aecore.io import load, save
    from aecore.normalization import Normalization

    model = _fresh(cls, shape, hparams).eval()
    model.normalization = Normalization("minmax", [0.0], [2.0])
    x = _batch(shape, 4, seed=6)
    with _registered(cls), tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "m")
        loaded = load(Path(tmp) / "m")
        if type(loaded) is not cls:
            _fail(cls, "save/load", f"loaded a {type(loaded).__name__}")
        with torch.no_grad():
            if not torch.equal(model(x), loaded(x)):
                _fail(cls, "save/load", "outputs differ after save/load")
        if loaded.normalization != model.normalization:
            _fail(cls, "save/load", "normalisation not restored")


#: the checks every plugin must pass, in order
CHECKS: list[Callable] = [
    check_construction,
    check_config_round_trip,
    check_shapes,
    check_loss,
    check_training_lowers_loss,
    check_save_load,
    check_onnx_parity,
]


def check_autoencoder(
    cls_or_name: type | str,
    hparams: dict[str, Any] | None = None,
    *,
    checks: list[Callable] | None = None,
) -> list[str]:
    """Run every conformance check on a model class (or registry name) for a vector
    input ``(12,)`` and an image input ``(1, 8, 8)`` (those its ``input_ranks`` allow).
    Returns the names of the checks run; raises ConformanceError on the first failure."""
    from aecore.base import Autoencoder
    from aecore.registry import model_class

    cls = model_class(cls_or_name) if isinstance(cls_or_name, str) else cls_or_name
    if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
        raise ConformanceError(f"{cls!r} is not a subclass of aecore.Autoencoder")
    shapes = [s for s in (VECTOR_SHAPE, IMAGE_SHAPE) if len(s) in cls.input_ranks]
    if not shapes:
        raise ConformanceError(f"{cls.__name__}: accepts neither vector nor image inputs")
    ran = []
    for shape in shapes:
        for check in checks or CHECKS:
            check(cls, shape, dict(hparams or {}))
            ran.append(f"{check.__name__}{shape}")
    return ran
