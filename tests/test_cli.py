"""The aecore command: train / eval / models / info / demo, and one-line errors."""

import argparse
import dataclasses
import json
import subprocess
import sys
import warnings

import numpy as np
import pytest

import aecore
from aecore.cli import main


def run(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def train_args(epochs, out):
    """A quick `aecore train ae` on digits into ``out``."""
    return [
        "train",
        "ae",
        "--data",
        "digits",
        "--latent-dim",
        "8",
        "--epochs",
        str(epochs),
        "--out",
        str(out),
        "--quiet",
        "--set",
        "hidden=[32]",
    ]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "ae8"
    code = main(train_args(3, out))
    assert code == 0
    return out


def test_train_writes_a_model_folder_with_metrics_and_checkpoint(trained):
    names = {p.name for p in trained.iterdir()}
    assert {"model.json", "model.safetensors", "metrics.jsonl", "checkpoint.safetensors"} <= names
    record = json.loads((trained / "model.json").read_text())
    assert record["config"]["hidden"] == [32]
    assert record["data"]["source"] == "digits" and record["data"]["split"]["test"] == 359
    assert record["normalization"]["kind"] == "minmax"
    assert record["metrics"]["pca_test_mse"] > 0
    # the run's training settings: the flags given over TrainConfig's defaults
    assert record["training"] == {**aecore.TrainConfig().to_dict(), "epochs": 3, "lr": 1e-3}


def test_every_training_setting_is_a_flag_with_the_library_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for field in dataclasses.fields(aecore.TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        assert flag in help_text, flag
        default = "none" if field.default is None else str(field.default).lower()
        assert f"(default: {default})" in help_text, field.name


def test_optional_settings_take_none_and_unknown_values_are_named(tmp_path, capsys):
    from aecore.cli.train import add_config_flags, config_from_args

    parser = argparse.ArgumentParser()
    add_config_flags(parser)
    args = parser.parse_args(["--patience", "none", "--grad-clip", "0.5", "--no-shuffle"])
    assert config_from_args(args) == aecore.TrainConfig(patience=None, grad_clip=0.5, shuffle=False)
    assert config_from_args(parser.parse_args([])) == aecore.TrainConfig()
    code, _, err = run(capsys, *train_args(1, tmp_path / "m"), "--optimizer", "rmsprop")
    assert code == 1 and "optimizer must be one of 'adam', 'adamw', 'sgd', 'lbfgs'" in err


def test_eval_compares_with_pca_on_the_same_split(trained, capsys):
    code, out, _ = run(capsys, "eval", str(trained))
    assert code == 0
    assert "PCA (8 components)" in out and "test split of 359 rows" in out
    code, out, _ = run(capsys, "eval", str(trained), "--json")
    metrics = json.loads(out)
    saved = json.loads((trained / "model.json").read_text())["metrics"]
    assert metrics["test_mse"] == pytest.approx(saved["test_mse"], rel=1e-6)
    assert metrics["pca_test_mse"] == pytest.approx(saved["pca_test_mse"], rel=1e-9)


def test_resume_continues_and_a_second_train_refuses_to_overwrite(trained, capsys):
    code, _, err = run(capsys, *train_args(3, trained))
    assert code == 1 and err.count("\n") == 1
    assert "already holds a training run (checkpoint.safetensors); resume it" in err
    code, out, _ = run(capsys, *train_args(5, trained), "--resume")
    assert code == 0 and "of 5" in out
    lines = (trained / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3, 4, 5]


def test_models_lists_name_class_distribution_and_status(capsys):
    code, out, _ = run(capsys, "models")
    assert code == 0
    row = next(line for line in out.splitlines() if line.startswith("ae "))
    assert "aecore_plugins.ae.PlainAutoencoder" in row and f"aecore {aecore.__version__}" in row
    assert row.rstrip().endswith("ok")


def test_info_shows_versions_and_kernels(capsys):
    code, out, _ = run(capsys, "info")
    assert code == 0 and f"aecore {aecore.__version__}" in out and "torch " in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "nosuch", "--data", "digits", "--out", "{tmp}/x"], "unknown model 'nosuch'"),
        (
            ["train", "ae", "--data", "npy:{tmp}/missing.npy", "--out", "{tmp}/x"],
            "npy: file not found",
        ),
        (
            ["train", "ae", "--data", "digits", "--out", "{tmp}/x", "--set", "hidden"],
            "--set expects key=value",
        ),
        (
            ["train", "ae", "--data", "digits", "--out", "{tmp}/x", "--set", "dropout=2"],
            "dropout must be a number in [0, 1); got 2",
        ),
        (
            ["train", "ae", "--data", "digits", "--out", "{tmp}/x", "--epochs", "0"],
            "epochs must be an int in [1, inf]; got 0",
        ),
        (["eval", "{tmp}/nothing"], "not a model folder"),
        (
            ["train", "ae", "--data", "digits", "--out", "{tmp}/x", "--threads", "0"],
            "--threads must be an int in [1, inf]; got 0",
        ),
    ],
)
def test_errors_are_one_line_without_traceback(tmp_path, capsys, argv, message):
    code, _, err = run(capsys, *[a.format(tmp=tmp_path) for a in argv])
    assert code == 1
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


