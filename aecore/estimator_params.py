"""scikit-learn's ``get_params`` / ``set_params`` for an estimator that wraps a registry
model: its own parameters, plus the model's hyperparameters given as extra keywords
(kept in ``_hparams``), so ``clone`` and a grid over a hyperparameter work."""

from __future__ import annotations

from typing import Any

from aecore.errors import RegistryError
from aecore.registry import hyperparameter_names


class ModelHyperparameters:
    """Mixin, before scikit-learn's ``BaseEstimator``: the estimator's ``model``
    parameter names the registry model whose hyperparameters ``_hparams`` holds."""

    model: Any
    _hparams: dict[str, Any]

    def get_params(self, deep: bool = True) -> dict[str, Any]:
        return {**super().get_params(deep=deep), **self._hparams}

    def set_params(self, **params: Any):
        """scikit-learn's ``set_params``, the model's hyperparameters included; a new
        ``model`` drops the hyperparameters set for the old one that it does not take
        (a grid over models from one estimator), and is checked against the others."""
        own_names = set(self._get_param_names())
        own = {k: v for k, v in params.items() if k in own_names}
        extra = {k: v for k, v in params.items() if k not in own_names}
        # check everything before changing anything, against the model being set
        allowed = known_hyperparameters(own.get("model", self.model))
        for key in extra:
            if "__" in key or (allowed is not None and key not in allowed):
                valid = sorted(own_names | (allowed or set()))
                raise ValueError(
                    f"Invalid parameter {key!r} for estimator {self}. Valid parameters "
                    f"are: {valid!r} (hyperparameters of model "
                    f"{own.get('model', self.model)!r} included)."
                )
        kept = self._hparams
        if "model" in own and allowed is not None:
            kept = {k: v for k, v in kept.items() if k in allowed}
        super().set_params(**own)
        self._hparams = {**kept, **extra}
        return self


def known_hyperparameters(model: Any) -> set[str] | None:
    """The model's hyperparameter names; None when they cannot be known here (an unknown
    model name is reported by ``fit``, with the registry's message)."""
    try:
        return hyperparameter_names(model)
    except RegistryError:
        return None
