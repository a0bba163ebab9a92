"""Turning an exporter failure into an error a plugin author can act on: the model, the
part, the failing torch op and the model's own source line that the tracer choked on."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import traceback
import warnings
from collections.abc import Iterator

import torch

from aecore.errors import OnnxExportError

_OP_PATTERNS = (
    re.compile(r"No ONNX function found for <OpOverload\(op='([\w.]+)', overload='(\w+)'\)"),
    re.compile(r"target=torch\.ops\.([\w]+)\.([\w]+)"),
)
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


def export_failure(name: str, part: str, exc: BaseException, stage: str) -> OnnxExportError:
    """The OnnxExportError for ``exc`` raised while ``stage`` ran on ``name`` (``part``)."""
    if "Constraints violated" in str(exc) and "specialized it to be a constant" in str(exc):
        return OnnxExportError(
            f"cannot export {name} ({part}) to ONNX: its forward works only for the batch "
            f"size it was traced with, and ONNX graphs take any batch size; derive shapes "
            f"from the input (x.reshape(len(x), -1) or reshape(-1, ...)), not constants"
        )
    op = _failing_op(exc)
    where = _user_frame(exc)
    what = op or where or "an operation"
    detail = first_line(_chain(exc)[-1])
    if op and where:
        what = f"{op} at {where}"
    return OnnxExportError(
        f"cannot export {name} ({part}) to ONNX: {what} failed in {stage}: {detail}"
    )


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (capped), or its type name."""
    text = str(exc).strip()
    for line in text.splitlines():
        line = line.strip()
        if line:
            return line[:300]
    return type(exc).__name__


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    while exc is not None and exc not in seen:
        seen.append(exc)
        exc = exc.__cause__ or exc.__context__
    return seen


def _failing_op(exc: BaseException) -> str | None:
    for e in _chain(exc):
        text = str(e)
        for pattern in _OP_PATTERNS:
            m = pattern.search(text)
            if m:
                qualified = m.group(1)
                namespace, _, op = qualified.partition(".")
                return f"torch op {namespace}::{op or m.group(2)}"
    return None


def _user_frame(exc: BaseException) -> str | None:
    """The deepest traceback frame outside torch, the ONNX packages, the standard
    library and this package: the model line that the tracer could not handle."""
    import sysconfig

    import onnx
    import onnxscript

    packages = (torch, onnx, onnxscript)
    skip = tuple(os.path.dirname(m.__file__) + os.sep for m in packages if m.__file__)
    skip += (sysconfig.get_paths()["stdlib"] + os.sep, _PACKAGE_DIR)
    found = None
    for e in _chain(exc):
        for frame in traceback.extract_tb(e.__traceback__):
            filename = frame.filename
            if filename.startswith(skip) or "<" in filename:
                continue  # "<...>": generated code
            code = (frame.line or "").strip()
            found = f"`{code}` ({os.path.basename(filename)}:{frame.lineno} in {frame.name})"
    return found


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """The exporter prints progress, logs warnings (e.g. torchvision missing) and, on
    failure, dumps the partial graph to stderr; our error says what failed instead."""
    loggers = [
        logging.getLogger(n)
        for n in ("torch.onnx", "torch.export", "torch._export", "torch.fx.experimental")
    ]
    # fake tensors log a failed meta kernel's traceback as an error (a plugin's shape
    # mismatch met while tracing), which our error already names
    loggers.append(logging.getLogger("torch._subclasses.fake_tensor"))
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL if lg.name.endswith("fake_tensor") else logging.ERROR)
    try:
        with (
            warnings.catch_warnings(),
            contextlib.redirect_stdout(io.StringIO()),
            contextlib.redirect_stderr(io.StringIO()),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
