"""Activation caches: extraction with hooks (contents, manifest, checksums, resume,
refusals, model and dtype forms), reading (indexing, block shuffle, Batches, training,
the activations: source), the CLI and the splice metric."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import aecore
from aecore.activations import (
    ActivationCache,
    block_shuffle_order,
    ce_loss_recovered,
    extract_activations,
    read_manifest,
)
from aecore.cli.main import main
from aecore.data import load_data
from aecore.errors import ConfigError, DataError, ModelFileError, ShapeError
from aecore.training.batches import Batches

transformers = pytest.importorskip("transformers")

HOOKS = ["transformer.h.0", "transformer.h.1.mlp"]
N_INPUTS, SEQ, D = 24, 16, 32
SHARD_ROWS = 100  # not a multiple of SEQ: shards split inputs, resume must cut rows


def _tiny_lm(seed: int = 0):
    config = transformers.GPT2Config(
        n_layer=2, n_embd=D, n_head=2, vocab_size=100, n_positions=64,
        bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="module")
def lm_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm") / "gpt2"
    _tiny_lm().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    ids = np.random.default_rng(0).integers(0, 100, (N_INPUTS, SEQ))
    path = tmp_path_factory.mktemp("tokens") / "tokens.npy"
    np.save(path, ids)
    return ids, f"npy:{path}"


def _extract(lm_dir, data, out, **kw):
    settings = {"dtype": "float32", "shard_rows": SHARD_ROWS, "batch_size": 5, **kw}
    return extract_activations(str(lm_dir), data, HOOKS, out, **settings)


@pytest.fixture(scope="module")
def cache_dir(lm_dir, tokens, tmp_path_factory):
    out = tmp_path_factory.mktemp("caches") / "full"
    _extract(lm_dir, tokens[1], out)
    return out


def _direct(model, names, inputs):
    """Each named module's output over ``inputs``, as rows, captured with plain hooks."""
    got = {name: [] for name in names}
    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda m, a, out, name=name: got[name].append(out[0] if isinstance(out, tuple) else out)
        )
        for name in names
    ]
    with torch.no_grad():
        model(inputs)
    for h in handles:
        h.remove()
    return {name: torch.cat(v).reshape(-1, v[0].shape[-1]).numpy() for name, v in got.items()}


# -- extraction ---------------------------------------------------------------------
def test_shards_hold_the_activations_of_both_hooks_from_one_pass(cache_dir, lm_dir, tokens):
    model = transformers.GPT2LMHeadModel.from_pretrained(lm_dir, local_files_only=True).eval()
    expected = _direct(model, HOOKS, torch.as_tensor(tokens[0]))
    for hook in HOOKS:
        cache = ActivationCache(cache_dir, hook)
        assert cache.shape == (N_INPUTS * SEQ, D) and cache.dtype == np.float32
        np.testing.assert_allclose(cache[np.arange(len(cache))], expected[hook], atol=1e-5)


def test_the_manifest_records_the_extraction_and_each_shards_checksum(cache_dir, lm_dir, tokens):
    manifest = json.loads((cache_dir / "manifest.json").read_text())
    assert manifest["format"] == "aecore-activations" and manifest["complete"] is True
    assert manifest["model"] == str(lm_dir.resolve()) and manifest["data"] == tokens[1]
    assert manifest["input_kind"] == "tokens" and manifest["input_shape"] == [N_INPUTS, SEQ]
    assert (manifest["dtype"], manifest["shard_rows"]) == ("float32", SHARD_ROWS)
    assert manifest["finite"] is True  # checked while extracting: loading skips the scan
    assert list(manifest["hooks"]) == HOOKS
    for entry in manifest["hooks"].values():
        assert (entry["d"], entry["rows"], entry["rows_per_input"]) == (D, N_INPUTS * SEQ, SEQ)
        sizes = [s["rows"] for s in entry["shards"]]
        assert sizes == [SHARD_ROWS] * 3 + [N_INPUTS * SEQ - 3 * SHARD_ROWS]
        for shard in entry["shards"]:
            data = (cache_dir / shard["file"]).read_bytes()
            assert hashlib.sha256(data).hexdigest() == shard["sha256"]
    assert not list(cache_dir.rglob("*.tmp"))
    ActivationCache(cache_dir, HOOKS[0]).verify()


