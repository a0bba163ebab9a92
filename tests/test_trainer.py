"""Trainer: reproducibility, data kinds, early stopping, non-finite losses, exact resume."""

import json
import warnings

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import aecore
from aecore.errors import (
    ConfigError,
    DataError,
    ModelFileError,
    ShapeError,
    TrainingError,
    TrainingInterrupted,
)
from aecore.io.atomic import atomic_write
from aecore.io.tensors import load_tensors, save_tensors, unflatten_state
from aecore.training import Trainer
from aecore.training.optim import make_optimizer
from aecore_plugins.ae import PlainAutoencoder

X = np.random.default_rng(0).random((90, 6)).astype(np.float32)
VAL = np.random.default_rng(1).random((20, 6)).astype(np.float32)


def make(seed=0, **hp):
    torch.manual_seed(seed)
    hp.setdefault("hidden", [8])
    return aecore.create("ae", input_shape=(6,), latent_dim=2, **hp)


def weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit(data=X, val=None, seed=0, **kw):
    model = make(seed, dropout=kw.pop("dropout", 0.0), init=kw.pop("init", "pca"))
    kw.setdefault("epochs", 3)
    kw.setdefault("batch_size", 16)
    history = Trainer(seed=seed, device="cpu", progress=False, **kw).fit(model, data, val)
    return model, history


def test_same_seed_same_weights_different_seed_differs():
    a, _ = fit(seed=3, dropout=0.1)
    b, _ = fit(seed=3, dropout=0.1)
    c, _ = fit(seed=4, dropout=0.1)
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


@pytest.mark.parametrize(
    "kind",
    ["ndarray", "tensor", "dataset", "dataloader"],
)
def test_accepts_arrays_tensors_datasets_and_loaders(kind):
    t = torch.as_tensor(X)
    data = {
        "ndarray": X,
        "tensor": t,
        "dataset": TensorDataset(t, torch.zeros(len(t))),
        "dataloader": DataLoader(TensorDataset(t), batch_size=16, shuffle=True),
    }[kind]
    model, history = fit(data, epochs=2)
    assert len(history.epochs) == 2 and history.epochs[-1]["train_loss"] > 0


def test_arrays_and_tensors_train_identically():
    a, _ = fit(X)
    b, _ = fit(torch.as_tensor(X))
    assert same(weights(a), weights(b))


def test_training_lowers_loss_and_writes_metrics(tmp_path):
    model, history = fit(val=VAL, epochs=15, out_dir=tmp_path)
    losses = history.metric("train_loss")
    assert losses[-1] < losses[0]
    lines = [json.loads(s) for s in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 16))
    assert {"train_loss", "train_recon", "val_loss", "seconds"} <= set(lines[0])


def test_early_stopping_restores_best_validation_weights():
    # a tiny validation set that training quickly overfits against; a random start (a
    # PCA start would come back: 9 rows cannot show the best epoch beats it)
    model, history = fit(val=VAL[:3], epochs=150, patience=3, lr=0.2, init="random")
    assert history.stopped_early
    assert len(history.epochs) < 150
    best = history.best_val_loss
    # the best epoch is judged on the smoothed curve; its raw loss is recorded
    smoothed = history.metric("val_loss_smoothed")
    assert min(smoothed) == smoothed[history.best_epoch - 1]
    assert history.kept_epoch == history.best_epoch
    assert best == history.metric("val_loss")[history.best_epoch - 1]
    assert not model.training
    with torch.no_grad():
        final = float(model.loss(torch.as_tensor(VAL[:3]))["loss"])
    assert final == pytest.approx(best, rel=1e-6)


def _curve(values, smoothing):
    """A RunState fed ``values`` as per-epoch validation losses (epoch 0 first)."""
    from aecore.training.state import RunState

    state, model = RunState(), make()
    for epoch, loss in enumerate(values):
        state.record_val(loss, epoch, model, 0.0, smoothing)
        if epoch:
            state.history.epochs.append(
                {"epoch": epoch, "val_loss": loss, "val_loss_smoothed": state.smoothed}
            )
    return state


def test_the_smoothed_curve_sees_a_trend_through_noise():
    rng = np.random.default_rng(0)
    trend = np.linspace(1.0, 0.9, 80)
    noisy = trend + rng.normal(0, 0.02, 80)
    smooth = _curve(noisy, 0.8)
    # the smoothed curve follows the trend to the end (a patience of 10 epochs would not
    # stop it early), and the last weights are as good as its best within the noise
    assert smooth.history.best_epoch >= 70
    assert not smooth.rising(20) and not smooth.gap_is_real(0.0, 20)


def test_best_weights_come_back_only_when_the_gap_is_real():
    rng = np.random.default_rng(1)
    flat = 0.5 + rng.normal(0, 0.01, 60)  # no trend: the final weights are as good
    assert not _curve(flat, 0.8).gap_is_real(0.0, 20)
    rising = np.concatenate([np.linspace(1.0, 0.5, 30), np.linspace(0.5, 0.8, 30)])
    rising += rng.normal(0, 0.01, 60)  # overfitting: restore the best epoch
    state = _curve(rising, 0.8)
    assert state.rising(20) and state.gap_is_real(0.0, 20)
    assert 25 <= state.history.best_epoch <= 40
    # a clear step up without noise is a real gap too
    assert _curve([1.0, 0.5, 0.5, 0.5, 0.6, 0.6, 0.6], 0.0).gap_is_real(0.0, 3)