def test_data_shape_the_model_does_not_accept(tmp_path, capsys):
    from aecore import registry
    from aecore_plugins.ae import PlainAutoencoder

    class ImagesOnly(PlainAutoencoder):
        input_ranks = (3,)

    registry.register("images-only", ImagesOnly)
    try:
        code, _, err = run(
            capsys,
            "train",
            "images-only",
            "--data",
            "digits",
            "--out",
            str(tmp_path / "m"),
            "--epochs",
            "1",
            "--quiet",
        )
    finally:
        registry.unregister("images-only")
    assert code == 1
    assert (
        "ImagesOnly accepts 3-D input shapes (without the batch axis); got input_shape=(64,)" in err
    )
    # and says how to get images (the message named the shape alone)
    assert "rows of 64 values as (1, 8, 8), or on the command line an image source" in err


def test_debug_shows_the_traceback(tmp_path):
    ran = subprocess.run(
        [sys.executable, "-m", "aecore", "--debug", "eval", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert ran.returncode != 0 and "Traceback" in ran.stderr and "ModelFileError" in ran.stderr


def test_python_dash_m_and_console_script_agree():
    ran = subprocess.run(
        [sys.executable, "-m", "aecore", "--version"], capture_output=True, text=True
    )
    assert ran.stdout.strip() == f"aecore {aecore.__version__}"


def test_demo_writes_report_and_figures(tmp_path, capsys, monkeypatch):
    from aecore_plugins.ae import PlainAutoencoder

    quick = aecore.DemoRecipe(data="digits", latent_dim=2, epochs=2, hparams={"hidden": [16]})
    monkeypatch.setattr(PlainAutoencoder, "demo", quick)
    code, out, _ = run(capsys, "demo", "--out", str(tmp_path), "--models", "ae", "--quiet")
    assert code == 0
    report = (tmp_path / "report.md").read_text()
    assert "| ae | digits | 2 |" in report
    for png in ("reconstructions.png", "loss.png", "latent.png"):
        data = (tmp_path / "ae" / png).read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 2000
        assert f"ae/{png}" in report


@pytest.mark.parametrize(
    "name", [n for n in aecore.list_models() if getattr(aecore.model_class(n), "demo", None)]
)
def test_a_demo_recipe_trains_without_warning_about_itself(name, tmp_path):
    # a demo that warns about its own recipe teaches users to ignore warnings: each
    # recipe's data, normalisation and hyperparameters, for one epoch, warnings as errors
    import warnings

    from aecore.pipeline import train

    recipe = aecore.model_class(name).demo
    hparams = dict(recipe.hparams)
    if "pretrain_epochs" in hparams:
        hparams["pretrain_epochs"] = 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        train(
            name, recipe.data, tmp_path / name, latent_dim=recipe.latent_dim, hparams=hparams,
            config=recipe.train.replace(epochs=1, device="cpu"), normalize=recipe.normalize,
            progress=False,
        )  # fmt: skip


def test_train_rescales_each_feature_of_a_table_in_units_of_its_own(tmp_path, capsys):
    # wine's thirteen quantities (hue near 1, proline near 1000): one min-max over all
    # features let proline decide alone; each is rescaled instead, and the vae gets its
    # Gaussian decoder in place of Bernoulli units on clipped rows
    import numpy as np
    from sklearn.datasets import load_digits, load_wine

    table = tmp_path / "wine.csv"
    np.savetxt(table, load_wine(return_X_y=True)[0], delimiter=",")
    for name, key in (("vae", "decoder"), ("ae", None)):
        out = tmp_path / name
        argv = ["train", name, "--data", f"csv:{table}", "--epochs", "1", "--out", str(out),
                "--quiet", "--set", "hidden=[8]"]  # fmt: skip
        assert run(capsys, *argv)[0] == 0
        record = json.loads((out / "model.json").read_text())
        assert record["data"]["per_feature"] is True
        assert len(record["normalization"]["scale"]) == 13
        if key is not None:
            assert record["config"][key] == "gaussian"
    # pixel counts are intensities on one scale: one min-max over all of them, Bernoulli
    # units kept
    counts = tmp_path / "counts.csv"
    np.savetxt(counts, load_digits(return_X_y=True)[0][:300], delimiter=",")
    out = tmp_path / "pixels"
    argv = ["train", "vae", "--data", f"csv:{counts}", "--epochs", "1", "--out", str(out),
            "--quiet", "--set", "hidden=[8]"]  # fmt: skip
    assert run(capsys, *argv)[0] == 0
    record = json.loads((out / "model.json").read_text())
    assert record["config"]["decoder"] == "bernoulli"
    assert len(record["normalization"]["scale"]) == 1
    # a resumed run is refused a normalisation other than the one it was trained with
    argv[1] = "ae"
    assert run(capsys, *argv, "--overwrite")[0] == 0
    argv[argv.index("1")] = "2"
    code, _, err = run(capsys, *argv, "--resume", "--normalize", "standardize")
    assert code == 1 and "normalised by minmax (one scale for all)" in err
    assert "by standardize (per feature)" in err and "--normalize" in err


def test_eval_refuses_a_data_file_that_changed_and_names_a_missing_one(
    capsys, tmp_path, monkeypatch
):
    # 50 rows appended after training: eval drew its test split from the changed file and
    # scored training rows as test rows without a word
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rows = np.random.default_rng(0).random((250, 6))
    np.savetxt("x.csv", rows[:200], delimiter=",")
    args = ["train", "ae", "--data", "csv:x.csv", "--latent-dim", "2", "--epochs", "1"]
    assert run(capsys, *args, "--out", "c")[0] == 0
    assert run(capsys, "eval", "c")[0] == 0
    np.savetxt("x.csv", rows, delimiter=",")
    code, _, err = run(capsys, "eval", "c")
    assert code != 0 and "now holds 250 rows; the model was trained on its 200" in err
    assert run(capsys, "eval", "c", "--data", "csv:x.csv")[0] == 0  # other data, by choice
    # as many rows, other values (another folder's file of the same name): evaluated
    # as if they were the held-out rows
    np.savetxt("x.csv", rows[50:], delimiter=",")
    code, _, err = run(capsys, "eval", "c")
    assert code != 0 and "csv:x.csv holds other values than the model was trained on" in err
    np.savetxt("x.csv", rows[:200], delimiter=",")
    assert run(capsys, "eval", "c")[0] == 0
    monkeypatch.chdir(tmp_path / "c")
    code, _, err = run(capsys, "eval", ".")
    assert code != 0 and "relative path is from the directory training ran in" in err


def test_a_setting_given_twice_is_refused(capsys, tmp_path):
    code, _, err = run(capsys, "train", "ae", "--data", "digits", "--out", str(tmp_path / "m"),
                       "--set", "hidden=[4]", "--set", "hidden=[8]")  # fmt: skip
    assert code != 0 and "--set hidden is given twice" in err
    assert not (tmp_path / "m").exists()


def test_set_reads_pythons_true_false_and_none_as_jsons():
    # "False" stayed a string, which a plugin without its own check took as true
    from aecore.cli.train import parse_set

    got = parse_set(["bias=False", "a=True", "b=None", "c=false", "d=[1, 2]", "e=relu"])
    assert got == {"bias": False, "a": True, "b": None, "c": False, "d": [1, 2], "e": "relu"}


@pytest.mark.parametrize("bench", ["kernels", "onnx", "quality", "anomaly", "sae", "sae-step"])
def test_a_benchmarks_json_file_is_checked_before_it_runs(capsys, tmp_path, bench):
    # an existing file was replaced at the end of the run; a bad folder failed only then
    kept = tmp_path / "kept.json"
    kept.write_text('{"precious": 1}')
    with pytest.raises(SystemExit) as stop:
        main(["bench", bench, "--json", str(kept)])
    assert stop.value.code == 2 and "results never replace a file" in capsys.readouterr().err
    assert kept.read_text() == '{"precious": 1}'
    with pytest.raises(SystemExit):
        main(["bench", bench, "--json", str(tmp_path / "no" / "r.json")])
    assert "no folder" in capsys.readouterr().err


def test_bench_kernels_profiles_each_fused_call(capsys, monkeypatch):
    from aecore_benchmarks import kernels

    monkeypatch.setattr(kernels, "_compiled", lambda fn: None)  # no compile in a unit test
    monkeypatch.setattr(kernels, "_cases", lambda device: [kernels._case_kl(device, 16, 32)])
    assert kernels.main(["--quick", "--profile"]) == 0
    out = capsys.readouterr().out
    assert "profile of 3 calls by cpu time: kl_sparsity fwd+bwd 16x32, fused" in out
    assert "aecore::kl_sparsity" in out.split("profile of 3 calls")[1]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["quality", "--codes", "x"], "expected a positive int, got 'x'"),
        (["quality", "--datasets", "digits,foo"], "unknown 'foo'"),
        (["quality", "--entries", "trainer,foo"], "unknown 'foo'"),
        (["quality", "--recipes", "foo"], "unknown 'foo'"),
        (["quality", "--recipe-seeds", "x"], "expected a non-negative int"),
        (["anomaly", "--datasets", "wine,foo"], "unknown 'foo'"),
        (["anomaly", "--pyod", "KNN,LOF"], "unknown 'LOF'"),
        (["anomaly", "--pyod-inputs", "raw,scaled"], "unknown 'scaled'"),
        (["sae", "--architectures", "relu"], "unknown 'relu'"),
    ],
)
def test_benchmark_lists_are_checked_before_any_work(capsys, argv, message):
    # each was found only after minutes of training, or silently ran nothing
    with pytest.raises(SystemExit) as stop:
        main(["bench", *argv])
    assert stop.value.code == 2 and message in capsys.readouterr().err


