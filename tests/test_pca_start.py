"""Quality by default, for every registered model that starts at PCA (capability
``pca-start``, selected from the registry): its start is PCA's reconstruction (clipped
to the data's range where the model bounds its outputs), and through every entry point
with nothing set but a small budget it ends no worse than PCA at the same code size (a
denoising model: on corrupted inputs)."""

import numpy as np
import pytest
import torch
from model_settings import small_hparams

import aecore
from aecore.data import load_data
from aecore.layers import pca_basis
from aecore.training.evaluation import clearly_lower
from aecore_benchmarks.quality import entry_cli, entry_sklearn, entry_trainer

MODELS = aecore.list_models(requires="pca-start")
# random [0, 1] inputs are probabilities to the deep model's layer-wise RBMs
pytestmark = pytest.mark.filterwarnings("ignore:RBM.* got non-binary values")


def test_the_built_in_reconstruction_models_start_at_pca():
    assert {"ae", "conv", "deep", "denoising", "sparse"} <= set(MODELS)


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("code", [2, 30])
def test_the_start_is_pcas_reconstruction(name, code):
    caps = aecore.capabilities(aecore.model_class(name))
    data = load_data("digits" if "vector" in caps else "digits:image")
    x = torch.from_numpy(data.x[:400] / 16.0).float()
    torch.manual_seed(0)
    model = aecore.create(name, input_shape=data.shape, latent_dim=code, **small_hparams(name))
    with torch.no_grad():
        pretrain = getattr(model, "pretrain", None)
        if pretrain is not None:
            pretrain(lambda: iter(x.split(64)), lambda message: None)
        model.init_from_data(x)
        mean, comps = pca_basis(x, code)
        flat = x.reshape(len(x), -1).double()
        want = (flat - mean) @ comps.T @ comps + mean
        if model.input_range is not None:  # outputs bounded to the data's range
            want = want.clamp(*model.input_range)
        got = model.eval()(x).reshape(len(x), -1).double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


ENTRIES = {"trainer": entry_trainer, "cli": entry_cli, "sklearn": entry_sklearn}


@pytest.mark.parametrize("entry", ENTRIES)
@pytest.mark.parametrize("name", MODELS)
def test_no_worse_than_pca_with_the_defaults_on_a_small_budget(name, entry):
    caps = aecore.capabilities(aecore.model_class(name))
    if entry == "sklearn" and "vector" not in caps:
        pytest.skip("the scikit-learn estimator takes vectors")
    source = "digits" if "vector" in caps else "digits:image"
    for code in (2, 30):
        result = ENTRIES[entry](name, source, code, seed=0, epochs=3, **_model_args(name, entry))
        assert result["ratio"] <= 1.0, (code, result)


def _model_args(name: str, entry: str) -> dict:
    """A small pretraining budget where a model's default one is slow (deep's RBMs)."""
    return {"hparams": {k: v for k, v in small_hparams(name).items() if k == "pretrain_epochs"}}


def test_benchmark_rows_name_their_ratio_against_pca(tmp_path):
    from aecore_benchmarks.quality import main

    out = tmp_path / "q.json"
    assert main(["--models", "ae", "--datasets", "digits", "--codes", "8", "--entries",
                 "trainer", "--recipes", "none", "--json", str(out)]) == 0  # fmt: skip
    import json

    (row,) = json.loads(out.read_text())["defaults"]
    assert row["model"] == "ae" and row["code"] == 8 and row["entry"] == "trainer"
    assert row["ratio"] == pytest.approx(row["mse"] / row["pca_mse"])
    assert np.isfinite(row["pca_mse"]) and row["ratio"] < 1.0


