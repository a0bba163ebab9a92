"""What the SAE interchange formats (``saelens_format``, ``sparsify_format``) share:
the SAE an aecore model computes in raw input units, checked reading of another
library's ``cfg.json`` and safetensors, building an aecore SAE from foreign weights,
and writing a folder all at once (a temp folder renamed into place)."""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from aecore.errors import ConfigError, ModelFileError

#: the aecore SAE models, by their sparsity rule's name
SAE_MODELS = {
    "topk": "sae-topk",
    "batchtopk": "sae-batchtopk",
    "matryoshka": "sae-matryoshka",
    "relu": "sae-relu",
    "jumprelu": "sae-jumprelu",
}
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
#: decoder rows whose norms agree this closely count as held at one norm
ROW_NORM_TOLERANCE = 1e-4


def model_label(model: Any) -> str:
    """The registry name of ``model``, or its class name when it has none."""
    from aecore.registry import name_of

    try:
        return name_of(model)
    except Exception:  # an unregistered or foreign object: name its class
        return type(model).__name__


def sae_kind(model: Any) -> str:
    """The sparsity rule's name of an aecore SAE; a clear error for anything else."""
    rule = getattr(model, "rule", None)
    kind = getattr(rule, "name", None)
    if kind not in SAE_MODELS or not hasattr(model, "folded_state_dict"):
        raise ConfigError(
            f"expected an SAE model ({', '.join(SAE_MODELS.values())}); got {model_label(model)}"
        )
    return kind


@dataclass
class RawSAE:
    """An SAE in raw input units: ``z = rule(W_enc (x - b_dec) + b_enc)``,
    ``x_hat = z W_dec + b_dec``; float64 on the CPU. ``thresholds``: the per-latent
    inference thresholds of the JumpReLU-like rules (None for topk and relu)."""

    W_enc: Tensor  # (n, d)
    b_enc: Tensor  # (n,)
    W_dec: Tensor  # (n, d)
    b_dec: Tensor  # (d,)
    thresholds: Tensor | None = None


@torch.no_grad()
def raw_sae(model: Any) -> RawSAE:
    """The function ``model`` computes on data-unit inputs: its input scale folded
    in, and a per-feature affine ``model.normalization`` folded in as well (other
    libraries take the raw activations)."""
    sae_kind(model)
    state = model.folded_state_dict()
    get = {
        k: state[k].detach().to("cpu", torch.float64) for k in ("W_enc", "b_enc", "W_dec", "b_dec")
    }
    thresholds = model.rule.thresholds(model.latent_dim)
    sae = RawSAE(
        get["W_enc"],
        get["b_enc"],
        get["W_dec"],
        get["b_dec"],
        None if thresholds is None else thresholds.detach().to("cpu", torch.float64),
    )
    norm = getattr(model, "normalization", None)
    if norm is not None and norm.kind != "none":
        d = sae.b_dec.numel()
        shift = torch.as_tensor(norm.shift, dtype=torch.float64)
        scale = torch.as_tensor(norm.scale, dtype=torch.float64)
        # Normalization leaves features of scale 0 (constant in training) unscaled
        inv = torch.where(scale > 0, 1 / scale.where(scale > 0, 1.0), 1.0)
        if shift.numel() not in (1, d):
            raise ModelFileError(
                f"the model's normalization holds {shift.numel()} features; the SAE has {d}"
            )
        # model input (x - shift) * inv: scale the encoder's columns, move the bias
        # into data units; the decoder's output maps back the same way
        sae.W_enc = sae.W_enc * inv
        sae.W_dec = sae.W_dec / inv
        sae.b_dec = sae.b_dec / inv + shift.expand(d)
    return sae


# -- reading ---------------------------------------------------------------------------
def require_folder(path: str | os.PathLike, what: str, files: tuple[str, ...]) -> Path:
    """``path`` as a folder holding ``files``; the error names what is there instead."""
    path = Path(path)
    if not path.is_dir():
        problem = "is not a folder" if path.exists() else f"no such {what} folder"
        raise ModelFileError(f"{path}: {problem}")
    for name in files:
        if not (path / name).is_file():
            held = sorted(p.name for p in path.iterdir())
            raise ModelFileError(
                f"{path}: not a {what} folder: no {name} (expected {' and '.join(files)}; "
                f"found {', '.join(held) or 'nothing'})"
            )
    return path


