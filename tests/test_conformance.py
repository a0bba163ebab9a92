"""The conformance kit: one test item per registered model, input shape and check (a
new plugin is checked here without editing anything), and the kit itself catching
models that break the contract."""

import pytest
import torch

import aecore
from aecore.testing import (
    CHECKS,
    ConformanceError,
    ModelSpec,
    check_autoencoder,
    check_config_round_trip,
    check_loss,
    check_rows_independent,
    check_scores_beyond_range,
    check_shapes,
    parametrize_with_checks,
)
from aecore_plugins.ae import PlainAutoencoder

# the kit feeds random [0, 1] inputs, which the rbm rightly reads as probabilities
pytestmark = pytest.mark.filterwarnings("ignore:RBM.* got non-binary values")


@parametrize_with_checks(aecore.list_models())
def test_registered_model_conforms(model, check):
    check(model)


class WrongCode(PlainAutoencoder):
    def encode(self, x):
        return super().encode(x)[:, :1]  # drops code units


class LossyConfig(PlainAutoencoder):
    def get_config(self):
        config = super().get_config()
        del config["hidden"]
        return config


class ConstantConfig(PlainAutoencoder):
    def get_config(self):  # reports the default whatever the model was built with
        return {**super().get_config(), "dropout": 0.0}


class Stochastic(PlainAutoencoder):
    def forward(self, x):
        return super().forward(x) + torch.rand_like(x)


class DoubleDecode(PlainAutoencoder):
    def decode(self, z):  # its export could not be served (a float64 output)
        return super().decode(z).double()


class TupleCode(PlainAutoencoder):
    def encode(self, x):  # (mu, logvar), as a VAE's encoder network gives them
        z = super().encode(x)
        return z, z


class BatchStatistics(PlainAutoencoder):
    def encode(self, x):  # centred on its batch: served codes would follow batch_size
        z = super().encode(x)
        return z - z.mean(0)


class UncheckedDecode(PlainAutoencoder):
    def decode(self, z):  # no check_code: a wrong width fails deep in torch
        return (self.decoder_mlp(z) + self.decoder_linear(z)).reshape(-1, *self.input_shape)


class ClippedScore(PlainAutoencoder):
    def bounded_score(self, x, kind, compute):  # a row beyond the range scored clipped
        inside = x.clamp(*self.input_range)
        return (self(inside) - inside).pow(2).flatten(1).mean(1)


class NoLossKey(PlainAutoencoder):
    def loss(self, x):
        return {"objective": super().loss(x)["loss"]}


@pytest.mark.parametrize(
    ("cls", "hparams", "check", "message"),
    [
        (WrongCode, {}, check_shapes, r"WrongCode: shapes: encode gave \(1, 1\), expected"),
        (DoubleDecode, {}, check_shapes, "decode returned torch.float64, but the model computes"),
        (TupleCode, {}, check_shapes, "encode returned a tuple; expected a tensor"),
        (
            UncheckedDecode,
            {},
            check_shapes,
            r"decode\(\) of shape \(2, 4\) raised RuntimeError: .*expected a ShapeError",
        ),
        (
            BatchStatistics,
            {},
            check_rows_independent,
            r"encode of a row differs by .* in a batch of 5 from the row alone",
        ),
        (
            ClippedScore,
            {"output_activation": "sigmoid"},
            check_scores_beyond_range,
            r"score\(x, kind='reconstruction'\) of a row with one feature at .* must rise",
        ),
        (NoLossKey, {}, check_loss, r"loss\(\) must return a dict with key 'loss'; got the keys"),
        (LossyConfig, {"hidden": [7]}, check_config_round_trip, "LossyConfig: config round"),
        # the defaults alone rebuild the same shapes: the left-out key is named
        (LossyConfig, {}, check_config_round_trip, r"leaves out the hyperparameters \['hidden'\]"),
        (Stochastic, {}, check_shapes, r"Stochastic: shapes: model\(x\) is not deterministic"),
        # a value that changes no shape nor output in eval mode is still compared
        (
            ConstantConfig,
            {"dropout": 0.3},
            check_config_round_trip,
            r"get_config\(\) reports dropout=0.0, but the model was built with dropout=0.3",
        ),
    ],
)
def test_each_check_catches_its_contract_break(cls, hparams, check, message):
    with pytest.raises(ConformanceError, match=message):
        check(ModelSpec(cls, (12,), hparams))


def test_values_a_model_stores_in_its_own_form_pass():
    # hidden=8 is kept as [8]: the config check once called that another model
    check_config_round_trip(ModelSpec(PlainAutoencoder, (12,), {"hidden": 8}))


def test_check_autoencoder_reports_every_failure_not_just_the_first():
    with pytest.raises(ConformanceError) as info:
        check_autoencoder(WrongCode)
    failures = str(info.value).splitlines()
    # both input shapes fail the shape check, and the checks whose calls crash on the
    # too-narrow code are reported as well instead of ending the run
    assert any(f.startswith("check_shapes(12,): WrongCode: shapes:") for f in failures)
    assert any(f.startswith("check_shapes(1, 8, 8): WrongCode: shapes:") for f in failures)
    assert any(
        f.startswith("check_loss(12,): WrongCode raised ShapeError: WrongCode.decode expects")
        for f in failures
    )
    names = check_autoencoder("ae", {"hidden": [8]})
    assert names == [f"{c.__name__}{s}" for s in ((12,), (1, 8, 8)) for c in CHECKS]


def test_parametrize_with_checks_gives_one_item_per_shape_and_check():
    mark = parametrize_with_checks(
        ["conv", ("ae", {"hidden": [4]}), ModelSpec(PlainAutoencoder, (3,))]
    )
    argnames, params = mark.args
    assert argnames == ("model", "check")
    ids = [p.id for p in params]
    names = [c.__name__ for c in CHECKS]
    assert ids == (
        [f"conv-image-{n}" for n in names]  # conv takes images only
        + [f"ae(hidden=[4])-vector-{n}" for n in names]
        + [f"ae(hidden=[4])-image-{n}" for n in names]
        + [f"PlainAutoencoder-vector-{n}" for n in names]
    )
    spec, check = params[len(names)].values
    assert spec == ModelSpec(aecore.model_class("ae"), (12,), {"hidden": [4]})
    assert check is CHECKS[0]


def test_kit_rejects_non_models():
    with pytest.raises(ConformanceError, match="is not a subclass of aecore.Autoencoder"):
        check_autoencoder(torch.nn.Linear)


def test_a_model_of_another_input_rank_is_pointed_at_model_spec():
    class Sequences(PlainAutoencoder):
        input_ranks = (2,)

    with pytest.raises(ConformanceError, match=r"input_ranks \(2,\) .*ModelSpec\(Sequences"):
        check_autoencoder(Sequences)