def test_verify_finds_a_changed_shard(cache_dir, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    shard = copy / read_manifest(copy)["hooks"][HOOKS[1]]["shards"][1]["file"]
    rows = np.load(shard)
    rows[3, 4] += 1
    np.save(shard, rows)
    with pytest.raises(DataError, match="does not match its checksum"):
        ActivationCache(copy, HOOKS[1]).verify()
    # a NaN from damage in a cache written finite: the loaders trust the manifest and
    # skip their scan, so reading names it (training had saved a model of test MSE nan)
    rows[5, 0] = np.nan
    np.save(shard, rows)
    cache = ActivationCache(copy, HOOKS[1])
    first = int(cache.offsets[1])
    for read in (lambda: cache[first : first + 10], lambda: cache[np.array([first + 5, 0])]):
        with pytest.raises(DataError, match="written finite: a shard is damaged"):
            read()


class _Stop(Exception):
    pass


def test_an_interrupted_extraction_resumes_to_the_same_rows(cache_dir, lm_dir, tokens, tmp_path):
    out = tmp_path / "resumed"
    calls = []

    def stop_after_two_batches(done, total):
        calls.append(done)
        if len(calls) == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _extract(lm_dir, tokens[1], out, progress=stop_after_two_batches)
    partial = read_manifest(out)
    # 10 inputs = 160 rows per hook ran: one complete shard each, the rest was dropped
    assert not partial["complete"]
    assert [e["rows"] for e in partial["hooks"].values()] == [SHARD_ROWS] * 2
    with pytest.raises(DataError, match="unfinished"):
        ActivationCache(out, HOOKS[0])
    assert len(ActivationCache(out, HOOKS[0], allow_incomplete=True)) == SHARD_ROWS

    seen = []
    _extract(lm_dir, tokens[1], out, progress=lambda done, total: seen.append(done))
    assert seen[0] == 6 + 5  # resumed at input 6 (96 of the 100 rows), not at 0
    assert read_manifest(out)["complete"]
    for hook in HOOKS:
        resumed, whole = ActivationCache(out, hook), ActivationCache(cache_dir, hook)
        assert resumed.shape == whole.shape
        np.testing.assert_allclose(resumed[:], whole[:], atol=1e-5)


def test_a_resume_with_other_settings_or_an_overwrite_needs_the_flag(
    cache_dir, lm_dir, tokens, tmp_path
):
    copy = tmp_path / "copy"
    shutil.copytree(cache_dir, copy)
    before = (copy / "manifest.json").read_text()
    with pytest.raises(ConfigError, match=r"dtype: 'float32' -> 'float16'") as info:
        _extract(lm_dir, tokens[1], copy, dtype="float16", shard_rows=50)
    assert "shard_rows: 100 -> 50" in str(info.value) and "--overwrite" in str(info.value)
    other_lm = tmp_path / "other_lm"
    _tiny_lm(seed=1).save_pretrained(other_lm)
    with pytest.raises(ConfigError, match="model_fingerprint"):
        _extract(other_lm, tokens[1], copy)
    # the same settings again: complete, nothing rewritten
    _extract(lm_dir, tokens[1], copy)
    assert (copy / "manifest.json").read_text() == before
    _extract(lm_dir, tokens[1], copy, dtype="float16", overwrite=True)
    assert read_manifest(copy)["dtype"] == "float16"
    assert len(ActivationCache(copy, HOOKS[0])) == N_INPUTS * SEQ


def test_a_folder_that_is_not_a_cache_is_never_written_into(lm_dir, tokens, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not an activation cache"):
        _extract(lm_dir, tokens[1], tmp_path, overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


IMPORTABLE = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(), nn.Linear(24, 6))

MODEL = build()


class Pooled(nn.Module):
    # token embeddings (one row per token) and a pooled head (one row per input)

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed, self.head = nn.Embedding(100, 8), nn.Linear(8, 4)

    def forward(self, ids):
        return self.head(self.embed(ids).mean(1))


def shared():  # one layer applied twice (ALBERT's kind of sharing)
    torch.manual_seed(0)
    layer = nn.Linear(8, 8)
    return nn.Sequential(layer, layer)


def inplace():  # the next module changes the hooked one's output in place
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 24), nn.ReLU(inplace=True), nn.Linear(24, 6))


def wide(ablated=False, act=nn.ReLU):  # a row past the first 256 weights, zeroed
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(8, 64), act())
    if ablated:
        with torch.no_grad():
            net[0].weight[40] = 0
    return net


def double():
    return build().double()
