"""A model's ``get_config``, checked to rebuild the model before anything records it (a
checkpoint, a saved folder): a config that cannot would train for hours and then save a
folder that does not load."""

from __future__ import annotations

import inspect
import json
from typing import Any

from aecore.errors import ConfigError
from aecore.registry import hyperparameter_names


def config_json(model: Any, error: type[Exception] = ConfigError) -> str:
    """``model.get_config()`` as JSON, refused (``error``) where it would not rebuild the
    model: values JSON cannot hold, or hyperparameters left out (rebuilt at their
    defaults, the model would load or resume as another one, its weights not fitting)."""
    name = type(model).__name__
    config = model.get_config()
    try:
        text = json.dumps(config)
    except TypeError as exc:
        raise error(
            f"{name}.get_config() is not JSON-serialisable ({exc}): return plain numbers, "
            f"strings, lists and dicts"
        ) from None
    # the class's own declared keywords, and those it was given: one it passes its
    # parent through **kwargs unasked may be one it fixes (and leaves out on purpose)
    own = set(inspect.signature(type(model).__init__).parameters)
    own |= getattr(model, "_given_keywords", frozenset())
    declared = (hyperparameter_names(type(model)) or set()) & own
    left_out = sorted(declared - set(config))
    if left_out:
        raise error(
            f"{name}.get_config() leaves out the hyperparameter(s) {', '.join(left_out)}: "
            f"the saved model would be rebuilt with their defaults; return them too (on "
            f"super().get_config(), or self.base_config())"
        )
    return text
