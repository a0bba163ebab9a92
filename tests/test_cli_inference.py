"""``aecore encode | decode | reconstruct | score | export`` on model folders (PyTorch)
and .onnx files (onnxruntime), their one-line errors, and ``aecore bench onnx``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from exported_ae import export_small_ae, torch_reference
from exported_ae import rows as _data

import aecore
from aecore import cli
from aecore.errors import ModelFileError
from aecore.runtime import OnnxAutoencoder
from aecore.testing import ModelSpec

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")


def _fresh(cls, shape, hparams):
    return ModelSpec(cls, shape, hparams).build()


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return export_small_ae(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def runtime(saved):
    return OnnxAutoencoder(saved[2])


# -- the CLI -------------------------------------------------------------------------------
def _cli(capsys, *argv) -> tuple[int, str, str]:
    rc = cli.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return rc, out, err


def test_cli_torch_and_onnx_give_the_same_outputs(saved, tmp_path, capsys):
    model, folder, path = saved
    x = _data(9)
    np.save(tmp_path / "x.npy", x)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",", header=",".join(f"f{i}" for i in range(12)))
    want = torch_reference(model, x)
    for command in ("encode", "reconstruct", "score"):
        for source, suffix in ((folder, "npy"), (path, "csv")):
            out = tmp_path / f"{command}-{Path(source).name}.{suffix}"
            inp = tmp_path / ("x.csv" if suffix == "npy" else "x.npy")
            rc, stdout, _ = _cli(capsys, command, source, "--input", inp, "--output", out)
            assert rc == 0 and str(out) in stdout
            got = np.load(out) if suffix == "npy" else np.loadtxt(out, delimiter=",")
            np.testing.assert_allclose(
                got.reshape(want[command].shape), want[command], rtol=1e-4, atol=1e-4
            )
    np.save(tmp_path / "z.npy", want["encode"])
    rc, _, _ = _cli(
        capsys, "decode", path, "--input", tmp_path / "z.npy", "--output", tmp_path / "d.npy"
    )
    assert rc == 0
    np.testing.assert_allclose(np.load(tmp_path / "d.npy"), want["decode"], atol=1e-4)


def test_cli_reshapes_flat_csv_rows_for_image_models(tmp_path, capsys):
    model = _fresh(aecore.model_class("ae"), (1, 4, 4), {"hidden": [8]}).eval()
    folder = aecore.save(model, tmp_path / "img")
    x = np.random.default_rng(0).random((5, 16)).astype(np.float32)
    np.savetxt(tmp_path / "x.csv", x, delimiter=",")
    rc, _, err = _cli(
        capsys, "reconstruct", folder, "--input", tmp_path / "x.csv", "--output", tmp_path / "r.npy"
    )
    assert rc == 0, err
    with torch.no_grad():
        want = model(torch.from_numpy(x.reshape(5, 1, 4, 4))).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "r.npy"), want, atol=1e-5)


def test_cli_exports_one_part_at_another_opset(saved, runtime, tmp_path, capsys):
    _, folder, _ = saved
    out = tmp_path / "d.onnx"
    rc, stdout, err = _cli(
        capsys, "export", folder, "--out", out, "--part", "decoder", "--opset", "20"
    )
    assert rc == 0 and f"wrote {out}" in stdout, err
    proto = onnx.load(str(out))
    assert [op.version for op in proto.opset_import if op.domain in ("", "ai.onnx")] == [20]
    decoder = OnnxAutoencoder(out)
    assert decoder.parts == ("decoder",)
    z = runtime.encode(_data(4))
    np.testing.assert_allclose(decoder.decode(z), runtime.decode(z), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelFileError, match=r"encode needs the encoder graph"):
        decoder.encode(_data(1))


def test_cli_errors_are_one_line(saved, tmp_path, capsys):
    _, folder, path = saved
    np.save(tmp_path / "x.npy", _data(3))
    np.save(tmp_path / "wide.npy", np.zeros((3, 13), np.float32))
    (tmp_path / "taken.npy").write_bytes(b"keep me")
    cases = [
        (
            ["encode", path, "--input", tmp_path / "x.npy", "--output", tmp_path / "taken.npy"],
            "taken.npy exists; pass --overwrite",
        ),
        (
            ["encode", path, "--input", tmp_path / "x.npy", "--output", tmp_path / "z.txt"],
            "expected a file name ending in .npy or .csv",
        ),
        (
            ["encode", path, "--input", tmp_path / "x.txt", "--output", tmp_path / "z.npy"],
            "expected a .npy or .csv file",
        ),
        (
            ["score", folder, "--input", tmp_path / "wide.npy", "--output", tmp_path / "s.npy"],
            r"expects inputs of shape (N, 12); got shape (3, 13)",
        ),
        (
            [
                "score",
                tmp_path / "nothing",
                "--input",
                tmp_path / "x.npy",
                "--output",
                tmp_path / "s.npy",
            ],
            "no such model folder or .onnx file",
        ),
        (["export", folder, "--out", path], "exists; pass overwrite=True (--overwrite)"),
        (  # the missing input is the cause (only the output that exists was named)
            ["encode", path, "--input", tmp_path / "gone.npy", "--output", tmp_path / "taken.npy"],
            "gone.npy: not found; expected a .npy or .csv file",
        ),
    ]
    for argv, message in cases:
        rc, _, err = _cli(capsys, *argv)
        assert rc == 1 and message in err and err.count("\n") == 1, err
    assert (tmp_path / "taken.npy").read_bytes() == b"keep me"
    rc, _, err = _cli(
        capsys,
        "encode",
        path,
        "--input",
        tmp_path / "x.npy",
        "--output",
        tmp_path / "taken.npy",
        "--overwrite",
    )
    assert rc == 0, err
    assert np.load(tmp_path / "taken.npy").shape == (3, 3)


# -- the benchmark ----------------------------------------------------------------------------
def test_bench_onnx_reports_every_backend(tmp_path, capsys):
    report_path = tmp_path / "bench.json"
    rc, out, _ = _cli(
        capsys,
        "bench",
        "onnx",
        "--models",
        "ae",
        "--calls",
        "20",
        "--big-batch",
        "16",
        "--rounds",
        "2",
        "--latent-dim",
        "4",
        "--threads",
        "1",
        "--json",
        report_path,
    )
    assert rc == 0
    assert "batch 1: latency" in out and "batch 16: throughput" in out
    report = json.loads(report_path.read_text())
    (row,) = report["results"]
    assert row["model"] == "ae"
    for batch in ("batch1", "batch16"):
        seconds = row[batch]["seconds_per_call"]
        assert set(seconds) == {
            "torch",
            "onnxruntime",
            "aecore.runtime",
            "aecore.runtime without normalisation",
        }
        assert all(v > 0 for v in seconds.values())
        assert row[batch]["wrapper_overhead"] == pytest.approx(
            seconds["aecore.runtime"] / seconds["onnxruntime"] - 1
        )


def test_bench_onnx_rejects_unknown_and_repeated_models(capsys):
    # a repeated name timed the model once, then failed on its own temporary export
    for models, message in [("nope", "unknown 'nope'"), ("ae,ae", "a name given twice")]:
        with pytest.raises(SystemExit) as stop:
            _cli(capsys, "bench", "onnx", "--models", models)
        assert stop.value.code == 2 and message in capsys.readouterr().err


def test_an_output_that_is_the_input_is_refused(saved, tmp_path, capsys):
    # --overwrite replaced the input rows with their codes
    x = _data(4)
    np.save(tmp_path / "x.npy", x)
    rc, _, err = _cli(capsys, "encode", saved[1], "--input", tmp_path / "x.npy",
                      "--output", tmp_path / "x.npy", "--overwrite")  # fmt: skip
    assert rc == 1 and "is the --input file" in err
    np.testing.assert_array_equal(np.load(tmp_path / "x.npy"), x)


def test_a_reader_that_closes_early_ends_the_command_quietly(tmp_path, monkeypatch, capsys):
    # `aecore eval DIR | head -1` ended in "aecore: error: [Errno 32] Broken pipe", exit 1
    import sys

    class ClosedPipe:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            raise BrokenPipeError(32, "Broken pipe")

        def flush(self):
            pass

        def fileno(self):
            return self.f.fileno()

    with open(tmp_path / "out", "w") as f:
        monkeypatch.setattr(sys, "stdout", ClosedPipe(f))
        assert cli.main(["models"]) == 0
    assert "Broken pipe" not in capsys.readouterr().err


def test_a_model_trained_on_a_csv_with_a_header_refuses_its_columns_reordered(tmp_path, capsys):
    # the header was not recorded: the same columns in another order encoded silently
    from aecore.pipeline import train

    rows = np.random.default_rng(3).random((60, 4))
    (tmp_path / "d.csv").write_text(
        "a,b,c,d\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n"
    )
    (tmp_path / "r.csv").write_text(
        "d,c,b,a\n" + "\n".join(",".join(map(str, r[::-1])) for r in rows) + "\n"
    )
    result = train("ae", f"csv:{tmp_path / 'd.csv'}", tmp_path / "m", latent_dim=2,
                   epochs=1, progress=False)  # fmt: skip
    assert result.model.feature_names == ["a", "b", "c", "d"]
    assert aecore.load(tmp_path / "m").feature_names == ["a", "b", "c", "d"]
    rc, _, err = _cli(capsys, "encode", tmp_path / "m", "--input", tmp_path / "d.csv",
                      "--output", tmp_path / "z.npy")  # fmt: skip
    assert rc == 0, err
    rc, _, err = _cli(capsys, "encode", tmp_path / "m", "--input", tmp_path / "r.csv",
                      "--output", tmp_path / "y.npy")  # fmt: skip
    assert rc == 1 and "columns are in another order" in err


@pytest.mark.parametrize(
    "exc, said",
    [
        (ModuleNotFoundError("No module named 'torch'", name="torch"),
         "needs torch, which is not installed (pip install torch); without torch"),
        (ModuleNotFoundError("No module named 'sklearn'", name="sklearn"),
         "pip install scikit-learn"),
        (ImportError("aecore.runtime needs onnxruntime: pip install onnxruntime"),
         "aecore.runtime needs onnxruntime: pip install onnxruntime"),
    ],
)  # fmt: skip
def test_a_missing_package_is_an_error_that_names_it_not_an_internal_error(
    exc, said, monkeypatch, capsys
):
    # a serving image without torch runs commands that need it
    import aecore.cli.inference as inference
    from aecore.cli import main

    def missing(args):
        raise exc

    monkeypatch.setattr(inference, "cmd_export", missing)
    assert main(["export", "somewhere", "--out", "x.onnx"]) == 1
    err = capsys.readouterr().err
    assert said in err and "internal error" not in err
