"""Seeded mini-batches over whatever the user trains on: arrays (memory maps too),
tensors, map-style torch Datasets or a DataLoader. The batch order depends only on
(seed, epoch), so a resumed run draws the same batches."""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset

from aecore.data.frames import frame_values
from aecore.data.split import positions_in
from aecore.errors import DataError


class Batches:
    """Seeded mini-batches over arrays, tensors, torch Datasets or a DataLoader."""

    def __init__(self, data: Any, batch_size: int, shuffle: bool, seed: int, name: str) -> None:
        self.loader = None
        self.array = None
        self.dataset = None
        self.rows: torch.Tensor | None = None  # the data's rows these batches draw from
        data = frame_values(data, name)
        if isinstance(data, IterableDataset) or (
            isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset)
        ):
            raise DataError(
                f"{name}: an IterableDataset has no length to shuffle, split into epochs or "
                f"resume from; pass a map-style Dataset, an array or a memory map instead"
            )
        if isinstance(data, DataLoader):
            self.loader = data
            self.n = len(data.dataset)
        elif isinstance(data, (np.ndarray, torch.Tensor)) or (
            hasattr(data, "__getitem__")
            and hasattr(data, "shape")
            and not isinstance(data, Dataset)
        ):
            if len(getattr(data, "shape", ())) < 2:
                raise DataError(
                    f"{name}: expected rows (N, features...); got shape {tuple(data.shape)}"
                )
            self.array = data
            self.n = len(data)
        elif isinstance(data, Dataset):
            self.dataset = data
            self.n = len(data)
        else:
            raise DataError(
                f"{name}: expected an ndarray, tensor, torch Dataset or DataLoader; "
                f"got {type(data).__name__}"
            )
        if self.n == 0:
            raise DataError(f"{name}: the data is empty")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.name = name

    def summary(self) -> dict[str, Any]:
        """What a resume checks it trains on the same rows: their count, for in-memory
        data the sum of their values, and for arrays of any kind (memory maps and views
        too) a fingerprint of sampled rows (computed once)."""
        if getattr(self, "_summary", None) is None:
            chunks = self.in_memory_chunks()
            total = None
            if chunks is not None:
                total = sum(float(chunk.double().sum()) for chunk in chunks)
            self._summary = {"rows": self.n, "sum": total, "sample": self._sampled()}
        return self._summary

    def _sampled(self) -> float | None:
        """Up to 64 evenly spaced rows, read alone, their values weighted by position:
        other values, or the same ones reordered or flipped, give another number."""
        if self.array is None:
            return None
        picks = torch.linspace(0, self.n - 1, min(self.n, 64)).round().long().unique()
        idx = picks if self.rows is None else self.rows[picks]
        if isinstance(self.array, torch.Tensor):
            rows = self.array.index_select(0, idx.to(self.array.device)).cpu()
        else:
            rows = torch.as_tensor(np.asarray(self.array[idx.numpy()]))
        flat = rows.double().flatten(1)
        weights = torch.rand(flat.shape, generator=torch.Generator().manual_seed(0)).double()
        return float((flat * (weights + 0.5)).sum())

    def check_finite(self) -> None:
        """A DataError naming the first NaN or infinity (as float32, what training sees)
        of in-memory data; the steps' non-finite loss check covers other sources."""
        chunks = self.in_memory_chunks()
        start = 0
        for chunk in chunks if chunks is not None else ():
            bad = ~torch.isfinite(chunk.flatten(1))
            if bool(bad.any()):
                local, feature = (int(i) for i in bad.nonzero()[0])
                row = start + local if self.rows is None else int(self.rows[start + local])
                value = float(chunk.flatten(1)[local, feature])
                raise DataError(
                    f"{self.name}: {value} at row {row}, feature {feature} "
                    f"({int(bad.sum())} non-finite in rows {start}-{start + len(chunk) - 1} "
                    f"as float32); clean or impute the data first"
                )
            start += len(chunk)

    def hold_out(self, fraction: float, seed: int) -> tuple[Batches, Batches] | None:
        """(train, validation) batches over a seeded ``fraction`` of the rows held out;
        None where that leaves either side empty, or for a DataLoader (which draws its
        own batches)."""
        if self.loader is not None:
            return None
        n_val = round(fraction * self.n)
        if n_val < 1 or self.n - n_val < 1:
            return None
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + (self.HOLD_OUT_STREAM << 40))
        perm = torch.randperm(self.n, generator=gen)
        mine = self.rows if self.rows is not None else torch.arange(self.n)
        parts = []
        for rows, shuffle in ((perm[n_val:], self.shuffle), (perm[:n_val], False)):
            part = copy.copy(self)
            part.rows = mine[rows.sort().values]  # sorted: memory maps read forward
            part.n, part.shuffle = len(part.rows), shuffle
            parts.append(part)
        return parts[0], parts[1]

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return math.ceil(self.n / self.batch_size)

    #: shuffles of passes outside the training epochs (pretraining) come from their own
    #: stream, so they never repeat a training epoch's order; so does the hold-out split
    PRETRAIN_STREAM = 1
    HOLD_OUT_STREAM = 2

    def order(self, epoch: int, stream: int = 0) -> torch.Tensor:
        # derived from (seed, epoch) alone, so a resumed run draws the same batches
        if not self.shuffle:
            return torch.arange(self.n)
        data_order = getattr(self.array, "epoch_order", None)
        if data_order is not None:
            # the data's own shuffle (an activation cache's reads its shards in long
            # runs); restricted to the rows these batches draw from, in its sequence
            order = np.asarray(data_order(epoch, self.seed + (stream << 40)))
            if self.rows is not None:
                order = positions_in(self.rows.numpy(), order)
            return torch.as_tensor(order)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + (stream << 40))
        return torch.randperm(self.n, generator=gen)

    @property
    def in_memory(self) -> bool:
        """Whether the rows are an in-memory tensor or array (not a memory map, Dataset
        or DataLoader): the data that fit checks for NaN before the first step."""
        data = self.array
        return isinstance(data, (torch.Tensor, np.ndarray)) and not isinstance(data, np.memmap)

    def in_memory_chunks(self, rows: int = 65536) -> Iterator[torch.Tensor] | None:
        """The rows these batches draw from, in chunks of float32 tensors (as training
        sees them), where the data is an in-memory tensor or array; None for a memory map,
        a Dataset or a DataLoader (another whole pass over them would cost a read)."""
        if not self.in_memory:
            return None
        with warnings.catch_warnings():
            # torch warns of a read-only array (np.load's, a frame's values): the chunks
            # are copies, and nothing writes to it
            warnings.filterwarnings("ignore", "The given NumPy array is not writable")
            tensor = torch.as_tensor(self.array)
        order = self.rows if self.rows is not None else torch.arange(self.n)
        return (
            tensor.index_select(0, order[i : i + rows].to(tensor.device)).float()
            for i in range(0, self.n, rows)
        )

    def global_size(self, epoch_step: int) -> int:
        """Rows in global batch ``epoch_step`` (the last one may be short)."""
        return min(self.batch_size, self.n - epoch_step * self.batch_size)

    def loader_generators(self) -> list[torch.Generator]:
        """A DataLoader's own generators (its own, its sampler's): a resume restores
        their states, which torch's global RNG state does not hold."""
        if self.loader is None:
            return []
        owners = [
            self.loader,
            self.loader.sampler,
            getattr(self.loader.batch_sampler, "sampler", None),
        ]
        found = {
            id(g): g
            for o in owners
            if isinstance(g := getattr(o, "generator", None), torch.Generator)
        }
        return list(found.values())

    def epoch(
        self,
        epoch: int,
        skip: int = 0,
        rng_at_start: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
        stream: int = 0,
        loader_rng: list[torch.Tensor] | None = None,
    ) -> Iterator[torch.Tensor]:
        if self.loader is not None:
            if not skip:
                it = iter(self.loader)
            else:
                # a DataLoader shuffles from torch's RNG (or its own generators, states
                # ``loader_rng``) when iteration starts: replay the epoch's start states to
                # draw the same order, skip what was done, then put back the global RNG
                # state of the interrupted step
                now = torch.get_rng_state()
                if rng_at_start is not None:
                    torch.set_rng_state(rng_at_start)
                for generator, state in zip(self.loader_generators(), loader_rng or []):
                    generator.set_state(state)
                it = iter(self.loader)
                for _ in range(skip):
                    next(it, None)
                torch.set_rng_state(now)
            for batch in it:
                yield _first_tensor(batch)
            return
        order = self.order(epoch, stream)
        for i in range(skip, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            if self.rows is not None:
                idx = self.rows[idx]
            # under torchrun each process takes a strided share of the same global batch
            # (what a DistributedSampler does per epoch, done per step), so N processes
            # step exactly like one process with the same global batch
            if world > 1:
                idx = idx[rank::world]
            if self.array is not None:
                if isinstance(self.array, torch.Tensor):
                    yield self.array.index_select(0, idx.to(self.array.device))
                else:
                    yield torch.as_tensor(np.asarray(self.array[idx.numpy()]))
            else:
                yield _first_tensor(
                    torch.utils.data.default_collate([self.dataset[int(j)] for j in idx])
                )


def first_non_finite(x: torch.Tensor, rows: str, first: int = 0) -> str | None:
    """Where ``x``'s first NaN or infinity lies ("inf at row 3 of {rows}, feature 5 (2 in
    its batch)", ``x``'s rows numbered from ``first``), or None where every value
    is finite. Reads back from the device: for messages."""
    bad = ~torch.isfinite(x.flatten(1))
    count = int(bad.sum())
    if count == 0:
        return None
    row, feature = (int(i) for i in bad.nonzero()[0])
    value = float(x.flatten(1)[row, feature])
    return f"{value} at row {first + row} of {rows}, feature {feature} ({count} in its batch)"


def _first_tensor(batch: Any) -> torch.Tensor:
    """A (x, y) batch from a labelled Dataset trains on x."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get("x", next(iter(batch.values())))
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(np.asarray(batch))
    return batch
