"""SAEs in the SAELens and sparsify folder formats, both ways: sae-lens's own loader
and saver on one side (the real package), sparsify's layout and encoding written out
by hand on the other, the CLI, and the errors for every kind of bad input."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

import aecore
from aecore.cli import main
from aecore.data.normalization import Normalization
from aecore.errors import ConfigError, ModelFileError
from aecore.registry import name_of
from aecore.sae import format_common
from aecore.sae.formats import (
    detect_format,
    load_sae,
    load_saelens,
    load_sparsify,
    save_saelens,
    save_sparsify,
)

D, N, K = 16, 64, 6
HPARAMS = {
    "sae-topk": {"k": K},
    "sae-batchtopk": {"k": K},
    "sae-matryoshka": {"k": K, "prefixes": [8, 32, N]},
    "sae-relu": {},
    "sae-jumprelu": {},
}


@pytest.fixture(scope="module")
def sae_lens():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pytest.importorskip("sae_lens")


@pytest.fixture(scope="module")
def x():
    # far from unit mean square: the input scale the exports fold in is not 1
    g = torch.Generator().manual_seed(0)
    return torch.randn(128, D, generator=g) * 6 + 2


def make(name: str, x: torch.Tensor, seed: int = 1):
    """An aecore SAE started on ``x`` with biases and thresholds moved off their
    starting values, in eval mode."""
    torch.manual_seed(seed)
    model = aecore.create(name, input_shape=(D,), latent_dim=N, **HPARAMS[name])
    model.init_from_data(x)
    assert abs(float(model.input_scale) - 1) > 0.5
    with torch.no_grad():
        model.b_enc.add_(torch.randn(N) * 0.1)
        if name == "sae-jumprelu":
            model.rule.log_threshold.copy_(torch.empty(N).uniform_(0.02, 0.3).log())
        if name in ("sae-batchtopk", "sae-matryoshka"):
            model.rule.threshold.fill_(0.1)
    return model.eval()


def assert_same(model, encode, forward, x):
    """``model`` and another implementation's encode / forward agree on ``x``, and the
    code is neither empty nor dense."""
    with torch.no_grad():
        z = model.encode(x)
        torch.testing.assert_close(encode(x), z, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(forward(x), model(x), atol=1e-4, rtol=1e-4)
    active = (z != 0).float().sum(1).mean()
    assert 0 < active < N


# -- aecore -> SAELens -> sae-lens ------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "architecture"),
    [
        ("sae-topk", "topk"),
        ("sae-relu", "standard"),
        ("sae-jumprelu", "jumprelu"),
        ("sae-batchtopk", "jumprelu"),
        ("sae-matryoshka", "jumprelu"),
    ],
)
def test_sae_lens_loads_the_export_and_computes_the_same(sae_lens, x, tmp_path, name, architecture):
    model = make(name, x)
    save_saelens(model, tmp_path / "sae", hook_name="blocks.3.hook_resid_post")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg["architecture"] == architecture and (cfg["d_in"], cfg["d_sae"]) == (D, N)
    assert cfg["normalize_activations"] == "none" and cfg["apply_b_dec_to_input"] is True
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    assert theirs.cfg.metadata.hook_name == "blocks.3.hook_resid_post"
    assert_same(model, theirs.encode, theirs, x)
    # and back: the same aecore model, hyperparameters included
    back = load_saelens(tmp_path / "sae")
    assert name_of(back) == name and back.get_config() == model.get_config()
    assert back.data_initialised and back.normalization.kind == "none"
    assert_same(model, back.encode, back, x)


def test_loading_a_foreign_sae_as_a_model_folder_says_how_to_read_it(x, tmp_path):
    save_saelens(make("sae-topk", x), tmp_path / "sae")
    with pytest.raises(
        ModelFileError, match=r"a SAELens or sparsify SAE\? aecore.sae.formats.load_sae"
    ):
        aecore.load(tmp_path / "sae")


def test_the_export_folds_the_models_normalization(sae_lens, x, tmp_path):
    model = make("sae-topk", x)
    g = torch.Generator().manual_seed(3)
    shift, scale = torch.randn(D, generator=g), torch.rand(D, generator=g) + 0.5
    model.normalization = Normalization("standardize", shift.numpy(), scale.numpy())
    save_saelens(model, tmp_path / "sae")
    theirs = sae_lens.SAE.load_from_disk(tmp_path / "sae")
    norm = model.normalization
    with torch.no_grad():
        inside = torch.from_numpy(norm.apply(x.numpy()))
        torch.testing.assert_close(theirs.encode(x), model.encode(inside), atol=1e-5, rtol=1e-4)
        expected = torch.from_numpy(norm.invert(model(inside).numpy()))
        torch.testing.assert_close(theirs(x), expected, atol=1e-4, rtol=1e-4)


# -- sae-lens -> SAELens -> aecore ------------------------------------------------------
def _randomised(sae):
    torch.manual_seed(5)
    with torch.no_grad():
        for p in sae.parameters():
            p.normal_(0, 0.3)
        if hasattr(sae, "threshold"):
            sae.threshold.uniform_(0.0, 0.6)
    return sae.eval()


@pytest.mark.parametrize(
    ("kind", "options", "expected"),
    [
        ("TopK", {"k": K}, "sae-topk"),
        ("TopK", {"k": K, "rescale_acts_by_decoder_norm": True}, "sae-topk"),
        ("JumpReLU", {}, "sae-jumprelu"),
        ("Standard", {}, "sae-relu"),
        ("Standard", {"apply_b_dec_to_input": False}, "sae-relu"),
    ],
)
def test_sae_lens_saves_and_aecore_loads_the_same_function(
    sae_lens, x, tmp_path, kind, options, expected
):
    config = getattr(sae_lens, f"{kind}SAEConfig")(d_in=D, d_sae=N, **options)
    theirs = _randomised(getattr(sae_lens, f"{kind}SAE")(config))
    theirs.save_model(tmp_path / "sae")
    model = load_sae(tmp_path / "sae")
    assert name_of(model) == expected and not model.training
    assert_same(model, theirs.encode, theirs, x / 3)


def test_sae_lens_batchtopk_checkpoints_import_as_batchtopk(sae_lens, x, tmp_path):
    config = sae_lens.BatchTopKTrainingSAEConfig(d_in=D, d_sae=N, k=K)
    trained = _randomised(sae_lens.BatchTopKTrainingSAE(config))
    trained.topk_threshold = torch.tensor(0.4, dtype=torch.float64)
    trained.save_model(tmp_path / "checkpoint")  # the training form: batchtopk
    trained.save_inference_model(tmp_path / "inference")  # a JumpReLU
    inference = sae_lens.SAE.load_from_disk(tmp_path / "inference")
    for folder in ("checkpoint", "inference"):
        model = load_saelens(tmp_path / folder)
        assert name_of(model) == "sae-batchtopk" and model.rule.k == K
        assert_same(model, inference.encode, inference, x / 3)


@pytest.mark.parametrize("name", ["sae-batchtopk", "sae-matryoshka"])
def test_training_an_imported_batchtopk_goes_on_from_its_threshold(x, tmp_path, name):
    # the import counted no batches behind the threshold: the first training batch
    # replaced it outright, and the inference code's L0 jumped
    import copy

    save_saelens(make(name, x), tmp_path / "sae")
    imported = load_saelens(tmp_path / "sae")
    fresh = copy.deepcopy(imported)
    fresh.rule.threshold_batches.zero_()  # a first estimate, as the import once left it
    for model in (imported, fresh):
        model.train()
        model.set_progress(1.0)  # past any top-k warm-up: batch selection
        model.loss(x)
    moved, replaced = (float(m.rule.threshold) - 0.1 for m in (imported, fresh))
    assert abs(replaced) > 0.01
    assert abs(moved) <= 1.01 * imported.rule.THRESHOLD_RATE * abs(replaced)


# -- sparsify ---------------------------------------------------------------------------
def test_sparsify_round_trip(x, tmp_path):
    model = make("sae-topk", x)
    save_sparsify(model, tmp_path / "layers.3")
    cfg = json.loads((tmp_path / "layers.3" / "cfg.json").read_text())
    assert cfg["d_in"] == D and cfg["num_latents"] == N and cfg["k"] == K
    assert not cfg["transcode"] and not cfg["skip_connection"] and cfg["activation"] == "topk"
    shapes = {
        k: tuple(v.shape) for k, v in load_file(tmp_path / "layers.3" / "sae.safetensors").items()
    }
    assert shapes == {
        "encoder.weight": (N, D),
        "encoder.bias": (N,),
        "W_dec": (N, D),
        "b_dec": (D,),
    }
    assert detect_format(tmp_path / "layers.3") == "sparsify"
    back = load_sparsify(tmp_path / "layers.3")
    assert name_of(back) == "sae-topk" and back.k == K
    assert_same(model, back.encode, back, x)


def _sparsify_folder(path, *, n=N, k=K, **cfg_fields):
    """A folder as sparsify's SparseCoder.save_to_disk writes it (its key names and
    shapes), with random weights; returns them."""
    g = torch.Generator().manual_seed(7)
    weights = {
        "encoder.weight": torch.randn(n, D, generator=g) * 0.3,
        "encoder.bias": torch.randn(n, generator=g) * 0.1,
        "W_dec": torch.randn(n, D, generator=g) * 0.3,
        "b_dec": torch.randn(D, generator=g),
    }
    path.mkdir()
    save_file(weights, path / "sae.safetensors")
    cfg = {"activation": "topk", "expansion_factor": 4, "normalize_decoder": False,
           "num_latents": n, "k": k, "multi_topk": False, "skip_connection": False,
           "transcode": False, "d_in": D, **cfg_fields}  # fmt: skip
    (path / "cfg.json").write_text(json.dumps(cfg))
    return weights


def test_a_folder_in_sparsifys_layout_loads_with_sparsifys_encoding(x, tmp_path):
    w = _sparsify_folder(tmp_path / "sae")
    model = load_sparsify(tmp_path / "sae")

    def encode(x):  # sparsify: relu(encoder(x - b_dec)), the top k per row
        pre = torch.relu((x - w["b_dec"]) @ w["encoder.weight"].T + w["encoder.bias"])
        top = pre.topk(K, dim=1)
        return torch.zeros_like(pre).scatter(1, top.indices, top.values)

    assert_same(model, encode, lambda x: encode(x) @ w["W_dec"] + w["b_dec"], x / 6)


# -- the command line -------------------------------------------------------------------
def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("fmt", ["saelens", "sparsify"])
def test_cli_export_then_import_gives_the_same_model(x, tmp_path, capsys, fmt):
    model = make("sae-topk", x)
    aecore.save(model, tmp_path / "model")
    code, out, err = run(
        capsys, "export", tmp_path / "model", "--format", fmt, "--out", tmp_path / "sae"
    )
    assert code == 0, err
    assert "cfg.json" in out and detect_format(tmp_path / "sae") == fmt
    code, out, err = run(capsys, "import", tmp_path / "sae", "--out", tmp_path / "model2")
    assert code == 0 and "as sae-topk" in out, err
    back = aecore.load(tmp_path / "model2")
    assert back.metadata["data"]["imported_from"]["format"] == fmt
    assert_same(model, back.encode, back, x)
    # a second export into the same folder is refused in one line
    code, _, err = run(
        capsys, "export", tmp_path / "model", "--format", fmt, "--out", tmp_path / "sae"
    )
    assert code == 1 and "already exists" in err and "--overwrite" in err and err.count("\n") == 1
    assert (
        run(
            capsys,
            "export",
            tmp_path / "model",
            "--format",
            fmt,
            "--out",
            tmp_path / "sae",
            "--overwrite",
        )[0]
        == 0
    )


def test_cli_export_refuses_onnx_only_flags_and_non_sae_models(tmp_path, capsys):
    aecore.save(aecore.create("ae", input_shape=(D,), latent_dim=4), tmp_path / "ae")
    code, _, err = run(
        capsys, "export", tmp_path / "ae", "--format", "saelens", "--out", tmp_path / "s"
    )
    assert code == 1 and "expected an SAE model (sae-topk, " in err and "got ae" in err
    code, _, err = run(
        capsys, "export", tmp_path / "ae", "--format", "sparsify", "--out", tmp_path / "s", "--all"
    )
    assert code == 1 and "--part, --all and --opset apply to --format onnx only" in err
    args = ["export", tmp_path / "ae", "--out", tmp_path / "s"]
    code, _, err = run(capsys, *args, "--format", "saelens", "--opset", "99")
    assert code == 1 and "--opset apply to --format onnx only" in err
    code, _, err = run(capsys, *args[:-1], tmp_path / "m.onnx", "--hook-name", "blocks.0")
    assert code == 1 and "--hook-name applies to --format saelens only" in err
    code, _, err = run(capsys, "import", tmp_path / "ae", "--out", tmp_path / "m")
    assert code == 1 and "is an aecore model folder; expected a SAELens folder" in err


# -- errors -----------------------------------------------------------------------------
def test_an_existing_folder_is_replaced_only_with_overwrite(x, tmp_path):
    model = make("sae-relu", x)
    save_saelens(model, tmp_path / "sae")
    with pytest.raises(
        ModelFileError, match="already exists and is not empty; pass overwrite=True"
    ):
        save_saelens(model, tmp_path / "sae")
    save_saelens(model, tmp_path / "sae", overwrite=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(ModelFileError, match="holds files but no cfg.json: not a SAELens folder"):
        save_saelens(model, tmp_path / "other", overwrite=True)
    assert (tmp_path / "other" / "notes.txt").read_text() == "keep me"
    (tmp_path / "empty").mkdir()  # an empty folder is no saved SAE: written into
    save_sparsify(make("sae-topk", x), tmp_path / "empty")
    # a project folder with a cfg.json of its own was once replaced whole
    project = tmp_path / "project"
    (project / "src").mkdir(parents=True)
    (project / "cfg.json").write_text("{}")
    (project / "NOTES.md").write_text("keep me")
    with pytest.raises(ModelFileError, match=r"holds files a SAELens folder .* \(NOTES.md, src\)"):
        save_saelens(model, project, overwrite=True)
    assert (project / "NOTES.md").read_text() == "keep me" and (project / "src").is_dir()
    save_saelens(model, tmp_path / "empty", overwrite=True)  # one SAE folder over another


def test_a_saelens_topk_folder_of_the_layout_before_version_6_loads_as_topk(x, tmp_path):
    # "standard" with activation_fn "topk": sae-lens reads a TopK SAE; aecore read ReLU
    model = make("sae-topk", x)
    save_saelens(model, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    cfg.update(architecture="standard", activation_fn_str="topk", activation_fn_kwargs={"k": K})
    cfg.pop("k", None)
    (tmp_path / "sae" / "cfg.json").write_text(json.dumps(cfg))
    loaded = load_saelens(tmp_path / "sae")
    assert name_of(loaded) == "sae-topk" and loaded.rule.k == K
    assert_same(model, loaded.encode, loaded, x)


def test_a_failed_write_leaves_nothing_half_written(x, tmp_path, monkeypatch):
    model = make("sae-topk", x)
    save_saelens(model, tmp_path / "sae")
    before = {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()}

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(format_common.os, "fsync", fail)
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "sae", True)):
        with pytest.raises(OSError, match="disk full"):
            save_sparsify(model, target, overwrite=overwrite)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sae"]
    assert {p.name: p.read_bytes() for p in (tmp_path / "sae").iterdir()} == before


def test_non_sae_models_are_refused_by_name(x, tmp_path):
    ae = aecore.create("ae", input_shape=(D,), latent_dim=4)
    with pytest.raises(
        ConfigError, match=r"expected an SAE model \(sae-topk, sae-batchtopk, .*\); got ae"
    ):
        save_saelens(ae, tmp_path / "a")
    with pytest.raises(ConfigError, match="sparsify stores TopK SAEs only; got sae-relu"):
        save_sparsify(make("sae-relu", x), tmp_path / "b")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.fixture
def exported(x, tmp_path):
    save_saelens(make("sae-jumprelu", x), tmp_path / "sae")
    return tmp_path / "sae"


def _edit_cfg(folder, **changes):
    cfg = json.loads((folder / "cfg.json").read_text())
    cfg.update(changes)
    (folder / "cfg.json").write_text(json.dumps(cfg))


def _edit_weights(folder, file="sae_weights.safetensors", **changes):
    weights = load_file(folder / file)
    weights.update(changes)
    save_file(weights, folder / file)


def test_a_missing_weights_file_is_named(exported):
    (exported / "sae_weights.safetensors").unlink()
    with pytest.raises(
        ModelFileError,
        match=r"no sae_weights.safetensors \(expected cfg.json and sae_weights.safetensors; found cfg.json\)",
    ):
        load_saelens(exported)
    with pytest.raises(ModelFileError, match="not an SAE folder: expected a SAELens folder"):
        load_sae(exported)


def test_wrong_shapes_and_dtypes_are_named(exported):
    _edit_weights(exported, W_enc=torch.zeros(N, D))
    with pytest.raises(
        ModelFileError, match=rf"W_enc has shape \({N}, {D}\); expected \({D}, {N}\)"
    ):
        load_saelens(exported)
    _edit_weights(exported, W_enc=torch.zeros(D, N, dtype=torch.int64))
    with pytest.raises(ModelFileError, match="W_enc has dtype int64; expected float32, float64"):
        load_saelens(exported)
    _edit_weights(exported, W_enc=torch.zeros(D, N), extra=torch.zeros(1))
    with pytest.raises(ModelFileError, match="unexpected tensor extra"):
        load_saelens(exported)


def test_a_missing_tensor_is_named(exported):
    weights = load_file(exported / "sae_weights.safetensors")
    del weights["threshold"]
    save_file(weights, exported / "sae_weights.safetensors")
    with pytest.raises(ModelFileError, match="missing tensor threshold"):
        load_saelens(exported)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        (
            {"architecture": "gated"},
            "unsupported SAELens architecture 'gated'; aecore imports standard, topk, jumprelu",
        ),
        (
            {"normalize_activations": "layer_norm"},
            "normalize_activations is 'layer_norm'; aecore imports SAEs that take raw activations",
        ),
        ({"d_sae": "many"}, "d_sae must be an integer >= 1; got 'many'"),
        ({"dtype": "int8"}, "dtype 'int8' is not one of float32"),
    ],
)
def test_unsupported_saelens_configs_are_refused(exported, changes, message):
    _edit_cfg(exported, **changes)
    with pytest.raises(ModelFileError, match=message):
        load_saelens(exported)


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"transcode": True}, "a transcoder \\(transcode: true\\)"),
        ({"skip_connection": True}, "a skip connection \\(skip_connection: true, W_skip\\)"),
        ({"activation": "groupmax"}, "activation 'groupmax' is not supported"),
        ({"k": N + 1}, f"k must be an integer \\[1, {N}\\]; got {N + 1}"),
    ],
)
def test_unsupported_sparsify_folders_are_refused(tmp_path, fields, message):
    _sparsify_folder(tmp_path / "sae", **fields)
    with pytest.raises(ModelFileError, match=message):
        load_sparsify(tmp_path / "sae")


def test_sparsify_shape_mismatch_is_named(tmp_path):
    _sparsify_folder(tmp_path / "sae")
    _edit_cfg(tmp_path / "sae", num_latents=N // 2)
    with pytest.raises(
        ModelFileError, match=rf"encoder.weight has shape \({N}, {D}\); expected \({N // 2}, {D}\)"
    ):
        load_sparsify(tmp_path / "sae")


@pytest.mark.parametrize("name", list(HPARAMS))
def test_an_imported_sae_trains_on_as_the_saved_one(x, tmp_path, name):
    # an import has raw-unit weights and no input statistics: its loss was a sum of
    # squares in raw units with Adam sized for scaled weights, so training diverged and
    # fit silently went back to the start
    model = make(name, x)
    save_saelens(model, tmp_path / "sae")
    aecore.save(model, tmp_path / "native")
    imported, native = load_saelens(tmp_path / "sae"), aecore.load(tmp_path / "native")
    assert imported.needs_data_statistics and not native.needs_data_statistics
    with torch.no_grad():
        want = imported(x)
        imported.adopt_data_statistics(x)  # what fit does first: the function is kept
        torch.testing.assert_close(imported(x), want, atol=1e-4, rtol=1e-4)
    assert float(imported.input_scale) == pytest.approx(float(native.input_scale), rel=1e-5)
    assert float(imported.decoder_row_norm) == 1.0
    # saved and loaded again before training (what `aecore import` does): the decoder
    # rows' norm was once read as a folded input scale, and the loss ran 400x too large
    aecore.save(load_saelens(tmp_path / "sae"), tmp_path / "imported")
    reloaded = aecore.load(tmp_path / "imported")
    assert reloaded.needs_data_statistics
    imported = load_saelens(tmp_path / "sae")
    losses = {}
    for label, m in (("imported", imported), ("reloaded", reloaded), ("native", native)):
        torch.manual_seed(0)
        history = aecore.Trainer(epochs=3, batch_size=32, val_fraction=0, progress=False).fit(m, x)
        losses[label] = [e["train_loss"] for e in history.epochs]
        assert history.kept_epoch == 3
    assert losses["imported"] == pytest.approx(losses["native"], rel=1e-3)
    assert losses["reloaded"] == pytest.approx(losses["native"], rel=1e-3)


def test_the_hook_name_survives_an_import_and_a_second_export(x, tmp_path, capsys):
    # an imported SAE lost its hook point: exporting it again wrote hook_name null
    aecore.save(make("sae-jumprelu", x), tmp_path / "model")
    args = ["export", tmp_path / "model", "--format", "saelens"]
    assert run(capsys, *args, "--out", tmp_path / "a", "--hook-name", "blocks.2.hook_resid")[0] == 0
    assert run(capsys, "import", tmp_path / "a", "--out", tmp_path / "back")[0] == 0
    assert (
        run(capsys, "export", tmp_path / "back", "--format", "saelens", "--out", tmp_path / "b")[0]
        == 0
    )
    cfg = json.loads((tmp_path / "b" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == "blocks.2.hook_resid"
    # a name given on the command line wins
    out = tmp_path / "c"
    assert run(capsys, "export", tmp_path / "back", "--format", "saelens", "--out", out,
               "--hook-name", "blocks.3")[0] == 0  # fmt: skip
    assert json.loads((out / "cfg.json").read_text())["metadata"]["hook_name"] == "blocks.3"
