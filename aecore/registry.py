"""Model registry: variants are discovered through the ``aecore.models`` entry points.

Discovery is lazy and cached: the entry-point table is read on first use and each
plugin is imported the first time it is needed. A plugin that fails to import, or
whose object is not an ``aecore.Autoencoder`` subclass, is listed as broken with its
reason and a warning; it never breaks the registry or ``import aecore``.
"""

from __future__ import annotations

import contextlib
import difflib
import fnmatch
import importlib
import inspect
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

from aecore.errors import ConfigError, RegistryError, warn

GROUP = "aecore.models"
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


class BrokenPluginWarning(UserWarning):
    """A registered plugin could not be loaded; the rest of the registry works."""


@dataclass
class ModelEntry:
    """One registered model name and where it comes from."""

    name: str
    target: str  # "module:attr" as written in the entry point
    distribution: str
    version: str
    claimants: list[str] = field(default_factory=list)  # "dist version" per claim
    targets: list[str] = field(default_factory=list)  # the other claimants' targets
    _cls: Any = None
    _error: str | None = None
    _loaded: bool = False

    @property
    def conflict(self) -> bool:
        return len(self.claimants) > 1

    def load(self) -> Any:
        """The model class, importing the plugin on first call (None if broken)."""
        if not self._loaded:
            self._loaded = True
            self._cls, self._error = _load_target(self)
            if self._error is not None:
                _warn(
                    f"aecore plugin {self.name!r} ({self.target}, from {self.distribution}) "
                    f"is broken: {self._error}"
                )
        return self._cls

    @property
    def status(self) -> str:
        if self.conflict:
            return "conflict"
        self.load()
        return "ok" if self._error is None else "broken"

    @property
    def reason(self) -> str | None:
        if self.conflict:
            return conflict_message(self)
        self.load()
        return self._error


def conflict_message(entry: ModelEntry) -> str:
    return f"model name {entry.name!r} is claimed by " + " and by ".join(entry.claimants)


def _load_target(entry: ModelEntry) -> tuple[Any, str | None]:
    from aecore.base import Autoencoder  # torch: only once a plugin is loaded

    if not NAME_PATTERN.match(entry.name):
        return None, (
            f"invalid model name {entry.name!r}: use lowercase letters, digits, '-' and '_'"
        )
    module_name, attr = _target_parts(entry.target)
    try:
        obj = importlib.import_module(module_name)
        for part in attr.split(".") if attr else []:
            obj = getattr(obj, part)
    except KeyboardInterrupt:
        raise
    except BaseException as exc:  # a plugin's import may fail in any way, sys.exit too
        return None, f"import failed: {type(exc).__name__}: {exc}"
    if not (isinstance(obj, type) and issubclass(obj, Autoencoder)):
        return None, f"{entry.target} is {obj!r}, not a subclass of aecore.Autoencoder"
    if inspect.isabstract(obj):
        missing = ", ".join(sorted(getattr(obj, "__abstractmethods__", ())))
        return None, f"{entry.target} leaves abstract methods undefined: {missing}"
    return obj, None


def _target_parts(target: str) -> tuple[str, str]:
    """``module:attr`` of an entry point's value, without its extras (``[gpu]``)."""
    value = target.split("[", 1)[0]
    module_name, _, attr = value.partition(":")
    return module_name.strip(), attr.strip()


_entries: dict[str, ModelEntry] | None = None
_local: dict[str, type] = {}


def _discover() -> dict[str, ModelEntry]:
    global _entries
    if _entries is not None:
        return _entries
    found: dict[str, ModelEntry] = {}
    for dist in metadata.distributions():
        dist_name = dist.metadata["Name"] or "<unknown>"
        for ep in dist.entry_points:
            if ep.group != GROUP:
                continue
            claimant = f"{dist_name} {dist.version}"
            entry = found.get(ep.name)
            if entry is None:
                found[ep.name] = ModelEntry(
                    ep.name, ep.value, dist_name, dist.version, claimants=[claimant]
                )
            elif entry.target != ep.value or _norm(entry.distribution) != _norm(dist_name):
                # the same distribution seen twice on sys.path is not a conflict
                if claimant not in entry.claimants:
                    entry.claimants.append(claimant)
                    entry.targets.append(ep.value)
    for name, cls in _local.items():
        found[name] = ModelEntry(
            name,
            f"{cls.__module__}:{cls.__qualname__}",
            "<registered in process>",
            "",
            claimants=["<registered in process>"],
            _cls=cls,
            _loaded=True,
        )
    _entries = dict(sorted(found.items()))
    for entry in _entries.values():
        if entry.conflict:  # neither claimant can be used: say so once, not silently
            _warn(
                f"aecore {conflict_message(entry)}; that name is unusable until one is uninstalled"
            )
    return _entries


_warned: set[str] = set()


