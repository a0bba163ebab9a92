"""Training settings: ``TrainConfig``, the one source of training defaults.

``Trainer``, ``aecore.pipeline.train``, ``aecore train`` (its flags are generated from
the fields below), the demo recipes and the scikit-learn estimator all start from
``TrainConfig()``; a trained model folder stores the config of its run in ``model.json``
(``"training"``), so ``aecore eval`` and model hooks read what was actually used.

torch-free on purpose: the command line builds its parser from these fields before it
knows whether the command needs torch at all.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Any

from aecore import params
from aecore.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "lbfgs")
DEVICES = ("auto", "cpu", "cuda", *(f"cuda:{i}" for i in range(16)))


def _doc(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass(frozen=True)
class TrainConfig:
    """How a model is trained. Every field is validated on construction; ``replace``
    returns a validated copy with some fields changed."""

    epochs: int = field(
        default=50,
        metadata=_doc("passes over the training data (fewer when early stopping ends the run)"),
    )
    batch_size: int = field(default=64, metadata=_doc("rows per optimisation step"))
    lr: float | None = field(
        default=None,
        metadata=_doc(
            "learning rate of the optimizer (none: the model's default_lr, 1e-3 unless the "
            "model declares another)"
        ),
    )
    optimizer: str = field(
        default="adam",
        metadata=_doc(
            "adam, adamw, sgd (momentum 0.9) or lbfgs (full-batch quasi-Newton with a "
            "line search: use a batch_size of the whole data)"
        ),
    )
    weight_decay: float = field(
        default=0.0, metadata=_doc("the optimizer's weight decay (L2; decoupled for adamw)")
    )
    grad_clip: float | None = field(
        default=None, metadata=_doc("clip the global gradient norm to this value (none: off)")
    )
    val_fraction: float = field(
        default=0.1,
        metadata=_doc(
            "the share of the training rows held out (seeded) for early stopping and the "
            "best-weights choice when no validation data is given (0: train on every row "
            "and keep the final weights unless the start did better); aecore train splits "
            "its data with it"
        ),
    )
    patience: int | None = field(
        default=20,
        metadata=_doc(
            "early stopping: stop after this many epochs without a better (smoothed) "
            "validation loss, once it is clearly worse than the best (needs validation "
            "data; none: run every epoch)"
        ),
    )
    min_delta: float = field(
        default=0.0, metadata=_doc("a validation loss must beat the best by more than this")
    )
    smoothing: float = field(
        default=0.8,
        metadata=_doc(
            "early stopping judges an exponential moving average of the validation loss "
            "with this weight on the past (0: the raw loss), and restores the best epoch's "
            "weights only when the final ones are worse by more than the curve's noise: a "
            "small, noisy validation set neither stops a run early nor picks a lucky epoch"
        ),
    )
    seed: int = field(
        default=0,
        metadata=_doc(
            "seeds batch order, noise, sampling and data-dependent starts (a PCA start); "
            "other initial weights are drawn by aecore.create from torch's global seed "
            "(torch.manual_seed first; aecore train and the estimators do)"
        ),
    )
    device: str = field(default="auto", metadata=_doc("auto, cpu, cuda or cuda:N"))
    shuffle: bool = field(default=True, metadata=_doc("reshuffle the training rows every epoch"))
    checkpoint_every: int | None = field(
        default=None,
        metadata=_doc("also checkpoint every this many steps (none: at each epoch end only)"),
    )

    def __post_init__(self) -> None:
        # checked values are stored as Python ints and floats (numpy scalars from a grid
        # search included; lr=1 becomes 1.0): one JSON form
        def store(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        store("epochs", params.integer("epochs", self.epochs, low=1))
        store("batch_size", params.integer("batch_size", self.batch_size, low=1))
        if self.lr is not None:
            store("lr", params.number("lr", self.lr, low=0.0, low_open=True))
        params.choice("optimizer", self.optimizer, OPTIMIZERS)
        store("weight_decay", params.number("weight_decay", self.weight_decay, low=0.0))
        if self.grad_clip is not None:
            store("grad_clip", params.number("grad_clip", self.grad_clip, low=0.0, low_open=True))
        if self.patience is not None:
            store("patience", params.integer("patience", self.patience, low=1))
        store(
            "val_fraction",
            params.number("val_fraction", self.val_fraction, low=0.0, high=1.0, high_open=True),
        )
        store("min_delta", params.number("min_delta", self.min_delta, low=0.0))
        store(
            "smoothing",
            params.number("smoothing", self.smoothing, low=0.0, high=1.0, high_open=True),
        )
        # numpy's and the batch streams' seeds: 32 bits
        store("seed", params.integer("seed", self.seed, low=0, high=2**32 - 1))
        params.choice("device", self.device, DEVICES)
        if not isinstance(self.shuffle, bool):
            raise ConfigError(f"shuffle must be true or false; got {self.shuffle!r}")
        if self.checkpoint_every is not None:
            every = params.integer("checkpoint_every", self.checkpoint_every, low=1)
            store("checkpoint_every", every)
        if self.optimizer == "lbfgs":
            if self.grad_clip is not None:
                raise ConfigError(
                    "grad_clip does not apply to optimizer='lbfgs' (it line-searches)"
                )
            if self.weight_decay:
                raise ConfigError("weight_decay does not apply to optimizer='lbfgs'")

    def replace(self, **changes: Any) -> TrainConfig:
        """A copy with ``changes`` applied (unknown names are an error naming the fields)."""
        check_names(changes, "TrainConfig")
        return dataclasses.replace(self, **changes)

    def for_model(self, model: Any) -> TrainConfig:
        """This config as a run of ``model`` uses it: with no ``lr`` given, the model's
        ``default_lr`` (for a model trained by the optimizer), so records show the rate."""
        if self.lr is not None or not getattr(model, "uses_optimizer", True):
            return self
        return self.replace(lr=float(model.default_lr))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> TrainConfig:
        """A config from ``to_dict`` output (``model.json``); missing fields take the
        defaults, so records written before a field existed still load."""
        if not isinstance(data, dict):
            raise ConfigError(f"a training config must be a JSON object; got {data!r}")
        check_names(data, "the training config")
        return cls(**data)


FIELDS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def check_names(settings: dict[str, Any], where: str) -> None:
    """A ConfigError for keys that are not TrainConfig fields, with a close match."""
    from aecore.keywords import did_you_mean

    for key in settings:
        if key not in FIELDS:
            raise ConfigError(
                f"{where} has no training setting {key!r}{did_you_mean(key, FIELDS)} "
                f"(settings: {', '.join(FIELDS)})"
            )


def _named_fields_init(init):
    # the dataclass's own __init__ answers a misspelt keyword with a bare TypeError
    @functools.wraps(init)
    def checked(self, *args: Any, **settings: Any) -> None:
        check_names(settings, "TrainConfig")
        init(self, *args, **settings)

    return checked


TrainConfig.__init__ = _named_fields_init(TrainConfig.__init__)


class DemoRecipe:
    """How ``aecore demo`` trains a model class: the data source, code size,
    normalisation, hyperparameters and the training settings that differ from
    ``TrainConfig()``'s (given as keywords: ``DemoRecipe(data="digits", epochs=120)``).

    A plugin opts in with a class attribute ``demo = DemoRecipe(...)``.
    """

    __slots__ = ("data", "hparams", "latent_dim", "normalize", "train")

    def __getattr__(self, name: str) -> Any:
        # recipe.epochs, recipe.lr, ...: the training settings, read through the recipe
        if name in FIELDS:
            return getattr(self.train, name)
        raise AttributeError(f"DemoRecipe has no attribute {name!r}")

    def __init__(
        self,
        data: str = "digits",
        latent_dim: int = 8,
        *,
        normalize: str = "minmax",
        hparams: dict[str, Any] | None = None,
        **train_settings: Any,
    ) -> None:
        if not isinstance(data, str) or not data:
            raise ConfigError(f"DemoRecipe data must be a data source name; got {data!r}")
        self.data = data
        self.latent_dim = params.integer("latent_dim", latent_dim, low=1)
        self.normalize = params.choice("normalize", normalize, ("minmax", "standardize", "none"))
        self.hparams = dict(hparams or {})
        check_names(train_settings, "DemoRecipe")
        #: the recipe's TrainConfig
        self.train = TrainConfig(**train_settings)

    def __repr__(self) -> str:
        changed = {k: v for k, v in self.train.to_dict().items() if v != getattr(TrainConfig, k)}
        return (
            f"DemoRecipe(data={self.data!r}, latent_dim={self.latent_dim}, "
            f"normalize={self.normalize!r}, hparams={self.hparams!r}, train={changed!r})"
        )