"""


@pytest.fixture
def importable(tmp_path, monkeypatch):
    (tmp_path / "tiny_mlp.py").write_text(IMPORTABLE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "tiny_mlp", raising=False)
    x = np.random.default_rng(1).standard_normal((40, 8)).astype(np.float32)
    np.save(tmp_path / "rows.npy", x)
    return x, f"npy:{tmp_path / 'rows.npy'}"


@pytest.mark.parametrize("spec", ["tiny_mlp:build", "tiny_mlp:MODEL"])
def test_an_import_path_model_over_float_rows(importable, spec, tmp_path):
    x, data = importable
    manifest = extract_activations(spec, data, ["0", "2"], tmp_path / "c", shard_rows=16,
                                   batch_size=7, dtype="float32")  # fmt: skip
    assert manifest["model"] == spec and manifest["input_kind"] == "rows"
    import tiny_mlp

    net = tiny_mlp.build()
    with torch.no_grad():
        first = net[0](torch.from_numpy(x))
        expected = {"0": first, "2": net[2](net[1](first))}
    for hook, rows in expected.items():
        cache = ActivationCache(tmp_path / "c", hook)
        assert manifest["hooks"][hook]["rows_per_input"] == 1
        np.testing.assert_allclose(cache[:], rows.numpy(), atol=1e-6)


@pytest.mark.parametrize(
    ("dtype", "stored", "torch_dtype"),
    [("float16", np.float16, torch.float16), ("bfloat16", np.uint16, torch.bfloat16),
     ("float32", np.float32, torch.float32)],
)  # fmt: skip
def test_each_dtype_is_stored_and_read_back(importable, tmp_path, dtype, stored, torch_dtype):
    x, data = importable
    manifest = extract_activations("tiny_mlp:build", data, ["0"], tmp_path / "c", dtype=dtype)
    assert manifest["dtype"] == dtype and manifest["storage"] == np.dtype(stored).name
    shard = np.load(tmp_path / "c" / manifest["hooks"]["0"]["shards"][0]["file"])
    assert shard.dtype == stored
    import tiny_mlp

    with torch.no_grad():
        exact = tiny_mlp.build()[0](torch.from_numpy(x))
    rows = ActivationCache(tmp_path / "c")[:]  # one hook: no name needed
    assert rows.dtype == np.float32
    np.testing.assert_array_equal(rows, exact.to(torch_dtype).float().numpy())


def test_hooks_with_different_rows_per_input_resume_each_at_its_own_row(importable, tmp_path):
    ids = np.random.default_rng(2).integers(0, 100, (30, 16))
    np.save(tmp_path / "ids.npy", ids)
    data, hooks = f"npy:{tmp_path / 'ids.npy'}", ["embed", "head"]
    settings = {"shard_rows": 10, "batch_size": 2, "dtype": "float32"}
    extract_activations("tiny_mlp:Pooled", data, hooks, tmp_path / "whole", **settings)

    def stop(done, total):
        if done == 14:
            raise _Stop

    with pytest.raises(_Stop):
        extract_activations("tiny_mlp:Pooled", data, hooks, tmp_path / "cut", progress=stop,
                            **settings)  # fmt: skip
    # embed ran ahead (220 rows = 13.75 inputs), head is at 10 inputs: resume at 10
    # and drop embed's first 60 rows, more than one batch of it
    assert [e["rows"] for e in read_manifest(tmp_path / "cut")["hooks"].values()] == [220, 10]
    extract_activations("tiny_mlp:Pooled", data, hooks, tmp_path / "cut", **settings)
    for hook, per_input in zip(hooks, (16, 1)):
        whole, cut = (
            ActivationCache(tmp_path / "whole", hook),
            ActivationCache(tmp_path / "cut", hook),
        )
        assert len(cut) == 30 * per_input
        np.testing.assert_allclose(cut[:], whole[:], atol=1e-6)


def test_max_rows_caps_each_hook(importable, tmp_path):
    _, data = importable
    extract_activations("tiny_mlp:build", data, ["0", "2"], tmp_path / "c", max_rows=25,
                        batch_size=10, shard_rows=10)  # fmt: skip
    assert [len(ActivationCache(tmp_path / "c", h)) for h in ("0", "2")] == [25, 25]


def test_errors_say_what_was_expected_and_what_came(lm_dir, tokens, tmp_path, importable):
    data = tokens[1]
    with pytest.raises(ConfigError, match=r"no module 'transformer\.h\.7'.*transformer\.h\.1"):
        extract_activations(str(lm_dir), data, ["transformer.h.7"], tmp_path / "a")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelFileError, match="config.json"):
        extract_activations(str(tmp_path / "empty"), data, HOOKS, tmp_path / "b")
    with pytest.raises(ModelFileError, match="no such folder, and not an import path"):
        extract_activations("no/such/model", data, HOOKS, tmp_path / "b")
    with pytest.raises(ConfigError, match="cannot import"):
        extract_activations("no_such_module_xyz:build", data, HOOKS, tmp_path / "b")
    with pytest.raises(ConfigError, match="dtype must be one of float16, bfloat16, float32"):
        extract_activations(str(lm_dir), data, HOOKS, tmp_path / "b", dtype="int8")
    np.save(tmp_path / "big_ids.npy", np.full((4, 8), 500))
    with pytest.raises(DataError, match=r"token id 500 in input row 0 .*0\.\.99"):
        extract_activations(str(lm_dir), f"npy:{tmp_path / 'big_ids.npy'}", HOOKS, tmp_path / "c")
    with pytest.raises(DataError, match="file not found"):
        extract_activations(str(lm_dir), "npy:/no/such.npy", HOOKS, tmp_path / "d")
    assert not (tmp_path / "b").exists() and not (tmp_path / "d").exists()
    # float rows into a language model: its own error, said as what came, and no cache
    # left to refuse the retry (it was an internal error and a stale manifest)
    np.save(tmp_path / "floats.npy", np.zeros((4, 8), np.float32))
    with pytest.raises(DataError, match=r"failed on input rows 0-3 \(float rows.*integer token"):
        extract_activations(str(lm_dir), f"npy:{tmp_path / 'floats.npy'}", HOOKS, tmp_path / "e")
    assert not (tmp_path / "e" / "manifest.json").exists()


def test_a_malformed_manifest_is_named_and_never_deletes_outside_its_cache(
    cache_dir, lm_dir, tokens, tmp_path
):
    # a hook "dir" of ".." once had an overwrite delete the folder above the cache
    import json
    import shutil

    project = tmp_path / "project"
    shutil.copytree(cache_dir, project / "cache")
    (project / "results.txt").write_text("keep me")
    path = project / "cache" / "manifest.json"
    good = json.loads(path.read_text())
    for hook_change, says in (
        ({"dir": ".."}, r"dir must be a folder name inside the cache, got '\.\.'"),
        ({"d": None}, "d is missing"),
        ({"shards": "x"}, "shards must be a list"),
    ):
        manifest = json.loads(json.dumps(good))
        manifest["hooks"][HOOKS[0]].update(hook_change)
        path.write_text(json.dumps(manifest))
        with pytest.raises(DataError, match=rf"malformed: hook '{HOOKS[0]}': {says}"):
            ActivationCache(project / "cache", HOOKS[0])
    manifest["hooks"][HOOKS[0]]["dir"] = ".."
    path.write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="malformed"):
        _extract(lm_dir, tokens[1], project / "cache", overwrite=True)
    assert (project / "results.txt").read_text() == "keep me"


# -- reading ------------------------------------------------------------------------
def test_indexing_reads_rows_across_shards_in_the_order_asked(cache_dir):
    cache = ActivationCache(cache_dir, HOOKS[0])
    every = np.concatenate([np.load(cache_dir / s["file"]) for s in cache.shards])
    idx = np.array([383, 5, 99, 100, 5, 250, -1])
    np.testing.assert_array_equal(cache[idx], every[idx])
    np.testing.assert_array_equal(cache[90:310], every[90:310])
    np.testing.assert_array_equal(cache[::7], every[::7])
    np.testing.assert_array_equal(cache[-2], every[-2])
    np.testing.assert_array_equal(np.asarray(cache), every)
    with pytest.raises(IndexError):
        cache[np.array([len(cache)])]
    with pytest.raises(IndexError):
        cache[np.ones(len(cache), bool)]


def test_a_cache_not_known_to_be_finite_is_scanned_when_loaded(tmp_path):
    from aecore.activations.manifest import new_manifest
    from aecore.activations.writer import CacheWriter

    writer = CacheWriter(tmp_path / "c", new_manifest(["h"], "float16", 4))
    rows = np.ones((10, 3), np.float16)
    rows[5, 1] = np.nan
    writer.write("h", rows)
    writer.finish()
    with pytest.raises(DataError, match="nan at row 5, feature 1"):
        load_data(f"activations:{tmp_path / 'c'}")


def test_the_block_shuffle_is_a_seeded_permutation_read_in_windows():
    n, block, buffer = 10_000, 64, 4
    order = block_shuffle_order(n, 0, 7, block_rows=block, buffer_blocks=buffer)
    assert order.dtype == torch.int64 and torch.equal(order.sort().values, torch.arange(n))
    assert torch.equal(order, block_shuffle_order(n, 0, 7, block_rows=block, buffer_blocks=buffer))
    assert not torch.equal(
        order, block_shuffle_order(n, 1, 7, block_rows=block, buffer_blocks=buffer)
    )
    assert not torch.equal(
        order, block_shuffle_order(n, 0, 8, block_rows=block, buffer_blocks=buffer)
    )
    window = block * buffer
    where = torch.empty(n, dtype=torch.long)
    where[order] = torch.arange(n)  # each row's position in the order
    for b in range(-(-n // block)):  # a block's rows are read within one window
        span = where[b * block : (b + 1) * block]
        assert span.max() - span.min() < window
    whole = block_shuffle_order(block * buffer * 3, 0, 7, block_rows=block, buffer_blocks=buffer)
    for start in range(0, len(whole), window):  # whole blocks: windows are aligned
        assert len(torch.unique(whole[start : start + window] // block)) == buffer
    assert not torch.equal(order[:window].sort().values, order[:window])  # mixed inside


def test_batches_follow_the_caches_order_also_on_a_held_out_split(cache_dir):
    cache = ActivationCache(cache_dir, HOOKS[0], block_rows=16, buffer_blocks=2)
    batches = Batches(cache, 32, shuffle=True, seed=3, name="data")
    assert torch.equal(batches.order(2), cache.epoch_order(2, 3))
    assert not torch.equal(batches.order(2, Batches.PRETRAIN_STREAM), batches.order(2))
    assert torch.equal(Batches(cache, 32, False, 3, "d").order(0), torch.arange(len(cache)))
    train, val = batches.hold_out(0.25, 3)
    positions = train.order(1)
    assert torch.equal(positions.sort().values, torch.arange(train.n))
    visited = train.rows[positions]  # the data's rows, in the cache's own sequence
    full = cache.epoch_order(1, 3)
    assert torch.equal(visited, full[torch.isin(full, train.rows)])
    drawn = torch.cat(list(train.epoch(1)))
    np.testing.assert_array_equal(drawn.numpy(), cache[visited.numpy()])


def test_the_trainer_fits_an_autoencoder_on_a_cache(cache_dir):
    cache = ActivationCache(cache_dir, HOOKS[0])
    model = aecore.create("ae", input_shape=(D,), latent_dim=4)
    history = aecore.Trainer(epochs=1, progress=False, batch_size=64).fit(model, cache)
    assert len(history.epochs) == 1


def test_the_activations_source_trains_through_the_pipeline(cache_dir, tmp_path):
    from aecore.pipeline import train

    dataset = load_data(f"activations:{cache_dir}:{HOOKS[1]}")
    assert isinstance(dataset.x, ActivationCache) and dataset.shape == (D,)
    with pytest.raises(DataError, match="holds 2 hooks"):
        load_data(f"activations:{cache_dir}")
    with pytest.raises(DataError, match="no hook 'nope'"):
        load_data(f"activations:{cache_dir}:nope")
    result = train("ae", f"activations:{cache_dir}:{HOOKS[0]}", tmp_path / "model",
                   latent_dim=4, epochs=1, progress=False)  # fmt: skip
    assert result.metrics["test_rows"] == round(N_INPUTS * SEQ * 0.2)
    assert (tmp_path / "model" / "model.json").exists()
    # an SAE trained on a hook names it in a SAELens export (its hook_name was null)
    from aecore.sae.formats import save_sae

    train("sae-topk", f"activations:{cache_dir}:{HOOKS[1]}", tmp_path / "sae", latent_dim=64,
          epochs=1, progress=False)  # fmt: skip
    save_sae(aecore.load(tmp_path / "sae"), tmp_path / "lens", "saelens")
    cfg = json.loads((tmp_path / "lens" / "cfg.json").read_text())
    assert cfg["metadata"]["hook_name"] == HOOKS[1]


def test_a_prepared_split_of_a_cache_keeps_the_caches_order(cache_dir):
    from aecore.data import prepare

    # activations keep their geometry by default (an SAE then takes raw activations),
    # as the command line's SAEs do; other data is min-max scaled
    assert prepare(f"activations:{cache_dir}:{HOOKS[0]}").normalization.kind == "none"
    assert prepare("digits").normalization.kind == "minmax"
    cache = ActivationCache(cache_dir, HOOKS[0])
    view = prepare(f"activations:{cache_dir}:{HOOKS[0]}", normalize="none", seed=0).view("train")
    batches = Batches(view, 32, shuffle=True, seed=5, name="train")
    positions = batches.order(1)
    assert torch.equal(positions.sort().values, torch.arange(len(view)))
    visited = torch.as_tensor(view.indices)[positions]  # the cache's rows, in its sequence
    full = cache.epoch_order(1, 5)
    assert torch.equal(visited, full[torch.isin(full, torch.as_tensor(view.indices))])


# -- command line -------------------------------------------------------------------
def test_the_extract_and_info_commands(lm_dir, tokens, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["activations", "extract", "--model", str(lm_dir), "--data", tokens[1],
            "--hook", HOOKS[0], "--hook", HOOKS[1], "--out", str(out), "--dtype", "bfloat16",
            "--shard-rows", "128", "--batch-size", "8", "--quiet"]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "bfloat16" in printed
    assert all(hook in printed for hook in HOOKS) and "384" in printed and "KiB" in printed
    assert main(["activations", "info", str(out), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "complete" in printed and "every shard matches" in printed and tokens[1] in printed
    assert main([*argv[:-1], "--hook", "transformer.h.5"]) == 1
    assert "no module 'transformer.h.5'" in capsys.readouterr().err
    assert main(["activations", "info", str(tmp_path)]) == 1
    assert "not an activation cache" in capsys.readouterr().err


# -- splice metric ------------------------------------------------------------------
def test_ce_loss_recovered_is_one_for_the_identity_and_zero_for_zeros(tokens):
    model, ids = _tiny_lm(), tokens[0]
    same = ce_loss_recovered(model, "transformer.h.0", lambda a: a, ids, batch_size=10)
    assert same["ce_spliced"] == same["ce_clean"] and same["ce_loss_recovered"] == 1.0
    assert same["ce_zero"] != same["ce_clean"] and same["ce_clean"] > 0
    zero = ce_loss_recovered(model, "transformer.h.0", torch.zeros_like, ids)
    assert zero["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-9)
    assert zero["ce_clean"] == pytest.approx(same["ce_clean"], rel=1e-6)
    half = ce_loss_recovered(model, "transformer.h.0", lambda a: 0.5 * a, ids)
    assert half["ce_spliced"] != half["ce_clean"]
    with pytest.raises(ConfigError, match="shape"):
        ce_loss_recovered(model, "transformer.h.0", lambda a: a[..., :3], ids)
    with pytest.raises(ConfigError, match=r"a torch tensor .*; got numpy.ndarray"):
        ce_loss_recovered(model, "transformer.h.0", lambda a: a.numpy(), ids)
    # an SAE itself: it takes rows, so each position goes in as one
    sae = aecore.create("sae-topk", input_shape=(D,), latent_dim=4 * D, k=4)
    rows = ce_loss_recovered(model, "transformer.h.0", sae, ids)
    by_hand = ce_loss_recovered(
        model, "transformer.h.0", lambda a: sae(a.reshape(-1, D)).reshape(a.shape), ids
    )
    assert rows["ce_spliced"] == pytest.approx(by_hand["ce_spliced"], rel=1e-6)
    narrow = aecore.create("sae-topk", input_shape=(D // 2,), latent_dim=2 * D, k=4)
    with pytest.raises(ShapeError, match=rf"'transformer.h.0' outputs {D} features per "
                       rf"position, but the TopKSAE spliced in takes {D // 2}"):  # fmt: skip
        ce_loss_recovered(model, "transformer.h.0", narrow, ids)
    # a model trained on normalised activations reconstructs in their units, and back
    from aecore.data.normalization import Normalization

    sae.normalization = Normalization("standardize", np.full(D, 0.5), np.full(D, 2.0))
    scaled = ce_loss_recovered(model, "transformer.h.0", sae, ids)
    by_hand = ce_loss_recovered(
        model, "transformer.h.0",
        lambda a: (sae((a.reshape(-1, D) - 0.5) / 2.0) * 2.0 + 0.5).reshape(a.shape), ids,
    )  # fmt: skip
    assert scaled["ce_spliced"] == pytest.approx(by_hand["ce_spliced"], rel=1e-5)
    assert scaled["ce_spliced"] != pytest.approx(rows["ce_spliced"], rel=1e-5)


# -- memory -------------------------------------------------------------------------
BIG_ROWS, BIG_D = 920_000, 256  # 942 MB of float32
LIMIT_MB = 720


@pytest.mark.slow
def test_batches_read_a_cache_larger_than_the_memory_limit(tmp_path):
    from aecore.activations.manifest import new_manifest
    from aecore.activations.writer import CacheWriter

    writer = CacheWriter(tmp_path / "big", new_manifest(["h"], "float32", 262_144))
    block = np.random.default_rng(0).standard_normal((65_536, BIG_D), dtype=np.float32)
    for start in range(0, BIG_ROWS, len(block)):
        rows = block[: min(len(block), BIG_ROWS - start)].copy()
        rows[:, 0] = np.arange(start, start + len(rows))  # each row says which it is
        writer.write("h", rows)
    writer.finish()
    assert sum(p.stat().st_size for p in (tmp_path / "big").rglob("*.npy")) > LIMIT_MB * 2**20

    script = textwrap.dedent(f"""
        import resource
        limit = {LIMIT_MB} * 2**20  # heap and private maps; shared file maps are not counted
        resource.setrlimit(resource.RLIMIT_DATA, (limit, limit))
        import numpy as np
        from aecore.data import load_data
        from aecore.training.batches import Batches
        cache = load_data("activations:{tmp_path / "big"}").x
        try:
            np.asarray(cache)
        except MemoryError:
            print("whole read refused")
        seen = np.concatenate([b[:, 0].numpy().copy() for b in Batches(cache, 8192, True, 0, "d").epoch(0)])
        print("rows", len(seen), bool((np.sort(seen) == np.arange({BIG_ROWS})).all()))
    """)
    ran = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-2000:]
    assert ran.stdout.splitlines() == ["whole read refused", f"rows {BIG_ROWS} True"]


def test_the_models_output_is_named_by_an_empty_hook_in_the_source(lm_dir, tokens, tmp_path):
    # "activations:DIR:" once read as "no hook named", and the hint suggested it again
    from aecore.data import prepare

    out = tmp_path / "both"
    extract_activations(str(lm_dir), tokens[1], ["", HOOKS[0]], out, dtype="float32")
    rows = prepare(f"activations:{out}:", normalize="none", seed=0).dataset.x
    assert rows.shape[1] == ActivationCache(out, "").d != ActivationCache(out, HOOKS[0]).d


def test_a_file_given_for_the_cache_is_named_as_a_file(tmp_path):
    (tmp_path / "in.npy").write_bytes(b"")
    with pytest.raises(DataError, match="is a file, not the cache's folder"):
        read_manifest(tmp_path / "in.npy")
    with pytest.raises(DataError, match="no such folder"):
        read_manifest(tmp_path / "missing")


def test_a_module_that_runs_twice_is_refused_even_when_hooked_alone(importable, tmp_path):
    # the pass stopped at the hook's first call: the cache held the first application of
    # a shared layer as if it were the module's output
    _, data = importable
    with pytest.raises(ConfigError, match="module '0' ran twice in one forward pass"):
        extract_activations("tiny_mlp:shared", data, ["0"], tmp_path / "c", dtype="float32")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_a_first_batch_refused_leaves_no_cache_behind(lm_dir, tokens, tmp_path):
    # the refusal left an unfinished cache, and the advice (another dtype) was then
    # refused as "other settings"
    ids = tokens[0].copy()
    ids[0, 0] = 1000  # outside the vocabulary
    np.save(tmp_path / "bad.npy", ids)
    with pytest.raises(DataError, match="outside the model's vocabulary"):
        _extract(lm_dir, f"npy:{tmp_path / 'bad.npy'}", tmp_path / "c")
    assert not (tmp_path / "c" / "manifest.json").exists()


def test_token_ids_beyond_a_plain_modules_embedding_are_named(importable, tmp_path):
    # a model without a transformers config failed with torch's bare IndexError, and
    # negative ids were said to lie outside 0..inf
    for bad, row in ((100, 3), (-1, 5)):
        ids = np.random.default_rng(0).integers(0, 100, (8, 5))
        ids[row, 2] = bad
        np.save(tmp_path / "ids.npy", ids)
        with pytest.raises(DataError, match=rf"token id {bad} in input row {row} .*\(0..99\)"):
            extract_activations("tiny_mlp:Pooled", f"npy:{tmp_path / 'ids.npy'}", ["head"],
                                tmp_path / "c", dtype="float32")  # fmt: skip


def test_the_vocabulary_of_a_plain_module_is_its_largest_embedding():
    from torch import nn

    from aecore.activations.models import vocabulary_size

    class Positions(nn.Module):  # positions declared before tokens
        def __init__(self):
            super().__init__()
            self.pos, self.tok = nn.Embedding(16, 4), nn.Embedding(1000, 4)

    assert vocabulary_size(Positions()) == 1000 and vocabulary_size(nn.Linear(2, 2)) is None


def test_a_resume_sees_input_rows_changed_anywhere(lm_dir, tmp_path):
    # only the first and last 16 rows were fingerprinted: a file rewritten in between
    # resumed into a cache mixing two data sets
    ids = np.random.default_rng(2).integers(0, 100, (40, SEQ))
    np.save(tmp_path / "t.npy", ids)
    _extract(lm_dir, f"npy:{tmp_path / 't.npy'}", tmp_path / "c", max_rows=40)
    ids[20] = (ids[20] + 1) % 100  # row 20 alone
    np.save(tmp_path / "t.npy", ids)
    with pytest.raises(ConfigError, match=r"other settings \(input_fingerprint"):
        _extract(lm_dir, f"npy:{tmp_path / 't.npy'}", tmp_path / "c", max_rows=40)


def test_ce_loss_recovered_on_a_whole_model_output_and_bad_tokens(tokens):
    # a hook whose output is a transformers ModelOutput failed inside ('.float()'), bad
    # ids with an IndexError, no rows with a ZeroDivisionError
    model, ids = _tiny_lm(), tokens[0]
    same = ce_loss_recovered(model, "transformer", lambda a: a, ids)
    assert same["ce_loss_recovered"] == 1.0
    with pytest.raises(DataError, match=r"the model takes 0..99"):
        ce_loss_recovered(model, "transformer.h.0", lambda a: a, ids + 100)
    with pytest.raises(DataError, match=r"N >= 1"):
        ce_loss_recovered(model, "transformer.h.0", lambda a: a, ids[:0])


def test_a_cache_from_before_every_row_was_fingerprinted_is_still_its_own(lm_dir, tmp_path):
    # its edge-rows fingerprint read as "other settings": the finished cache could only
    # be thrown away (--overwrite)
    import json

    from aecore.activations.extract import _edge_fingerprint

    ids = np.random.default_rng(3).integers(0, 100, (40, SEQ))
    np.save(tmp_path / "t.npy", ids)
    _extract(lm_dir, f"npy:{tmp_path / 't.npy'}", tmp_path / "c")
    manifest = json.loads((tmp_path / "c" / "manifest.json").read_text())
    manifest["input_fingerprint"] = _edge_fingerprint(ids)
    (tmp_path / "c" / "manifest.json").write_text(json.dumps(manifest))
    assert _extract(lm_dir, f"npy:{tmp_path / 't.npy'}", tmp_path / "c")["complete"]


def test_activations_are_what_the_module_returned_before_in_place_changes(importable, tmp_path):
    # the stored rows shared memory with the output: ReLU(inplace=True) after the hooked
    # layer rewrote the first batch (and, with two hooks, every batch)
    x, data = importable
    import tiny_mlp

    with torch.no_grad():
        want = tiny_mlp.inplace()[0](torch.from_numpy(x)).numpy()
    for hooks in (["0"], ["0", "2"]):
        out = tmp_path / "-".join(hooks)
        extract_activations("tiny_mlp:inplace", data, hooks, out, batch_size=8, dtype="float32")
        np.testing.assert_allclose(ActivationCache(out, "0")[:], want, atol=1e-6)
        assert (ActivationCache(out, "0")[:] < 0).any()


def test_a_changed_model_is_not_resumed_into_a_cache(importable, tmp_path):
    # the fingerprint read the first 256 values of each tensor: a zeroed row past them, or
    # another activation, resumed silently and mixed two models' rows
    _, data = importable
    out = tmp_path / "c"
    settings = dict(batch_size=8, shard_rows=8, dtype="float32", max_rows=8)
    extract_activations("tiny_mlp:wide", data, ["0"], out, **settings)
    (out / "manifest.json").write_text(  # as if stopped after one shard
        (out / "manifest.json").read_text().replace('"complete": true', '"complete": false')
    )
    import tiny_mlp

    for other in (lambda: tiny_mlp.wide(ablated=True), lambda: tiny_mlp.wide(act=torch.nn.Tanh)):
        with pytest.raises(ConfigError, match="model_fingerprint"):
            extract_activations(other(), data, ["0"], out, **settings)


def test_rows_asked_for_twice_come_back_as_asked(cache_dir):
    cache = ActivationCache(cache_dir, HOOKS[0])
    full = cache[:]
    for idx in ([0, 0, 2], [5, 3, 3, 4]):
        np.testing.assert_array_equal(cache[np.array(idx)], full[idx])


def test_float_rows_reach_the_model_in_its_dtype(importable, tmp_path):
    x, data = importable
    manifest = extract_activations("tiny_mlp:double", data, ["0"], tmp_path / "c", dtype="float32")
    assert manifest["hooks"]["0"]["rows"] == len(x)


def test_a_resume_that_fails_at_once_keeps_the_shards_written(importable, tmp_path, monkeypatch):
    # a resume starting at input 0 (one hook had no completed shard) that failed on its
    # first batch (out of memory, say) deleted the whole cache as if it were its own
    ids = np.random.default_rng(2).integers(0, 100, (30, 16))
    np.save(tmp_path / "ids.npy", ids)
    data, hooks = f"npy:{tmp_path / 'ids.npy'}", ["embed", "head"]
    settings = {"shard_rows": 10, "batch_size": 2, "dtype": "float32"}

    def stop(done, total):
        if done == 8:
            raise _Stop

    with pytest.raises(_Stop):
        extract_activations("tiny_mlp:Pooled", data, hooks, tmp_path / "c", progress=stop,
                            **settings)  # fmt: skip
    before = read_manifest(tmp_path / "c")["hooks"]
    assert before["embed"]["rows"] > 0 and before["head"]["rows"] == 0

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr("aecore.activations.extract.capture", out_of_memory)
    with pytest.raises(DataError, match="out of memory"):
        extract_activations("tiny_mlp:Pooled", data, hooks, tmp_path / "c", **settings)
    assert read_manifest(tmp_path / "c")["hooks"] == before
