"""The library's warnings point at the user's own line, however deep in aecore (or a
torch module call) they arise, and a run that holds out most of its rows says so."""

import warnings

import numpy as np
import pytest
import torch

import aecore
from aecore.errors import IgnoredSettingWarning


def _caught(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return caught


def _rbm_on_grey_values():
    model = aecore.create("rbm", input_shape=(5,), latent_dim=3)
    aecore.Trainer(epochs=1, val_fraction=0, progress=False).fit(model, torch.rand(16, 5))


def _patience_without_validation():
    model = aecore.create("ae", input_shape=(5,), latent_dim=2)
    aecore.Trainer(epochs=1, patience=2, val_fraction=0, progress=False).fit(
        model, torch.rand(16, 5)
    )


@pytest.mark.parametrize(
    ("call", "category", "text"),
    [
        (_rbm_on_grey_values, UserWarning, "non-binary values"),
        (_patience_without_validation, IgnoredSettingWarning, "patience=2 needs validation"),
    ],
)
def test_a_warning_names_the_users_line(call, category, text):
    ours = [w for w in _caught(call) if issubclass(w.category, category) and text in str(w.message)]
    assert ours, "the warning was not raised"
    assert all(w.filename == __file__ for w in ours), [(w.filename, w.lineno) for w in ours]


def test_a_validation_split_larger_than_the_training_rows_is_named():
    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    with pytest.warns(UserWarning, match="holds out 99 of the 100 rows, so the model trains on 1"):
        aecore.Trainer(epochs=1, val_fraction=0.99, progress=False).fit(model, torch.rand(100, 4))
    x = np.random.default_rng(0).random((100, 4))
    with pytest.warns(UserWarning, match="^validation_fraction=0.9 holds out 90"):
        aecore.AnomalyDetector("ae", epochs=1, validation_fraction=0.9).fit(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # half and half is allowed without a word
        aecore.Trainer(epochs=1, val_fraction=0.5, progress=False).fit(model, torch.rand(100, 4))


def test_a_bottleneck_model_with_a_code_as_wide_as_its_rows_is_named(tmp_path):
    # `aecore train ae` on a 6-column CSV kept the default code of 8: the model copied
    # its input and an outlier 25 standard deviations out scored 1e-11, as normal rows did
    from aecore.pipeline import train

    rows = np.random.default_rng(0).standard_normal((200, 6))
    np.save(tmp_path / "six.npy", rows)
    settings = {"epochs": 1, "val_fraction": 0, "progress": False}
    with pytest.warns(UserWarning, match=r"ae has a code of 8 for rows of 6 values: .* such as 3"):
        train("ae", f"npy:{tmp_path / 'six.npy'}", None, latent_dim=8, **settings)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a narrower code, or a sparse code, is meant
        train("ae", f"npy:{tmp_path / 'six.npy'}", None, latent_dim=3, **settings)
        train("sparse", f"npy:{tmp_path / 'six.npy'}", None, latent_dim=8, **settings)
    # whatever the model's start (linear_path=False: no PCA start, the same copy)
    with pytest.warns(UserWarning, match=r"ae has a code of 8 for rows of 6 values"):
        train("ae", f"npy:{tmp_path / 'six.npy'}", None, latent_dim=8,
              hparams={"linear_path": False}, **settings)  # fmt: skip


def test_rows_in_data_units_for_a_model_carrying_a_normalisation_are_named():
    # pixels 0..255 trained a model whose saved normalisation divides by 255: it served
    # scores of ~3000 where `aecore train` on the same images gives ~0.02, without a word
    pixels = np.random.default_rng(0).integers(0, 256, (64, 3, 5, 7)).astype(np.uint8)

    def fit(rows):
        model = aecore.create("conv", input_shape=(3, 5, 7), latent_dim=4, channels=[4])
        model.normalization = aecore.Normalization.fit("minmax", pixels)
        aecore.Trainer(epochs=1, val_fraction=0, progress=False).fit(model, rows)
        return model

    with pytest.warns(UserWarning, match=r"these look like data units .*normalization.apply"):
        model = fit(pixels)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fit(model.normalization.apply(pixels).astype(np.float32))


def test_a_normalisation_that_does_not_fit_the_model_is_named_before_training():
    # (the data-units check applied it and failed with numpy's ValueError on the rows)
    from aecore.errors import ConfigError

    model = aecore.create("ae", input_shape=(6,), latent_dim=2)
    model.normalization = aecore.Normalization.fit(
        "standardize", np.random.default_rng(0).random((50, 5)), per_feature=True
    )
    with pytest.raises(ConfigError, match=r"normalization does not fit: .* 5 features; the model"):
        aecore.Trainer(epochs=1, progress=False).fit(model, np.zeros((50, 6), np.float32))
