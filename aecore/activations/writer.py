"""Writing an activation cache shard by shard, so that an interrupted writer leaves only
whole shards behind and a manifest that lists exactly those.

Rows of a hook go into a temporary memory-mapped ``.npy`` (``.NNNNN.npy.tmp``) of one
shard's size; once full it is flushed, fsynced, hashed and renamed into place, and then
the manifest is rewritten atomically. The last shard is cut to the rows it holds. A
new writer deletes temporary shards an interrupted one left.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from aecore.activations.manifest import (
    STORAGE,
    hook_folder,
    sha256_file,
    shard_name,
    write_manifest,
)
from aecore.errors import DataError

_COPY_ROWS_BYTES = 64 * 2**20  # bytes copied per step when cutting the last shard


class HookWriter:
    """Appends rows (k, d) of one hook to its shards; ``entry`` is the hook's record in
    the manifest, updated as shards complete; ``saved()`` persists the manifest."""

    def __init__(
        self,
        root: Path,
        hook: str,
        entry: dict[str, Any],
        dtype: str,
        shard_rows: int,
        saved: Callable[[], None],
    ) -> None:
        self.root, self.hook, self.entry = root, hook, entry
        self.storage = STORAGE[dtype]
        self.shard_rows = shard_rows
        self.saved = saved
        self.folder = root / entry["dir"]
        self.folder.mkdir(parents=True, exist_ok=True)
        for stale in self.folder.glob(".*.npy.tmp"):
            stale.unlink()
        self.pending: np.ndarray | None = None  # the open temporary shard
        self.filled = 0

    def write(self, rows: np.ndarray) -> None:
        """Append ``rows`` (k, d) in the stored dtype; full shards are completed."""
        if rows.ndim != 2 or rows.dtype != self.storage:
            raise DataError(
                f"{self.hook}: expected rows (k, d) of {self.storage}; got {rows.dtype} "
                f"{rows.shape}"
            )
        if self.entry.get("d") is None:
            self.entry["d"] = int(rows.shape[1])
        elif rows.shape[1] != self.entry["d"]:
            raise DataError(
                f"{self.hook}: activations changed width from d={self.entry['d']} to "
                f"d={rows.shape[1]} between batches"
            )
        while len(rows):
            if self.pending is None:
                self.pending = np.lib.format.open_memmap(
                    self._temp(),
                    mode="w+",
                    dtype=self.storage,
                    shape=(self.shard_rows, rows.shape[1]),
                )
                self.filled = 0
            take = min(len(rows), self.shard_rows - self.filled)
            self.pending[self.filled : self.filled + take] = rows[:take]
            self.filled += take
            rows = rows[take:]
            if self.filled == self.shard_rows:
                self._complete()

    def finish(self) -> None:
        """Complete the last, partly filled shard (cut to its rows)."""
        if self.pending is None or self.filled == 0:
            return
        full, temp = self.pending, self._temp()
        cut = temp.with_name(temp.name.replace(".npy.tmp", ".cut.npy.tmp"))
        short = np.lib.format.open_memmap(
            cut, mode="w+", dtype=self.storage, shape=(self.filled, full.shape[1])
        )
        step = max(1, _COPY_ROWS_BYTES // max(1, full[:1].nbytes))
        for start in range(0, self.filled, step):
            short[start : start + step] = full[start : min(self.filled, start + step)]
        del full
        self.pending = short
        os.replace(cut, temp)
        self._complete()

    def _temp(self) -> Path:
        return self.folder / f".{shard_name(len(self.entry['shards']))}.tmp"

    def _complete(self) -> None:
        """Make the pending shard durable, rename it into place, record it."""
        assert self.pending is not None
        self.pending.flush()
        rows = len(self.pending)
        self.pending = None  # unmaps the file
        temp = self._temp()
        fd = os.open(temp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        digest = sha256_file(temp)
        final = self.folder / shard_name(len(self.entry["shards"]))
        os.replace(temp, final)
        _fsync_folder(self.folder)
        self.entry["shards"].append(
            {"file": f"{self.entry['dir']}/{final.name}", "rows": rows, "sha256": digest}
        )
        self.entry["rows"] = int(self.entry.get("rows", 0)) + rows
        self.filled = 0
        self.saved()


class CacheWriter:
    """The shards of every hook of one cache and its manifest (``manifest`` is the
    state: a new cache's or the one being resumed)."""

    def __init__(self, root: str | Path, manifest: dict[str, Any]) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.manifest = manifest
        taken = {e["dir"] for e in manifest["hooks"].values() if e.get("dir")}
        for hook, entry in manifest["hooks"].items():
            if not entry.get("dir"):
                entry["dir"] = hook_folder(hook, taken)
                taken.add(entry["dir"])
            entry.setdefault("d", None)
            entry.setdefault("rows", 0)
            entry.setdefault("shards", [])
        self.hooks = {
            hook: HookWriter(
                self.root, hook, entry, manifest["dtype"], manifest["shard_rows"], self.save
            )
            for hook, entry in manifest["hooks"].items()
        }
        self.save()

    def write(self, hook: str, rows: np.ndarray) -> None:
        self.hooks[hook].write(rows)

    def save(self) -> None:
        write_manifest(self.root, self.manifest)

    def finish(self) -> dict[str, Any]:
        """Complete every hook's last shard and mark the cache complete."""
        for writer in self.hooks.values():
            writer.finish()
        self.manifest["complete"] = True
        self.save()
        return self.manifest


def _fsync_folder(folder: Path) -> None:
    """Make a rename durable (where the platform allows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