class Counting(PlainAutoencoder):
    """Counts its training steps (loss calls in training mode) and snapshots the weights
    each starts from; ``on_step(n)`` runs at each."""

    def __init__(self, **kw):
        super().__init__(**kw)
        self.calls = 0
        self.snapshots = []
        self.on_step = lambda n: None

    def loss(self, x):
        if self.training:
            self.calls += 1
            self.snapshots.append(weights(self))
            self.on_step(self.calls)
        return super().loss(x)


class NanAfter(Counting):
    """Returns a NaN loss on its n-th training call."""

    nan_at = 5

    def loss(self, x):
        terms = super().loss(x)
        if self.training and self.calls == self.nan_at:
            terms["loss"] = terms["loss"] * float("nan")
        return terms


def test_nan_loss_stops_with_epoch_and_step_and_keeps_last_good_weights():
    torch.manual_seed(0)
    model = NanAfter(input_shape=(6,), latent_dim=2, hidden=[8])
    trainer = Trainer(epochs=5, batch_size=30, device="cpu", progress=False)  # 3 steps per epoch
    with pytest.raises(
        TrainingError, match=r"non-finite loss \(nan\) at epoch 2, step 2 \(global step 5\)"
    ) as info:
        trainer.fit(model, X)
    assert str(info.value).endswith("Lower the learning rate or set grad_clip.")
    assert model.calls == 5
    assert same(weights(model), model.snapshots[-1])
    assert all(torch.isfinite(v).all() for v in weights(model).values())


def test_non_finite_rows_a_loader_streams_are_named_not_blamed_on_scale(monkeypatch):
    from aecore.training import data_start

    bad = torch.from_numpy(X.copy())
    bad[70, 4] = float("inf")
    loader = DataLoader(TensorDataset(bad), batch_size=30)
    fit = Trainer(epochs=1, val_fraction=0.0, progress=False, device="cpu").fit
    # in the rows the start samples: refused before the data-dependent start reads them
    model = make()
    with pytest.raises(DataError, match=r"inf at row 70 of the first epoch's order, feature 4"):
        fit(model, loader)
    assert not model.data_initialised
    assert all(torch.isfinite(v).all() for v in weights(model).values())
    # past them: the step's loss turns non-finite, and the message names the rows
    monkeypatch.setattr(data_start, "INIT_ROWS", 30)
    with pytest.raises(TrainingError, match=r"holds NaN or infinite values \(inf at row 10 of"):
        fit(make(), loader)


def test_grad_clip_bounds_the_update():
    model = make(init="random")  # no data-dependent init between the snapshot and the step
    before = weights(model)
    Trainer(
        epochs=1,
        batch_size=90,
        lr=1.0,
        optimizer="sgd",
        grad_clip=1e-6,
        device="cpu",
        progress=False,
    ).fit(model, X)
    change = sum((weights(model)[k] - before[k]).pow(2).sum() for k in before).sqrt()
    assert 0 < change <= 1.1e-6  # float32 rounding of w + dw adds a little


@pytest.mark.parametrize(
    ("loader", "stop_at"), [(False, 9), (True, 9), ("generator", 9), ("generator", 12)]
)
def test_resume_mid_epoch_is_exact(tmp_path, loader, stop_at):
    # a DataLoader with its own seeded generator (the usual reproducible setup) resumed
    # with another order: its generator's state was not in the checkpoint
    def data():
        if loader:
            own = torch.Generator().manual_seed(0) if loader == "generator" else None
            rows = TensorDataset(torch.as_tensor(X))
            return DataLoader(rows, batch_size=16, shuffle=True, generator=own)
        return X

    ref, ref_hist = fit(data(), val=VAL, epochs=4, dropout=0.2)

    torch.manual_seed(0)
    model = Counting(input_shape=(6,), latent_dim=2, hidden=[8], dropout=0.2)
    trainer = Trainer(
        epochs=4, batch_size=16, seed=0, device="cpu", progress=False, out_dir=tmp_path
    )
    # as a signal handler does: mid epoch 2 (6 steps per epoch), stop after this step
    model.on_step = lambda n: n == stop_at and trainer.request_stop("SIGTERM")
    with pytest.raises(
        TrainingInterrupted, match=rf"interrupted by SIGTERM at step {stop_at}; checkpoint saved"
    ):
        trainer.fit(model, data(), VAL)

    resumed = make(dropout=0.2)
    hist = Trainer(
        epochs=4, batch_size=16, seed=0, device="cpu", progress=False, out_dir=tmp_path, resume=True
    ).fit(resumed, data(), VAL)
    assert same(weights(resumed), weights(ref))
    assert hist.metric("val_loss") == pytest.approx(ref_hist.metric("val_loss"), rel=1e-6)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(s)["epoch"] for s in lines] == [1, 2, 3, 4]


