"""A misspelt keyword to a public function names the closest one it takes, and is still
a TypeError, as Python's own error for it is."""

import inspect

import numpy as np
import pytest
import torch

import aecore
from aecore.activations import ce_loss_recovered, extract_activations
from aecore.errors import ConfigError, KeywordError
from aecore.keywords import checked_keywords
from aecore.sae.formats import load_sae
from aecore.sae.metrics import sae_metrics


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A saved ae with a detector, opened for serving from its folder and its export."""
    pytest.importorskip("onnxruntime")
    from aecore.runtime import OnnxAutoencoder

    x = np.random.default_rng(0).random((60, 6), dtype=np.float32)
    detector = aecore.AnomalyDetector("ae", latent_dim=2, epochs=1, random_state=0).fit(x)
    folder = tmp_path_factory.mktemp("served")
    aecore.save(detector.model_, folder / "model")
    aecore.export_onnx(detector.model_, folder / "model.onnx", part="all")
    return aecore.open_model(str(folder / "model")), OnnxAutoencoder(folder / "model.onnx")


def _ae():
    return aecore.create("ae", input_shape=(6,), latent_dim=2)


CALLS = {
    "create": (lambda: aecore.create("ae", input_shape=(6,), latent_dim=2, hiden=[3]), "hidden"),
    "TrainConfig": (lambda: aecore.TrainConfig(epoch=1), "epochs"),
    "Trainer.fit": (lambda: aecore.Trainer(epochs=1).fit(_ae(), torch.rand(8, 6), val_dat=0), "val_data"),
    "save": (lambda: aecore.save(_ae(), "unused", overwite=True), "overwrite"),
    "load": (lambda: aecore.load("unused", devices="cpu"), "device"),
    "export_onnx": (lambda: aecore.export_onnx(_ae(), "unused.onnx", opst=18), "opset"),
    "load_data": (lambda: aecore.load_data("digits", check_finit=False), "check_finite"),
    "prepare": (lambda: aecore.prepare("digits", normalise="none"), "normalize"),
    "score": (lambda: _ae().score(torch.rand(2, 6), knd="reconstruction"), "kind"),
    "extract_activations": (lambda: extract_activations("m", "d", ["h"], "o", shard_row=9), "shard_rows"),
    "ce_loss_recovered": (lambda: ce_loss_recovered(None, "h", None, None, batchsize=2), "batch_size"),
    "sae_metrics": (lambda: sae_metrics(None, None, truht=None), "truth"),
    "load_sae": (lambda: load_sae("unused", fromat="auto"), "format"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(CALLS))
def test_a_misspelt_keyword_names_the_closest_one(name):
    call, meant = CALLS[name]
    with pytest.raises(ConfigError, match=f"did you mean '{meant}'") as raised:
        call()
    if name not in ("create", "TrainConfig"):  # these take **hyperparameters
        assert isinstance(raised.value, KeywordError) and isinstance(raised.value, TypeError)


@pytest.mark.parametrize("method", ["predict", "predict_proba"])
def test_served_models_name_the_closest_keyword(served, method):
    # (encode, reconstruct and score keep Python's own error: the batch-1 serving path
    # does not pay for a wrapper)
    x = np.random.default_rng(0).random((3, 6), dtype=np.float32)
    for model in served:
        getattr(model, method)(x)  # the right call works
        typo = {"predict": "return_confidance", "predict_proba": "methd"}[method]
        with pytest.raises(KeywordError, match="did you mean"):
            getattr(model, method)(x, **{typo: 1})


def test_the_wrapper_keeps_the_signature_and_leaves_var_keyword_functions_alone():
    def takes(a, *, b=1):
        return a + b

    def any_keyword(**kwargs):
        return kwargs

    wrapped = checked_keywords(takes)
    assert wrapped(1, b=2) == 3 and inspect.signature(wrapped) == inspect.signature(takes)
    assert checked_keywords(any_keyword) is any_keyword
    with pytest.raises(
        KeywordError, match=r"takes\(\) takes no keyword 'zzz' \(its keywords: a, b\)"
    ):
        wrapped(1, zzz=2)
