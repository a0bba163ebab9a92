"""The on-disk layout of an activation cache: ``manifest.json`` and its shards.

A cache is a folder::

    manifest.json                 what was extracted, how, and the completed shards
    <hook dir>/00000.npy          rows (tokens) x d of one hook, one shard per file
    <hook dir>/00001.npy          ...

The manifest names the model, its hooks, the stored dtype, the input data and, per hook,
its width ``d``, the rows it holds and each completed shard's file, rows and sha256. It
is rewritten (atomically) after every completed shard, so it always describes exactly
the shards that are whole on disk. numpy only (``aecore.data`` reads caches torch-free).
"""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np

from aecore.errors import ConfigError, DataError
from aecore.io.atomic import atomic_write_text

FORMAT = "aecore-activations"
VERSION = 1
MANIFEST = "manifest.json"

#: dtype name -> numpy dtype of the stored arrays; bfloat16 has no numpy dtype, so its
#: values are stored as their uint16 bit patterns (the manifest's ``dtype`` says so)
STORAGE = {
    "float16": np.dtype(np.float16),
    "bfloat16": np.dtype(np.uint16),
    "float32": np.dtype(np.float32),
}

#: the settings a resumed extraction must share with the cache it continues
SETTINGS = (
    "model",
    "model_fingerprint",
    "data",
    "input_shape",
    "input_fingerprint",
    "hooks",
    "dtype",
    "shard_rows",
    "max_rows",
)


def new_manifest(hooks: list[str], dtype: str, shard_rows: int, **fields: Any) -> dict[str, Any]:
    """The manifest of an empty cache of ``hooks`` (``fields``: model, data, ...)."""
    from aecore._version import __version__

    return {
        "format": FORMAT,
        "version": VERSION,
        **fields,
        "hooks": {hook: {} for hook in hooks},
        "dtype": check_dtype(dtype),
        "storage": str(STORAGE[dtype]),
        "shard_rows": shard_rows,
        "complete": False,
        "aecore_version": __version__,
    }


def check_dtype(name: Any) -> str:
    """``name`` if it is a stored dtype, else a ConfigError listing them."""
    if name not in STORAGE:
        raise ConfigError(f"dtype must be one of {', '.join(STORAGE)}; got {name!r}")
    return name


def to_float32(block: np.ndarray, dtype: str) -> np.ndarray:
    """Stored rows as float32 (bfloat16 bit patterns widened to float32's); float32
    rows come back as they are."""
    if dtype == "bfloat16":
        out = np.empty(block.shape, np.uint32)
        np.left_shift(block, 16, out=out, dtype=np.uint32)
        return out.view(np.float32)
    if dtype == "float16":
        torch = sys.modules.get("torch")
        if torch is not None:  # its float16 cast is vectorised, numpy's is several times slower
            return torch.from_numpy(np.ascontiguousarray(block)).float().numpy()
    return block.astype(np.float32, copy=False)


def hook_folder(hook: str, taken: set[str]) -> str:
    """A folder name for ``hook``'s shards: the module name with unsafe characters
    replaced (the root module, named '', is ``_output``), unique within the cache."""
    base = re.sub(r"[^A-Za-z0-9._-]", "_", hook).strip(".") or "_output"
    name, i = base, 1
    while name in taken or name == MANIFEST:
        name, i = f"{base}-{i}", i + 1
    return name


def shard_name(index: int) -> str:
    return f"{index:05d}.npy"


def sha256_file(path: Path, chunk: int = 8 * 2**20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(root: str | Path) -> dict[str, Any]:
    """The manifest of the cache in ``root``, checked for the fields readers rely on."""
    root = Path(root)
    path = root / MANIFEST
    if not root.is_dir():
        what = "is a file, not the cache's folder" if root.exists() else "no such folder"
        raise DataError(f"activations: {root}: {what}")
    if not path.is_file():
        raise DataError(
            f"activations: {root} is not an activation cache (no {MANIFEST}); write one "
            f"with `aecore activations extract`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"activations: cannot read {path}: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"activations: {path} is not an aecore activation manifest")
    if manifest.get("version") != VERSION:
        raise DataError(
            f"activations: {path} has format version {manifest.get('version')!r}; this aecore "
            f"reads version {VERSION}"
        )
    hooks = manifest.get("hooks")
    if not isinstance(hooks, dict) or manifest.get("dtype") not in STORAGE:
        raise DataError(f"activations: {path} is malformed (hooks or dtype missing)")
    for name, entry in hooks.items():
        problem = _entry_problem(entry)
        if problem:
            raise DataError(f"activations: {path} is malformed: hook {name!r}: {problem}")
    return manifest


def _plain_name(value: Any) -> bool:
    """A file or folder name inside the cache: no separators, no "." or ".."."""
    return (
        isinstance(value, str)
        and value not in ("", ".", "..")
        and "/" not in value
        and ("\\" not in value)
    )


def _count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry_problem(entry: Any) -> str:
    """What is wrong with one hook's entry ("" when nothing): readers open its shards and
    an overwrite deletes its folder, so every path must stay inside the cache."""
    if not isinstance(entry, dict):
        return f"expected an object, got {type(entry).__name__}"
    folder = entry.get("dir")
    if not _plain_name(folder):
        return f"dir must be a folder name inside the cache, got {folder!r}"
    if entry.get("d") is not None and not (_count(entry["d"]) and entry["d"] > 0):
        return f"d must be a positive int, got {entry['d']!r}"
    if not _count(entry.get("rows", 0)):
        return f"rows must be a count, got {entry.get('rows')!r}"
    shards = entry.get("shards", [])
    if not isinstance(shards, list):
        return f"shards must be a list, got {type(shards).__name__}"
    for i, shard in enumerate(shards):
        if not isinstance(shard, dict):
            return f"shard {i} must be an object"
        file = shard.get("file")
        inside = isinstance(file, str) and file.startswith(f"{folder}/")
        if not (inside and _plain_name(file[len(folder) + 1 :])):
            return f"shard {i}'s file must lie in {folder}/, got {file!r}"
        if not _count(shard.get("rows")) or not isinstance(shard.get("sha256"), str):
            return f"shard {i} needs a row count and a sha256"
    if shards and entry.get("d") is None:
        return "d is missing"
    return ""


def write_manifest(root: Path, manifest: dict[str, Any]) -> None:
    atomic_write_text(root / MANIFEST, json.dumps(manifest, indent=2) + "\n")


def settings(manifest: dict[str, Any]) -> dict[str, Any]:
    """The values of ``SETTINGS`` (hooks as the list of their names)."""
    out = {key: manifest.get(key) for key in SETTINGS}
    out["hooks"] = sorted(manifest.get("hooks") or ())  # the order they were named in is no setting
    return out


def differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``key: old -> new`` for each of the ``SETTINGS`` in which two manifests differ."""
    a, b = settings(old), settings(new)
    return [f"{key}: {a[key]!r} -> {b[key]!r}" for key in SETTINGS if a[key] != b[key]]


def inputs_covered(manifest: dict[str, Any]) -> int:
    """Input rows whose activations lie in completed shards of every hook."""
    covered = []
    for entry in manifest["hooks"].values():
        per_input = entry.get("rows_per_input")
        covered.append(int(entry.get("rows", 0)) // per_input if per_input else 0)
    return min(covered, default=0)


def stored_bytes(entry: dict[str, Any], dtype: str) -> int:
    """Bytes of a hook's rows (without the .npy headers)."""
    return int(entry.get("rows", 0)) * int(entry.get("d") or 0) * STORAGE[dtype].itemsize