def test_demo_checks_its_model_names_before_any_work(capsys, tmp_path):
    # ae,nosuch trained ae for 20 s, then failed; "" ran the whole demo
    code, _, err = run(capsys, "demo", "--out", str(tmp_path / "d"), "--models", "ae,nosuch")
    assert code != 0 and "unknown model 'nosuch'" in err
    with pytest.raises(SystemExit):  # an empty argument, as argparse refuses others
        main(["demo", "--out", str(tmp_path / "d"), "--models", ""])
    assert "--models is empty" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_train_holds_rows_to_a_bounded_models_range(capsys, tmp_path):
    # data in [0, 1] made a Bernoulli vae fail on validation rows just past the training
    # rows' min-max range; standardised rows under a sigmoid trained to a negative BCE
    import numpy as np

    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((200, 2, 5, 1)).astype("f4"))
    args = ["train", "vae", "--data", f"npy:{tmp_path / 'x.npy'}", "--latent-dim", "2",
            "--epochs", "2", "--set", 'backbone="conv"', "--out", str(tmp_path / "v")]  # fmt: skip
    assert run(capsys, *args)[0] == 0
    args = ["train", "conv", "--data", "digits:image", "--normalize", "standardize", "--set",
            'output_activation="sigmoid"', "--epochs", "1", "--out", str(tmp_path / "c")]  # fmt: skip
    code, _, err = run(capsys, *args)
    assert (
        code != 0 and "leaves the training rows in [-3.1" in err and "takes inputs in [0, 1]" in err
    )


