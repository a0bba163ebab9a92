"""Fused kernels vs reference vs torch.compile vs scikit-learn (see aecore.bench_kernels).

    python benchmarks/bench_kernels.py [--device cpu|cuda] [--json FILE] [--quick]

Same as ``aecore bench kernels``.
"""

import sys

from aecore.bench_kernels import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
