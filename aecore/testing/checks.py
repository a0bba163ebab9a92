"""The conformance checks: each takes a ``ModelSpec`` (a model class, an input shape and
hyperparameters) and raises ``ConformanceError`` naming the model, the check and what
was wrong."""

from __future__ import annotations

import contextlib
import json
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from aecore import registry
from aecore.data.normalization import Normalization
from aecore.errors import DataError, RegistryError, ShapeError
from aecore.io.model_folder import load, save

VECTOR_SHAPE = (12,)
IMAGE_SHAPE = (1, 8, 8)
LATENT_DIM = 3


class ConformanceError(AssertionError):
    """A plugin breaks the aecore model contract."""


@dataclass(frozen=True)
class ModelSpec:
    """What a check runs on: a model class, one input shape and its hyperparameters."""

    cls: type
    input_shape: tuple[int, ...]
    hparams: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cls.__name__

    def build(self):
        """A fresh, seeded model (data-dependent initialisation run on a fixed batch)."""
        torch.manual_seed(0)
        model = self.cls(input_shape=self.input_shape, latent_dim=LATENT_DIM, **self.hparams)
        init = getattr(model, "init_from_data", None)
        if init is not None:
            init(batch(self.input_shape, 32, seed=1))
        return model

    def fail(self, check: str, message: str) -> None:
        raise ConformanceError(f"{self.name}: {check}: {message}")


