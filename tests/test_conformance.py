"""The conformance kit over every registered model: each new plugin is checked here."""

import pytest
import torch

import aecore
from aecore.testing import ConformanceError, check_autoencoder


@pytest.mark.parametrize("name", aecore.list_models())
def test_registered_model_conforms(name):
    assert check_autoencoder(name)


def test_kit_catches_a_model_that_breaks_the_contract():
    from aecore_plugins.ae import PlainAutoencoder

    class WrongCode(PlainAutoencoder):
        def encode(self, x):
            return super().encode(x)[:, :1]  # drops code units

    with pytest.raises(
        ConformanceError, match=r"WrongCode: shapes: encode gave \(1, 1\), expected \(1, 3\)"
    ):
        check_autoencoder(WrongCode)

    class LossyConfig(PlainAutoencoder):
        def get_config(self):
            config = super().get_config()
            del config["hidden"]
            return config

    with pytest.raises(ConformanceError, match="LossyConfig: config round trip"):
        check_autoencoder(LossyConfig, {"hidden": [7]})

    class Stochastic(PlainAutoencoder):
        def forward(self, x):
            return super().forward(x) + torch.rand_like(x)

    with pytest.raises(ConformanceError, match="not deterministic in eval mode"):
        check_autoencoder(Stochastic)


def test_kit_rejects_non_models():
    with pytest.raises(ConformanceError, match="is not a subclass of aecore.Autoencoder"):
        check_autoencoder(torch.nn.Linear)