def test_channel_last_images_are_named_when_training(capsys, tmp_path):
    # (N, H, W, C) trained silently as H channels of W x C images
    import numpy as np

    rows = np.random.default_rng(0).random((64, 8, 8, 3)).astype("f4")
    np.save(tmp_path / "hwc.npy", rows)
    args = ["train", "conv", "--data", f"npy:{tmp_path / 'hwc.npy'}", "--latent-dim", "2",
            "--epochs", "1", "--out", str(tmp_path / "m")]  # fmt: skip
    with pytest.warns(UserWarning, match=r"channels last.*\(N, 3, 8, 8\)"):
        assert run(capsys, *args)[0] == 0
    from aecore.pipeline import _warn_if_channels_last

    with pytest.warns(UserWarning, match=r"channels last.*\(N, 3, 4, 4\)"):  # small ones too
        _warn_if_channels_last("npy:x.npy", (4, 4, 3))


def test_the_pca_row_of_a_code_as_wide_as_the_input_says_it_is_exact():
    from types import SimpleNamespace

    from aecore.cli.train import _pca_label

    assert _pca_label(SimpleNamespace(latent_dim=64, input_size=16)) == (
        "PCA (all 16 components: exact)"
    )
    assert _pca_label(SimpleNamespace(latent_dim=8, input_size=16)) == "PCA (8 components)"


