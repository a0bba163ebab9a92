"""The base class contract and the `ae` plugin's own behaviour and errors."""

import pytest
import torch

import aecore
from aecore.errors import ConfigError, ShapeError


class Halving(aecore.Autoencoder):
    """encode keeps the first feature, halved; decode puts it back in every feature."""

    def encode(self, x):
        return x.flatten(1)[:, :1] / 2

    def decode(self, z):
        return z.expand(-1, self.input_size).reshape(-1, *self.input_shape)

    def loss(self, x):
        return {"loss": (self(x) - x).pow(2).mean()}

    def get_config(self):
        return self.base_config()


def test_forward_decodes_the_code_and_score_is_the_mean_squared_error_per_row():
    m = Halving(input_shape=[1, 1, 2], latent_dim=1)
    assert m.input_shape == (1, 1, 2) and m.input_size == 2
    assert m.get_config() == {"input_shape": [1, 1, 2], "latent_dim": 1}
    x = torch.tensor([[[[2.0, 4.0]]], [[[0.0, 1.0]]]])
    # rows reconstruct as [1, 1] and [0, 0]: errors (1 + 9) / 2 and (0 + 1) / 2
    assert m(x).flatten(1).tolist() == [[1.0, 1.0], [0.0, 0.0]]
    m.train()
    assert m.score(x).tolist() == [5.0, 0.5]
    assert m.training  # score evaluates in eval mode and puts the mode back
    with pytest.raises(ShapeError, match=r"Halving expects input of shape \(B, 1, 1, 2\)"):
        m.score(torch.zeros(2, 2))


def test_abstract_methods_are_required():
    class Incomplete(aecore.Autoencoder):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Incomplete(input_shape=(3,), latent_dim=1)


def test_a_score_override_without_a_kind_is_refused_naming_the_hooks_to_define():
    # the README once listed score(x) as a hook: such a plugin crashed the detectors and
    # the conformance kit with "unexpected keyword argument 'kind'", and served models
    # bypassed it in silence
    with pytest.raises(TypeError, match=r"OwnScore overrides score\(x\) without a kind: .*"
                       r"anomaly_score\(x, kind\).*score_kinds"):  # fmt: skip

        class OwnScore(Halving):
            def score(self, x):
                return (self(x) - x).abs().flatten(1).mean(1)

    class L1Score(Halving):  # the contract: a kind of its own, scored through score()
        score_kinds = ("reconstruction", "l1")
        default_score_kind = "l1"

        def anomaly_score(self, x, kind):
            return (self(x) - x).abs().flatten(1).mean(1)

    x = torch.tensor([[[[2.0, 4.0]]]])
    assert L1Score(input_shape=[1, 1, 2], latent_dim=1).score(x).tolist() == [2.0]

    class PassesKind(Halving):  # a pass-through reaches the base's kind: allowed
        def score(self, x, **kwargs):
            return super().score(x, **kwargs)

    assert PassesKind(input_shape=[1, 1, 2], latent_dim=1).score(x).tolist() == [5.0]


@pytest.mark.parametrize(
    ("shape", "message"),
    [
        ((5, 7), r"expects input of shape \(B, 6\); got \(5, 7\)"),
        ((6,), r"expects input of shape \(B, 6\); got \(6,\)"),
        ((2, 1, 6), r"expects input of shape \(B, 6\); got \(2, 1, 6\)"),
    ],
)
def test_wrong_input_shape_says_expected_and_got(shape, message):
    m = aecore.create("ae", input_shape=(6,), latent_dim=2)
    with pytest.raises(ShapeError, match=message):
        m(torch.rand(shape))


def test_wrong_input_type_and_dtype():
    m = aecore.create("ae", input_shape=(6,), latent_dim=2)
    with pytest.raises(ShapeError, match=r"expects a torch.Tensor of shape \(B, 6\); got list"):
        m.encode([[0.0] * 6])
    with pytest.raises(
        ShapeError, match="expects a floating-point tensor; got dtype torch.complex"
    ):
        m(torch.zeros(2, 6, dtype=torch.complex64))
    # integer and bool rows are computed in the model's dtype, as training casts them
    counts = torch.arange(12).reshape(2, 6)
    for method in (m, m.encode, m.score):
        torch.testing.assert_close(method(counts), method(counts.float()))
    torch.testing.assert_close(m.encode(counts > 5), m.encode((counts > 5).float()))
    with pytest.raises(ShapeError, match=r"decode expects codes of shape \(B, 2\); got \(4, 3\)"):
        m.decode(torch.zeros(4, 3))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"input_shape": (0,)},
            "input_shape must be a non-empty tuple of positive ints; got \\(0,\\)",
        ),
        ({"input_shape": "64"}, "input_shape must be a tuple of positive ints"),
        ({"latent_dim": 0}, "latent_dim must be a positive int; got 0"),
        ({"hidden": [16, -1]}, "hidden must be a list of positive ints; got \\[16, -1\\]"),
        ({"activation": "swish9"}, "activation must be one of 'relu', .*; got 'swish9'"),
        ({"reconstruction": "l2"}, "reconstruction must be one of 'mse', 'bce'; got 'l2'"),
        ({"reconstruction": "bce"}, "reconstruction='bce' needs output_activation='sigmoid'"),
        ({"dropout": 1.0}, "dropout must be a number in \\[0, 1\\); got 1.0"),
        ({"init": "xavier"}, "init must be one of 'pca', 'random'; got 'xavier'"),
    ],
)
def test_ae_rejects_bad_hyperparameters(kwargs, message):
    args = {"input_shape": (6,), "latent_dim": 2, **kwargs}
    with pytest.raises(ConfigError, match=message):
        aecore.create("ae", **args)


def test_pca_init_reproduces_pca_before_training():
    torch.manual_seed(0)
    x = torch.randn(200, 10) @ torch.randn(10, 10)
    m = aecore.create("ae", input_shape=(10,), latent_dim=3)
    m.init_from_data(x)
    xc = x - x.mean(0)
    _, _, vh = torch.linalg.svd(xc, full_matrices=False)
    pca = xc @ vh[:3].T @ vh[:3] + x.mean(0)
    with torch.no_grad():
        assert torch.allclose(m(x), pca, atol=1e-4)


def test_bce_variant_outputs_probabilities():
    m = aecore.create(
        "ae", input_shape=(6,), latent_dim=2, output_activation="sigmoid", reconstruction="bce"
    )
    x = torch.rand(4, 6)
    y = m(x)
    assert ((y >= 0) & (y <= 1)).all()
    assert set(m.loss(x)) == {"loss", "recon"}
