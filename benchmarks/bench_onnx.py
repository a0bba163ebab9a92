"""ONNX runtime vs PyTorch eager, per model: ``python benchmarks/bench_onnx.py --help``.

The same as ``aecore bench onnx``; the code lives in ``aecore.bench_onnx``.
"""

import sys

from aecore.bench_onnx import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
