"""``aecore activations extract`` (a model's activations over input data into a sharded
cache, resumable) and ``aecore activations info`` (what a cache holds)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from aecore.activations.manifest import inputs_covered, read_manifest
from aecore.cli.tables import print_table
from aecore.data.sources import SOURCE_FORMS

DTYPES = "float16, bfloat16 or float32"


def add_commands(sub) -> None:
    s = sub.add_parser("activations", help="extract activations for sparse autoencoders")
    commands = s.add_subparsers(dest="activations_command", required=True, metavar="COMMAND")

    e = commands.add_parser(
        "extract",
        help="run a model over data with forward hooks; write each hook's activations",
        description="Run a model over input data with forward hooks on named modules and "
        "write each hook's activations (one row per token) into a sharded cache. Rerun "
        "the same command to resume an interrupted extraction.",
    )
    e.add_argument(
        "--model",
        required=True,
        help="a transformers folder (save_pretrained) or an import path package.module:factory",
    )
    e.add_argument(
        "--data",
        required=True,
        help=f"input rows: token ids as npy:PATH (int, (N, seq_len)) or any of {SOURCE_FORMS}",
    )
    e.add_argument(
        "--hook",
        action="append",
        required=True,
        metavar="NAME",
        help="module name (model.get_submodule), e.g. transformer.h.0; repeatable",
    )
    e.add_argument("--out", required=True, help="cache folder to write (or to resume)")
    e.add_argument("--dtype", default="float16", help=f"stored dtype: {DTYPES} (default float16)")
    e.add_argument(
        "--shard-rows", type=int, default=65536, help="rows per shard file (default 65536)"
    )
    e.add_argument(
        "--batch-size", type=int, default=16, help="input rows per forward pass (default 16)"
    )
    e.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 or auto (default cpu)")
    e.add_argument("--max-rows", type=int, default=None, help="stop after N rows per hook")
    e.add_argument("--overwrite", action="store_true", help="replace a cache in --out")
    e.add_argument("--quiet", action="store_true", help="no progress on stderr")
    e.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    e.set_defaults(func=cmd_extract)

    i = commands.add_parser("info", help="what an activation cache holds")
    i.add_argument("dir", help="cache folder")
    i.add_argument("--verify", action="store_true", help="check every shard's sha256")
    i.set_defaults(func=cmd_info)


def cmd_extract(args) -> int:
    from aecore.activations.extract import extract_activations

    manifest = extract_activations(
        args.model,
        args.data,
        args.hook,
        args.out,
        dtype=args.dtype,
        shard_rows=args.shard_rows,
        batch_size=args.batch_size,
        device=args.device,
        max_rows=args.max_rows,
        overwrite=args.overwrite,
        progress=None if args.quiet else _Progress(),
        log=lambda message: print(message, file=sys.stderr),
    )
    if not args.quiet:
        print(file=sys.stderr)
    print(f"wrote {args.out}: {manifest['dtype']} activations of {manifest['model']}")
    print_hooks(Path(args.out), manifest)
    return 0


def cmd_info(args) -> int:
    manifest = read_manifest(args.dir)
    shape = manifest.get("input_shape") or []
    rows = [
        ("model", manifest.get("model")),
        ("data", f"{manifest.get('data')} ({manifest.get('input_kind')}, shape {shape})"),
        ("dtype", f"{manifest['dtype']} (stored as {manifest.get('storage')})"),
        ("rows per shard", manifest.get("shard_rows")),
        ("max rows", "all" if manifest.get("max_rows") is None else manifest["max_rows"]),
        ("inputs covered", f"{inputs_covered(manifest)} of {shape[0] if shape else '?'}"),
        ("complete", "yes" if manifest.get("complete") else "no (rerun extract to resume)"),
        ("aecore", manifest.get("aecore_version")),
    ]
    print_table(["field", "value"], rows)
    print()
    print_hooks(Path(args.dir), manifest)
    if args.verify:
        from aecore.activations.cache import ActivationCache

        for hook in manifest["hooks"]:
            if manifest["hooks"][hook].get("shards"):
                ActivationCache(args.dir, hook, allow_incomplete=True).verify()
        print("every shard matches its sha256")
    return 0


def print_hooks(root: Path, manifest: dict[str, Any]) -> None:
    """One line per hook: width, rows, shards and bytes on disk."""
    rows = []
    for hook, entry in manifest["hooks"].items():
        shards = entry.get("shards", [])
        size = sum((root / s["file"]).stat().st_size for s in shards if (root / s["file"]).exists())
        rows.append(
            (hook or "(model output)", entry.get("d") or "?", f"{entry.get('rows', 0):,}",
             len(shards), _bytes(size))
        )  # fmt: skip
    print_table(["hook", "d", "rows", "shards", "bytes"], rows, numbers_right=True)


def _bytes(n: float) -> str:
    if n < 1024:
        return f"{int(n)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        n /= 1024
        if n < 1024 or unit == "TiB":
            break
    return f"{n:.1f} {unit}"


class _Progress:
    """``inputs done/total`` on stderr, at most twice a second."""

    def __init__(self) -> None:
        self.shown = 0.0

    def __call__(self, done: int, total: int) -> None:
        now = time.monotonic()
        if now - self.shown >= 0.5 or done == total:
            self.shown = now
            print(f"\rinputs {done:,}/{total:,}", end="", file=sys.stderr, flush=True)