@pytest.mark.parametrize("name, shape", [("ae", (32,)), ("conv", (2, 4, 4))])
def test_a_pca_start_is_kept_when_training_cannot_show_a_gain_on_validation(name, shape):
    # independent noise: nothing beyond PCA to learn, so what training finds on these
    # rows does not carry to the held-out ones
    rng = np.random.default_rng(0)
    x = rng.normal(size=(320, *shape)).astype(np.float32)
    train, val = x[:240], x[240:]
    torch.manual_seed(0)
    model = aecore.create(name, input_shape=shape, latent_dim=4)
    history = aecore.Trainer(epochs=20, patience=None, seed=0, progress=False).fit(
        model, train, val
    )
    assert history.kept_epoch == 0
    mean, comps = pca_basis(torch.from_numpy(train), 4)
    flat = torch.from_numpy(val).reshape(len(val), -1).double()
    want = (flat - mean) @ comps.T @ comps + mean
    got = model(torch.from_numpy(val)).detach().reshape(len(val), -1).double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)


def test_trained_weights_that_beat_the_pca_start_on_validation_are_kept():
    x = (load_data("digits").x / 16.0).astype(np.float32)
    torch.manual_seed(0)
    model = aecore.create("ae", input_shape=(64,), latent_dim=8)
    history = aecore.Trainer(epochs=5, seed=0, progress=False).fit(model, x[:1000], x[1000:1300])
    assert history.kept_epoch == 5


def test_a_gain_in_every_chunk_beats_the_start_however_unequal_the_chunks():
    # each chunk's loss falls to a third or less, but one chunk of hard rows carries
    # losses ten times the others': its gain alone spreads the absolute differences
    start = np.array([0.0268, 0.0173, 0.0247, 0.1538])
    trained = np.array([0.0107, 0.0094, 0.0089, 0.0494])
    assert clearly_lower(trained, start)
    assert not clearly_lower(start, trained)
    # gains of either sign do not show a gain, on any scale
    assert not clearly_lower(np.array([0.5, 2.0, 0.5, 2.0]), np.array([1.0, 1.0, 1.0, 1.0]))
    # losses that may be negative (a likelihood) compare as they are
    assert clearly_lower(np.array([-2.0, -3.1, -2.5]), np.array([-1.0, -2.0, -1.6]))
    assert not clearly_lower(np.array([0.1]), np.array([1.0]))  # one chunk: no noise estimate


def test_a_small_data_detector_keeps_its_trained_weights_when_every_chunk_gains():
    # breast cancer, benign as normal (285 training rows, 28 held out in 4 chunks): this
    # seed's best epoch gains clearly on the log scale, where chunks of unequal losses
    # count alike, and it is kept; judged on absolute gains, the start was
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    X, y = load_breast_cancer(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=0)
    detector = aecore.AnomalyDetector(random_state=2).fit(X_tr[y_tr == 1])
    assert detector.history_.kept_epoch == detector.history_.best_epoch > 0


@pytest.mark.parametrize("name", ["ae", "conv"])
def test_a_clipped_output_starts_at_pca_and_a_sigmoid_one_claims_no_pca_start(name):
    # a sigmoid maps PCA's solution elsewhere (a 0 pixel to 0.5: 59x PCA's error at code
    # 32 on digits), so the trainer's guard held to that start protected nothing
    caps = aecore.capabilities(name)
    data = load_data("digits" if "vector" in caps else "digits:image")
    x = torch.from_numpy(data.x[:300] / 16.0).float()
    clipped = aecore.create(name, input_shape=data.shape, latent_dim=30, output_activation="clip")
    assert clipped.pca_start and clipped.input_range == (0.0, 1.0)
    with torch.no_grad():
        clipped.init_from_data(x)
        mean, comps = pca_basis(x, 30)
        flat = x.reshape(len(x), -1).double()
        want = ((flat - mean) @ comps.T @ comps + mean).clamp(0, 1)
        got = clipped.eval()(x).reshape(len(x), -1).double()
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    sigmoid = aecore.create(
        name, input_shape=data.shape, latent_dim=30, output_activation="sigmoid"
    )
    assert not sigmoid.pca_start
