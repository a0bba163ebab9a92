"""aecore.ops dispatch: backend() strings, backend_report(), AECORE_DISABLE_EXT and a
missing extension (both in a subprocess, since the choice is made at import)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from aecore import ops
from aecore.errors import ConfigError
from aecore.ops._extension import CPU_ONLY

PROBE = r"""
import json, sys, torch
{prelude}
from aecore import ops
g = torch.Generator().manual_seed(0)
v = (torch.rand(5, 4, generator=g) < 0.5).float()
W, bv, bh = torch.randn(4, 3, generator=g), torch.zeros(4), torch.zeros(3)
s = ops.cd_step(v, W, bv, bh, 2, generator=g)
h = torch.rand(5, 3, requires_grad=True)
ops.kl_sparsity(h, 0.1, 1.0).backward()
z = ops.topk_sparsify(torch.randn(5, 6), 2)
print(json.dumps({
    "backends": ops.backend_report(),
    "cpu": ops.backend("cd_step", "cpu"),
    "cuda": ops.backend("topk_sparsify", "cuda"),
    "ext_loaded": "aecore._C" in sys.modules,
    "nonzero": int((z != 0).sum()),
    "dW": list(s.dW.shape),
    "grad_finite": bool(torch.isfinite(h.grad).all()),
}))
"""


def probe(env_extra=None, prelude=""):
    env = dict(os.environ)
    env.pop("AECORE_DISABLE_EXT", None)
    env.update(env_extra or {})
    out = subprocess.run(
        [sys.executable, "-c", PROBE.replace("{prelude}", prelude)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_disable_ext_forces_reference():
    r = probe({"AECORE_DISABLE_EXT": "1"})
    assert r["cpu"] == "reference: AECORE_DISABLE_EXT=1"
    assert r["cuda"] == "reference: AECORE_DISABLE_EXT=1"
    assert not r["ext_loaded"]
    assert {b for _, _, b in r["backends"]} == {"reference: AECORE_DISABLE_EXT=1"}
    assert r["nonzero"] == 10 and r["dW"] == [4, 3] and r["grad_finite"]


def test_missing_extension_falls_back_to_reference():
    # None in sys.modules makes `import aecore._C` fail as if it had never been built
    r = probe(prelude="sys.modules['aecore._C'] = None")
    assert r["cpu"] == "reference: extension not built"
    assert r["cuda"] == "reference: extension not built"
    assert r["nonzero"] == 10 and r["dW"] == [4, 3] and r["grad_finite"]


def test_each_backend_library_loads_on_its_own():
    """The schemas live in aecore._C; without the CPU kernels the CPU runs the reference
    while the schemas (and the CUDA kernels, where built) stay usable."""
    r = probe(prelude="sys.modules['aecore._C_cpu'] = None")
    assert r["cpu"] == "reference: extension not built"
    assert r["ext_loaded"]  # the schema library
    assert r["cuda"] in ("fused cuda", "reference: no CUDA kernels built")
    assert r["nonzero"] == 10 and r["dW"] == [4, 3] and r["grad_finite"]


def test_disable_ext_zero_means_enabled():
    r = probe({"AECORE_DISABLE_EXT": "0"})
    assert r["cpu"] == ops.backend("cd_step", "cpu")


def test_backend_strings():
    for op in ops.OPS:
        cpu = ops.backend(op, "cpu")
        assert cpu == "fused cpu" or cpu.startswith("reference: ")
        assert ops.backend(op, torch.device("cpu")) == cpu
        cuda = ops.backend(op, "cuda")
        assert cuda == "fused cuda" or cuda.startswith("reference: ")
        assert ops.backend(op, "mps") == "reference: no fused kernels for mps"
    if not torch.cuda.is_available() or not torch.version.cuda:
        assert ops.backend("cd_step", "cuda").startswith("reference: ")
    with pytest.raises(ConfigError, match="unknown op 'conv'"):
        ops.backend("conv", "cpu")


def test_backend_report_lists_every_op_and_device():
    rows = ops.backend_report()
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    assert [(op, dev) for op, dev, _ in rows] == [(op, d) for op in ops.OPS for d in devices]
    assert ops.OPS == (
        "gibbs_chain",
        "cd_step",
        "kl_sparsity",
        "topk_sparsify",
        "topk_encode",
        "sparse_decode",
        "remove_parallel_",
        "set_row_norms_",
        "momentum_step_",
        "cd_update_",
        "adam_step_",
    )
    # every op of one device runs the same implementation (the library is per device),
    # but for the ops with CPU kernels alone
    for dev in devices:
        assert len({b for op, d, b in rows if d == dev and op not in CPU_ONLY}) == 1
    assert CPU_ONLY == ("adam_step_",)
    json.dumps(rows)  # plain strings, printable by `aecore info`


def test_extension_is_built_here():
    """The development environment builds the CPU extension: a silent fallback to the
    reference here would hide a broken build (set AECORE_ALLOW_REFERENCE=1 to skip)."""
    if os.environ.get("AECORE_ALLOW_REFERENCE") == "1":
        pytest.skip("AECORE_ALLOW_REFERENCE=1")
    if os.environ.get("AECORE_DISABLE_EXT", "0") not in ("", "0"):
        pytest.skip("AECORE_DISABLE_EXT is set")
    assert ops.backend("cd_step", "cpu") == "fused cpu"
