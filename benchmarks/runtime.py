"""``aecore bench onnx``: onnxruntime (through ``aecore.runtime``) vs PyTorch eager.

For each model (fresh weights; speed does not depend on training), one run times side
by side, interleaved in rounds so that machine noise hits all alike:

* ``torch``: ``model(x)`` in eager mode under ``torch.inference_mode()``;
* ``onnxruntime``: a bare ``InferenceSession.run`` of the exported full graph;
* ``aecore.runtime``: ``OnnxAutoencoder.reconstruct(x)``, i.e. the same session plus
  input checks, normalisation and its inverse (inputs in data units, pixels 0..255);
* the same wrapper with normalisation switched off, fed normalised inputs like the bare
  session: the cost of the checks and dispatch alone.

It reports batch-1 latency (median microseconds per call) and batch-256 throughput
(rows per second, from the median call), and the wrapper's overhead over the bare
session (goal: at most 10%), with and without the normalisation arithmetic (two passes
over the input, two over the output, which a bare-session user must also do). Torch
and onnxruntime use the same number of threads.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from aecore.cli.tables import print_table
from aecore.registry import list_models
from aecore_benchmarks.args import count, json_file, names, write_json
from aecore_benchmarks.timing import time_in_turns

OVERHEAD_GOAL = 0.10
VECTOR_SHAPE = (784,)  # MNIST-sized rows
IMAGE_SHAPE = (1, 28, 28)
PIXEL_SCALE = 255.0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="aecore bench onnx",
        description="Latency and throughput: onnxruntime via aecore.runtime vs PyTorch eager.",
    )
    p.add_argument(
        "--models", type=names(list_models()), default=None, help="comma-separated (default: all)"
    )
    p.add_argument("--latent-dim", type=count, default=32)
    p.add_argument(
        "--threads",
        type=count,
        default=min(4, os.cpu_count() or 1),
        help="intra-op threads for both torch and onnxruntime (default: min(4, cores))",
    )
    p.add_argument("--calls", type=count, default=400, help="timed batch-1 calls per backend")
    p.add_argument("--big-batch", type=count, default=256, help="rows per throughput call")
    p.add_argument("--rounds", type=count, default=5, help="interleaved timing rounds")
    p.add_argument(
        "--json", type=json_file, default=None, metavar="FILE", help="also write results as JSON"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    import torch

    from aecore.errors import ConfigError

    args = build_parser().parse_args(argv)
    for name in ("latent_dim", "threads", "calls", "big_batch", "rounds"):
        value = getattr(args, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    models = args.models or list_models()
    torch.set_num_threads(args.threads)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            print(f"{name}: exporting and timing ...", file=sys.stderr, flush=True)
            results.append(bench_model(name, args, Path(tmp)))
    report = {
        "benchmark": "aecore bench onnx",
        "machine": {
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "cores": os.cpu_count(),
        },
        "versions": _versions(),
        "threads": args.threads,
        "batch_sizes": [1, args.big_batch],
        "overhead_goal": OVERHEAD_GOAL,
        "results": results,
    }
    print_report(report)
    if args.json:
        write_json(args.json, report)
    return 0


def bench_model(name: str, args, tmp: Path) -> dict[str, Any]:
    import onnxruntime
    import torch

    from aecore.data.normalization import Normalization
    from aecore.onnx import export_onnx
    from aecore.registry import create, model_class
    from aecore.runtime import OnnxAutoencoder

    cls = model_class(name)
    shape = VECTOR_SHAPE if 1 in cls.input_ranks else IMAGE_SHAPE
    torch.manual_seed(0)
    model = create(name, input_shape=shape, latent_dim=args.latent_dim).eval()
    model.normalization = Normalization("minmax", [0.0], [PIXEL_SCALE])
    path = export_onnx(model, tmp / f"{name}.onnx", part="full")

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = args.threads
    session = onnxruntime.InferenceSession(
        str(path), sess_options=options, providers=["CPUExecutionProvider"]
    )
    wrapper = OnnxAutoencoder(path, threads=args.threads)
    # the same wrapper with normalisation switched off: what checks and dispatch cost
    plain = OnnxAutoencoder(path, threads=args.threads)
    if not plain.normalizes_itself:
        plain.normalization = Normalization("none")
    feed, fetch = session.get_inputs()[0].name, [session.get_outputs()[0].name]

    row: dict[str, Any] = {
        "model": name,
        "input_shape": list(shape),
        "latent_dim": model.latent_dim,
    }
    for batch, calls in ((1, args.calls), (args.big_batch, max(20, args.calls // 10))):
        rng = np.random.default_rng(batch)
        raw = (rng.random((batch, *shape)) * PIXEL_SCALE).astype(np.float32)
        normed = model.normalization.apply(raw)
        tensor = torch.from_numpy(normed.copy())

        def run_torch(t=tensor):
            with torch.inference_mode():
                return model(t)

        backends = {
            "torch": run_torch,
            # an export with the normalisation in its graph takes data units
            "onnxruntime": lambda x=(raw if wrapper.normalizes_itself else normed): session.run(
                fetch, {feed: x}
            ),
            "aecore.runtime": lambda x=raw: wrapper.reconstruct(x),
            "aecore.runtime without normalisation": lambda x=normed: plain.reconstruct(x),
        }
        per_round = max(1, calls // args.rounds)
        seconds, errors = time_in_turns(backends, rounds=args.rounds, block=per_round, warmup=5)
        if errors:
            raise RuntimeError(f"{name}: " + "; ".join(f"{k}: {v}" for k, v in errors.items()))
        bare = seconds["onnxruntime"]
        row[f"batch{batch}"] = {
            "seconds_per_call": seconds,
            "rows_per_s": {k: batch / v for k, v in seconds.items()},
            "wrapper_overhead": seconds["aecore.runtime"] / bare - 1.0,
            "wrapper_overhead_without_normalisation": (
                seconds["aecore.runtime without normalisation"] / bare - 1.0
            ),
        }
    return row


def print_report(report: dict[str, Any]) -> None:
    big = report["batch_sizes"][1]
    goal = f"{100 * OVERHEAD_GOAL:.0f}%"
    print(
        f"aecore bench onnx: {report['threads']} threads, median of interleaved calls. "
        f"runtime = aecore.runtime.OnnxAutoencoder.reconstruct on data units (checks, "
        f"normalisation, session, inverse); overhead = runtime / bare onnxruntime - 1 "
        f"(goal <= {goal}); 'w/o norm' = the same with normalisation off."
    )
    for batch, unit in ((1, "us per call"), (big, "rows/s")):
        print(f"\nbatch {batch}: {'latency' if batch == 1 else 'throughput'} ({unit})")
        header = ["model", "torch", "onnxruntime", "runtime", "ort/torch", "overhead", "w/o norm"]
        rows = []
        for r in report["results"]:
            res = r[f"batch{batch}"]
            sec = res["seconds_per_call"]
            if batch == 1:
                cells = [f"{sec[k] * 1e6:.1f}" for k in ("torch", "onnxruntime", "aecore.runtime")]
            else:
                cells = [
                    f"{res['rows_per_s'][k]:,.0f}"
                    for k in ("torch", "onnxruntime", "aecore.runtime")
                ]
            rows.append(
                [
                    r["model"],
                    *cells,
                    f"{sec['torch'] / sec['onnxruntime']:.2f}x",
                    f"{100 * res['wrapper_overhead']:+.1f}%",
                    f"{100 * res['wrapper_overhead_without_normalisation']:+.1f}%",
                ]
            )
        print_table(header, rows, numbers_right=True)


def _versions() -> dict[str, str]:
    import onnxruntime
    import torch

    from aecore._version import __version__

    return {
        "aecore": __version__,
        "torch": torch.__version__,
        "onnxruntime": onnxruntime.__version__,
    }


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
