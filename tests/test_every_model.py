"""What every registered model goes through, selected from the registry by capability
(so a new plugin is tested here without editing a list): training with the Trainer and
an exact resume, and the whole path of a user's model: ``aecore train`` on a data file,
the saved folder with its training config, ``aecore eval``, ONNX export and
``aecore.runtime`` (onnxruntime)."""

import json

import numpy as np
import pytest
import torch
from model_settings import small_hparams

import aecore
from aecore.cli import main
from aecore.errors import DataError, RegistryError, TrainingInterrupted
from aecore.runtime import OnnxAutoencoder
from aecore.training import Trainer

# random [0, 1] rows: Bernoulli units (rbm, vae, deep) read them as probabilities
pytestmark = pytest.mark.filterwarnings("ignore:RBM.* got non-binary values")


def _shape(name: str) -> tuple[int, ...]:
    return (16,) if "vector" in aecore.capabilities(aecore.model_class(name)) else (1, 4, 4)


def _rows(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((n, *shape)).astype(np.float32)


def _pixels(n: int, shape: tuple[int, ...], seed: int) -> np.ndarray:
    """Grey levels 0..10 with both extremes in every row (as in scanned digits), so a
    min-max scaling fitted on the training rows maps every split into [0, 1]."""
    x = np.random.default_rng(seed).integers(0, 11, (n, int(np.prod(shape)))).astype(np.float32)
    x[:, 0], x[:, -1] = 0.0, 10.0
    return x.reshape(n, *shape)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", aecore.list_models())
def test_training_resumed_after_an_epoch_ends_where_one_run_ends(name, tmp_path):
    shape = _shape(name)
    x, val = _rows(48, shape, 0), _rows(16, shape, 1)

    def run(epochs, stop_after_step=None, **kw):
        torch.manual_seed(0)
        model = aecore.create(name, input_shape=shape, latent_dim=3, **small_hparams(name))
        settings = {"batch_size": 16, "seed": 0, "device": "cpu", "progress": False}
        trainer = Trainer(epochs=epochs, **settings, **kw)
        if stop_after_step:  # as a signal handler would, during that training step
            hook = "loss" if model.uses_optimizer else "train_step"
            step, steps = getattr(model, hook), []

            def counted(*args, **kwargs):
                if model.training and (torch.is_grad_enabled() or hook == "train_step"):
                    steps.append(1)
                    if len(steps) == stop_after_step:
                        trainer.request_stop("test")
                return step(*args, **kwargs)

            setattr(model, hook, counted)
        history = trainer.fit(model, x, val)
        return model, history

    whole, whole_history = run(3)
    # stopped at the end of epoch 1 (3 steps of 16 rows), then resumed: the same budget,
    # so a model whose steps follow the run's progress (an SAE's decay) resumes exactly
    with pytest.raises(TrainingInterrupted):
        run(3, stop_after_step=3, out_dir=tmp_path)
    resumed, history = run(3, out_dir=tmp_path, resume=True)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    assert history.metric("train_loss") == pytest.approx(whole_history.metric("train_loss"))
    want, got = _weights(whole), _weights(resumed)
    assert want.keys() == got.keys()
    for key in want:
        assert torch.equal(want[key], got[key]), key


@pytest.mark.parametrize("name", aecore.list_models())
def test_train_save_eval_export_and_serve_through_onnxruntime(name, tmp_path, capsys):
    shape = _shape(name)
    np.save(tmp_path / "rows.npy", _pixels(120, shape, 2))
    out = tmp_path / "model"
    args = ["train", name, "--data", f"npy:{tmp_path / 'rows.npy'}", "--out", str(out)]
    args += ["--latent-dim", "3", "--epochs", "2", "--batch-size", "32", "--quiet"]
    for key, value in small_hparams(name).items():
        args += ["--set", f"{key}={json.dumps(value)}"]
    assert main(args) == 0, capsys.readouterr().err
    record = json.loads((out / "model.json").read_text())
    assert record["model"] == name
    cls = aecore.model_class(name)
    lr = cls.default_lr if cls.uses_optimizer else None  # the rate the run used
    assert record["training"] == {
        **aecore.TrainConfig().to_dict(),
        "epochs": 2,
        "batch_size": 32,
        "lr": lr,
    }

    capsys.readouterr()
    assert main(["eval", str(out), "--json"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["test_mse"] == pytest.approx(record["metrics"]["test_mse"], rel=1e-5)

    onnx_path = tmp_path / f"{name}.onnx"
    assert main(["export", str(out), "--out", str(onnx_path), "--all"]) == 0
    model = aecore.load(out)
    runtime = OnnxAutoencoder(onnx_path)
    rows = _pixels(5, shape, 3)
    with torch.no_grad():
        normalised = torch.from_numpy(model.normalization.apply(rows))
        want = model.normalization.invert(model(normalised).numpy())
    np.testing.assert_allclose(runtime.reconstruct(rows), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", aecore.list_models())
def test_float64_and_integer_inputs_compute_in_the_models_dtype(name):
    # torch.as_tensor(numpy_array) gives float64: every method taking a batch accepts it
    shape = _shape(name)
    torch.manual_seed(0)
    model = aecore.create(name, input_shape=shape, latent_dim=3, **small_hparams(name)).eval()
    x32 = torch.from_numpy(_rows(6, shape, 0))
    x64 = x32.double()
    torch.testing.assert_close(model.encode(x64), model.encode(x32))
    z = model.encode(x32)
    torch.testing.assert_close(model.decode(z.double()), model.decode(z))
    torch.testing.assert_close(model.score(x64), model.score(x32))
    torch.testing.assert_close(model(x64), model(x32))
    assert model.score(x64).dtype == torch.float32
    # integer rows (counts, 0/1 pixels) as training casts them
    ints = (x32 > 0.5).long()
    torch.testing.assert_close(model.encode(ints), model.encode(ints.float()))
    torch.testing.assert_close(model.score(ints), model.score(ints.float()))
    torch.manual_seed(1)
    loss64 = model.loss(x64)["loss"]
    torch.manual_seed(1)
    torch.testing.assert_close(loss64, model.loss(x32)["loss"])


@pytest.mark.parametrize("name", aecore.list_models())
def test_empty_batches_and_integer_codes(name):
    # no rows: scores and reconstructions of none; a loss of none is refused, not NaN
    # or an error from deep inside; codes as ints (binary states, one-hot rows) decode
    shape = _shape(name)
    model = aecore.create(name, input_shape=shape, latent_dim=3, **small_hparams(name)).eval()
    empty = torch.zeros(0, *shape)
    assert model.score(empty).shape == (0,)
    assert model(empty).shape == (0, *shape)
    with pytest.raises(DataError, match="needs at least one row"):
        model.loss(empty)
    ints = torch.tensor([[1, 0, 1], [0, 0, 1]])
    torch.testing.assert_close(model.decode(ints), model.decode(ints.float()))


def test_capabilities_take_a_name_or_a_class():
    assert aecore.capabilities("ae") == aecore.capabilities(aecore.model_class("ae"))
    with pytest.raises(RegistryError, match="pass type"):
        aecore.capabilities(aecore.create("ae", input_shape=(4,), latent_dim=2))


def test_numpy_ints_in_shapes_and_widths():
    import numpy as np

    model = aecore.create("ae", input_shape=(np.int64(8),), latent_dim=2, hidden=[np.int32(4)])
    assert model.input_shape == (8,) and type(model.input_shape[0]) is int
    assert model.get_config()["hidden"] == [4]


@pytest.mark.parametrize(
    ("name", "hparams", "unused"),
    [
        ("ae", {"hidden": [], "activation": "tanh", "dropout": 0.1}, "activation='tanh', dropout"),
        ("ae", {"linear_path": False, "init": "random"}, "init='random'"),
        ("denoising", {"corruption": "gaussian", "p": 0.5}, "p=0.5"),
        ("denoising", {"corruption": "masking", "sigma": 0.5}, "sigma=0.5"),
        ("vae", {"channels": [8]}, "channels=.8."),
        ("vae", {"decoder": "bernoulli", "min_decoder_std": 0.1}, "min_decoder_std=0.1"),
        ("rbm", {"chains": 10}, "chains=10"),
        ("rbm", {"visible": "gaussian", "probabilities": True}, "probabilities=True"),
        ("deep", {"hidden": [8], "pretrain": False, "pretrain_k": 3}, "pretrain_k=3"),
        ("deep", {"hidden": [8], "visible": "gaussian", "pretrain_lr": 0.5}, "pretrain_lr=0.5"),
        ("sae-relu", {"aux_coefficient": 0.5}, "aux_coefficient=0.5"),
    ],
)
def test_a_setting_without_effect_is_named(name, hparams, unused):
    from aecore.errors import IgnoredSettingWarning

    with pytest.warns(IgnoredSettingWarning, match=f"{unused}.* no effect"):
        aecore.create(name, input_shape=(16,), latent_dim=3, **hparams)


@pytest.mark.parametrize("name", aecore.list_models())
def test_defaults_and_saved_configs_name_no_unused_setting(name, tmp_path):
    import warnings

    from aecore.errors import IgnoredSettingWarning

    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        model = aecore.create(name, input_shape=_shape(name), latent_dim=3)
        aecore.save(model, tmp_path / "m")
        aecore.load(tmp_path / "m")