def test_a_mid_epoch_resume_refuses_a_new_batch_order_and_says_how_to_finish_it(tmp_path):
    # the saved step counted batches of the old size and order: resumed with another,
    # the rest of the epoch skipped 480 of 1000 rows (or repeated some) without a word
    def stopped(out):
        torch.manual_seed(0)
        model = Counting(input_shape=(6,), latent_dim=2, hidden=[8])
        trainer = Trainer(epochs=3, batch_size=16, seed=0, device="cpu", progress=False,
                          out_dir=out)  # fmt: skip
        model.on_step = lambda n: n == 9 and trainer.request_stop("SIGTERM")  # mid epoch 2
        with pytest.raises(TrainingInterrupted):
            trainer.fit(model, X, VAL)
        return model

    model = stopped(tmp_path)
    for change in ({"batch_size": 8}, {"seed": 1}, {"shuffle": False}):
        settings = {"batch_size": 16, "seed": 0, **change}
        with pytest.raises(ConfigError, match=r"in the middle of epoch 2 with another .*"
                           r"resume with .* and epochs=2 to finish that epoch"):  # fmt: skip
            Trainer(epochs=3, device="cpu", progress=False, out_dir=tmp_path, resume=True,
                    allow_changes=True, **settings).fit(model, X, VAL)  # fmt: skip
    # as advised: finish the epoch, then change
    Trainer(epochs=2, batch_size=16, seed=0, device="cpu", progress=False, out_dir=tmp_path,
            resume=True).fit(model, X, VAL)  # fmt: skip
    history = Trainer(epochs=3, batch_size=8, seed=0, device="cpu", progress=False,
                      out_dir=tmp_path, resume=True, allow_changes=True).fit(model, X, VAL)  # fmt: skip
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]


def test_resume_extends_a_finished_run_exactly(tmp_path):
    ref, _ = fit(val=VAL, epochs=5)
    model = make()
    Trainer(epochs=2, batch_size=16, device="cpu", progress=False, out_dir=tmp_path).fit(
        model, X, VAL
    )
    model = make(seed=99)  # weights come from the checkpoint, not from construction
    Trainer(
        epochs=5, batch_size=16, device="cpu", progress=False, out_dir=tmp_path, resume=True
    ).fit(model, X, VAL)
    assert same(weights(model), weights(ref))


def test_resume_refuses_to_replace_a_model_saved_over_the_run(tmp_path):
    # an import saved over a finished run's folder (overwrite) was replaced by the old
    # run's weights at the next --resume, without a word
    fit(epochs=1, out_dir=tmp_path)
    imported = make(seed=5)
    aecore.save(imported, tmp_path, overwrite=True, data={"imported_from": "elsewhere"})
    before = (tmp_path / "model.safetensors").read_bytes()
    resume = Trainer(epochs=2, batch_size=16, progress=False, out_dir=tmp_path, resume=True)
    with pytest.raises(ModelFileError, match=r"a model imported from elsewhere after checkp"):
        resume.fit(make(), X)
    assert (tmp_path / "model.safetensors").read_bytes() == before
    # a run's own model, saved after its checkpoint, resumes as before; so does one saved
    # by hand (no run id: an interrupted run's, or a folder from before run ids)
    for own in (True, False):
        out = tmp_path / f"b{own}"
        model, _ = fit(epochs=1, out_dir=out)
        model.run_id = model.run_id if own else ""
        aecore.save(model, out, overwrite=True)
        assert bool(json.loads((out / "model.json").read_text()).get("run_id")) is own
        resume = Trainer(epochs=2, batch_size=16, progress=False, out_dir=out, resume=True)
        assert len(resume.fit(make(), X).epochs) == 2


def test_checkpoint_is_pickle_free_safetensors(tmp_path):
    fit(epochs=1, out_dir=tmp_path)
    head = (tmp_path / "checkpoint.safetensors").read_bytes()[:8]
    assert not head.startswith(b"\x80") and not head.startswith(b"PK")
    tensors, meta = load_tensors(tmp_path / "checkpoint.safetensors")
    assert meta["format"] == "aecore-checkpoint" and meta["epoch"] == 1
    assert any(k.startswith("optim.") for k in tensors)


def test_existing_run_is_not_overwritten(tmp_path):
    fit(epochs=1, out_dir=tmp_path)
    before = (tmp_path / "checkpoint.safetensors").read_bytes()
    with pytest.raises(
        ConfigError, match=r"already holds a training run .*resume=True \(--resume\)"
    ):
        fit(epochs=1, out_dir=tmp_path)
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == before


def test_without_validation_data_a_seeded_share_of_the_rows_is_held_out():
    class Seen(PlainAutoencoder):
        def loss(self, x):
            if self.training:
                self.rows.update(map(tuple, x.tolist()))
            return super().loss(x)

    def run(**kw):
        torch.manual_seed(0)
        model = Seen(input_shape=(6,), latent_dim=2, hidden=[8])
        model.rows = set()
        history = Trainer(epochs=2, batch_size=16, device="cpu", progress=False, **kw).fit(model, X)
        return model.rows, history

    rows, history = run()
    assert len(rows) == 81 and "val_loss" in history.epochs[0]  # 9 of 90 rows held out
    assert run()[0] == rows  # seeded
    everything, history = run(val_fraction=0.0)
    assert len(everything) == 90 and "val_loss" not in history.epochs[0]
    loader = DataLoader(TensorDataset(torch.as_tensor(X)), batch_size=16)
    torch.manual_seed(0)
    history = Trainer(epochs=1, device="cpu", progress=False).fit(make(), loader)
    assert "val_loss" not in history.epochs[0]  # a DataLoader draws its own batches


