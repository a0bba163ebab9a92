"""``aecore bench activations``: how fast training batches come out of an activation
cache.

It writes a synthetic cache (``--rows`` x ``--d`` float16 in shards, in a temporary
folder unless ``--dir``) and times full epochs of seeded ``Batches`` of ``--batch-size``
rows, each batch read and widened to float32:

* ``cache, block shuffle``: ``Batches`` over the ``ActivationCache``, which orders rows
  by its block shuffle (what training uses);
* ``cache, uniform shuffle``: the same cache in a uniform random order, for contrast
  (every batch touches every shard);
* ``in-memory array``: the same rows as one numpy float16 array in memory, uniform
  order: the reference a cache is measured against.

Each loader runs one untimed epoch first (it maps the shards' pages), then one timed.

The cache was just written, so its pages are likely still in the page cache: these are
warm-cache numbers, the CPU cost of reading (a cache bigger than memory is slower,
where the block shuffle's long runs matter most).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from aecore.cli.tables import print_table
from aecore_benchmarks.args import count, json_file, write_json


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aecore bench activations",
        description="Loader throughput: Batches over an activation cache vs an in-memory array.",
    )
    p.add_argument("--rows", type=count, default=2_000_000, help="rows of the synthetic cache")
    p.add_argument("--d", type=count, default=512, help="width of each row")
    p.add_argument("--shard-rows", type=count, default=262_144, help="rows per shard")
    p.add_argument("--batch-size", type=count, default=4096)
    p.add_argument("--block-rows", type=count, default=4096, help="block shuffle: rows per block")
    p.add_argument(
        "--buffer-blocks", type=count, default=64, help="block shuffle: blocks per window"
    )
    p.add_argument("--dir", default=None, help="write the cache here (default: a temp folder)")
    p.add_argument(
        "--json", type=json_file, default=None, metavar="FILE", help="also write results as JSON"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    from aecore.errors import ConfigError

    args = build_parser().parse_args(argv)
    for name in ("rows", "d", "shard_rows", "batch_size", "block_rows", "buffer_blocks"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {getattr(args, name)}")
    if args.dir is not None:
        folder = Path(args.dir)
        if folder.exists() and (not folder.is_dir() or any(folder.iterdir())):
            # it writes a synthetic cache there: never over a user's cache or files
            raise ConfigError(f"--dir {folder} exists and is not empty; name a new folder")
        report = run(folder, args)
    else:
        with tempfile.TemporaryDirectory(prefix="aecore-bench-activations-") as tmp:
            report = run(Path(tmp) / "cache", args)
    print_report(report)
    if args.json:
        write_json(args.json, report)
    return 0


def run(root: Path, args) -> dict[str, Any]:
    from aecore.activations.cache import ActivationCache
    from aecore.activations.manifest import read_manifest

    print(f"writing {args.rows:,} x {args.d} float16 rows to {root} ...", file=sys.stderr)
    started = time.perf_counter()
    write_synthetic_cache(root, args.rows, args.d, args.shard_rows)
    write_s = time.perf_counter() - started
    in_memory = np.concatenate(
        [np.load(root / s["file"]) for s in read_manifest(root)["hooks"]["synthetic"]["shards"]]
    )
    cases = {
        "cache, block shuffle": ActivationCache(
            root, block_rows=args.block_rows, buffer_blocks=args.buffer_blocks
        ),
        "cache, uniform shuffle": _WithoutOrder(ActivationCache(root)),
        "in-memory array": in_memory,
    }
    results = {}
    for name, data in cases.items():
        print(f"timing {name} ...", file=sys.stderr)
        seconds = time_epoch(data, args.batch_size)
        results[name] = {"seconds": seconds, "rows_per_s": args.rows / seconds}
    return {
        "benchmark": "aecore bench activations",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "rows": args.rows,
        "d": args.d,
        "stored_dtype": "float16",
        "shard_rows": args.shard_rows,
        "batch_size": args.batch_size,
        "block_rows": args.block_rows,
        "buffer_blocks": args.buffer_blocks,
        "write_seconds": write_s,
        "results": results,
    }


def write_synthetic_cache(root: Path, rows: int, d: int, shard_rows: int) -> None:
    """A complete one-hook cache of float16 rows (one random block, shifted per chunk:
    the values do not matter for speed, generating them would dominate)."""
    from aecore.activations.manifest import new_manifest
    from aecore.activations.writer import CacheWriter

    manifest = new_manifest(
        ["synthetic"], "float16", shard_rows, model="synthetic", data="synthetic"
    )
    writer = CacheWriter(root, manifest)
    chunk = 65_536
    block = np.random.default_rng(0).standard_normal((chunk, d), dtype=np.float32)
    block = block.astype(np.float16)
    for i, start in enumerate(range(0, rows, chunk)):
        writer.write("synthetic", block[: min(chunk, rows - start)] + np.float16(i % 8))
    writer.finish()


def time_epoch(data, batch_size: int) -> float:
    """Seconds for one shuffled epoch of float32 batches (drawing the order included),
    after an untimed epoch that maps the files' pages into the process."""
    from aecore.training.batches import Batches

    batches = Batches(data, batch_size, shuffle=True, seed=0, name="bench")
    for batch in batches.epoch(0):
        batch.float()
    started = time.perf_counter()
    for batch in batches.epoch(1):
        batch.float()
    return time.perf_counter() - started


class _WithoutOrder:
    """The cache without its block shuffle: Batches draws a uniform permutation."""

    def __init__(self, cache) -> None:
        self.cache, self.shape = cache, cache.shape

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, item):
        return self.cache[item]


def print_report(report: dict[str, Any]) -> None:
    print(
        f"aecore bench activations: {report['rows']:,} rows x {report['d']} float16 in shards "
        f"of {report['shard_rows']:,} (written in {report['write_seconds']:.1f} s), one "
        f"shuffled epoch of batch {report['batch_size']:,} as float32; warm page cache"
    )
    reference = report["results"]["in-memory array"]["rows_per_s"]
    rows = [
        (
            name,
            f"{r['rows_per_s']:,.0f}",
            f"{r['seconds']:.2f}",
            f"{r['rows_per_s'] / reference:.2f}x",
        )
        for name, r in report["results"].items()
    ]
    print_table(["loader", "rows/s", "seconds", "vs in-memory"], rows, numbers_right=True)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
