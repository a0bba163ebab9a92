"""The base class every autoencoder plugin derives from (the plugin contract).

A subclass calls ``super().__init__(input_shape=..., latent_dim=...)`` and implements
``encode``, ``decode``, ``loss`` and ``get_config``. Everything else here is shared.
"""

from __future__ import annotations

import abc
import contextlib
import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from aecore.errors import ConfigError, DataError, ShapeError
from aecore.keywords import checked_keywords
from aecore.model_methods import (
    adapt_tensor_methods,
    check_score_override,
    record_given_keywords,
)


def check_input_shape(input_shape: Any) -> tuple[int, ...]:
    """``input_shape`` as a tuple of positive ints, without the batch axis."""
    if isinstance(input_shape, numbers.Integral) and not isinstance(input_shape, bool):
        input_shape = (input_shape,)
    if not isinstance(input_shape, Sequence) or isinstance(input_shape, str):
        raise ConfigError(
            f"input_shape must be a tuple of positive ints such as (64,) or (1, 28, 28); "
            f"got {input_shape!r}"
        )
    shape = tuple(input_shape)
    if not shape or not all(
        isinstance(d, numbers.Integral) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ConfigError(
            f"input_shape must be a non-empty tuple of positive ints; got {input_shape!r}"
        )
    return tuple(int(d) for d in shape)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int (numpy integers included) when it is at least 1."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1
    if not ok:
        raise ConfigError(f"{name} must be a positive int; got {value!r}")
    return int(value)


class Autoencoder(nn.Module, abc.ABC):
    """An autoencoder: ``encode`` to a ``(B, latent_dim)`` code, ``decode`` back.

    Optional hooks the trainer and tools use when a subclass defines them:

    * ``init_from_data(x)``: data-dependent initialisation (e.g. PCA) on a tensor of
      normalised training inputs, called before the first epoch of a fresh run of a
      model that has not been initialised, trained or loaded yet
      (``data_initialised``; fit sets it, so a second fit continues training).
    * ``needs_data_statistics`` / ``adopt_data_statistics(x)``: for a model whose weights
      are kept (``data_initialised``) but lack what ``init_from_data`` measures (an SAE
      imported from another library has no input scale): True makes fit call the
      method on the same rows, which must keep the model's function.
    * ``pretrain(batches, log)``: a pretraining stage run before fine-tuning (the deep
      autoencoder's layer-wise RBMs); ``batches()`` iterates over the training batches,
      ``log(message)`` reports progress to the user.
    * ``train_step(x) -> dict``: a model with its own update rule (an RBM) sets
      ``uses_optimizer = False`` and updates its parameters itself.
    * ``check_training_data(chunks) -> bool``: for such a model that checks each batch,
      the same checks once over in-memory training data (chunks of rows); True lets the
      trainer call ``train_step(x, checked=True)``, which skips them.
    * ``sample(n)``: draw ``n`` inputs from a generative model.
    * ``before_optimizer_step()`` / ``after_optimizer_step()``: called around each
      optimizer step (after backward; after the update), e.g. to project gradients
      and renormalise weights that live on a constraint set (an SAE's decoder rows).
    * ``lr_factor(progress) -> float``: what the trainer multiplies its learning rate
      by at ``progress`` (completed steps / the budget's steps, 0 to 1), e.g. a scale
      for the model's size and a decay at the end of the run.
    * ``set_progress(progress)``: the trainer says, before each step, how far through
      its budget the run is (0 to 1), for a model whose training changes over the
      run (an SAE's top-k warm-up).
    * ``saved_state_dict() -> dict``: the state ``aecore.save`` writes, when it differs
      from ``state_dict()`` (an equivalent form, e.g. with an input scale folded in);
      ``restore_saved_state(state) -> dict`` turns it back on ``aecore.load``.
    * ``default_normalize``: the data normalisation that ``aecore train`` and the
      estimators' ``normalize="auto"`` apply to a model that says so; without it they
      choose by the data (``aecore.data.units``).
    * ``overcomplete = True``: a code meant to be wider than the input (a sparse
      dictionary): ``aecore train`` warns where ``latent_dim`` is not.
    * ``evaluation_metrics(x_test, prepared) -> dict``: extra numbers for ``aecore eval``
      on (up to 20000 rows of) the normalised test split (floats; a ``"baselines"``
      dict of label -> test MSE adds rows to its table). A loaded model has
      ``metadata`` (its ``model.json``), whose ``"training"`` is its run's TrainConfig.
    * ``demo_figures(prepared, out_dir) -> list[(caption, path)]``: extra demo figures.
    """

    #: input ranks (without the batch axis) the model accepts; conv models say (3,)
    input_ranks: ClassVar[tuple[int, ...]] = (1, 2, 3)
    #: False for models that update their own parameters in ``train_step``
    uses_optimizer: ClassVar[bool] = True
    #: an ``aecore.DemoRecipe`` for ``aecore demo``, or None
    demo: ClassVar[Any] = None
    #: state-dict keys that older versions of the model saved and loading now ignores
    retired_state_keys: ClassVar[tuple[str, ...]] = ()
    #: hyperparameters added after a model was first released, with the values that
    #: rebuild a config saved before them (their defaults may differ)
    legacy_defaults: ClassVar[dict[str, Any]] = {}
    #: buffers renamed since the model was first released: {old name: new name}
    renamed_buffers: ClassVar[dict[str, str]] = {}
    #: True when, with its default hyperparameters, the model starts at PCA's solution
    #: (``init_from_data`` makes ``model(x)`` PCA's reconstruction at ``latent_dim``) and
    #: training can only improve on it (capability ``pca-start``)
    pca_start: ClassVar[bool] = False
    #: the optimizer's learning rate when the training settings give none (``lr=None``)
    default_lr: ClassVar[float] = 1e-3
    #: hyperparameters that change only how a trained model scores, not its training: a
    #: resumed run may differ in them
    scoring_hparams: ClassVar[tuple[str, ...]] = ()

    def __setstate__(self, state: dict[str, Any]) -> None:
        # a model pickled by an older version (a fitted estimator, say): its renamed
        # buffers under their new names, hyperparameters added since at legacy values
        buffers = state.get("_buffers", {})
        transient = state.get("_non_persistent_buffers_set", set())
        for old, new in self.renamed_buffers.items():
            if old in buffers and new not in buffers:
                buffers[new] = buffers.pop(old)
                if old in transient:
                    transient.discard(old)
                    transient.add(new)
        for name, value in self.legacy_defaults.items():
            state.setdefault(name, value)
        super().__setstate__(state)
        if _mark_weights_loaded not in self._load_state_dict_post_hooks.values():
            self.register_load_state_dict_post_hook(_mark_weights_loaded)

    @classmethod
    def real_valued_hparams(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters for real-valued data (Gaussian in place of Bernoulli units),
        which ``normalize="auto"`` (the estimators, ``aecore train``) sets on data
        neither in [0, 1] nor intensities from zero such as pixel counts. ``given`` (the
        caller's hyperparameters) always wins: return nothing where it sets the units."""
        return {}

    @classmethod
    def rescaled_hparams(cls, given: dict[str, Any]) -> dict[str, Any]:
        """Hyperparameters for data that ``normalize="auto"`` itself min-max scaled into
        [0, 1] as a whole (intensities such as pixel counts): values between 0 and 1
        are then the data's grey levels, which a model that expects binary data may
        take as they are (the RBM's ``probabilities``). ``given`` always wins."""
        return {}

    def __init__(self, *, input_shape: Sequence[int], latent_dim: int) -> None:
        super().__init__()
        shape = check_input_shape(input_shape)
        if len(shape) not in self.input_ranks:
            expected = " or ".join(f"{r}-D" for r in self.input_ranks)
            # grey images (H, W) for a model of (C, H, W): one channel axis is missing
            hint = ""
            if len(shape) == 2 and 3 in self.input_ranks:
                hint = "; grey images take a channel axis, (1, H, W): x[:, None]"
            elif len(shape) == 1 and 3 in self.input_ranks:
                side = math.isqrt(shape[0])
                square = f": rows of {shape[0]} values as (1, {side}, {side})" * (
                    side * side == shape[0]
                )
                hint = (
                    f"; images are (C, H, W){square}, or on the command line an image "
                    f"source (digits:image, colour_patches, images in a .npy)"
                )
            raise ConfigError(
                f"{type(self).__name__} accepts {expected} input shapes "
                f"(without the batch axis); got input_shape={shape}{hint}"
            )
        self.input_shape: tuple[int, ...] = shape
        self.latent_dim: int = check_positive_int("latent_dim", latent_dim)
        # set by aecore.load / the trainer: the data normalisation saved with the model
        self.normalization = None
        # True once init_from_data ran or weights were loaded (aecore.load, or the
        # user's load_state_dict): later fits keep the weights
        self.data_initialised = False
        self.register_load_state_dict_post_hook(_mark_weights_loaded)

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        check_score_override(cls)
        adapt_tensor_methods(cls)
        record_given_keywords(cls)

    def float_dtype(self) -> torch.dtype | None:
        """The dtype the model computes in: its first floating parameter's (or buffer's)."""
        # every tensor-taking method asks, so where that tensor lives is remembered; it is
        # looked up again there, so a conversion or a reassigned parameter is seen
        cached = self.__dict__.get("_dtype_source")
        if cached is not None:
            module, table, name = cached
            t = getattr(module, table).get(name)
            if t is not None and t.is_floating_point():
                return t.dtype
        for table in ("_parameters", "_buffers"):
            for module in self.modules():
                for name, t in getattr(module, table).items():
                    if t is not None and t.is_floating_point():
                        self.__dict__["_dtype_source"] = (module, table, name)
                        return t.dtype
        return None

    # -- the contract ---------------------------------------------------------------
    @abc.abstractmethod
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *input_shape) -> (B, latent_dim)``, deterministic."""

    @abc.abstractmethod
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, latent_dim) -> (B, *input_shape)``."""

    @abc.abstractmethod
    def loss(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training objective: ``{"loss": scalar, <named terms>...}``."""

    @abc.abstractmethod
    def get_config(self) -> dict[str, Any]:
        """JSON-able keywords that rebuild the model: ``type(m)(**m.get_config())``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.decode(self.encode(x))

    # -- shared helpers -------------------------------------------------------------
    @property
    def input_size(self) -> int:
        """Number of input features, ``prod(input_shape)``."""
        n = 1
        for d in self.input_shape:
            n *= d
        return n

    def base_config(self) -> dict[str, Any]:
        """The two keywords every model has, in JSON form; subclasses extend it."""
        return {"input_shape": list(self.input_shape), "latent_dim": self.latent_dim}

    def check_input(self, x: Any) -> None:
        """Raise a ShapeError unless ``x`` is a float tensor of shape (B, *input_shape)."""
        if not isinstance(x, torch.Tensor):
            raise ShapeError(
                f"{type(self).__name__} expects a torch.Tensor of shape "
                f"(B, {', '.join(map(str, self.input_shape))}); got {type(x).__name__}"
            )
        if not x.is_floating_point():
            raise ShapeError(
                f"{type(self).__name__} expects a floating-point tensor; got dtype {x.dtype}"
            )
        if torch.jit.is_tracing() or _is_exporting():
            return
        if tuple(x.shape[1:]) != self.input_shape or x.dim() != len(self.input_shape) + 1:
            expected = ", ".join(map(str, self.input_shape))
            raise ShapeError(
                f"{type(self).__name__} expects input of shape (B, {expected}); "
                f"got {tuple(x.shape)}"
            )

    def check_code(self, z: Any) -> None:
        if not isinstance(z, torch.Tensor) or z.dim() != 2 or z.shape[1] != self.latent_dim:
            got = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ShapeError(
                f"{type(self).__name__}.decode expects codes of shape "
                f"(B, {self.latent_dim}); got {got}"
            )

    #: the anomaly scores ``score(x, kind=...)`` offers; ``"reconstruction"`` for all
    score_kinds: ClassVar[tuple[str, ...]] = ("reconstruction",)
    #: the kind ``score`` uses by default: the one that detects anomalies best
    default_score_kind: ClassVar[str] = "reconstruction"
    #: the kinds an ONNX export can compute (deterministic: no fresh draws), whose detector
    #: thresholds the runtime then serves from the export's ``score`` graph
    exportable_score_kinds: ClassVar[tuple[str, ...]] = ("reconstruction",)
    #: forward passes per row that a kind costs (1 where absent): the ONNX runtime scores
    #: in batches that many times smaller, so memory stays as for a reconstruction
    score_passes: ClassVar[dict[str, int]] = {}

    @torch.no_grad()
    @checked_keywords
    def score(self, x: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        """Per-sample anomaly score, shape (B,), higher for a more anomalous row:
        ``"reconstruction"`` (the mean squared reconstruction error) or another of the
        model's ``score_kinds`` (None: ``default_score_kind``), of rows as given
        (``bounded_score``: beyond the ``input_range``, a row scores higher)."""
        kind = self.default_score_kind if kind is None else kind
        if kind not in self.score_kinds:
            raise ConfigError(
                f"{type(self).__name__} offers the scores {', '.join(self.score_kinds)}; "
                f"got kind={kind!r}"
            )
        self.check_input(x)
        finite = torch.isfinite(x.flatten(1)).all(1)
        if not bool(finite.all()):  # one read: a NaN score is above no threshold
            from aecore.detection import row_list

            rows = row_list((~finite).cpu().numpy())
            raise DataError(
                f"{type(self).__name__}.score: x holds NaN or infinite values (rows "
                f"{rows}): a detector cannot score them; drop or impute them first"
            )
        with eval_mode(self):
            return self.bounded_score(x, kind, self.anomaly_score)

    def bounded_score(self, x: torch.Tensor, kind: str, compute: Callable) -> torch.Tensor:
        """``kind``'s score of rows as given, rising as a row leaves the ``input_range``:
        the clipped row's reconstruction error against the row as given; another kind
        (nats summed over features), ``compute`` of the clipped row plus half the summed
        squared distance beyond (a unit-variance Gaussian's tail)."""
        bounds = self.input_range
        inside = x if bounds is None else x.clamp(*bounds)
        if kind == "reconstruction":
            return squared_error(self(inside), x)
        score = compute(inside, kind)
        if bounds is None:
            return score
        return score + 0.5 * (x - inside).pow(2).flatten(1).sum(1).to(score.dtype)

    def anomaly_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """The model's own scores (``score_kinds`` beyond ``"reconstruction"``): a model
        that lists such kinds defines this."""
        raise TypeError(
            f"{type(self).__name__} lists {kind!r} in score_kinds but defines no "
            f"anomaly_score(x, kind) to compute it"
        )

    def traceable_score(self, x: torch.Tensor, kind: str) -> torch.Tensor:
        """``anomaly_score`` in one pass that an ONNX export traces (no Python loops over
        chunks of rows or samples, no host checks): a model whose ``anomaly_score`` works
        in chunks overrides this with the same computation unchunked."""
        if kind == "reconstruction":
            return squared_error(self(x), x)
        return self.anomaly_score(x, kind)

    @property
    def input_range(self) -> tuple[float, float] | None:
        """The range the model's inputs must lie in (``(0.0, 1.0)`` for Bernoulli units
        or sigmoid outputs), or None for any real values: what the scikit-learn
        estimator's ``normalize="auto"`` follows."""
        return None

    def extra_repr(self) -> str:
        return f"input_shape={self.input_shape}, latent_dim={self.latent_dim}"


def squared_error(x_hat: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mean squared error of each row, (B,): the reconstruction error."""
    return (x_hat - x).pow(2).flatten(1).mean(1)


def current_state_keys(model: Any, state: dict[str, Any]) -> dict[str, Any]:
    """A state dict written by an older version of the model with today's keys: its
    ``retired_state_keys`` dropped and its ``renamed_buffers`` under their new names."""
    retired = set(getattr(model, "retired_state_keys", ()))
    state = {k: v for k, v in state.items() if k not in retired}
    for old, new in getattr(model, "renamed_buffers", {}).items():
        if old in state and new not in state:
            state[new] = state.pop(old)
    return state


def _mark_weights_loaded(module: nn.Module, _incompatible_keys: Any) -> None:
    module.data_initialised = True


adapt_tensor_methods(Autoencoder)


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """``module`` in eval mode inside the block; its previous mode restored after."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def _is_exporting() -> bool:
    """True while torch.export / the ONNX exporter traces the model (symbolic shapes)."""
    compiler = getattr(torch, "compiler", None)
    return bool(compiler is not None and compiler.is_compiling())
