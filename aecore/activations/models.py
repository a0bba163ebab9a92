"""The model activations come from: loaded from a local transformers folder or a Python
import path, its hooked modules found by name, and a fingerprint of its weights (so a
resumed extraction can tell that the weights are the ones it started with)."""

from __future__ import annotations

import difflib
import hashlib
import importlib
import json
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from aecore.errors import ConfigError, ModelFileError

_IMPORT_PATH = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
_FINGERPRINT_VALUES = 65536  # values per tensor the fingerprint reads, spread evenly
#: the prefix of fingerprints that read the structure and values spread over each tensor
MODEL_SCHEME = "spread:"


def load_model(spec: str | nn.Module) -> tuple[nn.Module, str]:
    """(module, how the manifest names it) for a transformers folder, an import path
    ``package.module:attr`` (an ``nn.Module`` or a callable returning one) or a module."""
    if isinstance(spec, nn.Module):
        return spec, f"object {type(spec).__module__}.{type(spec).__qualname__}"
    if not isinstance(spec, str) or not spec:
        raise ConfigError(
            f"model must be a folder, an import path package.module:factory or an nn.Module; "
            f"got {spec!r}"
        )
    path = Path(spec).expanduser()
    if path.exists():
        return _from_folder(path), str(path.resolve())
    if _IMPORT_PATH.fullmatch(spec):
        return _from_import_path(spec), spec
    raise ModelFileError(
        f"model {spec!r}: no such folder, and not an import path of the form package.module:factory"
    )


def _from_folder(path: Path) -> nn.Module:
    """A transformers model saved with ``save_pretrained``: the causal-LM class when the
    config's architecture is one (so hook names match the LM, e.g. transformer.h.0),
    else the base model. Never downloads."""
    config_file = path / "config.json"
    if not path.is_dir() or not config_file.is_file():
        raise ModelFileError(
            f"model folder {path}: expected a transformers folder with config.json (as "
            f"written by save_pretrained); found "
            f"{'a file' if path.is_file() else 'no config.json'}"
        )
    try:
        architectures = json.loads(config_file.read_text(encoding="utf-8")).get("architectures")
    except (OSError, ValueError, AttributeError) as exc:
        raise ModelFileError(f"model folder {path}: cannot read config.json: {exc}") from None
    import transformers

    auto = (
        transformers.AutoModelForCausalLM
        if _is_causal_lm(architectures)
        else transformers.AutoModel
    )
    try:
        return auto.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise ModelFileError(
            f"model folder {path}: transformers cannot load it with {auto.__name__}: "
            f"{type(exc).__name__}: {exc}"
        ) from None


def _is_causal_lm(architectures: Any) -> bool:
    if not isinstance(architectures, list):
        return False
    try:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

        known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    except ImportError:  # the mapping moved: fall back to the naming convention
        known = set()
    return any(a in known or str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures)


def _from_import_path(spec: str) -> nn.Module:
    module_name, _, attr = spec.partition(":")
    try:
        target: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"model {spec!r}: cannot import {module_name}: {exc}") from None
    for part in attr.split("."):
        if not hasattr(target, part):
            raise ConfigError(f"model {spec!r}: {module_name} has no attribute {attr!r}")
        target = getattr(target, part)
    if not isinstance(target, nn.Module):
        if not callable(target):
            raise ConfigError(
                f"model {spec!r}: expected an nn.Module or a callable returning one; got "
                f"{type(target).__name__}"
            )
        target = target()
    if not isinstance(target, nn.Module):
        raise ConfigError(
            f"model {spec!r}: the factory returned {type(target).__name__}, not an nn.Module"
        )
    return target


