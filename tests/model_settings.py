"""Small hyperparameters for the built-in models, so the registry-driven tests that
train every model stay fast. A model not listed here (a new plugin) is tested with its
own defaults."""

SMALL_HPARAMS = {
    "ae": {"hidden": [8]},
    "denoising": {"hidden": [8]},
    "vae": {"hidden": [8]},
    "deep": {"hidden": [8], "pretrain_epochs": 1},
    "conv": {"channels": [4]},
}


def small_hparams(name: str) -> dict:
    return dict(SMALL_HPARAMS.get(name, {}))