def test_pretraining_passes_are_fresh_seeded_shuffles():
    class Recording(PlainAutoencoder):
        def pretrain(self, batches, log):
            self.passes = [torch.cat(list(batches())) for _ in range(3)]

    def run(seed):
        torch.manual_seed(0)
        model = Recording(input_shape=(6,), latent_dim=2, hidden=[8])
        settings = {"batch_size": 16, "seed": seed, "device": "cpu", "progress": False}
        Trainer(epochs=1, val_fraction=0.0, **settings).fit(model, X)
        return model.passes

    a, b, c = run(0), run(0), run(1)
    rows = sorted(map(tuple, X.tolist()))
    for p in a:
        assert sorted(map(tuple, p.tolist())) == rows  # every row once
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[1], a[2])  # reshuffled
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # seeded
    assert not torch.equal(a[0], c[0])


def test_a_resume_keeps_the_runs_training_settings(tmp_path):
    fit(epochs=1, out_dir=tmp_path, lr=1e-3)
    with pytest.raises(
        ConfigError,
        match=r"the checkpoint used lr=0.001, optimizer='adam'; got lr=0.01, optimizer='sgd' "
        r"\(a resumed run keeps its training settings; only epochs, device, checkpoint_every",
    ):
        fit(epochs=2, out_dir=tmp_path, resume=True, lr=1e-2, optimizer="sgd")
    _, history = fit(epochs=2, out_dir=tmp_path, resume=True, checkpoint_every=3)
    assert len(history.epochs) == 2


def test_a_checkpoint_written_by_an_older_version_still_resumes(tmp_path):
    def deep():
        torch.manual_seed(0)
        return aecore.create("deep", input_shape=(6,), latent_dim=2, hidden=[4], pretrain_epochs=1)

    settings = {"batch_size": 16, "device": "cpu", "progress": False, "out_dir": tmp_path}
    Trainer(epochs=1, **settings).fit(deep(), X, VAL)
    path = tmp_path / "checkpoint.safetensors"
    tensors, meta = load_tensors(path)
    for prefix in ("model.", "best."):  # a buffer older versions kept
        tensors[prefix + "finetune_budget"] = torch.zeros(7, dtype=torch.float64)
    del meta["model_config"]["pretrain_k"]  # a hyperparameter added since, at its default
    meta["trainer"] = {"seed": 0, "batch_size": 16, "epochs": 1}  # the older settings record
    del meta["training"]
    save_tensors(path, tensors, meta)
    history = Trainer(epochs=2, resume=True, **settings).fit(deep(), X, VAL)
    assert [e["epoch"] for e in history.epochs] == [1, 2]


def test_resume_errors(tmp_path):
    with pytest.raises(ModelFileError, match="cannot resume: no checkpoint.safetensors in"):
        fit(out_dir=tmp_path, resume=True)
    fit(epochs=1, out_dir=tmp_path)
    other = aecore.create("ae", input_shape=(6,), latent_dim=3, hidden=[8])
    with pytest.raises(
        ModelFileError,
        match=r"cannot resume: .* other hyperparameters \(latent_dim 2 then, 3 now\): give the "
        r"ones it was trained with",
    ):
        Trainer(epochs=2, batch_size=16, device="cpu", out_dir=tmp_path, resume=True).fit(other, X)
    # another model whose config rebuilds this one's (its own keys at their defaults)
    # resumed and replaced the saved model
    denoiser = aecore.create("denoising", input_shape=(6,), latent_dim=2, hidden=[8])
    with pytest.raises(ModelFileError, match=r"written for model .ae., not .denoising."):
        Trainer(epochs=2, batch_size=16, out_dir=tmp_path, resume=True).fit(denoiser, X)
    # a checkpoint from before names were recorded: its class is looked up in the registry
    tensors, meta = load_tensors(tmp_path / "checkpoint.safetensors")
    assert meta.pop("model_name") == "ae"
    save_tensors(tmp_path / "checkpoint.safetensors", tensors, meta)
    with pytest.raises(ModelFileError, match=r"written for model .ae., not .denoising."):
        Trainer(epochs=2, batch_size=16, out_dir=tmp_path, resume=True).fit(denoiser, X)
    with pytest.raises(
        ConfigError, match=r"cannot resume exactly: the checkpoint used batch_size=16"
    ):
        Trainer(epochs=2, batch_size=8, device="cpu", out_dir=tmp_path, resume=True).fit(make(), X)


def test_atomic_write_keeps_the_previous_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.bin"
    target.write_bytes(b"old")

    def failing(f):
        f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.bin"]