def read_config(path: Path) -> dict[str, Any]:
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelFileError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise ModelFileError(f"{path}: expected a JSON object; got {type(config).__name__}")
    return config


def config_int(config: dict[str, Any], key: str, where: Path, *, low: int = 1, high=None) -> int:
    if key not in config:
        raise ModelFileError(f"{where} lacks {key!r}")
    value = config[key]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= low
    if not ok or (high is not None and value > high):
        bound = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ModelFileError(f"{where}: {key} must be an integer {bound}; got {value!r}")
    return value


def read_weights(
    path: Path, expected: dict[str, tuple[int, ...]], optional=()
) -> dict[str, Tensor]:
    """The tensors of a safetensors file, as float64, checked against ``expected``
    (name -> shape): every name present (those in ``optional`` may be missing), no
    others, floating point, finite, of the expected shape."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from aecore.io.tensors import check_safetensors_header

    check_safetensors_header(path)
    try:
        tensors = load_file(str(path))
    except SafetensorError as exc:
        raise ModelFileError(f"{path} is corrupt: {exc}") from None
    required = ", ".join(k for k in expected if k not in optional)
    missing = [k for k in expected if k not in tensors and k not in optional]
    if missing:
        raise ModelFileError(
            f"{path}: missing tensor {', '.join(missing)} (expected {required}; "
            f"found {', '.join(sorted(tensors)) or 'none'})"
        )
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise ModelFileError(
            f"{path}: unexpected tensor {', '.join(unexpected)} (expected {required})"
        )
    out = {}
    for key, shape in expected.items():
        if key not in tensors:
            continue
        t = tensors[key]
        if t.dtype not in FLOAT_DTYPES:
            raise ModelFileError(
                f"{path}: {key} has dtype {str(t.dtype).removeprefix('torch.')}; expected "
                f"float32, float64, float16 or bfloat16"
            )
        if tuple(t.shape) != shape:
            raise ModelFileError(f"{path}: {key} has shape {tuple(t.shape)}; expected {shape}")
        if not bool(torch.isfinite(t).all()):
            raise ModelFileError(f"{path}: {key} holds non-finite values")
        out[key] = t.double()
    return out


# -- building --------------------------------------------------------------------------
@torch.no_grad()
def build_sae(name: str, sae: RawSAE, hparams: dict[str, Any], where: Path, recorded: Any = None):
    """The aecore SAE ``name`` computing ``sae``, ready to use or to train further
    (``data_initialised``: fit keeps the weights). ``hparams``: what the format fixes;
    ``recorded``: an aecore export's record of the model, whose training recipe is
    kept when it still builds (the weights alone fix the function)."""
    from aecore.data.normalization import Normalization
    from aecore.errors import AecoreError
    from aecore.registry import create

    n, d = sae.W_enc.shape
    norms = sae.W_dec.norm(dim=1)
    # rows at one norm: keep them there in further training, as the source's recipe did
    unit = bool(norms.min() > 0) and float(norms.max() / norms.min()) - 1 <= ROW_NORM_TOLERANCE
    fixed = {**hparams, "unit_decoder": unit}
    recipe = recorded_hparams(recorded, name)
    try:
        model = create(name, input_shape=(d,), latent_dim=n, **{**recipe, **fixed})
    except (AecoreError, TypeError):  # recorded by another aecore version: not needed
        try:
            model = create(name, input_shape=(d,), latent_dim=n, **fixed)
        except AecoreError as exc:
            raise ModelFileError(f"{where}: cannot build {name}: {exc}") from None
    dtype = model.W_enc.dtype
    model.W_enc.copy_(sae.W_enc.to(dtype))
    model.b_enc.copy_(sae.b_enc.to(dtype))
    model.W_dec.copy_(sae.W_dec.to(dtype))
    model.b_dec.copy_(sae.b_dec.to(dtype))
    if unit:
        model.decoder_row_norm.fill_(float(norms.mean()))
    if name == "sae-jumprelu":
        # the threshold lives in log space; a threshold <= 0 gates like ReLU, which the
        # smallest positive float reproduces for every input but subnormal ones
        tiny = torch.finfo(dtype).tiny
        model.rule.log_threshold.copy_(sae.thresholds.clamp_min(tiny).log().to(dtype))
    elif name in ("sae-batchtopk", "sae-matryoshka"):
        model.rule.threshold.fill_(float(sae.thresholds[0]))
        if float(sae.thresholds[0]) > 0:  # an estimate to go on from, not replace outright
            model.rule.threshold_batches.fill_(math.ceil(1 / model.rule.THRESHOLD_RATE))
    model.normalization = Normalization("none")
    model.data_initialised = True
    return model.eval()


def recorded_hparams(record: Any, name: str) -> dict[str, Any]:
    """The hyperparameters an aecore export recorded (``{"model", "config"}``), when it
    recorded them for ``name``."""
    if not (isinstance(record, dict) and record.get("model") == name):
        return {}
    config = record.get("config")
    if not isinstance(config, dict):
        return {}
    return {k: v for k, v in config.items() if k not in ("input_shape", "latent_dim")}


def whole_number(value: Any) -> int | None:
    """``value`` as an int when it is a whole number (JSON may store k as 32.0)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        return None
    return int(value)


