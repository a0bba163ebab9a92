"""Training from an npy memory map larger than the memory the process may use."""

import subprocess
import sys
import textwrap

import numpy as np
import pytest

ROWS, FEATURES = 850_000, 256  # 870 MB of float32
LIMIT_MB = 720  # heap a process may use; torch + a small training run need ~500 MB


@pytest.mark.slow
def test_trains_from_a_memory_map_larger_than_the_memory_limit(tmp_path):
    path = tmp_path / "big.npy"
    big = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(ROWS, FEATURES))
    rng = np.random.default_rng(0)
    basis = rng.standard_normal((4, FEATURES)).astype(np.float32)
    for start in range(0, ROWS, 100_000):
        n = min(100_000, ROWS - start)
        big[start : start + n] = rng.standard_normal((n, 4)).astype(np.float32) @ basis
    big.flush()
    del big
    assert path.stat().st_size > LIMIT_MB * 2**20

    script = textwrap.dedent(f"""
        import resource, sys
        # RLIMIT_DATA caps the heap and private mappings, not the shared file mapping of
        # the memory map: the data can only stream from disk
        limit = {LIMIT_MB} * 2**20
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        import numpy as np
        try:  # the limit is real: reading the file whole into memory fails
            np.fromfile({str(path)!r}, dtype=np.float32)
        except MemoryError:
            print("whole-file read refused")
        from aecore.pipeline import train
        result = train("ae", "npy:{path}", {str(tmp_path / "model")!r}, latent_dim=4,
                       epochs=1, batch_size=4096, hparams={{"hidden": [16]}},
                       normalize="standardize", device="cpu", progress=False)
        print("trained", result.metrics["test_rows"], result.metrics["test_mse"])
    """)
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = ran.stdout.splitlines()
    assert "whole-file read refused" in lines
    trained = next(line for line in lines if line.startswith("trained")).split()
    assert int(trained[1]) == round(ROWS * 0.2)
    assert float(trained[2]) < 0.05  # standardised units: it learned the 4-D structure
    assert (tmp_path / "model" / "model.json").exists()