def find_modules(model: nn.Module, names: list[str]) -> dict[str, nn.Module]:
    """``name -> model.get_submodule(name)``; an unknown name raises a ConfigError that
    lists the module names closest to it."""
    if not names:
        raise ConfigError("name at least one module to hook (e.g. --hook transformer.h.0)")
    if len(set(names)) != len(names):
        raise ConfigError(f"each hook may be named once; got {names}")
    found = {}
    for name in names:
        try:
            found[name] = model.get_submodule(name)
        except AttributeError:
            raise ConfigError(
                f"{type(model).__name__} has no module {name!r}; modules with close names: "
                f"{', '.join(close_module_names(model, name))}"
            ) from None
    return found


def close_module_names(model: nn.Module, name: str, count: int = 6) -> list[str]:
    """Module names of ``model`` that look like ``name`` (or its first ones)."""
    every = [n for n, _ in model.named_modules() if n]
    close = difflib.get_close_matches(name, every, n=count, cutoff=0.5)
    # names under the longest existing prefix (e.g. transformer.h.* for transformer.h.99)
    prefix = name
    while prefix and not any(n.startswith(prefix + ".") for n in every):
        prefix = prefix.rpartition(".")[0]
    children = [
        n
        for n in every
        if prefix and n.startswith(prefix + ".") and n.count(".") == prefix.count(".") + 1
    ]
    merged = list(dict.fromkeys(close + children))
    return merged[:count] or every[:count]


def vocabulary_size(model: nn.Module) -> int | None:
    """How many token ids ``model`` embeds: a transformers config's ``vocab_size``, else
    its input embedding's rows, else its largest embedding's (None where it has none)."""
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(vocab, int):
        return vocab
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return embedding.num_embeddings
    # the largest embedding: the tokens' (positions and types have fewer rows), so no
    # valid id is refused
    sizes = [m.num_embeddings for m in model.modules() if isinstance(m, nn.Embedding)]
    return max(sizes) if sizes else None


def vocabulary(vocab: int | None) -> str:
    """The ids a vocabulary takes, for messages."""
    return f"0..{vocab - 1}" if vocab is not None else "non-negative ids"


def fingerprint(model: nn.Module) -> str:
    """``MODEL_SCHEME`` and a sha256 of the model's structure (its modules' repr: layer
    types and their settings, an activation swapped included), of the names, shapes and
    dtypes of the parameters and buffers, and of up to ``_FINGERPRINT_VALUES`` values of
    each spread evenly over it (every value of a smaller tensor): an ablated row changes
    it, where the first values alone missed one past them."""

    def spread(flat: torch.Tensor) -> torch.Tensor:
        return flat[:: max(1, -(-flat.numel() // _FINGERPRINT_VALUES))]

    return MODEL_SCHEME + _tensors_digest(model, spread, repr(model))


def legacy_fingerprint(model: nn.Module) -> str:
    """The fingerprint caches written before ``MODEL_SCHEME`` hold (the first 256 values
    of each tensor), to resume them."""
    return _tensors_digest(model, lambda flat: flat[:256])


def _tensors_digest(model: nn.Module, values, structure: str = "") -> str:
    """sha256 (32 hex digits) of ``structure`` and, per parameter and buffer, its name,
    shape, dtype and ``values(flat tensor)``."""
    digest = hashlib.sha256(structure.encode())
    for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype};".encode())
        picked = values(tensor.detach().flatten())
        digest.update(picked.to("cpu", torch.float64).numpy().tobytes())
    return digest.hexdigest()[:32]


def first_tensor(output: Any, name: str) -> torch.Tensor:
    """The activation tensor of a module's output: the output itself, or element 0 of a
    tuple, list or transformers ``ModelOutput``."""
    if isinstance(output, (tuple, list)) and output:
        output = output[0]
    elif hasattr(output, "to_tuple"):
        output = output.to_tuple()[0]
    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise ConfigError(
            f"module {name!r} returned {type(output).__name__}"
            f"{'' if not isinstance(output, torch.Tensor) else f' of {output.dtype}'}; "
            f"hooks need modules whose output (or its element 0) is a float tensor"
        )
    return output
