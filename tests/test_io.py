"""Model folders: round trip, refusal to overwrite, and files that are not what they claim."""

import json
import pickle

import numpy as np
import pytest
import torch

import aecore
from aecore.data import Normalization
from aecore.errors import ModelFileError


@pytest.fixture
def saved(tmp_path):
    torch.manual_seed(0)
    model = aecore.create("ae", input_shape=(6,), latent_dim=2, hidden=[8])
    model.normalization = Normalization("standardize", np.arange(6.0), np.ones(6) * 2)
    aecore.save(model, tmp_path / "m", metrics={"test_mse": 0.5}, data={"source": "digits"})
    return model, tmp_path / "m"


def test_round_trip(saved):
    model, path = saved
    loaded = aecore.load(path)
    x = torch.rand(4, 6)
    assert torch.equal(model.eval()(x), loaded(x))
    assert not loaded.training
    assert loaded.normalization == model.normalization
    record = json.loads((path / "model.json").read_text())
    assert record["model"] == "ae" and record["config"] == model.get_config()
    assert record["metrics"] == {"test_mse": 0.5} and record["input_shape"] == [6]
    assert record["aecore_version"] == aecore.__version__ and record["torch_version"]
    assert sorted(p.name for p in path.iterdir()) == ["model.json", "model.safetensors"]


def test_a_float64_model_loads_in_float64(tmp_path):
    torch.manual_seed(0)
    model = aecore.create("ae", input_shape=(6,), latent_dim=2, hidden=[8]).double()
    aecore.save(model, tmp_path / "m")
    loaded = aecore.load(tmp_path / "m")
    x = torch.rand(4, 6, dtype=torch.float64)
    assert next(loaded.parameters()).dtype == torch.float64
    assert torch.equal(model.eval()(x), loaded(x))  # not rounded through float32
    # 16-bit weights load into float32, in which every model trains
    aecore.save(model.bfloat16(), tmp_path / "b")
    assert next(aecore.load(tmp_path / "b").parameters()).dtype == torch.float32


def test_refuses_to_overwrite_a_saved_model(saved):
    model, path = saved
    before = (path / "model.safetensors").read_bytes()
    with pytest.raises(ModelFileError, match="already holds a saved model; pass overwrite=True"):
        aecore.save(model, path)
    assert (path / "model.safetensors").read_bytes() == before
    aecore.save(model, path, overwrite=True)


class Boom:
    """Unpickling this creates a file: proof that something was executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_renamed_safetensors_is_refused_and_never_executed(saved, tmp_path):
    _, path = saved
    marker = tmp_path / "executed"
    (path / "model.safetensors").write_bytes(pickle.dumps(Boom(str(marker))))
    with pytest.raises(ModelFileError, match="not a safetensors file: it looks like a pickle"):
        aecore.load(path)
    torch.save({"w": torch.zeros(1)}, path / "model.safetensors")
    with pytest.raises(ModelFileError, match="not a safetensors file: it looks like a pickle"):
        aecore.load(path)
    assert not marker.exists()


def test_corrupt_header(saved):
    _, path = saved
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes((10**12).to_bytes(8, "little") + blob[8:])
    with pytest.raises(ModelFileError, match=r"corrupt header \(claims 1000000000000 header bytes"):
        aecore.load(path)
    n = int.from_bytes(blob[:8], "little")
    (path / "model.safetensors").write_bytes(blob[:8] + b"{" * n + blob[8 + n :])
    with pytest.raises(ModelFileError, match="corrupt header"):
        aecore.load(path)


def test_truncated_weights(saved):
    _, path = saved
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:-40])
    with pytest.raises(
        ModelFileError, match="truncated or corrupt: tensor .* lies outside the file"
    ):
        aecore.load(path)


def test_weights_that_do_not_match_the_config(saved):
    _, path = saved
    record = json.loads((path / "model.json").read_text())
    record["config"]["hidden"] = [9]
    (path / "model.json").write_text(json.dumps(record))
    with pytest.raises(
        ModelFileError,
        match=r"do not match the model config: .*has shape \(8, 6\), the config builds \(9, 6\)",
    ):
        aecore.load(path)


def test_unknown_model_name(saved):
    _, path = saved
    record = json.loads((path / "model.json").read_text())
    record["model"] = "no-such-model"
    (path / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelFileError, match="unknown model 'no-such-model'"):
        aecore.load(path)


def test_config_the_model_rejects(saved):
    _, path = saved
    record = json.loads((path / "model.json").read_text())
    record["config"]["activation"] = "swish9"
    (path / "model.json").write_text(json.dumps(record))
    with pytest.raises(
        ModelFileError, match="saved config does not build: activation must be one of"
    ):
        aecore.load(path)
    record["config"]["surprise"] = 1
    (path / "model.json").write_text(json.dumps(record))
    with pytest.raises(ModelFileError, match="does not fit ae: .*surprise"):
        aecore.load(path)


def test_not_a_model_folder(tmp_path):
    with pytest.raises(ModelFileError, match="not a model folder \\(no such directory\\)"):
        aecore.load(tmp_path / "nothing")
    (tmp_path / "d").mkdir()
    with pytest.raises(ModelFileError, match="not a model folder \\(no model.json file\\)"):
        aecore.load(tmp_path / "d")
    (tmp_path / "d" / "model.json").write_text("{not json")
    with pytest.raises(ModelFileError, match="model.json is not valid JSON"):
        aecore.load(tmp_path / "d")
    (tmp_path / "d" / "model.json").write_text('{"format": "something-else"}')
    with pytest.raises(ModelFileError, match="is not an aecore model record"):
        aecore.load(tmp_path / "d")


def test_a_valid_file_whose_header_length_starts_with_0x80_loads(tmp_path):
    """The header length is little-endian: its first byte may look like a pickle opcode."""
    from aecore.io.tensors import load_tensors, save_tensors

    path = tmp_path / "t.safetensors"
    for pad in range(300):
        save_tensors(path, {"w": torch.arange(3.0)}, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    else:
        pytest.fail("no padding gave a header length starting with 0x80")
    tensors, meta = load_tensors(path)
    assert tensors["w"].tolist() == [0.0, 1.0, 2.0] and meta["pad"] == "x" * pad


def test_malformed_record_fields(saved):
    _, path = saved
    record = json.loads((path / "model.json").read_text())
    bad = {**record, "format_version": "2"}
    (path / "model.json").write_text(json.dumps(bad))
    with pytest.raises(ModelFileError, match="'format_version' must be an integer; got '2'"):
        aecore.load(path)
    bad = {**record, "normalization": {"kind": "minmax"}}
    (path / "model.json").write_text(json.dumps(bad))
    with pytest.raises(ModelFileError, match="malformed normalization in model.json"):
        aecore.load(path)


def test_a_record_that_does_not_serialise_writes_nothing(saved):
    # numpy numbers (a metric computed with numpy) are JSON's numbers; anything else is
    # refused before a file changes: the folder keeps the old model whole
    model, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(ModelFileError, match="its 'metrics' record does not serialise"):
        aecore.save(model, path, metrics={"mse": object()}, overwrite=True)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    aecore.save(model, path, metrics={"mse": np.float32(0.25)}, overwrite=True)
    assert aecore.load(path).metadata["metrics"] == {"mse": 0.25}


def test_weights_of_another_save_are_refused_not_paired(saved, tmp_path, monkeypatch):
    # a save writes its weights, then model.json: a load in between (or after a crash
    # there) must not pair the old record with the new weights
    from aecore.io import model_folder

    model, path = saved
    other = aecore.create("ae", input_shape=(6,), latent_dim=2, hidden=[8])
    aecore.save(other, tmp_path / "other")
    (path / "model.safetensors").write_bytes(
        (tmp_path / "other" / "model.safetensors").read_bytes()
    )
    monkeypatch.setattr(model_folder, "SAVE_WAIT_SECONDS", 0.05)
    with pytest.raises(ModelFileError, match="come from different saves"):
        aecore.load(path)


def test_weights_rewritten_by_another_tool_still_load(saved):
    # safetensors' own save_file keeps no metadata: no save id to compare, so the pair
    # loads (a save id on one side alone proves nothing either way)
    from safetensors.torch import load_file, save_file

    model, path = saved
    save_file(load_file(path / "model.safetensors"), path / "model.safetensors")
    loaded = aecore.load(path)
    for a, b in zip(model.state_dict().values(), loaded.state_dict().values()):
        assert torch.equal(a, b)


def test_a_record_that_does_not_fit_the_model_is_refused(saved):
    _, path = saved
    record = json.loads((path / "model.json").read_text())
    for change, match in (
        ({"normalization": {"kind": "standardize", "shift": [0.0] * 3, "scale": [1.0] * 3}},
         "the normalisation has 3 features; the model has 6"),
        ({"normalization": {"kind": "standardize", "shift": [0.0] * 6, "scale": [float("nan")] * 6}},
         "NaN or infinite"),
        ({"feature_names": ["a", "b"]}, "names 2 features; the model has 6"),
        # the top-level sizes restate the config: edited alone they would be ignored
        ({"latent_dim": 4}, "gives latent_dim 4, but its config builds 2"),
        ({"input_shape": [7]}, r"gives input_shape \[7\], but its config builds \[6\]"),
    ):  # fmt: skip
        (path / "model.json").write_text(json.dumps({**record, **change}))
        with pytest.raises(ModelFileError, match=match):
            aecore.load(path)


def test_paths_that_cannot_hold_a_model_say_so(saved, tmp_path):
    from aecore.errors import FileWriteError

    model, path = saved
    (tmp_path / "file").write_text("x")
    with pytest.raises(FileWriteError, match="could not create the folder"):
        aecore.save(model, tmp_path / "file" / "sub")
    with pytest.raises(ModelFileError, match=r"not a model folder \(a file\)"):
        aecore.load(tmp_path / "file")
    (path / "model.safetensors").unlink()
    (path / "model.safetensors").mkdir()
    with pytest.raises(ModelFileError, match="no model.safetensors file"):
        aecore.load(path)