def batch(shape: tuple[int, ...], n: int, seed: int) -> torch.Tensor:
    # values in [0, 1]: valid for BCE and Bernoulli-visible models alike
    return torch.rand((n, *shape), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def registered(cls: type) -> Iterator[str]:
    """A registry name for ``cls`` (registering it in-process if it has none)."""
    try:
        yield registry.name_of(cls)
        return
    except RegistryError:
        pass
    name = f"conformance-{cls.__name__.lower()}"
    registry.register(name, cls)
    try:
        yield name
    finally:
        registry.unregister(name)


def check_construction(spec: ModelSpec) -> None:
    model = spec.build()
    if tuple(model.input_shape) != spec.input_shape or model.latent_dim != LATENT_DIM:
        spec.fail(
            "construction",
            f"input_shape/latent_dim not kept: {model.input_shape}, {model.latent_dim}",
        )


def check_config_round_trip(spec: ModelSpec) -> None:
    model = spec.build()
    config = model.get_config()
    try:
        text = json.dumps(config)
    except TypeError as exc:
        spec.fail("config round trip", f"get_config() is not JSON-serialisable: {exc}")
    for key in ("input_shape", "latent_dim"):
        if key not in config:
            spec.fail("config round trip", f"get_config() lacks {key!r}")
    # a hyperparameter left out is rebuilt at its default: a saved model would load as
    # another model
    from aecore.registry import hyperparameter_names

    left_out = sorted((hyperparameter_names(spec.cls) or set()) - set(config))
    if left_out:
        spec.fail(
            "config round trip",
            f"get_config() leaves out the hyperparameters {left_out}: a saved model would "
            f"load with their defaults",
        )
    _check_given_values(spec, config)
    rebuilt = spec.cls(**json.loads(text))
    if rebuilt.get_config() != config:
        spec.fail("config round trip", f"{rebuilt.get_config()} != {config}")
    own = {k: v.shape for k, v in model.state_dict().items()}
    other = {k: v.shape for k, v in rebuilt.state_dict().items()}
    if own != other:
        spec.fail("config round trip", "rebuilt model has different parameters")


def _check_given_values(spec: ModelSpec, config: dict) -> None:
    """A config stuck at a default (``l2`` reported 0.0 whatever was given) rebuilds
    another model. Judged on scalars only, where the value reported equals the default
    model's but the one given differs: a model may store a value in its own form (8 as
    [8], "ReLU" as "relu", "auto" as what it chose)."""
    try:
        default = spec.cls(input_shape=spec.input_shape, latent_dim=LATENT_DIM).get_config()
    except Exception:  # a model that needs some hyperparameter: nothing to compare with
        return
    fold = lambda v: v.lower() if isinstance(v, str) else v  # noqa: E731
    for key, given in spec.hparams.items():
        reported = config.get(key)
        scalar = isinstance(given, (bool, int, float, str)) and type(given) is type(reported)
        if scalar and key in default and reported == default[key] and fold(given) != fold(reported):
            spec.fail(
                "config round trip",
                f"get_config() reports {key}={reported!r}, but the model was built with "
                f"{key}={given!r}: a saved model would load as another",
            )


def _output(spec: ModelSpec, method: str, value: Any, shape: tuple, dtype) -> None:
    """A tensor of ``shape`` in the model's dtype (a float64 output fails to export,
    or to be served, far from its cause)."""
    if not isinstance(value, torch.Tensor):
        spec.fail("shapes", f"{method} returned a {type(value).__name__}; expected a tensor")
    if tuple(value.shape) != shape:
        spec.fail("shapes", f"{method} gave {tuple(value.shape)}, expected {shape}")
    if dtype is not None and value.dtype != dtype:
        spec.fail(
            "shapes",
            f"{method} returned {value.dtype}, but the model computes in {dtype}: return its dtype",
        )


def check_shapes(spec: ModelSpec) -> None:
    shape = spec.input_shape
    model = spec.build().eval()
    dtype = model.float_dtype()
    for n in (1, 5):
        x = batch(shape, n, seed=2)
        with torch.no_grad():
            z = model.encode(x)
            _output(spec, "encode", z, (n, LATENT_DIM), dtype)
            x_hat = model.decode(z)
            _output(spec, "decode", x_hat, (n, *shape), dtype)
            y1, y2 = model(x), model(x)
            _output(spec, "model(x)", y1, (n, *shape), dtype)
        if not torch.equal(y1, y2):
            spec.fail("shapes", "model(x) is not deterministic in eval mode")
        if not torch.isfinite(y1).all():
            spec.fail("shapes", "model(x) has non-finite values")
        score = model.score(x)
        if tuple(score.shape) != (n,) or not torch.isfinite(score).all():
            spec.fail(
                "shapes", f"score(x) must be finite of shape ({n},); got {tuple(score.shape)}"
            )
    holed = batch(shape, 3, seed=2)
    holed.flatten(1)[1, 0] = float("nan")  # a NaN score would be above no threshold
    for kind in model.score_kinds:
        try:
            model.score(holed, kind=kind)
        except DataError:
            pass
        else:
            spec.fail("shapes", f"score(x, kind={kind!r}) of a row with NaN was not refused")
    # each door checks what it takes (Autoencoder.check_input, check_code): a wrong
    # width otherwise fails deep in torch ("mat1 and mat2 shapes cannot be multiplied")
    bad = batch((*shape[:-1], shape[-1] + 1), 2, seed=3)
    wide_code = torch.rand(2, LATENT_DIM + 1)
    for method, given in (("model", bad), ("encode", bad), ("decode", wide_code)):
        call = model if method == "model" else getattr(model, method)
        try:
            with torch.no_grad():
                call(given)
        except ShapeError:
            continue
        except Exception as exc:
            got = f"raised {type(exc).__name__}: {exc}"
        else:
            got = "was accepted"
        spec.fail(
            "shapes",
            f"{method}() of shape {tuple(given.shape)} {got}; expected a ShapeError (call "
            f"self.check_input(x) in encode, self.check_code(z) in decode)",
        )


def check_rows_independent(spec: ModelSpec) -> None:
    """In eval mode a row's code and reconstruction do not depend on the other rows of
    its batch: a served model runs batches of any size (batch statistics belong to
    training mode)."""
    model = spec.build().eval()
    x = batch(spec.input_shape, 5, seed=7)
    with torch.no_grad():
        together = model.encode(x), model(x)
        alone = [torch.cat([f(x[i : i + 1]) for i in range(5)]) for f in (model.encode, model)]
    for what, a, b in zip(("encode", "model(x)"), together, alone):
        if not torch.allclose(a, b, rtol=1e-4, atol=1e-5):
            gap = float((a - b).abs().max())
            spec.fail(
                "rows independent",
                f"{what} of a row differs by {gap:.3g} in a batch of 5 from the row alone",
            )


def check_scores_beyond_range(spec: ModelSpec) -> None:
    """A model with an ``input_range`` scores a row higher the farther it lies beyond
    it, by every kind: a detector must not pass a far-out row as its clipped self."""
    model = spec.build().eval()
    if model.input_range is None:
        return
    lo, hi = model.input_range
    values = [hi, hi + 1.0, hi + 10.0, hi + 100.0, lo, lo - 10.0]
    rows = batch(spec.input_shape, 1, seed=8).repeat(6, *[1] * len(spec.input_shape))
    rows.flatten(1)[:, 0] = torch.tensor(values)
    for kind in model.score_kinds:
        s = model.score(rows, kind=kind)
        if not (torch.all(s[1:4] > s[:3]) and s[5] > s[4]):
            spec.fail(
                "scores beyond range",
                f"score(x, kind={kind!r}) of a row with one feature at {values} "
                f"(input_range {model.input_range}) is {[round(float(v), 4) for v in s]}: "
                f"it must rise beyond the range (Autoencoder.bounded_score)",
            )


def check_loss(spec: ModelSpec) -> None:
    model = spec.build().train()
    x = batch(spec.input_shape, 8, seed=4)
    method = "loss" if model.uses_optimizer else "train_step"
    terms = getattr(model, method)(x)
    if not isinstance(terms, dict) or "loss" not in terms:
        got = (
            f"the keys {sorted(map(str, terms))}"
            if isinstance(terms, dict)
            else f"a {type(terms).__name__}"
        )
        spec.fail("loss", f"{method}() must return a dict with key 'loss'; got {got}")
    for key, value in terms.items():
        if method == "train_step" and isinstance(value, (int, float)):
            value = torch.tensor(float(value))  # an own update rule may report numbers
        if not isinstance(value, torch.Tensor) or value.dim() != 0:
            spec.fail("loss", f"term {key!r} must be a scalar tensor")
        if not torch.isfinite(value):
            spec.fail("loss", f"term {key!r} is not finite: {value}")
    if model.uses_optimizer and not terms["loss"].requires_grad:
        spec.fail("loss", "'loss' does not require grad")


def check_training_lowers_loss(spec: ModelSpec) -> None:
    """A few steps on one fixed batch lower the loss (noise fixed by a seed)."""
    model = spec.build().train()
    x = batch(spec.input_shape, 16, seed=5)

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
        spec.fail(
            "training",
            f"10 steps on a fixed batch did not lower the loss ({before:.6g} -> {after:.6g})",
        )


def check_save_load(spec: ModelSpec) -> None:
    model = spec.build().eval()
    model.normalization = Normalization("minmax", [0.0], [2.0])
    x = batch(spec.input_shape, 4, seed=6)
    with registered(spec.cls), tempfile.TemporaryDirectory() as tmp:
        save(model, Path(tmp) / "m")
        loaded = load(Path(tmp) / "m")
        if type(loaded) is not spec.cls:
            spec.fail("save/load", f"loaded a {type(loaded).__name__}")
        with torch.no_grad():
            before, after = model(x), loaded(x)
        # rounding only: a model may save a canonical form (an SAE folds its input
        # scale into the weights)
        if not torch.allclose(before, after, rtol=1e-5, atol=1e-6):
            gap = float((before - after).abs().max())
            spec.fail("save/load", f"outputs differ after save/load (max |diff| {gap:.3g})")
        if loaded.normalization != model.normalization:
            spec.fail("save/load", "normalisation not restored")


#: the checks that need nothing beyond torch, in order
CORE_CHECKS = [
    check_construction,
    check_config_round_trip,
    check_shapes,
    check_rows_independent,
    check_scores_beyond_range,
    check_loss,
    check_training_lowers_loss,
    check_save_load,
]
