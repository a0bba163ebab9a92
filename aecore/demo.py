"""Deprecated alias: ``DemoRecipe`` lives in :mod:`aecore.config` (also
``aecore.DemoRecipe``) and the demo command in :mod:`aecore.cli.demo`. Kept so that
plugins written for earlier versions still import; it will be removed."""

import warnings

from aecore.config import DemoRecipe

warnings.warn(
    "aecore.demo is deprecated: use aecore.DemoRecipe (from aecore.config)",
    DeprecationWarning,
    stacklevel=2,
)

__all__ = ["DemoRecipe"]
