"""SAELens SAE folders: ``cfg.json`` + ``sae_weights.safetensors``, the layout
``sae_lens.SAE.save_model`` writes and ``SAE.load_from_disk`` reads (sae-lens 6.x).

The weights: ``W_enc`` (d_in, d_sae), ``b_enc`` (d_sae), ``W_dec`` (d_sae, d_in),
``b_dec`` (d_in), and ``threshold`` (d_sae) for a JumpReLU. sae-lens encodes
``act(x' @ W_enc + b_enc)`` with ``x' = x - b_dec`` when ``apply_b_dec_to_input`` (else
``x``) and decodes ``acts @ W_dec + b_dec``; its JumpReLU is ``relu(pre) * (pre >
threshold)``.

Exported as: ``sae-topk`` -> ``topk``; ``sae-relu`` -> ``standard``; ``sae-jumprelu``
-> ``jumprelu``; ``sae-batchtopk`` and ``sae-matryoshka`` -> ``jumprelu`` with their one
inference threshold for every latent, the form sae-lens itself saves BatchTopK SAEs
in (its metadata's ``training_architecture`` says how they were trained, so an import
gives the same aecore model back). The weights are the model's function of raw
inputs: input scale and normalisation folded in.

Imported: ``standard`` -> ``sae-relu``, ``topk`` -> ``sae-topk``, ``jumprelu`` ->
``sae-jumprelu`` (``sae-batchtopk`` / ``sae-matryoshka`` when its metadata says it was
trained as one and its thresholds agree), and sae-lens training checkpoints of
``batchtopk`` / ``matryoshka_batchtopk``. ``apply_b_dec_to_input: false`` and
``rescale_acts_by_decoder_norm: true`` are folded into the weights exactly; other
architectures and activation normalisations are refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from aecore._version import __version__
from aecore.errors import ConfigError, ModelFileError
from aecore.sae.format_common import (
    SAE_MODELS,
    RawSAE,
    build_sae,
    config_int,
    json_bytes,
    raw_sae,
    read_config,
    read_weights,
    require_folder,
    sae_kind,
    tensor_bytes,
    whole_number,
    write_folder,
)

CONFIG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
#: the sae-lens release whose layout this module follows (its loader reads folders
#: without a version of at least 6 as the older layout)
FORMAT_VERSION = "6.54.12"
ARCHITECTURES = ("standard", "topk", "jumprelu", "batchtopk", "matryoshka_batchtopk")
#: training-only architectures sae-lens saves as JumpReLU for inference
BATCH_TOPK = ("batchtopk", "matryoshka_batchtopk")
DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "float16": torch.float16, "bfloat16": torch.bfloat16}  # fmt: skip


# -- export ----------------------------------------------------------------------------
def recorded_hook(model) -> str | None:
    """The hook point a saved model read: its activation cache's at training, or the
    SAELens folder's it was imported from (None when neither is recorded)."""
    data = (getattr(model, "metadata", None) or {}).get("data") or {}
    hook = data.get("hook")
    if hook is None:
        hook = (data.get("imported_from") or {}).get("hook_name")
    return hook if isinstance(hook, str) else None


def hook_of_folder(path: str | os.PathLike) -> str | None:
    """The hook point a SAELens folder's cfg.json names (in its metadata, or at the top
    level as older sae-lens versions wrote it), or None."""
    try:
        cfg = json.loads((Path(path) / "cfg.json").read_text())
    except (OSError, ValueError):
        return None
    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    hook = metadata.get("hook_name", cfg.get("hook_name"))
    return hook if isinstance(hook, str) else None


