"""The torch-free runtime (aecore.runtime): outputs, units, batching, bad inputs and
bad files, and a run in a process where torch cannot be imported."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from exported_ae import export_small_ae, torch_reference
from exported_ae import rows as _data
from hypothesis import given
from hypothesis import strategies as st

from aecore.data import Normalization
from aecore.errors import ConfigError, DataError, ModelFileError, ShapeError
from aecore.runtime import ArrayModel, OnnxAutoencoder, part_paths

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    return export_small_ae(tmp_path_factory.mktemp("runtime"))


@pytest.fixture(scope="module")
def runtime(saved):
    return OnnxAutoencoder(saved[2])


# -- the runtime -----------------------------------------------------------------------
def test_export_all_writes_three_files_and_the_runtime_finds_them(saved, runtime):
    model, _, path = saved
    assert all(p.is_file() for p in part_paths(path).values())
    assert runtime.parts == ("full", "encoder", "decoder")
    assert (runtime.name, runtime.input_shape, runtime.latent_dim) == ("ae", (12,), 3)
    assert runtime.normalization == model.normalization
    assert runtime.config == model.get_config()
    # any part file of the export opens the same model
    assert OnnxAutoencoder(part_paths(path)["decoder"]).parts == runtime.parts


def test_outputs_match_torch_in_data_units(saved, runtime):
    model = saved[0]
    x = _data(33)
    want = torch_reference(model, x)
    z = runtime.encode(x)
    np.testing.assert_allclose(z, want["encode"], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(runtime.reconstruct(x), want["reconstruct"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(runtime.decode(z), want["decode"], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(runtime.score(x), want["score"], rtol=1e-4, atol=1e-7)
    assert runtime.score(x).shape == (33,) and runtime.score(x).dtype == np.float32


def test_float64_and_integer_inputs_give_the_float32_results(runtime):
    x = np.round(_data(6))
    expected = runtime.reconstruct(x.astype(np.float32))
    for dtype in (np.float64, np.int64, np.uint8):
        np.testing.assert_allclose(runtime.reconstruct(x.astype(dtype)), expected, atol=1e-4)
    # lists work too, and booleans as 0 and 1 (as the estimator takes them)
    np.testing.assert_allclose(runtime.encode(x.tolist()), runtime.encode(x), atol=1e-6)
    flags = x > 0.5
    np.testing.assert_allclose(runtime.encode(flags), runtime.encode(flags.astype(np.float32)))


def test_a_sparse_matrix_is_refused_with_the_conversion_to_use(runtime):
    sparse = pytest.importorskip("scipy.sparse")
    with pytest.raises(DataError, match=r"got a sparse csr_matrix: pass x.toarray\(\)"):
        runtime.encode(sparse.csr_matrix(np.zeros((2, 12), np.float32)))


@given(n=st.integers(0, 30), batch_size=st.integers(1, 40))
def test_any_batch_size_and_chunking_give_the_same_rows(runtime, n, batch_size):
    x = _data(n, seed=n)
    for method, width in (("encode", (3,)), ("reconstruct", (12,)), ("score", ())):
        whole = getattr(runtime, method)(x, batch_size=10_000)
        chunked = getattr(runtime, method)(x, batch_size=batch_size)
        assert whole.shape == chunked.shape == (n, *width)
        np.testing.assert_allclose(chunked, whole, rtol=1e-6, atol=1e-6)


def test_the_input_is_never_modified(runtime):
    x = _data(4)
    before = x.copy()
    runtime.reconstruct(x)
    runtime.score(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.parametrize(
    ("method", "array", "error", "message"),
    [
        (
            "encode",
            np.zeros((5, 13), np.float32),
            ShapeError,
            r"shape \(N, 12\); got shape \(5, 13\)",
        ),
        ("reconstruct", np.zeros((12,), np.float32), ShapeError, r"single sample pass x\[None\]"),
        ("score", np.zeros((2, 3, 4), np.float32), ShapeError, r"reshape to \(N, 12\)"),
        ("encode", np.array([["a"] * 12]), DataError, r"float or integer array .*got dtype <U1"),
        ("score", np.zeros((2, 12), np.complex64), DataError, "got dtype complex64"),
        ("decode", np.zeros((2, 4), np.float32), ShapeError, r"codes of shape \(N, 3\)"),
    ],
)
def test_bad_inputs_state_the_expected_shape(runtime, method, array, error, message):
    with pytest.raises(error, match=message):
        getattr(runtime, method)(array)


def test_bad_arguments(saved, runtime):
    with pytest.raises(ConfigError, match="batch_size must be a positive int"):
        runtime.encode(_data(2), batch_size=0)
    with pytest.raises(ConfigError, match=r"providers \['NoSuchExecutionProvider'\]"):
        OnnxAutoencoder(saved[2], providers=["NoSuchExecutionProvider"])
    with pytest.raises(ConfigError, match="providers must be a list"):
        OnnxAutoencoder(saved[2], providers="CPUExecutionProvider")
    with pytest.raises(ConfigError, match="threads must be a positive int"):
        OnnxAutoencoder(saved[2], threads=0)
    one_thread = OnnxAutoencoder(saved[2], threads=1)
    np.testing.assert_allclose(one_thread.encode(_data(3)), runtime.encode(_data(3)), atol=1e-6)


class _Identity(ArrayModel):
    """The numpy front end around an identity "model": isolates the normalisation."""

    name, input_shape, latent_dim = "identity", (2, 3), 6

    def __init__(self, norm):
        self.normalization = norm

    def _forward(self, part, batch):
        return np.array(batch, dtype=np.float32).reshape(len(batch), *self.input_shape)


@given(
    kind=st.sampled_from(["minmax", "standardize", "none"]),
    per_feature=st.booleans(),
    offset=st.sampled_from([0.0, 3.5, -1000.0]),
    seed=st.integers(0, 2**16),
)
def test_the_fast_normalisation_matches_normalization_py(kind, per_feature, offset, seed):
    rng = np.random.default_rng(seed)
    train = rng.random((20, 2, 3)) * 50 + offset
    train[:, 0, 0] = offset  # a constant feature: scale 0, only shifted
    norm = Normalization.fit(kind, train, per_feature=per_feature)
    model = _Identity(norm)
    x = (rng.random((7, 2, 3)) * 50 + offset).astype(np.float32)
    tolerance = 1e-5 * (1 + abs(offset))
    np.testing.assert_allclose(model._apply(x), norm.apply(x), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(model.reconstruct(x), x, rtol=1e-5, atol=tolerance)
    np.testing.assert_allclose(model.score(x), 0.0, atol=1e-10)  # identity: no error
    np.testing.assert_allclose(
        model.decode(norm.apply(x).reshape(7, 6)), norm.invert(norm.apply(x)), atol=tolerance
    )
    # float64 inputs take Normalization.apply itself
    np.testing.assert_allclose(model._apply(x.astype(np.float64)), norm.apply(x), atol=1e-6)


def test_a_normalisation_of_the_wrong_size_is_refused():
    with pytest.raises(ConfigError, match="normalisation has 5 features; the model has 6"):
        _Identity(Normalization("standardize", np.zeros(5), np.ones(5)))


# -- bad files ---------------------------------------------------------------------------
def test_corrupt_truncated_and_missing_files(saved, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\x01not a protobuf" * 20)
    with pytest.raises(ModelFileError, match="garbage.onnx is not a readable ONNX model"):
        OnnxAutoencoder(garbage)
    truncated = tmp_path / "truncated.onnx"
    blob = saved[2].read_bytes()
    truncated.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ModelFileError, match="truncated.onnx is not a readable ONNX model"):
        OnnxAutoencoder(truncated)
    with pytest.raises(ModelFileError, match="file not found"):
        OnnxAutoencoder(tmp_path / "absent.onnx")
    with pytest.raises(ModelFileError, match="is a directory"):
        OnnxAutoencoder(tmp_path)


def test_a_foreign_onnx_model_is_refused(tmp_path):
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "identity",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 12])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 12])],
    )
    path = tmp_path / "foreign.onnx"
    onnx.save(helper.make_model(graph), str(path))
    with pytest.raises(ModelFileError, match="an ONNX model but not an aecore export"):
        OnnxAutoencoder(path)


def _rewrite(src: Path, dst: Path, **changes: str) -> Path:
    proto = onnx.load(str(src))
    meta = {p.key: p.value for p in proto.metadata_props}
    meta.update(changes)
    del proto.metadata_props[:]
    for key, value in meta.items():
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, str(dst))
    return dst


def test_tampered_metadata_is_refused(saved, tmp_path):
    src = saved[2]
    newer = _rewrite(src, tmp_path / "newer.onnx", **{"aecore.format_version": "99"})
    with pytest.raises(ModelFileError, match="format version '99' is not supported"):
        OnnxAutoencoder(newer)
    lying = _rewrite(src, tmp_path / "lying.onnx", **{"aecore.input_shape": "[13]"})
    with pytest.raises(ModelFileError, match=r"input has shape .*metadata says \(batch, 13\)"):
        OnnxAutoencoder(lying)
    broken = _rewrite(src, tmp_path / "broken.onnx", **{"aecore.config": "{not json"})
    with pytest.raises(ModelFileError, match="'aecore.config' is not valid JSON"):
        OnnxAutoencoder(broken)


def test_a_sibling_from_another_export_is_refused(saved, tmp_path):
    files = part_paths(saved[2])
    shutil.copy(files["full"], tmp_path / "m.onnx")
    _rewrite(files["encoder"], tmp_path / "m.encoder.onnx", **{"aecore.export_id": "other"})
    mixed = OnnxAutoencoder(tmp_path / "m.onnx")
    mixed.reconstruct(_data(2))  # the full graph is fine
    with pytest.raises(ModelFileError, match="does not belong to"):
        mixed.encode(_data(2))
    with pytest.raises(ModelFileError, match=r"decode needs the decoder graph.*--all"):
        mixed.decode(np.zeros((1, 3), np.float32))


def test_a_re_export_of_one_part_with_another_normalisation_orphans_its_siblings(saved, tmp_path):
    # the same weights, a corrected normalisation, only the full graph re-exported: the
    # old encoder (its normalisation folded in) must not serve beside it
    import copy

    import aecore

    model = copy.deepcopy(saved[0])
    aecore.export_onnx(model, tmp_path / "m.onnx", part="all")
    model.normalization = Normalization("minmax", [0.0], [16.0])
    aecore.export_onnx(model, tmp_path / "m.onnx", part="full", overwrite=True)
    with pytest.raises(ModelFileError, match="does not belong to"):
        OnnxAutoencoder(tmp_path / "m.onnx").encode(_data(2))


def test_without_the_full_graph_reconstruct_chains_the_halves(saved, runtime, tmp_path):
    files = part_paths(saved[2])
    for part in ("encoder", "decoder"):
        shutil.copy(files[part], tmp_path / files[part].name)
    halves = OnnxAutoencoder(tmp_path / "m.encoder.onnx")
    assert halves.parts == ("encoder", "decoder")
    x = _data(5)
    np.testing.assert_allclose(halves.reconstruct(x), runtime.reconstruct(x), atol=1e-4)


# -- torch-free ----------------------------------------------------------------------------
NO_TORCH = textwrap.dedent(
    """
    import sys

    class _NoTorch:  # the runtime must work where torch is not installed
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError("torch is not installed here (blocked by the test)")
            return None

    sys.meta_path.insert(0, _NoTorch())
    """
)

TORCH_FREE_SCRIPT = NO_TORCH + textwrap.dedent(
    """
    import json
    import numpy as np
    try:
        import torch  # noqa: F401
        raise SystemExit("the torch blocker does not work")
    except ImportError:
        pass

    from aecore.runtime import OnnxAutoencoder
    from aecore import cli

    model_path, x_path, out_path = sys.argv[1:4]
    ae = OnnxAutoencoder(model_path)
    x = np.load(x_path)
    z = ae.encode(x)
    result = {
        "encode": z.tolist(),
        "reconstruct": ae.reconstruct(x).tolist(),
        "decode": ae.decode(z).tolist(),
        "score": ae.score(x).tolist(),
    }
    assert cli.main(["score", model_path, "--input", x_path, "--output", out_path]) == 0
    loaded = [m for m in sys.modules if m == "torch" or m.startswith("torch.")]
    assert not loaded, loaded
    print("RESULT " + json.dumps(result))
    """
)


def test_runtime_and_cli_work_without_torch(saved, tmp_path):
    model, _, path = saved
    x = _data(7)
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            "-c",
            TORCH_FREE_SCRIPT,
            str(path),
            str(tmp_path / "x.npy"),
            str(tmp_path / "s.csv"),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT "))
    got = {k: np.asarray(v, dtype=np.float32) for k, v in json.loads(line[7:]).items()}
    want = torch_reference(model, x)
    for key in ("encode", "reconstruct", "decode", "score"):
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-4, err_msg=key)
    np.testing.assert_allclose(np.loadtxt(tmp_path / "s.csv"), want["score"], rtol=1e-4)


def test_the_normalisation_lives_in_the_exported_graphs(saved, runtime):
    # one session call serves a request: the graphs take and give data units
    import onnxruntime
    import torch

    model, _, path = saved
    assert model.normalization.kind != "none" and runtime.normalizes_itself
    x = _data(5)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    bare = session.run(None, {session.get_inputs()[0].name: x})[0]
    np.testing.assert_allclose(runtime.reconstruct(x), bare, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        want = model.normalization.invert(
            model(torch.from_numpy(model.normalization.apply(x)).float()).numpy()
        )
    np.testing.assert_allclose(bare, want, rtol=1e-4, atol=1e-5)
    # a normalisation the graphs hold cannot be swapped silently
    with pytest.raises(ConfigError, match="computes its normalisation inside its graphs"):
        runtime.normalization = Normalization("none")


def test_a_served_model_answers_many_threads_at_once(saved, runtime):
    # 8 threads hammer the ONNX runtime and the torch model: every answer equals the
    # single-threaded one
    from concurrent.futures import ThreadPoolExecutor

    import torch

    model = saved[0].eval()
    inputs = [_data(1 + i % 5, seed=i) for i in range(64)]
    want_onnx = [runtime.reconstruct(x) for x in inputs]
    want_scores = [runtime.score(x) for x in inputs]
    with torch.no_grad():
        want_torch = [model.encode(torch.from_numpy(x)).numpy() for x in inputs]

    def call(i):
        x = inputs[i % len(inputs)]
        with torch.no_grad():
            z = model.encode(torch.from_numpy(x)).numpy()
        return i % len(inputs), runtime.reconstruct(x), runtime.score(x), z

    with ThreadPoolExecutor(max_workers=8) as pool:
        for i, recon, score, z in pool.map(call, range(8 * len(inputs))):
            np.testing.assert_array_equal(recon, want_onnx[i])
            np.testing.assert_array_equal(score, want_scores[i])
            np.testing.assert_array_equal(z, want_torch[i])


def test_channel_last_images_are_told_to_transpose_not_reshape():
    # the hint once said reshape, which scrambles the pixels of (N, H, W, C) rows
    from aecore.runtime.arrays import _check_array

    with pytest.raises(ShapeError, match=r"channels come first: x.transpose\(0, 3, 1, 2\)"):
        _check_array(np.zeros((2, 8, 8, 3), np.float32), (3, 8, 8), "conv expects inputs", "x")
    with pytest.raises(ShapeError, match=r"reshape to \(N, 3, 8, 8\)"):
        _check_array(np.zeros((2, 192), np.float32), (3, 8, 8), "conv expects inputs", "x")


def test_image_axes_in_another_order_get_a_transpose_not_a_reshape():
    from aecore.runtime.arrays import _check_array

    with pytest.raises(ShapeError, match=r"another order: x.transpose\(0, 1, 3, 2\)"):
        _check_array(np.zeros((2, 3, 9, 7)), (3, 7, 9), "m expects inputs", "x")


def test_a_row_beyond_float32s_range_encodes_to_nan_without_a_warning(runtime):
    import warnings

    x = _data(2).astype(np.float64)
    x[1, 0] = 1e39
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        codes = runtime.encode(x)
    assert np.isfinite(codes[0]).all() and np.isnan(codes[1]).all()


def test_a_dataframe_of_nullable_columns_is_read_as_numbers(runtime):
    pd = pytest.importorskip("pandas")
    x = _data(3)
    frame = pd.DataFrame(x.astype(np.float64)).astype("Float64")
    np.testing.assert_allclose(runtime.encode(frame), runtime.encode(x), rtol=1e-6)
    frame.iloc[1, 0] = pd.NA
    codes = runtime.encode(frame)
    assert np.isnan(codes[1]).all() and np.isfinite(codes[[0, 2]]).all()
    with pytest.raises(DataError, match="got dtype object"):
        runtime.encode(pd.DataFrame(x).astype(object).assign(**{"0": "text"}).iloc[:, 1:])
