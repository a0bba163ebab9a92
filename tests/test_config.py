"""TrainConfig: the one source of training defaults, validated field by field, and what
takes its defaults from it (Trainer, the demo recipes, the scikit-learn estimator)."""

import dataclasses
import inspect

import pytest

import aecore
from aecore.config import DemoRecipe, TrainConfig
from aecore.errors import ConfigError
from aecore.sklearn import AutoencoderTransformer
from aecore_plugins.ae import PlainAutoencoder


def test_every_field_is_documented_and_the_defaults_validate():
    for field in dataclasses.fields(TrainConfig):
        assert len(field.metadata.get("help", "")) > 10, field.name
    assert TrainConfig().to_dict()["epochs"] == 50


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"epochs": 0}, r"epochs must be an int in \[1, inf\]; got 0"),
        ({"batch_size": 2.5}, r"batch_size must be an int"),
        ({"lr": 0}, r"lr must be a number in \(0, inf\); got 0"),
        ({"optimizer": "rmsprop"}, "optimizer must be one of 'adam', 'adamw', 'sgd', 'lbfgs'"),
        ({"patience": 0}, r"patience must be an int in \[1, inf\]; got 0"),
        ({"device": "tpu"}, "device must be one of 'auto', 'cpu', 'cuda'"),
        ({"shuffle": "yes"}, "shuffle must be true or false; got 'yes'"),
        ({"optimizer": "lbfgs", "grad_clip": 1.0}, "grad_clip does not apply to optimizer='lbfgs'"),
        ({"optimizer": "lbfgs", "weight_decay": 1e-4}, "weight_decay does not apply"),
    ],
)
def test_bad_settings_are_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**settings)


def test_replace_validates_and_names_unknown_settings():
    config = TrainConfig(epochs=3)
    assert config.replace(lr=1).lr == 1.0 and isinstance(config.replace(lr=1).lr, float)
    assert config.replace(lr=0.1).epochs == 3 and config.epochs == 3  # a copy
    with pytest.raises(ConfigError, match="has no training setting 'epoch'; did you mean 'epochs'"):
        config.replace(epoch=4)
    # the constructor too (the dataclass's own answer was a bare TypeError)
    with pytest.raises(ConfigError, match="TrainConfig has no training setting 'epoch'"):
        TrainConfig(epoch=4)
    with pytest.raises(ConfigError, match=r"lr must be a number in \(0, inf\)"):
        config.replace(lr=-1.0)


class _FastAutoencoder(PlainAutoencoder):
    default_lr = 3e-3


def test_no_learning_rate_means_the_models_own_default():
    dae = _FastAutoencoder(input_shape=(6,), latent_dim=2)
    ae = aecore.create("ae", input_shape=(6,), latent_dim=2)
    rbm = aecore.create("rbm", input_shape=(6,), latent_dim=2)
    assert TrainConfig().lr is None
    assert TrainConfig().for_model(dae).lr == dae.default_lr == 3e-3
    assert TrainConfig().for_model(ae).lr == 1e-3
    assert TrainConfig(lr=0.05).for_model(dae).lr == 0.05  # a given rate wins
    assert TrainConfig().for_model(rbm).lr is None  # its own rule has its own lr


def test_json_round_trip_and_records_without_newer_fields():
    config = TrainConfig(epochs=7, patience=None, grad_clip=2.0)
    assert TrainConfig.from_dict(config.to_dict()) == config
    older = {k: v for k, v in config.to_dict().items() if k != "checkpoint_every"}
    assert TrainConfig.from_dict(older) == config
    with pytest.raises(ConfigError, match="a training config must be a JSON object"):
        TrainConfig.from_dict([7])


def test_trainer_takes_a_config_and_keyword_overrides():
    config = TrainConfig(epochs=7, lr=0.01)
    trainer = aecore.Trainer(config, epochs=2, device="cpu")
    assert trainer.config == TrainConfig(epochs=2, lr=0.01, device="cpu")
    assert aecore.Trainer().config == TrainConfig()
    with pytest.raises(ConfigError, match="no training setting 'epoch'"):
        aecore.Trainer(epoch=2)
    with pytest.raises(ConfigError, match="config must be an aecore.TrainConfig; got dict"):
        aecore.Trainer({"epochs": 2})


def test_demo_recipes_hold_the_settings_they_change():
    recipe = DemoRecipe(data="patches", latent_dim=100, epochs=20, optimizer="lbfgs", lr=1.0)
    assert recipe.train == TrainConfig(epochs=20, optimizer="lbfgs", lr=1.0)
    assert "train={'epochs': 20, 'lr': 1.0, 'optimizer': 'lbfgs'}" in repr(recipe)
    with pytest.raises(ConfigError, match="DemoRecipe has no training setting 'epoch'"):
        DemoRecipe(epoch=3)
    for name in aecore.list_models(requires="demo"):
        assert isinstance(aecore.model_class(name).demo.train, TrainConfig)


def test_the_estimator_defaults_are_the_configs():
    defaults = inspect.signature(AutoencoderTransformer).parameters
    for name in ("epochs", "batch_size", "patience"):
        assert defaults[name].default == getattr(TrainConfig(), name)