def test_bad_arguments_and_data():
    with pytest.raises(ConfigError, match="epochs must be an int in \\[1, inf\\]; got 0"):
        Trainer(epochs=0)
    with pytest.raises(ConfigError, match="lr must be a number in \\(0, inf\\); got -1"):
        Trainer(lr=-1)
    with pytest.raises(ConfigError, match="device must be one of"):
        Trainer(device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="torch sees no CUDA device"):
            Trainer(device="cuda")
    with pytest.raises(
        DataError, match="expected an ndarray, tensor, torch Dataset or DataLoader; got str"
    ):
        fit("digits")
    with pytest.raises(DataError, match="the data is empty"):
        fit(np.zeros((0, 6), np.float32))
    with pytest.raises(
        ShapeError,
        match=r"does not fit the model: .*shape \(B, 6\); got \(16, 5\) \(its first batch "
        r"of the data's 20 rows\)",
    ):
        fit(np.zeros((20, 5), np.float32))
    # images for a model of another layout: the served models' hints (the message named
    # the shapes alone)
    conv = aecore.create("conv", input_shape=(3, 5, 7), latent_dim=2)
    for rows, hint in [
        (np.zeros((20, 5, 7, 3), np.float32), r"channels come first: x.transpose\(0, 3, 1, 2\)"),
        (np.zeros((20, 105), np.float32), r"reshape to \(N, 3, 5, 7\) with x.reshape"),
    ]:
        with pytest.raises(ShapeError, match=rf"its first batch of the data's 20 rows\); {hint}"):
            Trainer(epochs=1, progress=False).fit(conv, rows)
    with pytest.raises(ConfigError, match="expects an aecore.Autoencoder; got Linear"):
        Trainer().fit(torch.nn.Linear(2, 2), X)


def test_lbfgs_full_batch_trains_and_resumes_exactly(tmp_path):
    ref, hist = fit(epochs=4, batch_size=1000, optimizer="lbfgs", lr=1.0)
    losses = hist.metric("train_loss")
    assert losses[-1] < losses[0]
    model = make()
    Trainer(
        epochs=2,
        batch_size=1000,
        optimizer="lbfgs",
        lr=1.0,
        device="cpu",
        progress=False,
        out_dir=tmp_path,
    ).fit(model, X)
    model = make()
    Trainer(
        epochs=4,
        batch_size=1000,
        optimizer="lbfgs",
        lr=1.0,
        device="cpu",
        progress=False,
        out_dir=tmp_path,
        resume=True,
    ).fit(model, X)
    assert same(weights(model), weights(ref))
    with pytest.raises(ConfigError, match="grad_clip does not apply to optimizer='lbfgs'"):
        Trainer(optimizer="lbfgs", grad_clip=1.0)


def test_a_saved_model_in_out_dir_is_not_replaced(tmp_path):
    aecore.save(make(), tmp_path)
    with pytest.raises(ConfigError, match=r"already holds a training run \(model.json\)"):
        fit(epochs=1, out_dir=tmp_path)


def test_an_iterable_dataset_gets_a_clear_error():
    from torch.utils.data import IterableDataset

    class Stream(IterableDataset):
        def __iter__(self):
            return iter(torch.rand(8, 6))

    for data in (Stream(), DataLoader(Stream(), batch_size=4)):
        with pytest.raises(DataError, match="an IterableDataset has no length"):
            fit(data)


@pytest.mark.filterwarnings("ignore:optimizer='lbfgs' is a full-batch method")
def test_torchrun_refuses_a_last_batch_smaller_than_the_world_and_lbfgs(monkeypatch):
    from aecore.training import distributed

    monkeypatch.setattr(
        distributed.DistContext, "from_env", classmethod(lambda cls, device: cls(0, 2))
    )
    with pytest.raises(ConfigError, match=r"the last batch of 9 rows at batch_size 4 has 1 row"):
        Trainer(epochs=1, batch_size=4, device="cpu", val_fraction=0.0).fit(make(), X[:9])
    with pytest.raises(ConfigError, match="optimizer='lbfgs' line-searches on each process"):
        Trainer(epochs=1, batch_size=8, optimizer="lbfgs", device="cpu").fit(make(), X[:16])


def test_settings_that_cannot_apply_are_named_not_dropped(tmp_path, recwarn):
    import warnings

    from aecore import pipeline
    from aecore.errors import IgnoredSettingWarning

    x = torch.rand(96, 16)
    rbm = aecore.create("rbm", input_shape=(16,), latent_dim=4, probabilities=True)
    with pytest.warns(IgnoredSettingWarning, match=r"lr=0.5 does not apply.*lr=... \(now 0.1\)"):
        Trainer(lr=0.5, epochs=1, progress=False).fit(rbm, x)
    # each setting the model has its own of is named with its value
    with pytest.warns(
        IgnoredSettingWarning, match=r"instead: weight_decay=\.\.\. \(now 0.0002\) \(--set"
    ):
        Trainer(weight_decay=0.1, epochs=1, progress=False).fit(rbm, x)
    ae = aecore.create("ae", input_shape=(16,), latent_dim=4)
    with pytest.warns(
        IgnoredSettingWarning, match=r"patience=1 needs validation data.*val_fraction=0"
    ):
        Trainer(patience=1, val_fraction=0, epochs=1, progress=False).fit(ae, x)
    with pytest.warns(
        IgnoredSettingWarning, match=r"min_delta=0.1, smoothing=0.0 need validation data"
    ):
        Trainer(min_delta=0.1, smoothing=0.0, val_fraction=0, epochs=1, progress=False).fit(ae, x)
    with pytest.warns(IgnoredSettingWarning, match=r"checkpoint_every=5 .* Pass out_dir"):
        Trainer(checkpoint_every=5)
    # the defaults, or validation data for patience: nothing to say
    with warnings.catch_warnings():
        warnings.simplefilter("error", IgnoredSettingWarning)
        Trainer(epochs=1, progress=False).fit(rbm, x)
        Trainer(patience=1, epochs=1, progress=False).fit(ae, x)
        Trainer(val_fraction=0, epochs=1, progress=False).fit(ae, x)
        # the pipeline (aecore train --lr) hands the rate to a model with its own rule
        result = pipeline.train(
            "rbm", "digits", tmp_path / "rbm", lr=0.02, epochs=1, progress=False,
            hparams={"probabilities": True},
        )  # fmt: skip
    assert result.model.lr == 0.02