def test_train_of_a_code_as_wide_as_the_data_names_no_pca_ratio(tmp_path, capsys):
    # an SAE's code is wider than its input: PCA of as many components is exact, and the
    # line once printed its rounding error as the baseline ("PCA 1.9e-30, ratio n/a")
    args = ["train", "sae-topk", "--data", "superposition:600,d=8,n=16,p=0.1", "--quiet"]
    code, out, _ = run(capsys, *args, "--latent-dim", "16", "--epochs", "1", "--out",
                       str(tmp_path / "s"))  # fmt: skip
    assert code == 0 and "PCA of as many components is exact" in out and "n/a" not in out


def test_a_commands_warnings_print_as_one_line(tmp_path):
    # they named the launcher script's line and echoed `sys.exit(main())`
    ran = subprocess.run(
        [sys.executable, "-m", "aecore", "train", "ae", "--data", "digits", "--epochs", "1",
         "--patience", "3", "--val-fraction", "0", "--out", str(tmp_path / "m"), "--quiet"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert ran.returncode == 0, ran.stderr
    lines = ran.stderr.strip().splitlines()
    assert lines and all(line.startswith("aecore: warning: ") for line in lines), lines
    assert "patience=3 needs validation data" in ran.stderr


def test_eval_reads_a_csvs_columns_by_name_as_encode_does(capsys, tmp_path, monkeypatch):
    # a CSV of the same columns in another order was evaluated by position, without a word
    import numpy as np

    monkeypatch.chdir(tmp_path)
    rows = np.random.default_rng(0).random((80, 4))
    np.savetxt("a.csv", rows, delimiter=",", header="w,x,y,z", comments="")
    np.savetxt("b.csv", rows[:, ::-1], delimiter=",", header="z,y,x,w", comments="")
    args = ["train", "ae", "--data", "csv:a.csv", "--latent-dim", "2", "--epochs", "1"]
    assert run(capsys, *args, "--out", "m")[0] == 0
    code, _, err = run(capsys, "eval", "m", "--data", "csv:b.csv")
    assert code != 0 and "columns are in another order than at fit (w, x, y, z)" in err
    assert run(capsys, "eval", "m", "--data", "csv:a.csv")[0] == 0


def test_arguments_users_get_wrong_are_named_before_anything_runs(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    # an unset shell variable as --out wrote the model into the current directory
    with pytest.raises(SystemExit):
        main(["train", "ae", "--data", "digits", "--out", ""])
    assert "--out is empty" in capsys.readouterr().err and not list(tmp_path.iterdir())
    (tmp_path / "afile.txt").write_text("kept")
    code, _, err = run(capsys, "train", "ae", "--data", "digits", "--out", "afile.txt")
    assert code != 0 and "--out afile.txt is a file" in err
    assert (tmp_path / "afile.txt").read_text() == "kept"
    code, _, err = run(capsys, *train_args(1, "m"), "--resume", "--overwrite")
    assert code != 0 and "give one" in err
    code, _, err = run(capsys, *train_args(1, "m"), "--set", "dropout=[32,")
    assert code != 0 and "--set dropout=[32,: not valid JSON" in err
    with pytest.raises(SystemExit):  # named as the subcommand spells it, with its usage
        main(["encode", "", "--input", "a.npy", "--output", "b.npy"])
    err = capsys.readouterr().err
    assert "aecore encode: error: model is empty" in err and "--model" not in err
    # "rerun with --debug": where users put it, at the end, it was an unknown argument
    with pytest.raises(ValueError, match="hidden must be"):
        main([*train_args(1, "m")[:-2], "--set", "hidden=[-1]", "--debug"])
    with pytest.raises(ValueError, match="hidden must be"):  # argparse's prefix of it too
        main(["--deb", *train_args(1, "m")[:-2], "--set", "hidden=[-1]"])


def test_running_out_of_memory_is_the_users_error_not_an_internal_one():
    from aecore.cli.main import _out_of_memory

    assert _out_of_memory(RuntimeError("[enforce fail at alloc_cpu.cpp] can't allocate memory"))
    assert _out_of_memory(MemoryError()) and not _out_of_memory(RuntimeError("mat1 and mat2"))


def test_eval_lays_rows_out_for_the_model_and_lists_settings_a_resume_changed(capsys, tmp_path):
    # `eval --data digits` of a model of digits:image failed inside the model ("expects
    # (B, 1, 8, 8); got (359, 64)"), as did images for a vector model; and a resume's
    # --allow-changes settings were recorded in the folder but never shown
    image = tmp_path / "conv"
    assert main(["train", "conv", "--data", "digits:image", "--epochs", "1", "--quiet",
                 "--set", "channels=[4]", "--out", str(image)]) == 0  # fmt: skip
    capsys.readouterr()
    code, on_images, _ = run(capsys, "eval", str(image))
    assert code == 0
    code, on_rows, err = run(capsys, "eval", str(image), "--data", "digits")
    assert code == 0, err
    assert on_rows.splitlines()[1:] == on_images.splitlines()[1:]  # the same test rows
    vector = tmp_path / "ae"
    assert main(train_args(1, vector)) == 0
    capsys.readouterr()
    code, _, err = run(capsys, "eval", str(vector), "--data", "digits:image")
    assert code == 0, err
    assert main([*train_args(2, vector), "--resume", "--lr", "0.0005", "--allow-changes"]) == 0
    capsys.readouterr()
    code, out, _ = run(capsys, "eval", str(vector))
    assert "changed on resume after epoch 1: lr 0.001 -> 0.0005" in out
    code, out, _ = run(capsys, "eval", str(vector), "--json")
    assert json.loads(out)["training_changes"] == [{"epoch": 1, "changed": {"lr": [0.001, 0.0005]}}]


def test_train_fits_the_threshold_predict_uses_when_asked(capsys, tmp_path):
    # a command-line pipeline had no way to a detector: `aecore predict` on anything
    # `aecore train` saved said it was saved without a threshold
    out = tmp_path / "m"
    code, said, err = run(capsys, *train_args(1, out), "--contamination", "0.05")
    assert code == 0, err
    assert "anomaly threshold: reconstruction score above" in said
    detector = aecore.load(out).detector
    assert detector.contamination == 0.05 and detector.kind == "reconstruction"
    rows = aecore.prepare("digits").dataset.x[:100]
    np.save(tmp_path / "rows.npy", rows)
    code, said, err = run(capsys, "predict", str(out), "--input", str(tmp_path / "rows.npy"),
                          "--output", str(tmp_path / "labels.npy"))  # fmt: skip
    assert code == 0, err
    assert "(contamination 0.05)" in said
    assert set(np.unique(np.load(tmp_path / "labels.npy"))) <= {0, 1}
    code, _, err = run(capsys, *train_args(1, tmp_path / "n"), "--contamination", "0.7")
    assert code == 1 and "contamination must be a number in (0, 0.5]; got 0.7" in err
    assert not (tmp_path / "n").exists()  # refused before anything trained


def test_eval_on_data_in_other_units_says_so(capsys, tmp_path):
    # pixels in [0, 1] for a model of 0..255 gave a ratio to PCA of 109890 without a word
    pixels = np.random.default_rng(0).integers(0, 256, (200, 1, 4, 4)).astype(np.uint8)
    np.save(tmp_path / "u8.npy", pixels)
    np.save(tmp_path / "unit.npy", pixels / 255.0)
    out = tmp_path / "m"
    assert main(["train", "ae", "--data", f"npy:{tmp_path / 'u8.npy'}", "--latent-dim", "2",
                 "--epochs", "1", "--quiet", "--out", str(out)]) == 0  # fmt: skip
    with pytest.warns(
        UserWarning, match=r"root mean square of 0.00\d+, where the training rows' was 0.5"
    ):
        assert main(["eval", str(out), "--data", f"npy:{tmp_path / 'unit.npy'}"]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert main(["eval", str(out), "--data", f"npy:{tmp_path / 'u8.npy'}"]) == 0
        # heavy-tailed counts are small once min-max scaled: in their units, no warning
        counts = np.random.default_rng(0).pareto(1.0, (300, 4)) * 10
        np.save(tmp_path / "counts.npy", counts)
        args = [
            "train",
            "ae",
            "--data",
            f"npy:{tmp_path / 'counts.npy'}",
            "--latent-dim",
            "2",
            "--epochs",
            "1",
            "--quiet",
            "--normalize",
            "minmax",
            "--out",
            str(tmp_path / "c"),
        ]
        assert main(args) == 0  # fmt: skip
        assert main(["eval", str(tmp_path / "c"), "--data", f"npy:{tmp_path / 'counts.npy'}"]) == 0
