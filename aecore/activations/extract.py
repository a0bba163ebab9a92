"""Extraction: run a model over input data with forward hooks on named modules and
write each hook's activations, one row per token, as a sharded activation cache.

One forward pass serves every hook (and stops as soon as the last of them has fired).
An interrupted extraction resumes: run it again with the same settings and it skips the
input rows that completed shards already cover, dropping any rows of a partly covered
input, so the cache ends up exactly as an uninterrupted run would have written it.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from aecore.activations.manifest import (
    MANIFEST,
    check_dtype,
    differences,
    inputs_covered,
    new_manifest,
    read_manifest,
)
from aecore.activations.models import (
    MODEL_SCHEME,
    find_modules,
    fingerprint,
    first_tensor,
    legacy_fingerprint,
    load_model,
    vocabulary,
    vocabulary_size,
)
from aecore.activations.writer import CacheWriter
from aecore.data.sources import load_data
from aecore.errors import AecoreError, ConfigError, DataError
from aecore.io.lock import LOCK_FILE, FolderLock
from aecore.keywords import checked_keywords
from aecore.params import integer, torch_device

TORCH_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
DEFAULT_SHARD_ROWS = 65536


@checked_keywords
def extract_activations(
    model: str | nn.Module,
    data: str,
    hooks: list[str],
    out: str | Path,
    *,
    dtype: str = "float16",
    shard_rows: int = DEFAULT_SHARD_ROWS,
    batch_size: int = 16,
    device: str = "cpu",
    max_rows: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Write the activations of the modules named ``hooks`` of ``model`` over ``data``
    into the cache folder ``out`` and return its manifest.

    ``model``: a transformers folder, an import path ``package.module:factory`` or an
    ``nn.Module``. ``data``: an aecore data source; integer arrays (``npy:tokens.npy``
    of shape (N, seq_len)) are token ids, float rows are passed as they are.
    Activations (batch, ..., d) become rows (batch * ..., d) stored as ``dtype``, at
    most ``max_rows`` per hook, ``shard_rows`` per file. An existing cache with the same
    settings is resumed (or left alone when complete); one with other settings is
    refused unless ``overwrite``; a cache another process is writing is refused at once
    (``aecore.io.lock``). ``progress(inputs_done, inputs_total)`` is called after each
    batch.
    """
    say = log or (lambda message: None)
    check_dtype(dtype)
    shard_rows = integer("shard_rows", shard_rows, low=1)
    batch_size = integer("batch_size", batch_size, low=1)
    if max_rows is not None:
        max_rows = integer("max_rows", max_rows, low=1)
    target = torch_device(device)
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)  # one name, not its letters
    net, model_label = load_model(model)
    modules = find_modules(net, hooks)
    inputs = load_data(data).x
    fresh = new_manifest(
        hooks,
        dtype,
        shard_rows,
        model=model_label,
        model_fingerprint=fingerprint(net),
        data=data,
        input_kind="tokens" if inputs.dtype.kind in "iu" else "rows",
        input_shape=list(inputs.shape),
        input_fingerprint=_input_fingerprint(inputs),
        max_rows=max_rows,
        batch_size=batch_size,
        finite=True,  # _rows refuses NaN, infinities and overflow of the stored dtype
    )
    # the folder is this run's until it ends: a second writer fails at once
    with FolderLock(out, "write activations into"):
        legacy = {"input_fingerprint": lambda: _edge_fingerprint(inputs),
                  "model_fingerprint": lambda: legacy_fingerprint(net)}  # fmt: skip
        manifest = _start(Path(out), fresh, overwrite, legacy)
        resumed = manifest is not fresh  # a cache on disk: its shards are kept
        if manifest.get("complete"):
            say(f"{out} is complete already: nothing to do")
            return manifest
        writer = CacheWriter(out, manifest)
        start = inputs_covered(manifest)
        if start:
            say(f"resuming {out} at input row {start} of {len(inputs)}")
        entries = manifest["hooks"]
        skip = {
            h: e["rows"] - start * e["rows_per_input"] if e["rows"] else 0
            for h, e in entries.items()
        }
        left = {h: None if max_rows is None else max_rows - e["rows"] for h, e in entries.items()}
        net.to(target)
        was_training = net.training
        net.eval()
        try:
            with torch.no_grad():
                for first in range(start, len(inputs), batch_size):
                    if all(n is not None and n <= 0 for n in left.values()):
                        break
                    batch = None
                    try:
                        batch = _batch(inputs, first, batch_size, net, target)
                        # the first batch runs the whole forward pass: a hooked module
                        # that runs twice (a shared layer) is refused, not cut short
                        captured = capture(net, modules, batch, stop_early=first != start)
                        rows_of = {
                            h: _rows(a, h, len(batch), dtype, entries[h])
                            for h, a in captured.items()
                        }
                    except Exception as exc:  # the model or its outputs refused
                        if first == start == 0 and not resumed:  # this run wrote nothing:
                            _remove_cache(Path(out), manifest)  # leave no cache behind
                        if isinstance(exc, AecoreError) or batch is None:
                            raise
                        raise _forward_error(exc, model_label, batch, first) from None
                    for hook, rows in rows_of.items():
                        dropped = min(skip[hook], len(rows))  # already in a completed shard
                        rows, skip[hook] = rows[dropped:], skip[hook] - dropped
                        if left[hook] is not None:
                            rows = rows[: max(left[hook], 0)]
                            left[hook] -= len(rows)
                        if len(rows):
                            writer.write(hook, rows)
                    if progress is not None:
                        progress(min(first + batch_size, len(inputs)), len(inputs))
        finally:
            net.train(was_training)
        return writer.finish()