def save_saelens(
    model, path: str | os.PathLike, *, overwrite: bool = False, hook_name: str | None = None
) -> Path:
    """Write the aecore SAE ``model`` as a SAELens folder ``path`` (``hook_name``: the
    hook point it reads, recorded in the metadata sae-lens uses to attach it)."""
    kind = sae_kind(model)
    if hook_name is not None and not isinstance(hook_name, str):
        raise ConfigError(f"hook_name must be a string; got {hook_name!r}")
    if hook_name is None:
        hook_name = recorded_hook(model)
    sae = raw_sae(model)
    n, d = sae.W_enc.shape
    dtype = model.W_enc.dtype if model.W_enc.dtype in DTYPES.values() else torch.float32
    name = SAE_MODELS[kind]
    metadata: dict[str, Any] = {
        "sae_lens_version": FORMAT_VERSION,
        "sae_lens_training_version": None,
        "hook_name": hook_name,
        "aecore": {"model": name, "config": model.get_config(), "version": __version__},
    }
    cfg: dict[str, Any] = {
        "architecture": "standard",
        "d_in": d,
        "d_sae": n,
        "dtype": next(k for k, v in DTYPES.items() if v == dtype),
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": metadata,
    }
    weights = {"W_enc": sae.W_enc.T, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec}
    if kind == "topk":
        cfg.update(architecture="topk", k=model.rule.k, rescale_acts_by_decoder_norm=False)
    elif kind != "relu":
        cfg["architecture"] = "jumprelu"
        weights["threshold"] = sae.thresholds
        if kind in ("batchtopk", "matryoshka"):
            details: dict[str, Any] = {"k": model.rule.k}
            if kind == "matryoshka":
                details["matryoshka_widths"] = list(model.rule.prefixes)
            metadata["training_architecture"] = BATCH_TOPK[kind == "matryoshka"]
            metadata["training_architecture_details"] = details
    blob = tensor_bytes({k: v.to(dtype) for k, v in weights.items()})
    files = {CONFIG: json_bytes(cfg), WEIGHTS: blob}
    return write_folder(path, files, overwrite=overwrite, what="SAELens", marker=CONFIG)


# -- import ----------------------------------------------------------------------------
def load_saelens(path: str | os.PathLike):
    """The aecore SAE (eval mode, CPU, float32) computing what the SAELens folder
    ``path`` computes."""
    path = require_folder(path, "SAELens", (CONFIG, WEIGHTS))
    where = path / CONFIG
    cfg = read_config(where)
    arch = _architecture(cfg, where)
    d = config_int(cfg, "d_in", where)
    n = config_int(cfg, "d_sae", where)
    _check_inputs(cfg, where)
    expected: dict[str, tuple[int, ...]] = {
        "W_enc": (d, n), "b_enc": (n,), "W_dec": (n, d), "b_dec": (d,),
        "scaling_factor": (n,),  # the pre-6 layout's finetuning scale: 1 or refused
    }  # fmt: skip
    optional = ["scaling_factor"]
    if arch == "jumprelu":
        # training checkpoints of older sae-lens releases store log(threshold)
        expected.update(threshold=(n,), log_threshold=(n,))
        optional += ["threshold", "log_threshold"]
    elif arch in BATCH_TOPK:
        expected["topk_threshold"] = ()
    w = read_weights(path / WEIGHTS, expected, optional)
    scaling = w.pop("scaling_factor", None)
    if scaling is not None and not bool((scaling == 1).all()):
        raise ModelFileError(
            f"{path / WEIGHTS}: a finetuning scaling_factor other than 1 is not supported"
        )

    W_enc, b_enc, W_dec, b_dec = w["W_enc"].T, w["b_enc"], w["W_dec"], w["b_dec"]
    if not _flag(cfg, "apply_b_dec_to_input", True, where):
        # sae-lens encodes x itself: the bias that makes aecore's x - b_dec give that
        b_enc = b_enc + W_enc @ b_dec
    thresholds = None
    if arch == "jumprelu":
        if "threshold" in w:
            thresholds = w["threshold"]
        elif "log_threshold" in w:
            thresholds = w["log_threshold"].exp()
        else:
            raise ModelFileError(f"{path / WEIGHTS}: missing tensor threshold (a JumpReLU's)")
    elif arch in BATCH_TOPK:
        thresholds = w["topk_threshold"].expand(n)
    if arch in ("topk", *BATCH_TOPK) and _flag(
        cfg, "rescale_acts_by_decoder_norm", arch in BATCH_TOPK, where
    ):
        # latents scaled by their decoder rows' norms: fold the norms into the weights
        norms = W_dec.norm(dim=1)
        if not bool((norms > 0).all()):
            raise ModelFileError(
                f"{path / WEIGHTS}: rescale_acts_by_decoder_norm with a decoder row of "
                f"norm 0 cannot be represented"
            )
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    sae = RawSAE(W_enc, b_enc, W_dec, b_dec, thresholds)

    metadata = cfg.get("metadata") if isinstance(cfg.get("metadata"), dict) else {}
    if arch == "standard":
        name, derived = "sae-relu", {}
    elif arch == "topk":
        name, derived = "sae-topk", {"k": _k(cfg, where, n)}
    else:
        if arch == "jumprelu":
            trained_as = metadata.get("training_architecture")
            details = metadata.get("training_architecture_details")
        else:
            trained_as, details = arch, cfg
        # a BatchTopK's inference form, when it is one (else the exact JumpReLU)
        name, derived = _batch_topk(trained_as, details, thresholds, n) or ("sae-jumprelu", {})
    return build_sae(name, sae, derived, path, recorded=metadata.get("aecore"))