# -- writing ---------------------------------------------------------------------------
def tensor_bytes(tensors: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})


def json_bytes(config: dict[str, Any]) -> bytes:
    return (json.dumps(config, indent=2) + "\n").encode("utf-8")


#: the files aecore's SAE folders hold (SAELens: cfg.json + sae_weights.safetensors;
#: sparsify: cfg.json + sae.safetensors): a folder of one kind may replace the other
SAE_FOLDER_FILES = ("cfg.json", "sae_weights.safetensors", "sae.safetensors")


def write_folder(
    path: str | os.PathLike,
    files: dict[str, bytes],
    *,
    overwrite: bool,
    what: str,
    marker: str,
) -> Path:
    """Write ``files`` (name -> content) as the folder ``path``, all at once: into a
    temp folder beside it, then renamed into place, so a failure leaves no
    half-written folder. An existing non-empty folder is replaced only with
    ``overwrite``, only when it holds ``marker`` (a folder of the same kind) and nothing
    but SAE folder files (no one's notes or code go with it)."""
    shown, path = path, Path(os.path.abspath(path))
    if path.exists() and not path.is_dir():
        raise ModelFileError(
            f"cannot write the {what} folder {shown}: it exists and is not a folder"
        )
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise ModelFileError(
                f"{shown} already exists and is not empty; pass overwrite=True (--overwrite) "
                f"or choose another folder"
            )
        if not (path / marker).is_file():
            raise ModelFileError(
                f"{shown} holds files but no {marker}: not a {what} folder, so it is not "
                f"replaced even with overwrite"
            )
        # the whole folder is replaced: only when it holds nothing this write does not
        others = sorted(p.name for p in path.iterdir() if p.name not in SAE_FOLDER_FILES)
        if others:
            listed = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
            raise ModelFileError(
                f"{shown} holds files a {what} folder written here would not ({listed}): "
                f"it is not replaced even with overwrite; move them, or choose another folder"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = uuid.uuid4().hex[:12]
    tmp = path.parent / f".{path.name}.{tag}.tmp"
    tmp.mkdir()
    try:
        for name, blob in files.items():
            with open(tmp / name, "wb") as f:
                f.write(blob)
                f.flush()
                os.fsync(f.fileno())
        if path.exists():
            # move the old folder aside, put the new one in, then drop the old one
            old = path.parent / f".{path.name}.{tag}.old"
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                os.replace(old, path)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_dir(path.parent)
    return Path(shown)


def _sync_dir(folder: Path) -> None:
    try:  # make the rename durable
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass
