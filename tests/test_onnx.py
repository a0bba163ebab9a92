"""ONNX export: every registered model exports (full, encoder, decoder) to checked,
standard-op, self-contained files whose outputs match PyTorch; unexportable models fail
with an error naming the model and the operation."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch

import aecore
from aecore import registry
from aecore.base import Autoencoder
from aecore.data import Normalization
from aecore.errors import ConfigError, ModelFileError
from aecore.onnx import (
    MIN_OPSET,
    OnnxExportError,
    decompositions,
    export_onnx,
    export_protos,
    register_export_decomposition,
)
from aecore.onnx.diagnose import quiet
from aecore.onnx.graphs import BATCH_DIM
from aecore.runtime import OnnxAutoencoder, part_paths
from aecore.testing import IMAGE_SHAPE, VECTOR_SHAPE, ConformanceError, ModelSpec
from aecore.testing.onnx_parity import ATOL, RTOL, assert_onnx_parity, check_onnx_parity


def _fresh(cls, shape, hparams):
    return ModelSpec(cls, shape, hparams).build()


onnx = pytest.importorskip("onnx")

MODELS = aecore.list_models()
# the rbm warns about non-binary inputs; random [0, 1] inputs are fine for parity
pytestmark = pytest.mark.filterwarnings("ignore:.*non-binary values")


def _shape(cls) -> tuple[int, ...]:
    return VECTOR_SHAPE if 1 in cls.input_ranks else IMAGE_SHAPE


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """Each registered model, fresh with a per-feature normalisation, exported once
    (part="all") per test session: name -> (model, path of the full graph)."""
    cache: dict[str, tuple[Autoencoder, object]] = {}

    def get(name: str):
        if name not in cache:
            cls = aecore.model_class(name)
            shape = _shape(cls)
            model = _fresh(cls, shape, {}).eval()
            size = int(np.prod(shape))
            rng = np.random.default_rng(0)
            model.normalization = Normalization(
                "standardize", rng.normal(0.5, 0.1, size), rng.uniform(0.5, 2.0, size)
            )
            path = tmp_path_factory.mktemp(name) / f"{name}.onnx"
            assert export_onnx(model, path, part="all") == path
            cache[name] = (model, path)
        return cache[name]

    return get


def test_every_builtin_model_is_registered():
    # the parametrised tests below run over list_models(): make sure that is not empty
    assert "ae" in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_parity_with_torch_for_every_part_and_batch_size(name, exported):
    model, path = exported(name)
    files = part_paths(path)
    assert assert_onnx_parity(model, files, batch_sizes=(1, 7, 256)) is None


@pytest.mark.parametrize("name", MODELS)
def test_files_are_checked_self_contained_standard_and_carry_metadata(name, exported):
    model, path = exported(name)
    ids = set()
    for part, file in part_paths(path).items():
        proto = onnx.load(str(file))
        onnx.checker.check_model(proto, full_check=True)
        assert {op.domain for op in proto.opset_import} <= {"", "ai.onnx"}
        assert max(op.version for op in proto.opset_import) >= MIN_OPSET
        assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
        assert not any(
            t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer
        )
        for value in (*proto.graph.input, *proto.graph.output):
            assert value.type.tensor_type.shape.dim[0].dim_param == BATCH_DIM
        meta = {p.key: p.value for p in proto.metadata_props}
        assert meta["aecore.model"] == name
        assert meta["aecore.part"] == part
        assert json.loads(meta["aecore.config"]) == model.get_config()
        assert Normalization.from_dict(json.loads(meta["aecore.normalization"])) == (
            model.normalization
        )
        assert tuple(json.loads(meta["aecore.input_shape"])) == model.input_shape
        assert int(meta["aecore.latent_dim"]) == model.latent_dim
        assert meta["aecore.version"] == aecore.__version__
        ids.add(meta["aecore.export_id"])
    assert len(ids) == 1  # the three parts of one export say so


@pytest.mark.parametrize("name", MODELS)
def test_runtime_applies_the_stored_normalisation_like_torch(name, exported):
    model, path = exported(name)
    runtime = OnnxAutoencoder(path)
    norm = model.normalization
    x = np.random.default_rng(1).random((9, *model.input_shape)).astype(np.float32)
    # every served path takes rows clipped to the model's range, as the estimator does;
    # scores charge what lies beyond it (Autoencoder.score, given the rows as they are)
    given = torch.from_numpy(norm.apply(x))
    xn = given if model.input_range is None else given.clamp(*model.input_range)
    assert not torch.equal(given, xn) or model.input_range is None  # some rows lie beyond
    with torch.no_grad():
        z = model.encode(xn)
        x_hat = model(xn)
        decoded = model.decode(z)
    np.testing.assert_allclose(runtime.encode(x), z.numpy(), rtol=RTOL, atol=ATOL)
    # data units: the model output (normalised units) mapped back by the normalisation
    np.testing.assert_allclose(
        runtime.reconstruct(x), norm.invert(x_hat.numpy()), rtol=1e-5, atol=1e-4
    )
    np.testing.assert_allclose(
        runtime.decode(z.numpy()), norm.invert(decoded.numpy()), rtol=1e-5, atol=1e-4
    )
    expected_error = (x_hat - given).pow(2).flatten(1).mean(1).numpy()
    got = runtime.score(x, kind="reconstruction")
    np.testing.assert_allclose(got, expected_error, rtol=1e-4, atol=1e-6)
    # the default score is the model's own (an RBM's free energy), from the score graph
    assert runtime.default_score_kind == model.default_score_kind
    with torch.no_grad():
        expected_score = model.score(given).double().numpy()
    np.testing.assert_allclose(runtime.score(x), expected_score, rtol=1e-4, atol=1e-5)


def test_k_sparse_codes_export_as_topk_and_scatter(exported):
    if "sparse" not in MODELS:
        pytest.skip("sparse plugin not available")
    cls = aecore.model_class("sparse")
    model = _fresh(cls, VECTOR_SHAPE, {"penalty": "topk", "k": 2}).eval()
    protos = export_protos(model, "sparse", ("encoder",))
    ops = {n.op_type for n in protos["encoder"].graph.node}
    assert {"TopK", "ScatterElements"} <= ops, ops
    message = assert_onnx_parity(model, {"encoder": protos["encoder"].SerializeToString()})
    assert message is None
    with torch.no_grad():
        z = model.encode(torch.rand(5, *VECTOR_SHAPE))
    assert ((z != 0).sum(1) <= 2).all()


def test_the_kit_check_passes_for_ae():
    check_onnx_parity(ModelSpec(aecore.model_class("ae"), VECTOR_SHAPE))


# -- a tiny model to break --------------------------------------------------------------
class _Tiny(Autoencoder):
    """Linear autoencoder whose encoder output goes through ``self.squash``."""

    def __init__(self, *, input_shape=(6,), latent_dim=2):
        super().__init__(input_shape=input_shape, latent_dim=latent_dim)
        self.enc = torch.nn.Linear(self.input_size, latent_dim)
        self.dec = torch.nn.Linear(latent_dim, self.input_size)

    def squash(self, h):
        return h

    def encode(self, x):
        self.check_input(x)
        return self.squash(self.enc(x.flatten(1)))

    def decode(self, z):
        return self.dec(z).reshape(-1, *self.input_shape)

    def loss(self, x):
        return {"loss": (self(x) - x).pow(2).mean()}

    def get_config(self):
        return self.base_config()


@torch.library.custom_op("aecore_test::squash", mutates_args=())
def _squash_op(h: torch.Tensor) -> torch.Tensor:
    return torch.tanh(h)


@_squash_op.register_fake
def _(h):
    return torch.empty_like(h)


class _CustomOp(_Tiny):
    def squash(self, h):
        return torch.ops.aecore_test.squash(h)


class _DataDependent(_Tiny):
    def squash(self, h):
        if h.sum() > 0:  # Python control flow on tensor values cannot be traced
            return h
        return -h


class _FixedBatch(_Tiny):
    def squash(self, h):
        return h.reshape(2, -1).reshape(-1, self.latent_dim)  # the example's batch size


class _Untranslatable(_Tiny):
    def squash(self, h):
        # traces fine, but torch.onnx has no ONNX function for aten::cummax (torch 2.13);
        # if a later torch gains one, pick another op without a translation
        return torch.cummax(h, 1)[0]


class _Stochastic(_Tiny):
    def squash(self, h):
        return h + torch.randn_like(h)  # noise in the eval forward


class _ExportsDifferently(_Tiny):
    def squash(self, h):
        return h * 2 if torch.compiler.is_exporting() else h


@pytest.fixture
def registered():
    names = []

    def register(name, cls):
        registry.register(name, cls)
        names.append(name)
        return cls()

    yield register
    for name in names:
        registry.unregister(name)


def test_custom_op_without_equivalent_names_model_and_op(registered, tmp_path):
    model = registered("tiny-custom", _CustomOp)
    with pytest.raises(OnnxExportError, match=r"tiny-custom.*aecore_test::squash"):
        export_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_registered_decomposition_makes_a_custom_op_exportable(registered, monkeypatch):
    model = registered("tiny-custom2", _CustomOp).eval()
    monkeypatch.setattr(decompositions, "_DECOMPOSITIONS", {})  # forget it after this test
    register_export_decomposition(torch.ops.aecore_test.squash, torch.tanh)
    protos = export_protos(model, "tiny-custom2", ("encoder",))
    assert "Tanh" in {n.op_type for n in protos["encoder"].graph.node}
    assert assert_onnx_parity(model, {"encoder": protos["encoder"].SerializeToString()}) is None


def test_data_dependent_control_flow_names_model_and_line(registered, tmp_path):
    model = registered("tiny-branchy", _DataDependent)
    with pytest.raises(OnnxExportError, match=r"tiny-branchy.*if h\.sum\(\) > 0.*test_onnx\.py"):
        export_onnx(model, tmp_path / "m.onnx")


def test_an_op_without_onnx_translation_is_named(registered, tmp_path):
    model = registered("tiny-cummax", _Untranslatable)
    with pytest.raises(OnnxExportError, match=r"tiny-cummax.*aten::cummax.*translation to ONNX"):
        export_onnx(model, tmp_path / "m.onnx")


def test_a_forward_tied_to_one_batch_size_is_explained(registered, tmp_path):
    model = registered("tiny-fixed", _FixedBatch)
    with pytest.raises(OnnxExportError, match=r"tiny-fixed.*works only for the batch size"):
        export_onnx(model, tmp_path / "m.onnx")


def test_random_ops_in_the_eval_forward_are_refused(registered, tmp_path):
    model = registered("tiny-noisy", _Stochastic)
    with pytest.raises(OnnxExportError, match=r"tiny-noisy.*Random\w+.*deterministic"):
        export_onnx(model, tmp_path / "m.onnx")


def test_the_kit_check_catches_an_export_that_differs(registered):
    registered("tiny-differs", _ExportsDifferently)
    with pytest.raises(
        ConformanceError, match=r"onnx parity: full graph at batch 1: onnxruntime differs"
    ):
        check_onnx_parity(ModelSpec(_ExportsDifferently, (6,)))


class _DoubleDecode(_Tiny):
    def decode(self, z):
        return super().decode(z).double()


class _NumpyConfig(_Tiny):
    def get_config(self):
        return {**super().get_config(), "scale": np.float32(1.0)}


class _WideDecodeInput(_Tiny):
    def decode(self, z):  # a code one wider than the decoder takes: fails in tracing
        return self.dec(torch.cat([z, z[:, :1]], 1)).reshape(-1, *self.input_shape)


def test_exports_that_nothing_could_serve_are_refused_by_name(registered, tmp_path):
    # a float64 output wrote a graph the runtime refused to open (or, with a
    # normalisation, failed onnx.checker); a numpy number in the config was json's TypeError
    model = registered("tiny-f64", _DoubleDecode)
    with pytest.raises(
        OnnxExportError, match=r"tiny-f64 \(full\).*'x_hat' is float64, not float32"
    ):
        export_onnx(model, tmp_path / "m.onnx")
    model.normalization = Normalization("minmax", [0.0], [2.0])
    with pytest.raises(OnnxExportError, match="is float64, not float32"):
        export_onnx(model, tmp_path / "m.onnx", part="all")
    model = registered("tiny-np", _NumpyConfig)
    with pytest.raises(OnnxExportError, match=r"_NumpyConfig.get_config\(\) is not JSON-serial"):
        export_onnx(model, tmp_path / "m.onnx")
    # a shape mismatch met while tracing: one error, without the traceback torch's fake
    # tensors log (to the stderr torch's handler holds, which the CLI printed)
    model = registered("tiny-wide", _WideDecodeInput)
    with pytest.raises(OnnxExportError, match="failed in tracing"):
        export_onnx(model, tmp_path / "m.onnx")
    fake_tensors = logging.getLogger("torch._subclasses.fake_tensor")
    with quiet():
        assert not fake_tensors.isEnabledFor(logging.ERROR)
    assert fake_tensors.isEnabledFor(logging.ERROR)
    assert not list(tmp_path.iterdir())


def test_unregistered_model_is_refused(tmp_path):
    with pytest.raises(aecore.registry.RegistryError, match="not a registered model"):
        export_onnx(_Tiny(), tmp_path / "m.onnx")


# -- arguments and files ------------------------------------------------------------------
def test_export_of_a_saved_folder_writes_one_part_and_refuses_to_overwrite(tmp_path):
    model = _fresh(aecore.model_class("ae"), VECTOR_SHAPE, {"hidden": [8]}).eval()
    model.normalization = Normalization("minmax", [0.0], [16.0])
    aecore.save(model, tmp_path / "folder")
    out = tmp_path / "enc.onnx"
    export_onnx(tmp_path / "folder", out, part="encoder")
    runtime = OnnxAutoencoder(out)
    assert runtime.part == "encoder" and runtime.parts == ("encoder",)
    assert runtime.normalization == model.normalization
    x = np.random.default_rng(0).random((4, 12)) * 16
    with torch.no_grad():
        want = model.encode(torch.from_numpy(model.normalization.apply(x)))
    np.testing.assert_allclose(runtime.encode(x), want.numpy(), rtol=1e-5, atol=1e-5)
    with pytest.raises(ModelFileError, match=r"reconstruct|decoder"):
        runtime.decode(np.zeros((1, 3), np.float32))
    with pytest.raises(ModelFileError, match="exists; pass overwrite=True"):
        export_onnx(tmp_path / "folder", out, part="encoder")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"part": "middle"}, "part must be one of full, encoder, decoder, all"),
        ({"opset": 17}, "opset must be an int >= 18"),
        ({"opset": 999}, "opset 999 is newer"),
    ],
)
def test_bad_arguments(kwargs, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        export_onnx(_Tiny(), tmp_path / "m.onnx", **kwargs)


def test_bad_targets(tmp_path):
    with pytest.raises(ConfigError, match=r"end in \.onnx"):
        export_onnx(_Tiny(), tmp_path / "m.bin")
    with pytest.raises(ConfigError, match="expects an aecore.Autoencoder or a model folder"):
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx")
    with pytest.raises(ModelFileError, match="not a model folder"):
        export_onnx(tmp_path / "nothing", tmp_path / "m.onnx")


def test_part_paths_from_any_part():
    names = {p: f.name for p, f in part_paths("dir/m.decoder.onnx").items()}
    assert names == {"full": "m.onnx", "encoder": "m.encoder.onnx", "decoder": "m.decoder.onnx"}


@pytest.mark.parametrize("name", MODELS)
def test_the_traced_score_is_the_models_score_for_every_kind(name):
    # a score graph is traced from traceable_score: it once forwarded "reconstruction"
    # to anomaly_score, which gave an RBM's free energy under that name
    cls = aecore.model_class(name)
    model = _fresh(cls, _shape(cls), {}).eval()
    x = torch.rand(5, *model.input_shape, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        for kind in model.exportable_score_kinds:
            traced = model.traceable_score(x, kind)
            torch.testing.assert_close(traced, model.score(x, kind=kind), rtol=1e-4, atol=1e-5)