def test_the_run_uses_and_records_the_models_default_learning_rate(tmp_path):
    x = torch.rand(64, 8)

    class FastAutoencoder(PlainAutoencoder):
        default_lr = 3e-3

    for lr, used in [(None, 3e-3), (0.01, 0.01)]:
        model = FastAutoencoder(input_shape=(8,), latent_dim=2)
        Trainer(epochs=1, lr=lr, out_dir=tmp_path / str(lr), progress=False).fit(model, x)
        tensors, meta = load_tensors(tmp_path / str(lr) / "checkpoint.safetensors")
        assert meta["training"]["lr"] == used
        optimizer = unflatten_state(meta["optimizer"], tensors)
        assert optimizer["param_groups"][0]["lr"] == used
    fresh = make_optimizer(FastAutoencoder(input_shape=(8,), latent_dim=2), aecore.TrainConfig())
    assert fresh.param_groups[0]["lr"] == 3e-3


def test_a_resume_with_changed_settings_is_refused_unless_allowed_and_then_recorded(tmp_path):
    x = torch.rand(64, 8)
    settings = {"batch_size": 16, "progress": False, "val_fraction": 0.0, "seed": 0}
    model = aecore.create("ae", input_shape=(8,), latent_dim=2)
    Trainer(epochs=1, out_dir=tmp_path, **settings).fit(model, x)
    with pytest.raises(
        ConfigError, match=r"checkpoint used lr=0.001; got lr=0.1 .*--allow-changes"
    ):
        Trainer(epochs=2, lr=0.1, out_dir=tmp_path, resume=True, **settings).fit(model, x)
    with pytest.raises(ConfigError, match="cannot resume with optimizer='sgd'"):
        Trainer(epochs=2, optimizer="sgd", out_dir=tmp_path, resume=True, allow_changes=True,
                **settings).fit(model, x)  # fmt: skip
    with pytest.raises(ConfigError, match="applies to resume=True"):
        Trainer(allow_changes=True)
    Trainer(epochs=2, out_dir=tmp_path / "two", **settings).fit(model, x)
    with pytest.raises(ConfigError, match=r"epochs=1: the run has trained 2 epochs; pass epochs=2"):
        Trainer(epochs=1, out_dir=tmp_path / "two", resume=True, **settings).fit(model, x)
    trainer = Trainer(
        epochs=2, lr=0.1, out_dir=tmp_path, resume=True, allow_changes=True, **settings
    )
    history = trainer.fit(model, x)
    assert history.changes == [{"epoch": 1, "changed": {"lr": [0.001, 0.1]}}]
    # the new rate is what the checkpoint now holds: a plain resume at it continues
    history = Trainer(epochs=3, lr=0.1, out_dir=tmp_path, resume=True, **settings).fit(model, x)
    assert [e["epoch"] for e in history.epochs] == [1, 2, 3]
    assert history.changes == [{"epoch": 1, "changed": {"lr": [0.001, 0.1]}}]


def test_a_float64_model_trains_on_float64_rows():
    # every batch was rounded to float32 first: a signal below float32's resolution at
    # 1000 (1e-5) reached the model as one value
    rows = 1000.0 + 1e-5 * np.random.default_rng(0).normal(size=(64, 6))
    model = make().double()
    seen = set()
    loss = model.loss
    model.loss = lambda x: seen.add(x.dtype) or loss(x)
    Trainer(epochs=1, batch_size=16, progress=False, device="cpu").fit(model, rows)
    assert seen == {torch.float64}


def test_validation_data_that_scores_nan_is_refused(tmp_path):
    # a NaN in a memory-mapped validation set gave val_loss [nan, nan, ...] and no epoch
    # was ever chosen
    bad = VAL.copy()
    bad[3, 2] = np.nan
    np.save(tmp_path / "val.npy", bad)
    val = np.load(tmp_path / "val.npy", mmap_mode="r")
    with pytest.raises(DataError, match="the validation loss is nan"):
        Trainer(epochs=2, batch_size=16, progress=False, device="cpu").fit(make(), X, val)


def test_a_stop_request_ends_one_fit_not_the_trainers_next():
    trainer = Trainer(epochs=3, batch_size=16, progress=False, device="cpu")
    model = Counting(input_shape=(6,), latent_dim=2, hidden=[8])
    model.on_step = lambda n: n == 2 and trainer.request_stop("test")
    with pytest.raises(TrainingInterrupted):
        trainer.fit(model, X)
    assert len(trainer.fit(make(), X).epochs) == 3


def test_a_loader_without_batches_is_named():
    loader = DataLoader(TensorDataset(torch.as_tensor(X[:10])), batch_size=16, drop_last=True)
    with pytest.raises(DataError, match="yields no batches"):
        Trainer(epochs=1, progress=False, device="cpu").fit(make(), loader)


