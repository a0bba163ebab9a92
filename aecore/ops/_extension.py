"""Loading aecore's compiled kernels and saying which implementation each op runs.

``aecore._C`` defines the op schemas; ``aecore._C_cpu`` and ``aecore._C_cuda`` register
the CPU and CUDA kernels, each independently of the other. ``AECORE_DISABLE_EXT=1``
(read at import) loads none of them, so every op runs its pure-PyTorch reference.
"""

from __future__ import annotations

import importlib
import os

import torch

from aecore.errors import ConfigError

#: the public ops, in the order backend_report lists them
OPS = (
    "gibbs_chain", "cd_step", "kl_sparsity", "topk_sparsify", "topk_encode", "sparse_decode",
    "remove_parallel_", "set_row_norms_", "momentum_step_", "cd_update_", "adam_step_",
)  # fmt: skip

#: ops with CPU kernels alone: on CUDA torch's own fused Adam is one kernel already, and
#: what the CPU kernel saves is the host's per-tensor work
CPU_ONLY = ("adam_step_",)

#: the largest k of the CUDA topk_encode kernel (its per-row heap lives in shared memory);
#: a larger k runs the reference
CUDA_TOPK_ENCODE_MAX_K = 256

#: every schema csrc/ops.cpp defines (the public ops and their backward passes)
SCHEMAS = (
    *OPS, "kl_sparsity_backward", "topk_sparsify_backward", "topk_encode_backward",
    "sparse_decode_backward",
)  # fmt: skip

_DISABLED = os.environ.get("AECORE_DISABLE_EXT", "").strip() not in ("", "0")


def _load(module: str) -> tuple[bool, str]:
    """Imports an extension module; returns (loaded, reason when not)."""
    try:
        importlib.import_module(module)
    except ModuleNotFoundError:
        return False, "extension not built"
    except (ImportError, OSError, RuntimeError) as exc:  # e.g. ABI mismatch with torch
        return False, f"extension failed to load: {exc}"
    return True, ""


def _load_all() -> tuple[bool, dict[str, tuple[bool, str]]]:
    """Whether the schemas loaded, and per device type (kernels loaded, reason if not)."""
    if _DISABLED:
        off = (False, "AECORE_DISABLE_EXT=1")
        return False, {"cpu": off, "cuda": off}
    schemas = _load("aecore._C")
    if schemas[0]:
        # a build older than this Python code lacks some ops: use none of its kernels
        missing = [op for op in SCHEMAS if not hasattr(torch.ops.aecore, op)]
        if missing:
            schemas = (
                False,
                f"extension out of date (no {', '.join(missing)}): rebuild it with "
                f"`pip install --no-build-isolation -e .` (or make install)",
            )
    if not schemas[0]:
        return False, {"cpu": schemas, "cuda": schemas}
    cuda = _load("aecore._C_cuda")
    if not cuda[0] and cuda[1] == "extension not built":
        cuda = (False, "no CUDA kernels built")
    return True, {"cpu": _load("aecore._C_cpu"), "cuda": cuda}


#: whether torch.ops.aecore.* are defined in this process, and each backend's status
SCHEMAS_LOADED, _STATUS = _load_all()


def fused(t: torch.Tensor) -> bool:
    """Whether the compiled kernels for ``t``'s device are loaded."""
    status = _STATUS.get(t.device.type)
    return status is not None and status[0]


def backend(op: str, device: str | torch.device = "cpu") -> str:
    """Which implementation ``op`` runs on ``device``, and why.

    ``"fused cpu"``, ``"fused cuda"``, or ``"reference: <reason>"`` with reason one of
    ``AECORE_DISABLE_EXT=1``, ``extension not built``, ``extension failed to load: ...``,
    ``no CUDA kernels built``, ``no fused kernels for <device type>``.
    """
    if op not in OPS:
        raise ConfigError(f"backend: unknown op {op!r}; the ops are {', '.join(OPS)}")
    kind = torch.device(device).type
    if kind not in _STATUS or (op in CPU_ONLY and kind != "cpu"):
        return f"reference: no fused kernels for {kind}"
    loaded, reason = _STATUS[kind]
    return f"fused {kind}" if loaded else f"reference: {reason}"


def backend_report() -> list[tuple[str, str, str]]:
    """(op, device, backend) for every op on every available device; never raises."""
    devices = ["cpu"]
    try:
        if torch.cuda.is_available():
            devices.append("cuda")
    except Exception:  # a broken CUDA setup must not break `aecore info`
        pass
    rows = []
    for op in OPS:
        for dev in devices:
            try:
                rows.append((op, dev, backend(op, dev)))
            except Exception as exc:
                rows.append((op, dev, f"unknown: {exc}"))
    return rows