def _start(root: Path, fresh: dict[str, Any], overwrite: bool, legacy=None) -> dict[str, Any]:
    """The manifest to continue from: ``fresh`` for a new (or overwritten) cache, the
    one on disk for a resumable one; refuses folders that are not caches and caches with
    other settings. ``legacy``: per fingerprint, how a cache written before its scheme
    computed it."""
    if (root / MANIFEST).exists():
        try:
            old = read_manifest(root)
        except DataError as exc:  # which folders are the cache's is unknown: keep them
            raise DataError(
                f"{exc}; an unreadable cache is neither resumed nor replaced: delete {root} "
                f"(or its {MANIFEST} and hook folders) to start again"
            ) from None
        if overwrite:
            _remove_cache(root, old)
            return fresh
        for key, prefix in (("input_fingerprint", ALL_ROWS), ("model_fingerprint", MODEL_SCHEME)):
            # a cache from before every row was hashed, or the weights' spread was
            if legacy and not str(old.get(key, "")).startswith(prefix):
                fresh = {**fresh, key: legacy[key]()}
        changed = differences(old, fresh)
        if changed:
            raise ConfigError(
                f"{root} holds an activation cache with other settings ({'; '.join(changed)}); "
                f"resume it with its own settings, pass overwrite (--overwrite) to replace it, "
                f"or choose another output folder"
            )
        return old
    if root.exists() and (not root.is_dir() or any(p.name != LOCK_FILE for p in root.iterdir())):
        raise ConfigError(
            f"{root} exists and is not an activation cache (no {MANIFEST}); choose a new or "
            f"empty output folder"
        )
    return fresh


def _forward_error(exc: Exception, model: str, batch: torch.Tensor, first: int) -> DataError:
    kind = "token ids" if not batch.is_floating_point() else "float rows"
    message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    hint = (
        "; a language model takes integer token ids (an int .npy of shape (N, seq_len))"
        if batch.is_floating_point()
        else ""
    )
    return DataError(
        f"{model} failed on input rows {first}-{first + len(batch) - 1} ({kind}, "
        f"{str(batch.dtype).removeprefix('torch.')} of shape {tuple(batch.shape)}): "
        f"{type(exc).__name__}: {message}{hint}"
    )


def _remove_cache(root: Path, manifest: dict[str, Any]) -> None:
    """Delete the files of the cache in ``root`` (its hook folders and manifest only)."""
    for entry in manifest["hooks"].values():
        folder = root / str(entry.get("dir", ""))
        # only a folder inside the cache ("..", a link out of it: never)
        inside = folder.resolve().parent == root.resolve() and not folder.is_symlink()
        if entry.get("dir") and inside and folder.is_dir():
            shutil.rmtree(folder)
    (root / MANIFEST).unlink(missing_ok=True)