def _architecture(cfg: dict[str, Any], where: Path) -> str:
    arch = cfg.get("architecture")
    # configs before sae-lens 6 name the activation function, and a TopK SAE's may still
    # say "standard" (sae-lens itself reads such a folder as TopK)
    fn = cfg.get("activation_fn", cfg.get("activation_fn_str"))
    if arch is None or (arch == "standard" and fn == "topk"):
        fn = fn or "relu"
        arch = {"relu": "standard", "topk": "topk"}.get(fn, fn)
    if arch not in ARCHITECTURES:
        raise ModelFileError(
            f"{where}: unsupported SAELens architecture {arch!r}; aecore imports "
            f"{', '.join(ARCHITECTURES)}"
        )
    return arch


def _check_inputs(cfg: dict[str, Any], where: Path) -> None:
    """Refuse what the weights alone cannot reproduce: activation normalisation (its
    statistics are not in the folder) and unknown dtypes or reshapes."""
    norm = cfg.get("normalize_activations", "none")
    if norm not in (None, False, "none"):
        raise ModelFileError(
            f"{where}: normalize_activations is {norm!r}; aecore imports SAEs that take "
            f"raw activations ('none'): fold the normalisation into the weights first "
            f"(sae-lens: fold_activation_norm_scaling_factor or fold_activation_whitening, "
            f"then save_model)"
        )
    dtype = str(cfg.get("dtype", "float32")).removeprefix("torch.")
    if dtype not in DTYPES:
        raise ModelFileError(
            f"{where}: dtype {cfg.get('dtype')!r} is not one of {', '.join(DTYPES)}"
        )
    # hook_z SAEs flatten (heads, d_head) into d_in: the same SAE on flat rows
    reshape = cfg.get("reshape_activations", "none")
    if reshape not in ("none", "hook_z"):
        raise ModelFileError(
            f"{where}: reshape_activations {reshape!r} is not one of 'none', 'hook_z'"
        )


def _flag(cfg: dict[str, Any], key: str, default: bool, where: Path) -> bool:
    value = cfg.get(key, default)
    if not isinstance(value, bool):
        raise ModelFileError(f"{where}: {key} must be true or false; got {value!r}")
    return value


def _k(cfg: dict[str, Any], where: Path, n: int) -> int:
    kwargs = cfg.get("activation_fn_kwargs")
    if "k" not in cfg and isinstance(kwargs, dict) and "k" in kwargs:
        cfg = {**cfg, "k": kwargs["k"]}  # the pre-6 layout
    return config_int(cfg, "k", where, high=n)


def _batch_topk(trained_as: Any, details: Any, thresholds, n: int):
    """(aecore name, hparams) for a BatchTopK or Matryoshka SAE's inference form, or
    None when ``thresholds`` / ``details`` do not describe one aecore can hold."""
    if trained_as not in BATCH_TOPK or not isinstance(details, dict):
        return None
    k = whole_number(details.get("k"))
    if k is None or not 1 <= k <= n or not bool((thresholds == thresholds[0]).all()):
        return None
    if trained_as == "batchtopk":
        return "sae-batchtopk", {"k": k}
    widths = details.get("matryoshka_widths")
    prefixes = [whole_number(w) for w in widths] if isinstance(widths, list) else []
    if not prefixes or None in prefixes:
        return None
    if prefixes[-1] != n:  # sae-lens adds the whole dictionary as the last level
        prefixes.append(n)
    if prefixes != sorted(set(prefixes)) or prefixes[0] < 1 or prefixes[-1] != n:
        return None
    return "sae-matryoshka", {"k": k, "prefixes": prefixes}
