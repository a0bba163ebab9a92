"""What a user meets on the common path: saved work is never replaced or locked away
unasked, files are readable by whoever else serves them, and every bad input gets a
specific error."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch

import aecore
from aecore.errors import ConfigError, DataError, FileWriteError, ModelFileError, ShapeError
from aecore_plugins.ae import PlainAutoencoder

ROWS = np.random.default_rng(0).random((120, 16)).astype(np.float32)


def small(name="ae"):
    torch.manual_seed(0)
    return aecore.create(name, input_shape=(16,), latent_dim=4)


def fit(model, data=ROWS, **settings):
    settings = {"epochs": 1, "batch_size": 32, "progress": False, **settings}
    return aecore.Trainer(**settings).fit(model, data)


def test_saving_never_replaces_a_weights_file_it_did_not_write(tmp_path):
    # a Hugging Face folder holds model.safetensors and no model.json: it was replaced
    from safetensors.torch import load_file, save_file

    theirs = tmp_path / "hf"
    theirs.mkdir()
    save_file({"transformer.wte.weight": torch.ones(2)}, str(theirs / "model.safetensors"))
    with pytest.raises(ModelFileError, match=r"already holds model.safetensors \(not saved by"):
        aecore.save(small(), theirs)
    with pytest.raises(ConfigError, match=r"already holds a training run \(model.safetensors\)"):
        fit(small(), out_dir=theirs)
    assert list(load_file(str(theirs / "model.safetensors"))) == ["transformer.wte.weight"]
    aecore.save(small(), theirs, overwrite=True)  # asked for
    assert aecore.load(theirs).latent_dim == 4


def test_a_saved_model_loads_while_another_runs_checkpoint_shares_its_folder(tmp_path):
    # an overwriting run writes its checkpoint and metrics first: stopped (or still
    # running), it once left the previous model unloadable ("mixes runs")
    out = tmp_path / "m"
    model = small()
    fit(model, out_dir=out)
    aecore.save(model, out, overwrite=True)
    want = aecore.load(out).encode(torch.from_numpy(ROWS))
    other = small()
    fit(other, out_dir=tmp_path / "other")
    aecore.save(other, tmp_path / "other", overwrite=True)
    for name in ("checkpoint.safetensors", "metrics.jsonl"):  # as a stopped run leaves
        (out / name).write_bytes((tmp_path / "other" / name).read_bytes())
    with pytest.warns(UserWarning, match="another run wrote them.*do not describe this model"):
        loaded = aecore.load(out)
    torch.testing.assert_close(loaded.encode(torch.from_numpy(ROWS)), want)
    # weights from another run than model.json names are still refused
    (out / "model.safetensors").write_bytes((tmp_path / "other" / "model.safetensors").read_bytes())
    with pytest.raises(ModelFileError, match="mixes runs"):
        aecore.load(out)


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_written_files_follow_the_umask_like_any_other_file(tmp_path):
    # temp files are created 0600: a serving account could not read the models
    before = os.umask(0o022)
    try:
        aecore.save(small(), tmp_path / "m")
        from aecore.onnx import export_onnx

        export_onnx(small(), tmp_path / "m.onnx")
        (tmp_path / "m" / "model.json").chmod(0o640)  # a mode the user chose is kept
        aecore.save(small(), tmp_path / "m", overwrite=True)
    finally:
        os.umask(before)
    mode = lambda p: stat.S_IMODE(p.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "m" / "model.safetensors") == 0o644
    assert mode(tmp_path / "m.onnx") == 0o644
    assert mode(tmp_path / "m" / "model.json") == 0o640


def test_weights_loaded_with_load_state_dict_are_trained_on_not_replaced():
    # only aecore.load marked weights as trained: fit ran the PCA start over them
    given = {k: v + 0.1 for k, v in small().state_dict().items()}  # not any start
    model = small()
    model.load_state_dict(given)
    fit(model, lr=1e-12)
    for key, value in model.state_dict().items():
        torch.testing.assert_close(value, given[key], atol=1e-6, rtol=0)


def test_data_with_nan_or_inf_is_refused_with_its_row_and_feature():
    # ae's PCA start failed inside LAPACK; other models blamed the learning rate
    bad = ROWS.copy()
    bad[7, 3] = np.nan
    for name in ("ae", "vae"):
        with pytest.raises(DataError, match=r"data: nan at row 7, feature 3 \(1 non-finite"):
            fit(small(name), bad)
    val = ROWS[:20].astype(np.float64)
    val[2, 5] = np.inf
    with pytest.raises(DataError, match=r"val_data: inf at row 2, feature 5"):
        aecore.Trainer(epochs=1, progress=False).fit(small(), ROWS, val)
    with pytest.raises(DataError, match=r"inf at row 0, feature 0"):  # beyond float32
        fit(small(), np.full((10, 16), 1e300))


def test_bad_devices_seeds_and_output_folders_say_what_is_wrong(tmp_path):
    aecore.save(small(), tmp_path / "m")
    with pytest.raises(ConfigError, match="device must be 'auto', 'cpu', 'cuda' or 'cuda:N'"):
        aecore.load(tmp_path / "m", device="gpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            aecore.load(tmp_path / "m", device="cuda")
    with pytest.raises(ConfigError, match=r"seed must be an int in \[0, 4294967295\]"):
        aecore.TrainConfig(seed=2**45)
    (tmp_path / "afile").write_text("x")
    with pytest.raises(FileWriteError, match=r"could not create the folder .*afile/sub"):
        fit(small(), out_dir=tmp_path / "afile" / "sub")
    with pytest.raises(FileWriteError, match=r"lock file beside, .*afile/x.onnx"):
        from aecore.onnx import export_onnx

        export_onnx(small(), tmp_path / "afile" / "x.onnx")


@pytest.mark.parametrize("name", aecore.list_models(filter="*"))
def test_every_model_encodes_and_decodes_an_empty_batch(name):
    cls = aecore.registry.model_class(name)
    shape = (1, 8, 8) if 3 in getattr(cls, "input_ranks", (1,)) else (16,)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = aecore.create(name, input_shape=shape, latent_dim=4).eval()
    with torch.no_grad():
        z = model.encode(torch.zeros(0, *shape))
        assert z.shape == (0, 4)
        assert model.decode(z).shape == (0, *shape)


def test_train_says_where_the_code_size_and_input_shape_come_from(tmp_path):
    for item in ("latent_dim=3", "input_shape=[64]"):
        ran = subprocess.run(
            [sys.executable, "-m", "aecore", "train", "ae", "--data", "digits", "--epochs", "1",
             "--out", str(tmp_path / "r"), "--set", item],
            capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        key = item.split("=")[0]
        assert ran.returncode == 1 and f"error: {key} comes from" in ran.stderr, ran.stderr


def test_benchmark_counts_are_refused_below_one():
    from aecore_benchmarks.args import count, natural

    assert count("3") == 3 and natural("0") == 0
    for bad in ("0", "-3", "x"):
        with pytest.raises(Exception, match="expected a positive int"):
            count(bad)
    from aecore_benchmarks.sae_step import build_parser

    with pytest.raises(SystemExit):  # a ZeroDivisionError deep in the run, before
        build_parser().parse_args(["--batch-size", "0"])


def test_resume_refuses_other_training_rows(tmp_path):
    # a resume once went on over 50 of the 300 rows (or another split) without a word
    fit(small(), epochs=1, out_dir=tmp_path / "r")

    # a memory map of other rows, and the same values flipped (one sum), differ too
    np.save(tmp_path / "other.npy", ROWS[:, ::-1].copy())
    flipped = np.load(tmp_path / "other.npy", mmap_mode="r")
    for data, says in (
        (ROWS[:50], r"108 rows; this run gives 45 rows\)"),
        (ROWS + 1, "108 rows; this run gives 108 rows, other values"),
        (flipped, "108 rows; this run gives 108 rows, other values"),
        (np.ascontiguousarray(ROWS[:, ::-1]), "108 rows; this run gives 108 rows, other values"),
    ):
        trainer = aecore.Trainer(
            epochs=2, batch_size=32, progress=False, out_dir=tmp_path / "r", resume=True
        )
        with pytest.raises(ConfigError, match=rf"trained on other train data \({says}"):
            trainer.fit(small(), data)
    trainer = aecore.Trainer(
        epochs=2, batch_size=32, progress=False, out_dir=tmp_path / "r", resume=True
    )
    assert len(trainer.fit(small(), ROWS).epochs) == 2


def test_a_resumed_aecore_train_keeps_its_split_even_with_allowed_changes(tmp_path, capsys):
    # a new seed re-drew the split: 300 of 359 "test" rows had been trained on, and the
    # test MSE saved in model.json dropped by 7%
    from aecore.pipeline import train

    run = dict(latent_dim=4, out=tmp_path / "r", progress=False, batch_size=256)
    train("ae", "digits", epochs=1, **run)
    for changed in ({"seed": 5}, {"val_fraction": 0.2}):
        name, value = next(iter(changed.items()))
        with pytest.raises(ConfigError, match=rf"cannot resume with {name}={value}: .*test rows"):
            train("ae", "digits", epochs=2, resume=True, allow_changes=True, **changed, **run)
    with pytest.raises(ConfigError, match=r"other train data .*same data, split and seed"):
        train("ae", "digits", epochs=2, resume=True, allow_changes=True, split="stratified", **run)
    # an allowed change is said even without progress output
    train("ae", "digits", epochs=2, lr=2e-3, resume=True, allow_changes=True, **run)
    assert "with changed settings: lr 0.001 -> 0.002" in capsys.readouterr().err


def test_the_demo_replaces_only_a_folder_of_its_own(tmp_path):
    # `aecore demo --out DIR` once replaced the user's own model in DIR/ae unasked
    from aecore.cli.demo import DEMO_MARK, _claim, run

    aecore.save(small(), tmp_path / "mine" / "ae")
    with pytest.raises(ConfigError, match="holds files the demo did not write"):
        run(tmp_path / "mine", ["ae"], log=lambda *_: None)
    assert aecore.load(tmp_path / "mine" / "ae").latent_dim == 4
    earlier = tmp_path / "earlier"  # a demo folder from before the mark
    earlier.mkdir()
    (earlier / "report.md").write_text("# aecore demo\n")
    for folder in (tmp_path / "fresh", earlier):
        _claim(folder)
        assert (folder / DEMO_MARK).exists()


def test_a_sparsity_setting_of_another_penalty_is_named_not_ignored():
    from aecore.errors import IgnoredSettingWarning

    # penalty="auto" is l1 for a code narrower than the input: k was silently unused
    with pytest.warns(IgnoredSettingWarning, match=r"penalty='l1' does not use k=3 \(topk\)"):
        aecore.create("sparse", input_shape=(16,), latent_dim=4, k=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = aecore.create("sparse", input_shape=(16,), latent_dim=8, penalty="topk", k=5)
        config = {
            k: v for k, v in model.get_config().items() if k not in ("input_shape", "latent_dim")
        }
        aecore.create("sparse", input_shape=(16,), latent_dim=8, **config)


def test_a_deep_model_trains_on_from_the_weights_it_has():
    # a second fit (or one after from_rbms or aecore.load) reran the layer-wise
    # pretraining over the trained weights
    deep_class = aecore.registry.model_class("deep")
    model = aecore.create("deep", input_shape=(16,), latent_dim=4, hidden=[8], pretrain_epochs=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the RBMs' note on grey values
        fit(model, epochs=1)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        fit(model, lr=1e-12)
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, before[key], atol=1e-6, rtol=0)
        rbms = [
            aecore.create("rbm", input_shape=(16,), latent_dim=8, visible="gaussian"),
            aecore.create("rbm", input_shape=(8,), latent_dim=4),
        ]
        stacked = deep_class.from_rbms(rbms)
        assert stacked.visible == "gaussian" and stacked.data_initialised  # as given


@pytest.mark.parametrize("name", ["rbm", "vae"])
def test_a_float64_model_samples_in_float64(name):
    model = aecore.create(name, input_shape=(8,), latent_dim=3).double()
    assert model.sample(2).dtype == torch.float64


def test_a_csv_drops_only_a_header_and_tiny_data_is_refused_before_training(tmp_path):
    # a first data row with one missing cell was taken for a header: encode wrote 5 rows
    # for 6; 1 or 2 rows trained, then failed on an empty test split
    from aecore.data.files import read_csv

    (tmp_path / "h.csv").write_text("a,b\n1,2\n3,4\n")
    assert read_csv(str(tmp_path / "h.csv")).shape == (2, 2)
    (tmp_path / "m.csv").write_text(",2\n3,4\n")
    with pytest.raises(DataError, match=r"line 1: column 1 is empty \(a missing value"):
        read_csv(str(tmp_path / "m.csv"))
    np.save(tmp_path / "r2.npy", ROWS[:2])
    with pytest.raises(DataError, match="2 rows are too few .* at least one test row"):
        aecore.prepare(f"npy:{tmp_path / 'r2.npy'}")


def test_saving_an_estimator_says_to_save_its_model(tmp_path):
    X = np.random.default_rng(0).random((40, 10))
    detector = aecore.AnomalyDetector("ae", epochs=1, random_state=0).fit(X)
    with pytest.raises(ConfigError, match=r"save its model_"):
        aecore.save(detector, tmp_path / "d")
    assert not (tmp_path / "d").exists()


def test_a_run_that_fails_before_its_first_epoch_leaves_the_folder_as_it_was(tmp_path):
    # it left an empty metrics.jsonl that blocked the folder (neither a fresh run nor a
    # resume), and with --overwrite it emptied a saved model's training log
    from aecore.errors import TrainingError

    x = np.random.default_rng(0).random((64, 8)).astype(np.float32)

    def run(out, **settings):
        model = aecore.create("ae", input_shape=(8,), latent_dim=2)
        trainer = aecore.Trainer(epochs=1, batch_size=16, progress=False, out_dir=out, **settings)
        return trainer.fit(model, x)

    with pytest.raises(TrainingError, match="non-finite loss"):
        run(tmp_path / "new", lr=1e30)
    assert not (tmp_path / "new" / "metrics.jsonl").exists()
    run(tmp_path / "new")  # the folder takes a fresh run
    log = (tmp_path / "new" / "metrics.jsonl").read_bytes()
    with pytest.raises(TrainingError, match="non-finite loss"):
        run(tmp_path / "new", lr=1e30, overwrite=True)
    assert (tmp_path / "new" / "metrics.jsonl").read_bytes() == log
    # an empty log left by an older version does not block a fresh run
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "metrics.jsonl").write_bytes(b"")
    run(tmp_path / "old")


def test_a_resume_under_another_normalisation_says_what_differs(tmp_path):
    from aecore.data import Normalization
    from aecore.errors import ModelFileError

    model = small()
    model.normalization = Normalization("minmax", np.zeros(1), np.full(1, 16.0))
    fit(model, epochs=1, out_dir=tmp_path / "r")
    for norm, says in (
        # the same kind fitted on other rows: the data differs, not the setting
        (Normalization("minmax", np.zeros(1), np.full(1, 3.0)), r"other data \(normalised "
         r"by minmax \(one scale for all\) with scale 16 and shift 0; this data gives 3"),
        (Normalization("none"), "normalised by minmax .* this run normalises it not at all"),
    ):  # fmt: skip
        again = small()
        again.normalization = norm
        trainer = aecore.Trainer(
            epochs=2, batch_size=32, progress=False, out_dir=tmp_path / "r", resume=True
        )
        with pytest.raises(ModelFileError, match=says):
            trainer.fit(again, ROWS)


class _WideCode(PlainAutoencoder):
    """A plugin whose code is one column wider than its latent_dim."""

    def encode(self, x):
        z = super().encode(x)
        return torch.cat([z, z[:, :1]], 1)

    def decode(self, z):
        return super().decode(z[:, : self.latent_dim])


def test_a_plugin_giving_codes_of_another_width_is_refused_at_fit_and_when_served(tmp_path):
    # it trained, saved and served (5, 4) codes for latent_dim 3, and failed with numpy's
    # broadcast error once the batch size split the rows
    from aecore.testing.checks import registered

    model = _WideCode(input_shape=(6,), latent_dim=3)
    with pytest.raises(
        ShapeError, match=r"_WideCode.encode gave \(2, 4\) for 2 rows; expected \(2, 3\)"
    ):
        aecore.Trainer(epochs=1, progress=False).fit(model, torch.rand(20, 6))
    with registered(_WideCode):
        aecore.save(model, tmp_path / "m")
        served = aecore.open_model(str(tmp_path / "m"))
        rows = np.random.default_rng(0).random((5, 6), dtype=np.float32)
        for batch_size in (64, 2):
            with pytest.raises(ShapeError, match=r"its encoder part gave \(\d, 4\) .* expected"):
                served.encode(rows, batch_size=batch_size)
        served.reconstruct(rows)  # its other parts keep the contract
