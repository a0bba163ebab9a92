"""``ActivationCache``: all shards of one hook of an activation cache as one array of
rows, read on demand from memory-mapped shards.

It is what ``Batches`` and ``aecore.data`` need of an array (``shape``, ``dtype``,
``len``, indexing by int, slice or index array) plus ``epoch_order`` (a block shuffle
that reads the shards in long runs). numpy only: torch is imported by ``epoch_order``
alone, so ``aecore.data`` can open caches where torch is not installed.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from aecore.activations.manifest import STORAGE, read_manifest, sha256_file, to_float32
from aecore.errors import DataError

#: shards kept memory-mapped at once (each holds a file descriptor)
OPEN_SHARDS = 32


class ActivationCache:
    """The rows of ``hook`` in the activation cache at ``path`` (float32 on reading).

    ``hook`` may be omitted when the cache holds one hook. An unfinished extraction is
    refused unless ``allow_incomplete`` (its completed shards are then the rows).
    ``block_rows`` and ``buffer_blocks`` shape ``epoch_order``'s block shuffle.
    """

    #: reads rows on demand: ``aecore.data`` keeps it as it is instead of reading it whole
    lazy_rows = True
    ndim = 2
    dtype = np.dtype(np.float32)

    def __init__(
        self,
        path: str | Path,
        hook: str | None = None,
        *,
        allow_incomplete: bool = False,
        block_rows: int = 4096,
        buffer_blocks: int = 64,
    ) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        hooks = self.manifest["hooks"]
        if hook is None:
            if len(hooks) != 1:
                raise DataError(
                    f"activations: {self.path} holds {len(hooks)} hooks ({', '.join(hooks)}); "
                    f"name one, e.g. activations:{self.path}:{next(iter(hooks), 'HOOK')}"
                )
            hook = next(iter(hooks))
        if hook not in hooks:
            raise DataError(
                f"activations: {self.path} has no hook {hook!r}; it holds {', '.join(hooks)}"
            )
        if not self.manifest.get("complete") and not allow_incomplete:
            raise DataError(
                f"activations: the extraction into {self.path} is unfinished (its "
                f"{hooks[hook].get('rows', 0)} rows of {hook} so far); rerun the same "
                f"`aecore activations extract` command to complete it"
            )
        self.hook = hook
        self.stored_dtype = self.manifest["dtype"]
        entry = hooks[hook]
        self.shards = list(entry.get("shards", []))
        if not self.shards:
            raise DataError(f"activations: {self.path} holds no completed shard of {hook}")
        self.d = int(entry["d"])
        counts = [int(s["rows"]) for s in self.shards]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.block_rows, self.buffer_blocks = block_rows, buffer_blocks
        self._open: OrderedDict[int, np.ndarray] = OrderedDict()

    # -- array protocol -------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int]:
        return (int(self.offsets[-1]), self.d)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    @property
    def all_finite(self) -> bool:
        """Whether the writer checked every value finite (extraction does), so that
        ``aecore.data`` need not scan the cache again."""
        return self.manifest.get("finite") is True

    @property
    def nbytes(self) -> int:
        """Bytes of the rows as read (float32), not as stored."""
        return len(self) * self.d * 4

    def __getitem__(self, item: Any) -> np.ndarray:
        """Rows by global index: an int gives one row (d,), a slice or an index array
        gives rows (k, d) in the order asked for. float32, fresh arrays."""
        n = len(self)
        if isinstance(item, (int, np.integer)):
            i = int(item) + n if item < 0 else int(item)
            if not 0 <= i < n:
                raise IndexError(f"row {item} is out of range for {n} rows")
            return self._take(np.array([i]))[0]
        if isinstance(item, slice):
            start, stop, step = item.indices(n)
            if step == 1:
                return self._range(start, max(start, stop))
            return self._take(np.arange(start, stop, step))
        idx = np.asarray(item)
        if idx.dtype == bool or idx.ndim != 1 or idx.dtype.kind not in "iu":
            raise IndexError(
                f"index an ActivationCache with an int, a slice or a 1-D integer array; "
                f"got {type(item).__name__} of dtype {idx.dtype} and shape {idx.shape}"
            )
        idx = idx.astype(np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if len(idx) and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"row indices must lie in [-{n}, {n}); got {item!r}")
        return self._take(idx)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        # an explicit np.asarray(cache) reads every row: the caller asked for it
        rows = self._range(0, len(self))
        return rows if dtype is None else rows.astype(dtype, copy=False)

    def _shard(self, s: int) -> np.ndarray:
        """Shard ``s`` memory-mapped; the least recently used map is closed beyond
        ``OPEN_SHARDS``."""
        mapped = self._open.get(s)
        if mapped is not None:
            self._open.move_to_end(s)
            return mapped
        path = self.path / self.shards[s]["file"]
        try:
            mapped = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"activations: cannot read shard {path}: {exc}") from None
        expected = (int(self.shards[s]["rows"]), self.d)
        if mapped.shape != expected or mapped.dtype != STORAGE[self.stored_dtype]:
            raise DataError(
                f"activations: shard {path} holds {mapped.dtype} {mapped.shape}; the manifest "
                f"says {STORAGE[self.stored_dtype]} {expected}"
            )
        self._open[s] = mapped
        if len(self._open) > OPEN_SHARDS:
            self._open.popitem(last=False)
        return mapped

    def _range(self, start: int, stop: int) -> np.ndarray:
        """Rows ``start:stop``, copied from each shard they span."""
        stored = np.empty((stop - start, self.d), STORAGE[self.stored_dtype])
        s = max(int(np.searchsorted(self.offsets, start, side="right")) - 1, 0)
        pos = start
        while pos < stop:
            base = int(self.offsets[s])
            upto = min(stop, int(self.offsets[s + 1]))
            stored[pos - start : upto - start] = self._shard(s)[pos - base : upto - base]
            pos, s = upto, s + 1
        return self._checked(to_float32(stored, self.stored_dtype))

    def _checked(self, rows: np.ndarray) -> np.ndarray:
        """Rows read from a cache written finite: a NaN there is a damaged shard (the
        loaders skip their own scan on the manifest's word, so it is checked here)."""
        if self.all_finite and not np.isfinite(rows).all():
            raise DataError(
                f"activations: {self.path} holds NaN or infinite values although it was "
                f"written finite: a shard is damaged (`aecore activations info --verify "
                f"{self.path}` names it); extract the cache again"
            )
        return rows

    def _take(self, idx: np.ndarray) -> np.ndarray:
        """Rows at in-range indices ``idx``: read shard by shard in sorted order (forward
        through each file), returned in the order asked for."""
        order = np.argsort(idx)
        ordered = idx[order]
        rows = np.empty((len(idx), self.d), STORAGE[self.stored_dtype])
        cuts = np.searchsorted(ordered, self.offsets)
        for s in range(len(self.shards)):
            a, b = int(cuts[s]), int(cuts[s + 1])
            if a == b:
                continue
            local = ordered[a:b] - self.offsets[s]
            shard = self._shard(s)
            if bool(np.all(np.diff(local) == 1)):  # contiguous, no repeat: one slice read
                rows[a:b] = shard[int(local[0]) : int(local[-1]) + 1]
            else:  # gathered straight into place: no temporary copy
                np.take(shard, local, axis=0, out=rows[a:b])
        # put back in the order asked for while still in the stored (narrow) dtype
        wanted = np.empty_like(rows)
        wanted[order] = rows
        return self._checked(to_float32(wanted, self.stored_dtype))

    # -- training order and checks ----------------------------------------------------
    def epoch_order(self, epoch: int, seed: int):
        """A permutation of all rows (a torch int64 tensor) from (seed, epoch) alone:
        the block shuffle of ``aecore.activations.order``."""
        from aecore.activations.order import block_shuffle_order

        return block_shuffle_order(
            len(self), epoch, seed, block_rows=self.block_rows, buffer_blocks=self.buffer_blocks
        )

    def verify(self) -> None:
        """Check every shard's sha256 against the manifest (reads them all)."""
        for shard in self.shards:
            path = self.path / shard["file"]
            if not path.is_file():
                raise DataError(f"activations: shard {path} is missing")
            if sha256_file(path) != shard["sha256"]:
                raise DataError(
                    f"activations: shard {path} does not match its checksum in the manifest "
                    f"(changed or damaged since it was written)"
                )

    def __getstate__(self) -> dict[str, Any]:
        # pickled (e.g. into DataLoader workers) without its maps: they reopen on use
        return {**self.__dict__, "_open": OrderedDict()}

    def __repr__(self) -> str:
        return (
            f"ActivationCache({str(self.path)!r}, hook={self.hook!r}, rows={len(self)}, "
            f"d={self.d}, stored as {self.stored_dtype} in {len(self.shards)} shards)"
        )
