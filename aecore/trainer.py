"""The generic trainer: any ``aecore.Autoencoder`` through its ``loss`` (or its own
``train_step``), seeded, resumable, with early stopping and atomic checkpoints."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from aecore.errors import (
    ConfigError,
    DataError,
    ModelFileError,
    ShapeError,
    TrainingError,
    TrainingInterrupted,
)
from aecore.fileio import flatten_state, load_tensors, save_tensors, unflatten_state
from aecore.params import choice, integer, number

CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.jsonl"
OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    # full-batch quasi-Newton, as in Ng's sparse autoencoder exercise: use a batch_size
    # of the whole data; each step runs up to 20 iterations with a line search
    "lbfgs": torch.optim.LBFGS,
}


@dataclass
class History:
    """Per-epoch metrics of a run (``epochs[i]`` is a dict of floats)."""

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False

    def metric(self, name: str) -> list[float]:
        return [e[name] for e in self.epochs if name in e]

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
        }


def resolve_device(device: str | torch.device) -> torch.device:
    if isinstance(device, torch.device):
        return device
    choice("device", device, ["auto", "cpu", "cuda"] + [f"cuda:{i}" for i in range(16)])
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("device='cuda' was requested but torch sees no CUDA device")
    return torch.device(device)


class _Batches:
    """Seeded mini-batches over arrays, tensors, torch Datasets or a DataLoader."""

    def __init__(self, data: Any, batch_size: int, shuffle: bool, seed: int, name: str) -> None:
        from torch.utils.data import DataLoader, Dataset, IterableDataset

        self.loader = None
        self.array = None
        self.dataset = None
        if isinstance(data, IterableDataset) or (
            isinstance(data, DataLoader) and isinstance(data.dataset, IterableDataset)
        ):
            raise DataError(
                f"{name}: an IterableDataset has no length to shuffle, split into epochs or "
                f"resume from; pass a map-style Dataset, an array or a memory map instead"
            )
        if isinstance(data, DataLoader):
            self.loader = data
            self.n = len(data.dataset)
        elif isinstance(data, (np.ndarray, torch.Tensor)) or (
            hasattr(data, "__getitem__")
            and hasattr(data, "shape")
            and not isinstance(data, Dataset)
        ):
            if len(getattr(data, "shape", ())) < 2:
                raise DataError(
                    f"{name}: expected rows (N, features...); got shape {tuple(data.shape)}"
                )
            self.array = data
            self.n = len(data)
        elif isinstance(data, Dataset):
            self.dataset = data
            self.n = len(data)
        else:
            raise DataError(
                f"{name}: expected an ndarray, tensor, torch Dataset or DataLoader; "
                f"got {type(data).__name__}"
            )
        if self.n == 0:
            raise DataError(f"{name}: the data is empty")
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed

    def __len__(self) -> int:
        if self.loader is not None:
            return len(self.loader)
        return math.ceil(self.n / self.batch_size)

    def order(self, epoch: int) -> torch.Tensor:
        # derived from (seed, epoch) alone, so a resumed run draws the same batches
        if not self.shuffle:
            return torch.arange(self.n)
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=gen)

    def global_size(self, epoch_step: int) -> int:
        """Rows in global batch ``epoch_step`` (the last one may be short)."""
        return min(self.batch_size, self.n - epoch_step * self.batch_size)

    def epoch(
        self,
        epoch: int,
        skip: int = 0,
        rng_at_start: torch.Tensor | None = None,
        rank: int = 0,
        world: int = 1,
    ) -> Iterator[torch.Tensor]:
        if self.loader is not None:
            if not skip:
                it = iter(self.loader)
            else:
                # a DataLoader shuffles from torch's RNG when iteration starts: replay the
                # epoch's start state to draw the same order, skip what was done, then
                # put back the RNG state of the interrupted step
                now = torch.get_rng_state()
                if rng_at_start is not None:
                    torch.set_rng_state(rng_at_start)
                it = iter(self.loader)
                for _ in range(skip):
                    next(it, None)
                torch.set_rng_state(now)
            for batch in it:
                yield _first_tensor(batch)
            return
        order = self.order(epoch)
        for i in range(skip, len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            # under torchrun each process takes a strided share of the same global batch
            # (what a DistributedSampler does per epoch, done per step), so N processes
            # step exactly like one process with the same global batch
            idx = idx[rank::world]
            if self.array is not None:
                if isinstance(self.array, torch.Tensor):
                    yield self.array[idx]
                else:
                    yield torch.as_tensor(np.asarray(self.array[idx.numpy()]))
            else:
                yield _first_tensor(
                    torch.utils.data.default_collate([self.dataset[int(j)] for j in idx])
                )


def _first_tensor(batch: Any) -> torch.Tensor:
    """A (x, y) batch from a labelled Dataset trains on x."""
    if isinstance(batch, (list, tuple)):
        batch = batch[0]
    if isinstance(batch, dict):
        batch = batch.get("x", next(iter(batch.values())))
    if not isinstance(batch, torch.Tensor):
        batch = torch.as_tensor(np.asarray(batch))
    return batch


class Trainer:
    """Fits a model: ``Trainer(epochs=20, batch_size=64, lr=1e-3, seed=0).fit(model, x)``.

    * ``patience``: stop after this many epochs without validation improvement (needs
      ``val_data``); with validation data the best epoch's weights are always restored.
    * ``out_dir``: writes ``metrics.jsonl`` and an atomic ``checkpoint.safetensors``
      (every ``checkpoint_every`` steps and at each epoch end); ``resume=True``
      continues from it exactly.
    * ``grad_clip``: clip the global gradient norm to this value.
    """

    def __init__(
        self,
        *,
        epochs: int = 20,
        batch_size: int = 64,
        lr: float = 1e-3,
        seed: int = 0,
        device: str = "auto",
        out_dir: str | Path | None = None,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        grad_clip: float | None = None,
        patience: int | None = None,
        min_delta: float = 0.0,
        shuffle: bool = True,
        resume: bool = False,
        overwrite: bool = False,
        checkpoint_every: int | None = None,
        progress: bool | None = None,
    ) -> None:
        self.epochs = integer("epochs", epochs, low=1)
        self.batch_size = integer("batch_size", batch_size, low=1)
        self.lr = number("lr", lr, low=0.0, low_open=True)
        self.seed = integer("seed", seed, low=0)
        self.device = resolve_device(device)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.optimizer_name = choice("optimizer", optimizer, list(OPTIMIZERS))
        self.weight_decay = number("weight_decay", weight_decay, low=0.0)
        self.grad_clip = (
            None if grad_clip is None else number("grad_clip", grad_clip, low=0.0, low_open=True)
        )
        if self.optimizer_name == "lbfgs" and self.grad_clip is not None:
            raise ConfigError("grad_clip does not apply to optimizer='lbfgs' (it line-searches)")
        self.patience = None if patience is None else integer("patience", patience, low=1)
        self.min_delta = number("min_delta", min_delta, low=0.0)
        self.shuffle = bool(shuffle)
        self.resume = bool(resume)
        self.overwrite = bool(overwrite)
        self.checkpoint_every = (
            None
            if checkpoint_every is None
            else integer("checkpoint_every", checkpoint_every, low=1)
        )
        self.progress = progress
        if self.resume and self.out_dir is None:
            raise ConfigError("resume=True needs out_dir (where the checkpoint is)")
        self.stop_requested: str | None = None  # set by a signal handler to stop cleanly

    # -- public ----------------------------------------------------------------------
    def fit(self, model, data: Any, val_data: Any = None) -> History:
        from aecore.base import Autoencoder
        from aecore.distributed import DistContext

        if not isinstance(model, Autoencoder):
            raise ConfigError(
                f"Trainer.fit expects an aecore.Autoencoder; got {type(model).__name__}"
            )
        train = _Batches(data, self.batch_size, self.shuffle, self.seed, "data")
        val = (
            _Batches(val_data, self.batch_size, False, self.seed, "val_data")
            if val_data is not None
            else None
        )
        self.dist = DistContext.from_env(self.device)
        try:
            return self._fit(model, train, val)
        finally:
            self.dist.close()

    @property
    def is_main(self) -> bool:
        """True in the process that logs and writes files (rank 0 under torchrun)."""
        dist = getattr(self, "dist", None)
        return dist is None or dist.is_main

    def _fit(self, model, train: _Batches, val: _Batches | None) -> History:
        if self.dist.active:
            self._check_distributed(model, train)
        model.to(self.device)
        optimizer = self._make_optimizer(model) if model.uses_optimizer else None
        state = _RunState()
        if self.resume:
            self._load_checkpoint(model, optimizer, state)
        else:
            self._check_fresh_out_dir()
            self.dist.barrier()  # nobody writes before every process has checked
            torch.manual_seed(self.seed + self.dist.rank)
            self._check_first_batch(model, train)
            # data-dependent init and pretraining see the whole data in every process,
            # so all start identical (DDP also broadcasts rank 0's weights)
            self._data_init(model, train)
            if hasattr(model, "pretrain"):
                model.pretrain(lambda: train.epoch(0), self)
            if val is not None:
                state.record_val(self._evaluate(model, val), 0, model, self.min_delta)
            if self.out_dir is not None and self.is_main:
                self._rewrite_metrics(state)
        self._loss_fn = self._distributed_loss(model) if self.dist.active else model.loss
        self._loop(model, optimizer, train, val, state)
        if state.best_state is not None:
            model.load_state_dict(state.best_state)
        model.eval()
        return state.history

    def _check_distributed(self, model, train: _Batches) -> None:
        name = type(model).__name__
        if not model.uses_optimizer:
            raise ConfigError(
                f"{name} updates its own parameters (train_step) and does not support "
                f"multi-process training; run it in one process (without torchrun)"
            )
        if train.loader is not None:
            raise ConfigError(
                "under torchrun pass an array, tensor or Dataset rather than a DataLoader: "
                "aecore shards each global batch across the processes itself"
            )
        if self.batch_size < self.dist.world:
            raise ConfigError(
                f"batch_size ({self.batch_size}) must be at least the number of processes "
                f"({self.dist.world})"
            )
        last = train.n % self.batch_size
        if 0 < last < self.dist.world:
            raise ConfigError(
                f"the last batch of {train.n} rows at batch_size {self.batch_size} has {last} "
                f"row(s), fewer than the {self.dist.world} processes (one would get none): "
                f"choose a batch_size that leaves 0 or at least {self.dist.world} rows over"
            )
        if self.optimizer_name == "lbfgs":
            raise ConfigError(
                "optimizer='lbfgs' line-searches on each process's own loss, so processes "
                "would disagree; use it in one process"
            )
        if self.device.type == "cuda":
            self.device = torch.device("cuda", self.dist.local_rank)

    def _distributed_loss(self, model):
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            _LossModule(model),
            device_ids=[self.device.index] if self.device.type == "cuda" else None,
        )
        return ddp

    # -- internals -------------------------------------------------------------------
    def _make_optimizer(self, model):
        params = [p for p in model.parameters() if p.requires_grad]
        if not params:
            raise ConfigError(f"{type(model).__name__} has no trainable parameters")
        cls = OPTIMIZERS[self.optimizer_name]
        if self.optimizer_name == "lbfgs":
            if self.weight_decay:
                raise ConfigError("weight_decay does not apply to optimizer='lbfgs'")
            return cls(
                params, lr=self.lr, max_iter=20, history_size=20, line_search_fn="strong_wolfe"
            )
        kwargs = {"lr": self.lr, "weight_decay": self.weight_decay}
        if self.optimizer_name == "sgd":
            kwargs["momentum"] = 0.9
        return cls(params, **kwargs)

    def _check_fresh_out_dir(self) -> None:
        if self.out_dir is None or self.overwrite:
            return
        # model.json: a saved model the run would replace (aecore train saves there)
        for name in (CHECKPOINT, METRICS, "model.json"):
            if (self.out_dir / name).exists():
                raise ConfigError(
                    f"{self.out_dir} already holds a training run ({name}); resume it with "
                    f"resume=True (--resume), pass overwrite=True (--overwrite), or choose "
                    f"another out_dir"
                )

    def _check_first_batch(self, model, train: _Batches) -> None:
        x = next(train.epoch(0))
        try:
            model.check_input(x.float())
        except ShapeError as exc:
            raise ShapeError(f"the data does not fit the model: {exc}") from None

    def _data_init(self, model, train: _Batches) -> None:
        init = getattr(model, "init_from_data", None)
        if init is None:
            return
        # a bounded sample keeps this cheap for data larger than memory
        xs, seen = [], 0
        for x in train.epoch(0):
            xs.append(x.float())
            seen += len(x)
            if seen >= 10000:
                break
        with torch.no_grad():
            init(torch.cat(xs).to(self.device))

    @property
    def show_progress(self) -> bool:
        """Whether this process shows progress bars (a terminal, rank 0, unless set)."""
        if not self.is_main:
            return False
        if self.progress is not None:
            return self.progress
        return sys.stderr.isatty()

    def log(self, message: str) -> None:
        """A line for the user (stderr, when progress is shown)."""
        if self.show_progress:
            print(message, file=sys.stderr)

    def _loop(self, model, optimizer, train: _Batches, val, state: _RunState) -> None:
        from tqdm.auto import tqdm

        n_batches = len(train)
        while state.epoch < self.epochs:
            epoch = state.epoch + 1
            start = time.perf_counter()
            model.train()
            bar = tqdm(
                total=n_batches,
                initial=state.epoch_step,
                desc=f"epoch {epoch}/{self.epochs}",
                disable=not self.show_progress,
                leave=False,
                file=sys.stderr,
            )
            if state.epoch_step == 0:
                state.epoch_rng = torch.get_rng_state()
                state.sums, state.count = {}, 0
            batches = train.epoch(
                epoch,
                skip=state.epoch_step,
                rng_at_start=state.epoch_rng,
                rank=self.dist.rank,
                world=self.dist.world,
            )
            for x in batches:
                x = x.to(self.device, non_blocking=True).float()
                global_rows = (
                    train.global_size(state.epoch_step) if train.loader is None else len(x)
                )
                terms = self._step(model, optimizer, x, global_rows, epoch, state)
                for k, v in terms.items():
                    state.sums[k] = state.sums.get(k, 0.0) + v * len(x)
                state.count += len(x)
                state.epoch_step += 1
                state.step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{terms['loss']:.4g}", refresh=False)
                if self._stop_now():
                    bar.close()
                    self._last_step = state.step
                    self._save_checkpoint(model, optimizer, state)
                    raise TrainingInterrupted(self._interrupted_message())
                if self.checkpoint_every and state.step % self.checkpoint_every == 0:
                    self._save_checkpoint(model, optimizer, state)
            bar.close()
            record = {"epoch": epoch, "step": state.step}
            sums, count = self._global_sums(state)
            record.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
            improved = False
            if val is not None:
                val_terms = self._evaluate(model, val)
                record.update({f"val_{k}": v for k, v in val_terms.items()})
                improved = state.record_val(val_terms, epoch, model, self.min_delta)
            record["seconds"] = round(time.perf_counter() - start, 4)
            state.history.epochs.append(record)
            state.epoch, state.epoch_step = epoch, 0
            if self.patience is not None and val is not None and not improved:
                state.bad_epochs += 1
                if state.bad_epochs >= self.patience:
                    state.history.stopped_early = True
                    state.epoch = self.epochs
            elif improved:
                state.bad_epochs = 0
            self._append_metrics(record)
            self._save_checkpoint(model, optimizer, state)
            self.log(
                f"epoch {epoch}: "
                + ", ".join(
                    f"{k}={v:.5g}" for k, v in record.items() if k.startswith(("train_", "val_"))
                )
            )

    def _stop_now(self) -> bool:
        # every process must stop at the same step, whichever received the signal
        return self.dist.any([self.stop_requested is not None], self.device)[0]

    def _global_sums(self, state: _RunState) -> tuple[dict[str, float], int]:
        """Epoch metric sums and row count over all processes."""
        keys = sorted(state.sums)
        totals = self.dist.sum([state.sums[k] for k in keys] + [state.count], self.device)
        return dict(zip(keys, totals[:-1])), int(totals[-1])

    def _step(
        self, model, optimizer, x: torch.Tensor, global_rows: int, epoch: int, state: _RunState
    ) -> dict[str, float]:
        where = f"epoch {epoch}, step {state.epoch_step + 1} (global step {state.step + 1})"
        if optimizer is None:
            terms = model.train_step(x)
        else:
            terms = self._loss_fn(x)
            if "loss" not in terms:
                raise TrainingError(f"{type(model).__name__}.loss returned no 'loss' key")
            loss = terms["loss"]
            if self.dist.any([not torch.isfinite(loss)], self.device)[0]:
                raise TrainingError(
                    f"non-finite loss ({loss.item()}) at {where}; the model keeps the weights "
                    f"from before this step. Lower the learning rate or set grad_clip."
                )
            # DDP averages gradients over processes; weighting each process's mean by its
            # share of the global batch makes that the global batch mean
            scale = len(x) * self.dist.world / global_rows if self.dist.active else 1.0
            if isinstance(optimizer, torch.optim.LBFGS):
                self._lbfgs_step(model, optimizer, x, scale, where)
                return {k: float(v.detach()) for k, v in terms.items()}
            optimizer.zero_grad(set_to_none=True)
            (loss * scale if scale != 1.0 else loss).backward()
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
            if not torch.isfinite(norm):
                optimizer.zero_grad(set_to_none=True)
                raise TrainingError(
                    f"non-finite gradient at {where}; the model keeps the weights from before "
                    f"this step. Lower the learning rate or set grad_clip."
                )
            if self.grad_clip is not None:
                torch.nn.utils.clip_grads_with_norm_(
                    [p for p in model.parameters() if p.grad is not None], self.grad_clip, norm
                )
            optimizer.step()
        return {k: float(v.detach()) for k, v in terms.items()}

    def _lbfgs_step(self, model, optimizer, x: torch.Tensor, scale: float, where: str) -> None:
        """One L-BFGS step; it re-evaluates the loss during its line search, so the
        weights are checked afterwards and put back if they went non-finite."""
        params = [p for p in model.parameters() if p.requires_grad]
        before = [p.detach().clone() for p in params]

        def closure():
            optimizer.zero_grad(set_to_none=True)
            loss = self._loss_fn(x)["loss"] * scale
            loss.backward()
            return loss

        optimizer.step(closure)
        if not all(bool(torch.isfinite(p).all()) for p in params):
            with torch.no_grad():
                for p, b in zip(params, before):
                    p.copy_(b)
            raise TrainingError(
                f"non-finite weights after the L-BFGS step at {where}; the model keeps the "
                f"weights from before this step. Lower the learning rate."
            )

    @torch.no_grad()
    def _evaluate(self, model, val: _Batches) -> dict[str, float]:
        """Mean loss terms on validation data, in eval mode, with a fixed RNG stream so
        stochastic losses are comparable across epochs and training RNG is untouched."""
        was_training = model.training
        model.eval()
        sums: dict[str, float] = {}
        count = 0
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(self.seed + 7919)
            for x in val.epoch(0):
                x = x.to(self.device).float()
                terms = model.loss(x)
                for k, v in terms.items():
                    sums[k] = sums.get(k, 0.0) + float(v) * len(x)
                count += len(x)
        model.train(was_training)
        return {k: v / count for k, v in sums.items()}

    def _interrupted_message(self) -> str:
        if self.out_dir is None:
            return f"training interrupted by {self.stop_requested}; no out_dir, nothing saved"
        return (
            f"training interrupted by {self.stop_requested} at step {self._last_step}; "
            f"checkpoint saved in {self.out_dir}. Resume with --resume (resume=True)."
        )

    # -- files -----------------------------------------------------------------------
    def _append_metrics(self, record: dict[str, Any]) -> None:
        if self.out_dir is None or not self.is_main:
            return
        self.out_dir.mkdir(parents=True, exist_ok=True)
        with open(self.out_dir / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")

    def _rewrite_metrics(self, state: _RunState) -> None:
        from aecore.fileio import atomic_write_text

        atomic_write_text(
            self.out_dir / METRICS, "".join(json.dumps(r) + "\n" for r in state.history.epochs)
        )

    def _save_checkpoint(self, model, optimizer, state: _RunState) -> None:
        if self.out_dir is None:
            return
        # collectives first: every process takes part, only rank 0 writes
        rng_states = self.dist.gather(torch.get_rng_state(), self.device)
        sums, count = self._global_sums(state)
        if not self.is_main:
            return
        tensors: dict[str, torch.Tensor] = {}
        for k, v in model.state_dict().items():
            tensors[f"model.{k}"] = v
        optim = flatten_state(optimizer.state_dict(), "optim", tensors) if optimizer else None
        if state.best_state is not None:
            for k, v in state.best_state.items():
                tensors[f"best.{k}"] = v
        for rank, rng in enumerate(rng_states):
            tensors[f"rng.cpu.{rank}"] = rng
        tensors["rng.epoch_start"] = (
            state.epoch_rng if state.epoch_rng is not None else torch.get_rng_state()
        )
        if torch.cuda.is_available() and self.device.type == "cuda":
            tensors["rng.cuda"] = torch.cuda.get_rng_state(self.device)
        meta = {
            "format": "aecore-checkpoint",
            "model_class": f"{type(model).__module__}.{type(model).__qualname__}",
            "model_config": model.get_config(),
            "optimizer": optim,
            "epoch": state.epoch,
            "epoch_step": state.epoch_step,
            "step": state.step,
            "sums": sums,
            "count": count,
            "world_size": self.dist.world,
            "bad_epochs": state.bad_epochs,
            "history": state.history.to_dict(),
            "has_best": state.best_state is not None,
            "trainer": {"seed": self.seed, "batch_size": self.batch_size, "epochs": self.epochs},
        }
        self.out_dir.mkdir(parents=True, exist_ok=True)
        save_tensors(self.out_dir / CHECKPOINT, tensors, meta)

    def _load_checkpoint(self, model, optimizer, state: _RunState) -> None:
        path = self.out_dir / CHECKPOINT
        if not path.exists():
            raise ModelFileError(f"cannot resume: no {CHECKPOINT} in {self.out_dir}")
        tensors, meta = load_tensors(path)
        if not isinstance(meta, dict) or meta.get("format") != "aecore-checkpoint":
            raise ModelFileError(f"{path} is not an aecore checkpoint")
        if meta["model_config"] != model.get_config():
            raise ModelFileError(
                f"cannot resume: {path} was written for a model with config "
                f"{meta['model_config']}, not {model.get_config()}"
            )
        if meta["world_size"] != self.dist.world:
            raise ConfigError(
                f"cannot resume exactly: the checkpoint was written by {meta['world_size']} "
                f"process(es); resume with the same number (got {self.dist.world})"
            )
        saved = meta["trainer"]
        if saved["batch_size"] != self.batch_size or saved["seed"] != self.seed:
            raise ConfigError(
                f"cannot resume exactly: the checkpoint used batch_size={saved['batch_size']}, "
                f"seed={saved['seed']}; got batch_size={self.batch_size}, seed={self.seed}"
            )
        model_state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        model.load_state_dict(model_state)
        if optimizer is not None and meta["optimizer"] is not None:
            optimizer.load_state_dict(unflatten_state(meta["optimizer"], tensors))
        if meta["has_best"]:
            state.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        state.epoch, state.epoch_step, state.step = meta["epoch"], meta["epoch_step"], meta["step"]
        # rank 0 carries the interrupted epoch's global sums; the rest add to them
        if self.is_main:
            state.sums, state.count = meta["sums"], meta["count"]
        state.bad_epochs = meta["bad_epochs"]
        h = meta["history"]
        state.history = History(
            h["epochs"], h["best_epoch"], h["best_val_loss"], h["stopped_early"]
        )
        state.best_val = h["best_val_loss"] if h["best_val_loss"] is not None else math.inf
        state.epoch_rng = tensors["rng.epoch_start"]
        torch.set_rng_state(tensors[f"rng.cpu.{self.dist.rank}"])
        if "rng.cuda" in tensors and self.device.type == "cuda":
            torch.cuda.set_rng_state(tensors["rng.cuda"], self.device)
        if state.history.stopped_early:
            state.epoch = self.epochs
        if self.is_main:
            self._rewrite_metrics(state)


class _LossModule(torch.nn.Module):
    """DDP hooks into ``forward``: this makes ``model.loss`` the forward it wraps."""

    def __init__(self, model) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.model.loss(x)


class _RunState:
    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.epoch_step = 0  # steps done in the current epoch
        self.step = 0
        self.sums: dict[str, float] = {}
        self.count = 0
        self.bad_epochs = 0
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch_rng: torch.Tensor | None = None
        self.history = History()

    def record_val(self, terms: dict[str, float], epoch: int, model, min_delta: float) -> bool:
        loss = terms["loss"]
        if loss < self.best_val - min_delta:
            self.best_val = loss
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.history.best_epoch = epoch
            self.history.best_val_loss = loss
            return True
        return False