def _warn(message: str) -> None:
    """A broken or conflicting plugin, said once; never an exception, even where
    warnings are turned into errors (``-W error``, a plugin author's pytest settings):
    one broken package must not break listing the others (``create`` of its name still
    refuses, naming why)."""
    if message in _warned:  # a refresh (register, unregister) finds the same again
        return
    _warned.add(message)
    with contextlib.suppress(BrokenPluginWarning):
        warn(message, BrokenPluginWarning)


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def refresh() -> None:
    """Forget the cached entry-point table (after installing a plugin at run time), and
    which broken plugins were warned about."""
    _warned.clear()
    _forget_entries()


def _forget_entries() -> None:
    global _entries
    _entries = None
    metadata_cache = getattr(metadata, "_cache_clear", None)
    if metadata_cache:
        metadata_cache()


def register(name: str, cls: type) -> None:
    """Register a model class in this process only (tests, notebooks).

    Packages should use the ``aecore.models`` entry-point group instead, so the model
    can be found by ``aecore load`` in any process.
    """
    from aecore.base import Autoencoder  # torch: only once a model is registered

    if not NAME_PATTERN.match(name):
        raise RegistryError(
            f"invalid model name {name!r}: use lowercase letters, digits, '-' and '_'"
        )
    if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
        raise RegistryError(f"{cls!r} is not a subclass of aecore.Autoencoder")
    if inspect.isabstract(cls):  # as an entry point's class is listed broken for it
        missing = ", ".join(sorted(cls.__abstractmethods__))
        raise RegistryError(f"{cls.__name__} leaves abstract methods undefined: {missing}")
    existing = _discover().get(name)
    if existing is not None and existing.load() is not cls:
        raise RegistryError(
            f"model name {name!r} is already registered by {existing.distribution} "
            f"({existing.target})"
        )
    _local[name] = cls
    _forget_entries()


def unregister(name: str) -> None:
    """Undo ``register`` for a name registered in this process."""
    _local.pop(name, None)
    _forget_entries()


def model_entries() -> list[ModelEntry]:
    """Every registered name with its origin and status (``ok``, ``broken``, ``conflict``)."""
    return list(_discover().values())


#: what a model class can do, by name: what tests and tools select models by
CAPABILITIES: dict[str, Callable[[type], bool]] = {
    # takes vector inputs (D,), e.g. tabular data and the scikit-learn estimator
    "vector": lambda cls: 1 in cls.input_ranks,
    # takes image inputs (C, H, W)
    "image": lambda cls: 3 in cls.input_ranks,
    # trained by the Trainer's optimizer through loss(); multi-process training works
    "optimizer": lambda cls: bool(cls.uses_optimizer),
    # updates its own parameters in train_step()
    "own-update": lambda cls: not cls.uses_optimizer,
    "data-init": lambda cls: callable(getattr(cls, "init_from_data", None)),
    "pretrain": lambda cls: callable(getattr(cls, "pretrain", None)),
    "sample": lambda cls: callable(getattr(cls, "sample", None)),
    "demo": lambda cls: getattr(cls, "demo", None) is not None,
    # starts at PCA's solution with its defaults (reconstruction never worse than PCA's;
    # a denoiser's: of corrupted inputs, its training task)
    "pca-start": lambda cls: bool(getattr(cls, "pca_start", False)),
}


def capabilities(cls: str | type) -> frozenset[str]:
    """The CAPABILITIES names that hold for a model class, given as the class or as its
    registered name."""
    if isinstance(cls, str):
        cls = model_class(cls)
    elif not isinstance(cls, type):
        raise RegistryError(
            f"capabilities takes a model name or class; got {type(cls).__name__} "
            "(for a model instance, pass type(model))"
        )
    return frozenset(name for name, test in CAPABILITIES.items() if test(cls))


def list_models(
    include_broken: bool = False,
    *,
    filter: str | Iterable[str] = "",
    exclude_filters: str | Iterable[str] = (),
    requires: str | Iterable[str] = (),
) -> list[str]:
    """Names of the usable models (all names with ``include_broken=True``), sorted.

    ``filter`` / ``exclude_filters``: shell-style patterns (``"s*"``) a name must match
    one of / must match none of; ``requires``: capability names (``CAPABILITIES``) the
    model must all have, e.g. ``list_models(requires="vector")``.
    """
    include = _patterns(filter)
    exclude = _patterns(exclude_filters)
    needed = set(_patterns(requires))
    unknown = needed - set(CAPABILITIES)
    if unknown:
        raise RegistryError(
            f"unknown capabilit{'ies' if len(unknown) > 1 else 'y'} {sorted(unknown)}; "
            f"known: {', '.join(CAPABILITIES)}"
        )
    names = []
    for e in model_entries():
        usable = e.status == "ok"
        if not (include_broken or usable):
            continue
        if include and not any(fnmatch.fnmatchcase(e.name, p) for p in include):
            continue
        if any(fnmatch.fnmatchcase(e.name, p) for p in exclude):
            continue
        if needed and not (usable and needed <= capabilities(e.load())):
            continue
        names.append(e.name)
    return names


