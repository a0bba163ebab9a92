"""A shuffle that reads a large on-disk array in long runs.

A uniform permutation of rows sends every batch to every part of a file; when the file
is bigger than memory each row read is a disk seek. The block shuffle keeps most of the
mixing at a fraction of the cost: rows are cut into contiguous blocks, the blocks are
permuted, and rows are then shuffled within windows of a few consecutive (permuted)
blocks, so a batch reads from at most one window's blocks and each block is read while
it is warm.
"""

from __future__ import annotations

import hashlib

import torch

from aecore.errors import ConfigError

BLOCK_ROWS = 4096
BUFFER_BLOCKS = 64


def block_shuffle_order(
    n: int,
    epoch: int,
    seed: int,
    *,
    block_rows: int = BLOCK_ROWS,
    buffer_blocks: int = BUFFER_BLOCKS,
) -> torch.Tensor:
    """A permutation of ``range(n)`` (int64) drawn from (seed, epoch) alone: blocks of
    ``block_rows`` contiguous rows in random order, rows shuffled within windows of
    ``buffer_blocks`` consecutive blocks of that order."""
    if block_rows < 1 or buffer_blocks < 1:
        raise ConfigError(
            f"block_rows and buffer_blocks must be >= 1; got {block_rows} and {buffer_blocks}"
        )
    gen = torch.Generator().manual_seed(_mix(seed, epoch))
    n_blocks = -(-n // block_rows)
    blocks = torch.randperm(n_blocks, generator=gen)
    rows = (blocks[:, None] * block_rows + torch.arange(block_rows)).flatten()
    if n % block_rows:  # the last block is short: drop the rows past the end
        rows = rows[rows < n]
    # windows of whole blocks (the short last block may sit anywhere in the order)
    sizes = torch.full((n_blocks,), block_rows)
    sizes[blocks == n_blocks - 1] = n - (n_blocks - 1) * block_rows
    ends = torch.cumsum(sizes, 0)[buffer_blocks - 1 :: buffer_blocks].tolist()
    bounds = [0, *ends, *([n] if not ends or ends[-1] != n else [])]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        part = rows[start:stop]
        part.copy_(part[torch.randperm(len(part), generator=gen)])
    return rows


def _mix(seed: int, epoch: int) -> int:
    """One 64-bit generator seed from any two integers (negative or large ones too),
    so neighbouring (seed, epoch) pairs give unrelated streams."""
    digest = hashlib.sha256(f"block-shuffle:{int(seed)}:{int(epoch)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # below 2**63: any torch accepts it
