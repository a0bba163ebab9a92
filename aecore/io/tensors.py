"""Pickle-free tensor files: safetensors with aecore's JSON metadata, checked before
they are trusted, and nested states (optimizer state) flattened into them."""

from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aecore.errors import ModelFileError
from aecore.io.atomic import atomic_write

if TYPE_CHECKING:
    import torch

_META_KEY = "aecore"
_MAX_HEADER = 100 * 1024 * 1024


def save_tensors(
    path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: Any = None
) -> None:
    """Write tensors (+ JSON-able ``meta``) atomically as one safetensors file."""
    from safetensors.torch import save

    flat = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    metadata = {_META_KEY: json.dumps(meta)} if meta is not None else None
    blob = save(flat, metadata=metadata)
    atomic_write(path, lambda f: f.write(blob))


def check_safetensors_header(path: Path) -> dict[str, Any]:
    """Parse a safetensors header without trusting the file; a clear error if it is
    something else (a pickle renamed .safetensors, a truncated or corrupt file)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ModelFileError(f"{path} is not a safetensors file: only {size} bytes")
            (n,) = struct.unpack("<Q", head)
            plausible = n <= min(size - 8, _MAX_HEADER) and f.read(1) == b"{"
            if not plausible and _looks_pickled(head):
                # (checked only now: a valid header length may start with byte 0x80 too)
                raise ModelFileError(
                    f"{path} is not a safetensors file: it looks like a pickle or torch.save "
                    f"archive, which aecore never loads (it could run code)"
                )
            if not plausible:
                raise ModelFileError(
                    f"{path} is not a safetensors file: corrupt header (claims {n} header bytes "
                    f"in a {size}-byte file)"
                )
            f.seek(8)
            header = json.loads(f.read(n).decode("utf-8"))
    except FileNotFoundError:
        raise ModelFileError(f"{path}: file not found") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not a safetensors file: corrupt header ({exc})") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{path} is not a safetensors file: corrupt header")
    data_size = size - 8 - n
    for key, spec in header.items():
        if key == "__metadata__":
            continue
        offsets = spec.get("data_offsets") if isinstance(spec, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2 and offsets[1] <= data_size):
            raise ModelFileError(
                f"{path} is truncated or corrupt: tensor {key!r} lies outside the file"
            )
    return header


def _looks_pickled(head: bytes) -> bool:
    """A pickle (protocol 2-5 opcode) or a torch.save zip archive."""
    return (head[0] == 0x80 and 2 <= head[1] <= 5) or head[:4] == b"PK\x03\x04"


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], Any]:
    """Read a file written by ``save_tensors``: (tensors, meta). Never unpickles. The
    header and the tensors come from one file even while a writer replaces it (an
    atomic rename: a new inode), read again if that happened between them."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = Path(path)
    for _ in range(_READ_ATTEMPTS):
        before = _identity(path)
        header = check_safetensors_header(path)
        try:
            tensors = load_file(str(path))
        except SafetensorError as exc:
            if _identity(path) != before:
                continue
            raise ModelFileError(f"{path} is corrupt: {exc}") from None
        if _identity(path) == before:
            break
    else:
        raise ModelFileError(f"{path} kept changing while it was read (a writer is busy)")
    raw = (header.get("__metadata__") or {}).get(_META_KEY)
    try:
        meta = json.loads(raw) if raw is not None else None
    except json.JSONDecodeError:
        raise ModelFileError(f"{path}: corrupt aecore metadata") from None
    return tensors, meta


_READ_ATTEMPTS = 5


def _identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


# -- nested structures (optimizer state) <-> flat tensors + JSON -----------------------
def flatten_state(obj: Any, prefix: str, tensors: dict[str, torch.Tensor]) -> Any:
    """Replace every tensor in a nested dict/list structure by a reference into
    ``tensors``, leaving a JSON-able skeleton."""
    import torch

    if isinstance(obj, torch.Tensor):
        tensors[prefix] = obj
        return {"__tensor__": prefix}
    if isinstance(obj, dict):
        return {
            "__dict__": [
                [_key(k), flatten_state(v, f"{prefix}.{k}", tensors)] for k, v in obj.items()
            ]
        }
    if isinstance(obj, (list, tuple)):
        kind = "__tuple__" if isinstance(obj, tuple) else "__list__"
        return {kind: [flatten_state(v, f"{prefix}.{i}", tensors) for i, v in enumerate(obj)]}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} in a checkpoint")


def _key(k: Any) -> Any:
    if isinstance(k, (int, str)):
        return k
    raise TypeError(f"cannot store a dict key of type {type(k).__name__} in a checkpoint")


def unflatten_state(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensors[obj["__tensor__"]]
        if "__dict__" in obj:
            return {k: unflatten_state(v, tensors) for k, v in obj["__dict__"]}
        if "__list__" in obj:
            return [unflatten_state(v, tensors) for v in obj["__list__"]]
        if "__tuple__" in obj:
            return tuple(unflatten_state(v, tensors) for v in obj["__tuple__"])
    return obj