def test_a_paced_model_resumes_with_another_epoch_budget_only_when_allowed(tmp_path):
    # an SAE's learning-rate decay follows the run's progress: resumed with more epochs
    # it restarted its schedule (factor 13.3 back to 48) and recorded no change
    rows = np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32)

    def run(epochs, **kw):
        torch.manual_seed(0)
        model = aecore.create("sae-topk", input_shape=(6,), latent_dim=12, k=2)
        trainer = Trainer(epochs=epochs, batch_size=16, progress=False, device="cpu",
                          out_dir=tmp_path, **kw)  # fmt: skip
        return trainer.fit(model, rows)

    run(2)
    with pytest.raises(ConfigError, match="epochs sets this model's schedule"):
        run(4, resume=True)
    history = run(4, resume=True, allow_changes=True)
    assert history.changes and "epochs" in json.dumps(history.changes)

    # without a decay or a warm-up the steps do not follow the budget: free to extend
    def unpaced(epochs, **kw):
        torch.manual_seed(0)
        model = aecore.create("sae-relu", input_shape=(6,), latent_dim=12, lr_decay=0.0)
        trainer = Trainer(epochs=epochs, batch_size=16, progress=False, device="cpu",
                          out_dir=tmp_path / "relu", **kw)  # fmt: skip
        return trainer.fit(model, rows)

    unpaced(2)
    assert not unpaced(4, resume=True).changes


def test_a_stop_asked_for_by_another_process_is_named_so():
    # under torchrun, rank 0 said "training interrupted by None" when rank 1 had the signal
    from aecore.training.batches import Batches
    from aecore.training.loop import TrainingRun

    trainer = Trainer(epochs=1, progress=False, device="cpu")
    rows = Batches(X, 16, True, 0, "data")
    run = TrainingRun(trainer, trainer.config, make(), rows, None, init_data=rows)
    assert "interrupted by a stop request in another process" in str(run._interrupted())


def test_lbfgs_on_mini_batches_is_named():
    with pytest.warns(
        UserWarning, match=r"full-batch method, and batch_size=16 splits the training rows"
    ):
        Trainer(epochs=1, batch_size=16, optimizer="lbfgs", progress=False, device="cpu").fit(
            make(), X
        )


def test_a_diverged_model_is_not_blamed_on_the_validation_data():
    # weights that overflowed on the epoch's last step were reported as NaN in val_data
    rows = np.random.default_rng(0).random((40, 4)).astype(np.float32)
    torch.manual_seed(0)
    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    with pytest.raises(TrainingError, match="diverged.*lower the learning rate or set grad_clip"):
        Trainer(epochs=3, batch_size=32, lr=1e20, optimizer="sgd", progress=False,
                device="cpu").fit(model, rows[:32], rows[32:])  # fmt: skip


def test_overflow_before_any_step_blames_the_datas_scale_not_the_step_size():
    # at 1e15 with normalize="none" the first gradient overflowed float32 whatever the
    # learning rate, and the message said to lower it
    from aecore.errors import DataError

    torch.manual_seed(0)
    huge = torch.rand(48, 4) * 1e20
    with pytest.raises(TrainingError, match=r"global step 1\).* the data's scale, not the step"):
        Trainer(epochs=1, batch_size=48, val_fraction=0, progress=False, device="cpu").fit(
            aecore.create("ae", input_shape=(4,), latent_dim=2, init="random"), huge
        )
    with pytest.raises(
        DataError, match=r"before any training step: the model overflows .*up to [0-9.]+e\+37"
    ):
        Trainer(epochs=1, batch_size=32, progress=False, device="cpu").fit(
            aecore.create("ae", input_shape=(4,), latent_dim=2, init="random"),
            huge[:32],
            huge[32:] * 1e18,
        )


def test_lbfgs_on_a_loaders_batches_names_the_loaders_batch_size():
    loader = DataLoader(TensorDataset(torch.as_tensor(X)), batch_size=8)
    with pytest.warns(UserWarning, match=r"the DataLoader \(batch_size=8\) yields 12 batches"):
        Trainer(epochs=1, optimizer="lbfgs", progress=False, device="cpu").fit(make(), loader)


def test_rows_outside_a_bounded_models_range_are_refused():
    # raw 0..255 pixels trained a sigmoid-output model without a word (MSE 17941), and a
    # cross-entropy loss went negative
    from aecore.errors import DataError

    pixels = torch.randint(0, 256, (32, 16)).float()
    bce = {"reconstruction": "bce", "output_activation": "sigmoid"}
    for hparams in ({"output_activation": "sigmoid"}, {"output_activation": "clip"}, bce):
        model = aecore.create("ae", input_shape=(16,), latent_dim=2, **hparams)
        with pytest.raises(DataError, match=r"reach \[0, 255\], but .* takes inputs in \[0, 1\]"):
            Trainer(epochs=1, progress=False, device="cpu").fit(model, pixels)
        Trainer(epochs=1, progress=False, device="cpu").fit(model, pixels / 255)


