"""The ``conv`` plugin: output shape equals input shape for any image size, depth and
kernel; ONNX export with standard ops only; errors; it learns digits better than PCA."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from aecore.errors import ConfigError, ShapeError
from aecore.pipeline import train
from aecore.testing import parametrize_with_checks
from aecore_plugins.conv import ConvAutoencoder, downsampled_sizes

DEEPER_BCE = {"channels": [4, 8, 8], "output_activation": "sigmoid", "reconstruction": "bce"}


# the defaults are checked by tests/test_conformance.py
@parametrize_with_checks([(ConvAutoencoder, {**DEEPER_BCE, "kernel_size": k}) for k in (2, 5)])
def test_conformance_other_kernels_and_bce(model, check):
    check(model)


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28), (1, 13, 17), (3, 17, 13), (2, 1, 1)])
def test_named_sizes_round_trip_and_train(shape):
    torch.manual_seed(0)
    model = ConvAutoencoder(input_shape=shape, latent_dim=5, channels=[8, 16])
    x = torch.rand(3, *shape)
    assert model.encode(x).shape == (3, 5)
    assert model(x).shape == x.shape
    model.loss(x)["loss"].backward()  # every parameter takes part
    assert all(p.grad is not None for p in model.parameters())


@settings(max_examples=25, deadline=None)
@given(
    channels_in=st.integers(1, 3),
    height=st.integers(1, 33),
    width=st.integers(1, 33),
    depth=st.integers(1, 4),
    kernel_size=st.integers(2, 6),
    batch=st.integers(1, 3),
)
def test_output_shape_equals_input_shape(channels_in, height, width, depth, kernel_size, batch):
    shape = (channels_in, height, width)
    model = ConvAutoencoder(
        input_shape=shape, latent_dim=3, channels=[4] * depth, kernel_size=kernel_size
    ).eval()
    x = torch.rand(batch, *shape)
    with torch.no_grad():
        z = model.encode(x)
        assert z.shape == (batch, 3)
        assert model.decode(z).shape == x.shape


@settings(max_examples=25, deadline=None)
@given(size=st.integers(1, 200), depth=st.integers(0, 6), kernel_size=st.integers(2, 9))
def test_downsampled_sizes_match_torch(size, depth, kernel_size):
    x = torch.zeros(1, 1, size, 1)
    sizes = [size]
    for _ in range(depth):
        x = torch.nn.functional.conv2d(
            x, torch.zeros(1, 1, kernel_size, 1), stride=(2, 1), padding=(kernel_size // 2, 0)
        )
        sizes.append(x.shape[2])
    assert downsampled_sizes(size, depth, kernel_size) == sizes


def test_onnx_export_of_an_odd_size_uses_standard_ops_and_matches(tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = ConvAutoencoder(input_shape=(1, 13, 17), latent_dim=4, channels=[4, 8]).eval()
    program = torch.onnx.export(
        model,
        (torch.rand(2, 1, 13, 17),),
        dynamic_shapes=({0: torch.export.Dim("batch")},),
        dynamo=True,
        verbose=False,
    )
    path = tmp_path / "conv.onnx"
    program.save(str(path))
    domains = {node.domain for node in onnx.load(str(path)).graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    session = ort.InferenceSession(str(path))
    x = torch.rand(5, 1, 13, 17)
    (got,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        assert torch.allclose(torch.as_tensor(got), model(x), atol=1e-5)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"input_shape": (64,)}, ConfigError, "accepts 3-D input shapes"),
        ({"input_shape": (8, 8)}, ConfigError, "got input_shape=(8, 8)"),
        ({"kernel_size": 1}, ConfigError, "kernel_size must be an int in [2, inf]; got 1"),
        ({"kernel_size": 3.0}, ConfigError, "kernel_size must be an int in [2, inf]; got 3.0"),
        ({"channels": []}, ConfigError, "channels must be a non-empty list of positive ints"),
        ({"channels": [8, 0]}, ConfigError, "channels must be a non-empty list"),
        ({"activation": "swish"}, ConfigError, "activation must be one of"),
        ({"reconstruction": "bce"}, ConfigError, "needs output_activation='sigmoid'"),
    ],
)
def test_bad_hyperparameters_are_named(kwargs, error, message):
    with pytest.raises(error) as info:
        ConvAutoencoder(**{"input_shape": (1, 8, 8), "latent_dim": 3, **kwargs})
    assert message in str(info.value)


def test_wrong_input_shape_is_a_shape_error():
    model = ConvAutoencoder(input_shape=(1, 13, 17), latent_dim=3)
    with pytest.raises(ShapeError, match=r"expects input of shape \(B, 1, 13, 17\)"):
        model(torch.rand(2, 1, 17, 13))
    with pytest.raises(ShapeError, match=r"codes of shape \(B, 3\)"):
        model.decode(torch.rand(2, 4))


@pytest.mark.slow
def test_learns_digits_better_than_pca():
    """A short run on 8x8 digit images with an 8-D code beats PCA with 8 components
    (about 0.7x PCA's test MSE after 12 epochs)."""
    result = train("conv", "digits:image", None, latent_dim=8, epochs=12, lr=3e-3, progress=False)
    assert result.metrics["ratio_to_pca"] < 0.9, result.metrics


def test_grey_images_without_a_channel_axis_are_told_to_add_one():
    with pytest.raises(ConfigError, match=r"grey images take a channel axis, \(1, H, W\)"):
        ConvAutoencoder(input_shape=(7, 9), latent_dim=2)
