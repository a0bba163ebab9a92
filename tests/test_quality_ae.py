"""The README's `ae` row: the plain autoencoder on digits against PCA through the same
pipeline as `aecore train` (70/10/20 train/val/test, seed 0; PCA fitted on the training
rows). Measured 0.48x / 0.59x; the bounds leave a little room for other BLAS builds."""

import pytest

from aecore.pipeline import train


@pytest.mark.slow
@pytest.mark.parametrize(("code_size", "max_ratio"), [(8, 0.5), (30, 0.62)])
def test_ae_beats_pca_on_digits(code_size, max_ratio):
    result = train(
        "ae", "digits", None, latent_dim=code_size, epochs=200, seed=0, device="cpu", progress=False
    )
    m = result.metrics
    assert m["test_rows"] == 359
    assert m["test_mse"] <= max_ratio * m["pca_test_mse"], m