@pytest.mark.parametrize(
    ("returns", "says"),
    [
        (lambda loss: {"loss": float(loss)}, r"got 'loss' as float"),
        (lambda loss: {"loss": loss, "extra": 1.0}, r"got 'extra' as float"),
        (lambda loss: loss, r"got a Tensor"),
        (lambda loss: {"objective": loss}, r"got the entries \['objective'\] but no 'loss'"),
    ],
)
def test_a_loss_that_breaks_the_contract_is_named(returns, says):
    # a plugin's float loss or bare tensor failed deep in the trainer (isfinite(): argument
    # must be Tensor; 'Tensor' object has no attribute 'items')
    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    plain = model.loss
    model.loss = lambda x: returns(plain(x)["loss"])
    with pytest.raises(
        TrainingError, match=rf"PlainAutoencoder.loss must return a dict of scalar tensors .*{says}"
    ):
        Trainer(epochs=1, progress=False, device="cpu").fit(model, torch.rand(40, 4))


def test_a_step_reads_back_only_its_finiteness_checks(step_ops):
    # a value read back waits for the device: the epoch's loss sums stay on it and are
    # read once when wanted, so a plain model's step reads one number (its loss and its
    # gradients finite, read together) whatever number of loss terms it reports
    model = aecore.create("ae", input_shape=(6,), latent_dim=2, hidden=[8])
    trainer = Trainer(epochs=1, batch_size=10, progress=False, seed=0)
    trainer.fit(model, torch.randn(50, 6))
    reads = [op for op, _ in step_ops if op.startswith("_local_scalar_dense")]
    assert len(reads) == 5  # five steps


def test_the_epochs_loss_sums_are_read_back_together_and_keep_no_buffer_alive(monkeypatch):
    from aecore.training import state as run_state
    from aecore.training.state import RunState

    state = RunState()
    assert run_state.read_is_free(torch.zeros(()))  # a CPU term is summed as it comes
    state.add_terms({"loss": torch.tensor(2.0)}, 10)
    assert state.pending == {} and state.epoch_sums() == {"loss": 20.0}
    # as on a device whose reads wait
    monkeypatch.setattr(run_state, "read_is_free", lambda t: False)
    state = RunState()
    for i in range(4):
        state.add_terms({"loss": torch.tensor(float(i)), "l0": torch.tensor(2.0)}, 10)
    assert state.epoch_sums() == {"loss": 60.0, "l0": 80.0} and state.count == 40
    assert state.pending == {}
    # a term that is a view (an element of a batch's buffer) must not keep the buffer
    # alive until the epoch ends: that grew a run past its memory, a buffer a step
    state.add_terms({"loss": torch.zeros(2**20)[3]}, 1)
    kept = state.pending["loss"][0][0]
    assert kept.untyped_storage().nbytes() == kept.element_size()


def test_a_dataframe_trains_as_its_values_and_a_text_column_is_named():
    pd = pytest.importorskip("pandas")
    x = np.random.default_rng(0).random((40, 3))
    frame = pd.DataFrame(x, columns=["a", "b", "c"])
    trained = []
    for data in (x, frame):  # indexing a frame by rows picked columns: a KeyError
        torch.manual_seed(0)
        model = aecore.create("ae", input_shape=(3,), latent_dim=1)
        aecore.Trainer(epochs=2, progress=False).fit(model, data)
        trained.append(model.score(torch.from_numpy(x)))
    torch.testing.assert_close(trained[0], trained[1])
    # numbers under an object dtype convert, as scikit-learn converts them
    held = frame.astype({"b": object})
    aecore.Trainer(epochs=1, progress=False).fit(
        aecore.create("ae", input_shape=(3,), latent_dim=1), held
    )
    aecore.AutoencoderTransformer(latent_dim=1, epochs=1).fit(held)
    frame["kind"] = ["x"] * 40
    model = aecore.create("ae", input_shape=(3,), latent_dim=1)
    with pytest.raises(DataError, match=r"data: column 'kind' \(\w+\) does not hold numbers"):
        aecore.Trainer(epochs=1, progress=False).fit(model, frame)
    for estimator in (aecore.AnomalyDetector("ae", epochs=1), aecore.AutoencoderTransformer()):
        with pytest.raises(DataError, match="X: column 'kind'"):
            estimator.fit(frame)


def test_a_read_only_array_trains_without_a_warning_from_torch():
    x = np.random.default_rng(0).random((50, 4))
    x.setflags(write=False)  # np.load(..., mmap_mode="r") loaded into memory, a frame's values
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        aecore.Trainer(epochs=1, progress=False).fit(
            aecore.create("ae", input_shape=(4,), latent_dim=2), x
        )


def test_a_model_updating_itself_without_a_train_step_or_its_terms_is_named():
    # a bare AttributeError ('float' object has no attribute 'items') from the loop
    model = aecore.create("ae", input_shape=(4,), latent_dim=2)
    model.uses_optimizer = False
    with pytest.raises(ConfigError, match="uses_optimizer = False .* no train_step"):
        Trainer(epochs=1, progress=False).fit(model, torch.rand(20, 4))
    model.train_step = lambda x: 0.5
    with pytest.raises(TrainingError, match=r"train_step must return a dict .* got a float"):
        Trainer(epochs=1, progress=False).fit(model, torch.rand(20, 4))
    model.train_step = lambda x: {"loss": 0.5, "recon": 0.25}  # plain numbers: as before
    history = Trainer(epochs=1, progress=False).fit(model, torch.rand(20, 4))
    assert history.epochs[-1]["train_recon"] == 0.25