def _patterns(value: str | Iterable[str]) -> list[str]:
    if isinstance(value, str):
        return [value] if value else []
    return list(value)


def model_class(name: str) -> type:
    """The class registered as ``name``."""
    if not isinstance(name, str):
        raise RegistryError(f"model name must be a string; got {name!r}")
    entries = _discover()
    entry = entries.get(name)
    if entry is None:
        close = difflib.get_close_matches(name, list(entries), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(map(repr, close))}?" if close else ""
        available = ", ".join(e for e in entries if entries[e].status == "ok") or "none"
        raise RegistryError(f"unknown model {name!r}{hint} (available: {available})")
    if entry.conflict:
        raise RegistryError(conflict_message(entry))
    cls = entry.load()
    if cls is None:
        raise RegistryError(f"model {name!r} is broken: {entry.reason}")
    return cls


def hyperparameter_names(model: str | type) -> set[str] | None:
    """The hyperparameter keywords a model (a registry name or a class) takes besides
    input_shape and latent_dim, following ``**kwargs`` passed on to a parent class (the
    denoising model takes the ae's); None when they cannot be listed."""
    from aecore.base import Autoencoder  # torch: only when asked

    cls = model if isinstance(model, type) else model_class(model)
    names: set[str] = set()
    for klass in cls.__mro__:
        if "__init__" not in vars(klass):
            continue
        if not issubclass(klass, Autoencoder):
            return None  # **kwargs reach a constructor outside the plugin contract
        if klass is Autoencoder and klass is not cls:
            # the base takes no **kwargs: the class below read them itself
            return None
        passes_kwargs_on, own = False, set()
        for p in inspect.signature(klass.__init__).parameters.values():
            if p.kind is p.VAR_KEYWORD:
                passes_kwargs_on = True
            elif p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY):
                own.add(p.name)
        own -= {"self", "input_shape", "latent_dim"}
        if klass is not cls and not own and not passes_kwargs_on:
            return None  # nothing for **kwargs to reach here: the class below read them
        names |= own
        if not passes_kwargs_on:
            break
    return names


def check_hyperparameters(
    name: str, cls: type, hparams: Iterable[str], also: Iterable[str] = (), owner: str = ""
) -> None:
    """A ConfigError naming the closest known hyperparameter for an unknown one
    (``input_shape`` and ``latent_dim`` are known to every model); ``also``: the names
    of ``owner``'s own parameters (an estimator's), which a misspelling may be closest to."""
    allowed = hyperparameter_names(cls)
    if allowed is None:
        return
    for key in hparams:
        if key not in allowed and key not in ("input_shape", "latent_dim"):
            close = difflib.get_close_matches(key, sorted(allowed | set(also)), n=1)
            if close and close[0] not in allowed:
                raise ConfigError(
                    f"{key!r} is neither a parameter of {owner} nor a hyperparameter of "
                    f"model {name!r}; did you mean {close[0]!r}?"
                )
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"model {name!r} has no hyperparameter {key!r}{hint} "
                f"(its hyperparameters: {', '.join(sorted(allowed)) or 'none'})"
            )


def create(name: str, *, input_shape: Any, latent_dim: int, **hparams: Any):
    """Build the model registered as ``name``; an unknown hyperparameter is a
    ConfigError that names the closest one."""
    cls = model_class(name)
    check_hyperparameters(name, cls, hparams)
    model = cls(input_shape=input_shape, latent_dim=latent_dim, **hparams)
    if "input_shape" not in vars(model):  # every later use would fail far from the cause
        what = "super().__init__(input_shape=..., latent_dim=...)"
        raise RegistryError(f"{cls.__name__}.__init__ did not call {what}")
    return model


def name_of(model_or_cls: Any) -> str:
    """The registry name of a model instance or class. Entries whose target names the
    class are tried first, so saving a model imports no other plugin."""
    cls = model_or_cls if isinstance(model_or_cls, type) else type(model_or_cls)
    target = (cls.__module__, cls.__qualname__)
    entries = sorted(_discover().values(), key=lambda e: _target_parts(e.target) != target)
    for entry in entries:
        if entry.conflict:
            if target in (_target_parts(t) for t in [entry.target, *entry.targets]):
                raise RegistryError(
                    f"{cls.__module__}.{cls.__qualname__} cannot be saved by name: "
                    f"{conflict_message(entry)}; uninstall one of them"
                )
            continue
        if entry.load() is cls:
            return entry.name
    raise RegistryError(
        f"{cls.__module__}.{cls.__qualname__} is not a registered model: register it "
        f"under the '{GROUP}' entry-point group (or aecore.registry.register for a "
        f"process-local model) before saving it"
    )