def _input_fingerprint(inputs) -> str:
    """A sha256 of the shape, dtype and every row (read in chunks; cheap next to the
    forward passes): a changed input file is not mistaken for the one a cache was
    started on, wherever it changed."""
    digest = hashlib.sha256(f"{tuple(inputs.shape)}:{inputs.dtype};".encode())
    row_bytes = max(1, int(np.prod(inputs.shape[1:], dtype=np.int64)) * inputs.dtype.itemsize)
    rows = max(1, (64 << 20) // row_bytes)
    for start in range(0, len(inputs), rows):
        digest.update(np.ascontiguousarray(np.asarray(inputs[start : start + rows])).tobytes())
    return ALL_ROWS + digest.hexdigest()[:32]


#: the prefix of an every-row fingerprint; caches started before it hold an edge one
ALL_ROWS = "all:"


def _edge_fingerprint(inputs) -> str:
    """The fingerprint of caches started before every row was hashed: the shape, dtype
    and first and last 16 rows (what such a cache is compared by)."""
    digest = hashlib.sha256(f"{tuple(inputs.shape)}:{inputs.dtype};".encode())
    for part in (inputs[:16], inputs[-16:]):
        digest.update(np.ascontiguousarray(np.asarray(part)).tobytes())
    return digest.hexdigest()[:32]


def _batch(inputs, first: int, size: int, net: nn.Module, device: torch.device) -> torch.Tensor:
    """Input rows ``first:first+size`` as a tensor: token ids (int64, checked against
    the model's vocabulary when it has one) or float32 rows."""
    block = np.asarray(inputs[first : first + size])
    if block.dtype.kind not in "iu":  # in the model's float dtype (bfloat16, float64)
        dtype = next((p.dtype for p in net.parameters() if p.is_floating_point()), None)
        rows = torch.from_numpy(np.array(block))  # float64 rows stay float64 for float64
        return rows.to(device, dtype or torch.float32)
    vocab = vocabulary_size(net)
    low, high = int(block.min()), int(block.max())
    if low < 0 or (vocab is not None and high >= vocab):
        bad = low if low < 0 else high
        row = first + int(np.argwhere(block == bad)[0][0])
        raise DataError(
            f"data: token id {bad} in input row {row} is outside the model's vocabulary "
            f"({vocabulary(vocab)})"
        )
    return torch.as_tensor(block.astype(np.int64)).to(device)


class _AllCaptured(Exception):
    """Raised by the last hook to fire: the rest of the forward pass is not needed."""


def capture(net: nn.Module, modules: dict[str, nn.Module], batch: torch.Tensor, stop_early=True):
    """``name -> output tensor`` of each module in ``modules`` for ``net(batch)``; with
    ``stop_early`` the forward pass stops once every module has produced its output."""
    got: dict[str, torch.Tensor] = {}

    def hook_for(name: str):
        def hook(module, args, output):
            if name in got:
                raise ConfigError(
                    f"module {name!r} ran twice in one forward pass; hook a module that runs once"
                )
            # a copy: a later in-place op (ReLU(inplace=True), a residual +=) would
            # change the module's output tensor after the hook saw it
            got[name] = first_tensor(output, name).detach().clone()
            if stop_early and len(got) == len(modules):
                raise _AllCaptured

        return hook

    handles = [module.register_forward_hook(hook_for(name)) for name, module in modules.items()]
    try:
        net(batch)
    except _AllCaptured:
        pass
    finally:
        for handle in handles:
            handle.remove()
    missing = [name for name in modules if name not in got]
    if missing:
        raise ConfigError(f"module(s) {', '.join(missing)} did not run in the forward pass")
    return got


def _rows(acts: torch.Tensor, hook: str, batch: int, dtype: str, entry: dict) -> np.ndarray:
    """Activations (batch, ..., d) as rows (batch * ..., d) of the stored dtype."""
    if acts.ndim < 2 or acts.shape[0] != batch:
        raise ConfigError(
            f"module {hook!r} returned shape {tuple(acts.shape)}; expected (batch={batch}, "
            f"..., d): the batch axis first and the features last"
        )
    per_input = int(np.prod(acts.shape[1:-1], dtype=np.int64))
    if entry.setdefault("rows_per_input", per_input) != per_input:
        raise DataError(
            f"module {hook!r}: {per_input} rows per input row, {entry['rows_per_input']} before "
            f"(inputs of one shape give caches that resume cleanly)"
        )
    rows = acts.reshape(-1, acts.shape[-1])
    stored = rows.to(TORCH_DTYPES[dtype])
    if not bool(torch.isfinite(stored).all()):
        if bool(torch.isfinite(rows).all()):
            raise DataError(
                f"module {hook!r}: activations up to {float(rows.abs().max()):.4g} overflow "
                f"{dtype}; extract as bfloat16 or float32"
            )
        raise DataError(f"module {hook!r}: the model produced NaN or infinite activations")
    if dtype == "bfloat16":  # numpy has no bfloat16: keep the bit patterns
        return stored.view(torch.int16).cpu().numpy().view(np.uint16)
    return stored.cpu().numpy()
