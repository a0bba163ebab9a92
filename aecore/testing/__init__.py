"""Conformance checks for autoencoder plugins, like scikit-learn's estimator checks.

In a plugin's own pytest suite, one test item per (model, input shape, check), so each
failure is reported on its own and ``-k`` selects checks::

    from aecore.testing import parametrize_with_checks

    @parametrize_with_checks(["tiny"])          # registry names, classes, or
    def test_conformance(model, check):        # (name or class, hparams) pairs
        check(model)

Or all checks in one call, which raises one ``ConformanceError`` listing every failure::

    from aecore.testing import check_autoencoder
    check_autoencoder("tiny")

Models are checked with a vector input ``(12,)`` and an image input ``(1, 8, 8)``, those
their ``input_ranks`` allow. The ONNX parity check needs ``pip install aecore[onnx]``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

from aecore.base import Autoencoder
from aecore.registry import model_class
from aecore.testing.checks import (
    CORE_CHECKS,
    IMAGE_SHAPE,
    LATENT_DIM,
    VECTOR_SHAPE,
    ConformanceError,
    ModelSpec,
    check_config_round_trip,
    check_construction,
    check_loss,
    check_rows_independent,
    check_save_load,
    check_scores_beyond_range,
    check_shapes,
    check_training_lowers_loss,
)
from aecore.testing.onnx_parity import ONNX_PACKAGES, check_onnx_parity

__all__ = [
    "CHECKS",
    "IMAGE_SHAPE",
    "LATENT_DIM",
    "VECTOR_SHAPE",
    "ConformanceError",
    "ModelSpec",
    "check_autoencoder",
    "check_config_round_trip",
    "check_construction",
    "check_loss",
    "check_onnx_parity",
    "check_rows_independent",
    "check_save_load",
    "check_scores_beyond_range",
    "check_shapes",
    "check_training_lowers_loss",
    "model_specs",
    "parametrize_with_checks",
]

#: every check a plugin must pass, in order
CHECKS: list[Callable[[ModelSpec], None]] = [*CORE_CHECKS, check_onnx_parity]


def model_specs(cls_or_name: type | str, hparams: dict[str, Any] | None = None) -> list[ModelSpec]:
    """The specs a model class (or registry name) is checked with: one per input shape
    its ``input_ranks`` allow."""
    cls = model_class(cls_or_name) if isinstance(cls_or_name, str) else cls_or_name
    if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
        raise ConformanceError(f"{cls!r} is not a subclass of aecore.Autoencoder")
    shapes = [s for s in (VECTOR_SHAPE, IMAGE_SHAPE) if len(s) in cls.input_ranks]
    if not shapes:
        raise ConformanceError(
            f"{cls.__name__}: its input_ranks {tuple(cls.input_ranks)} take neither vector "
            f"{VECTOR_SHAPE} nor image {IMAGE_SHAPE} inputs: check it on a shape of its own, "
            f"each check called on aecore.testing.ModelSpec({cls.__name__}, input_shape)"
        )
    return [ModelSpec(cls, shape, dict(hparams or {})) for shape in shapes]


def check_autoencoder(
    cls_or_name: type | str,
    hparams: dict[str, Any] | None = None,
    *,
    checks: list[Callable[[ModelSpec], None]] | None = None,
) -> list[str]:
    """Run every check on a model class (or registry name) for each input shape it
    takes. Returns the names of the checks run (``check_shapes(12,)``, ...); raises one
    ConformanceError listing every failure (a check that crashes is a failure too)."""
    ran, failures = [], []
    for spec in model_specs(cls_or_name, hparams):
        for check in checks or CHECKS:
            name = f"{check.__name__}{spec.input_shape}"
            try:
                check(spec)
            except ConformanceError as exc:
                failures.append(f"{name}: {exc}")
            except Exception as exc:  # the model itself raised: report it, go on
                failures.append(f"{name}: {spec.name} raised {type(exc).__name__}: {exc}")
            ran.append(name)
    if failures:
        raise ConformanceError("\n".join(failures))
    return ran


def _specs(models: Iterable[Any]) -> Iterator[tuple[str, ModelSpec]]:
    """(test id prefix, spec) for each entry of parametrize_with_checks."""
    for entry in models:
        if isinstance(entry, ModelSpec):  # one input shape, chosen by the caller
            specs, label, hparams = [entry], entry.name, entry.hparams
        else:
            hparams: dict[str, Any] = {}
            if isinstance(entry, tuple):
                entry, hparams = entry
            specs = model_specs(entry, hparams)
            label = entry if isinstance(entry, str) else entry.__name__
        if hparams:
            label += "(" + ",".join(f"{k}={v}" for k, v in sorted(hparams.items())) + ")"
        for spec in specs:
            kind = "vector" if len(spec.input_shape) == 1 else "image"
            yield f"{label}-{kind}", spec


def parametrize_with_checks(
    models: Iterable[Any], *, checks: list[Callable[[ModelSpec], None]] | None = None
):
    """A ``pytest.mark.parametrize`` over (model, check): one test item per model, input
    shape and check, with ids like ``tiny-vector-check_shapes``. ``models`` holds
    registry names, classes, ``(name or class, hparams)`` pairs (each checked with every
    input shape it takes) or ``ModelSpec``s (one shape); the decorated test takes
    ``model`` (a ModelSpec) and ``check`` and calls ``check(model)``. Without the ONNX
    packages the ONNX parity items are skipped, saying what to install."""
    import importlib.util

    import pytest  # only where the kit runs under pytest

    missing = [m for m in ONNX_PACKAGES if importlib.util.find_spec(m) is None]
    no_onnx = pytest.mark.skip(
        reason=f"onnx parity needs {', '.join(missing)} (pip install aecore[onnx])"
    )
    params = [
        pytest.param(
            spec,
            check,
            id=f"{prefix}-{check.__name__}",
            marks=[no_onnx] if missing and check is check_onnx_parity else [],
        )
        for prefix, spec in _specs(models)
        for check in checks or CHECKS
    ]
    return pytest.mark.parametrize(("model", "check"), params)
