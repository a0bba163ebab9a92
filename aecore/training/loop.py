"""One ``Trainer.fit``: the model, its batches, the process group, the optimizer and
the run state, and the loop over epochs and steps."""

from __future__ import annotations

import itertools
import sys
import time
import uuid
from typing import Any

import torch

from aecore.errors import TrainingError, TrainingInterrupted
from aecore.training import checkpoint
from aecore.training.batches import Batches
from aecore.training.data_start import data_init, train_sample
from aecore.training.distributed import (
    DistContext,
    check_distributed,
    check_same_data,
    distributed_loss,
)
from aecore.training.evaluation import (
    check_first_batch,
    check_validation_loss,
    chunk_losses,
    clearly_lower,
    input_dtype,
    loss_terms,
    mean_losses,
    seed_device,
)
from aecore.training.optim import finite_loss_terms, gradient_step, lbfgs_step, make_optimizer
from aecore.training.state import History, RunState, StepPlace, listed_changes


class TrainingRun:
    """Runs one fit of ``model`` for ``trainer`` (its files and stop flag) with ``config``
    (the trainer's, its learning rate resolved for the model)."""

    def __init__(
        self, trainer, config, model, train: Batches, val: Batches | None, init_data: Batches
    ) -> None:
        self.trainer = trainer
        self.config = config
        self.out_dir = trainer.out_dir
        self.model = model
        self.train = train
        self.val = val
        self.init_data = init_data  # the rows data-dependent initialisation sees
        self.dist = DistContext.from_env(trainer.device)
        self.device = self.dist.device_for(trainer.device)
        self.state = RunState()
        self.state.loader_generators = train.loader_generators()
        self.optimizer = None
        self.loss_fn = model.loss

    # -- the run ---------------------------------------------------------------------
    def execute(self) -> History:
        if self.dist.active:
            check_distributed(self.model, self.train, self.config, self.dist.world)
            check_same_data(self.dist, self.train.summary(), self.device)
        self.model.to(self.device)
        if self.model.uses_optimizer:
            self.optimizer = make_optimizer(self.model, self.config)
        if self.trainer.resume:
            self._resume()
        else:
            self._start()
        if self.dist.active:
            self.loss_fn = distributed_loss(self.model, self.device)
        # a model that checks each batch may check in-memory data once instead
        check = getattr(self.model, "check_training_data", None)
        chunks = None if check is None else self.train.in_memory_chunks()
        self.data_checked = chunks is not None and bool(check(chunks))
        # which process this is (a resume replaces the history with the saved one)
        self.state.history.rank = self.dist.rank
        self.state.history.world_size = self.dist.world
        self._epochs()
        self._keep_best_weights()
        self.model.eval()
        self.model.run_id = self.state.history.run_id  # aecore.save records it
        return self.state.history

    def _keep_best_weights(self) -> None:
        """With validation data: the best epoch's weights, unless the final ones are as
        good within the noise of the curve (then training did not overfit: keep what it
        reached). Without: the start's, if training ended worse on the training sample
        than it began (a start such as PCA's is then never lost)."""
        state = self.state
        epochs = state.history.epochs
        state.history.kept_epoch = epochs[-1]["epoch"] if epochs else 0
        if state.best_state is None:
            return
        if self.val is not None:
            worse = self._gap_is_real()
        else:
            worse = self.evaluate(train_sample(self.model, self.init_data))["loss"] > state.best_val
        if worse:
            self.model.load_state_dict(state.best_state)
            state.history.kept_epoch = state.history.best_epoch
        if state.start_state is not None and not self._beats_start():
            self.model.load_state_dict(state.start_state)
            state.history.kept_epoch = 0

    def _beats_start(self) -> bool:
        """Whether the model's weights beat the start's on the validation rows beyond
        their noise (``evaluation.clearly_lower``). A known start such as PCA's is
        otherwise kept: a gain the validation data cannot show is as likely a loss on
        new data."""
        seed, device = self.config.seed, self.device
        trained = chunk_losses(self.model, self.val.epoch(0), seed, device)
        kept = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.model.load_state_dict(self.state.start_state)
        start = chunk_losses(self.model, self.val.epoch(0), seed, device)
        self.model.load_state_dict(kept)
        return clearly_lower(trained, start)

    def _window(self) -> int:
        """Epochs of the validation curve that its trend and noise are judged on."""
        return max(20, 2 * (self.config.patience or 0))

    def _gap_is_real(self) -> bool:
        return self.state.gap_is_real(self.config.min_delta, self._window())

    def _start(self) -> None:
        if self.out_dir is not None and not self.trainer.overwrite:
            checkpoint.check_fresh(self.out_dir)
        self.dist.barrier()  # nobody writes before every process has checked
        self.state.history.run_id = self.dist.from_main(uuid.uuid4().hex[:16])
        seed_device(self.config.seed + self.dist.rank, self.device)
        check_first_batch(self.model, self.train, self.init_data)
        # data-dependent init sees the whole data in every process, so all start
        # identical (pretraining draws from each one's seed: rank 0's is shared below)
        fresh = not getattr(self.model, "data_initialised", False)
        data_init(self.model, self.init_data, self.device)
        pretrain = getattr(self.model, "pretrain", None)
        if pretrain is not None and fresh:  # trained or loaded weights are trained on
            # every pass over the data is a fresh seeded shuffle
            passes = itertools.count(1)

            def pretraining_pass():  # a stop cannot wait out pretraining, nor resume it
                for batch in self.train.epoch(next(passes), stream=Batches.PRETRAIN_STREAM):
                    if self._stop_now():
                        raise self._interrupted(pretraining=True)
                    yield batch

            pretrain(pretraining_pass, self.log)
        # pretraining draws from each process's own seed: rank 0's result is the start
        self.dist.share_weights(self.model)
        if self.val is not None:
            if getattr(self.model, "pca_start", False):
                self.state.start_state = {
                    k: v.detach().clone() for k, v in self.model.state_dict().items()
                }
            loss = self.evaluate()["loss"]
            self.state.record_val(loss, 0, self.model, self.config.min_delta, self.config.smoothing)
        else:  # the start to fall back on: its loss on a sample of the training rows
            self.state.record_start(
                self.evaluate(train_sample(self.model, self.init_data))["loss"], self.model
            )

    def _resume(self) -> None:
        changed = checkpoint.read(
            self.out_dir, self.model, self.optimizer, self.state, self.config,
            rank=self.dist.rank, world=self.dist.world, device=self.device,
            allow_changes=self.trainer.allow_changes, data=self._data_summary(),
        )  # fmt: skip
        if changed:  # allowed: said, and recorded in the history (and model.json)
            self.state.history.changes.append({"epoch": self.state.epoch, "changed": changed})
            listed = listed_changes(changed)
            if self.is_main:  # said whether progress is shown or not
                print(f"resuming after epoch {self.state.epoch} with changed settings: "
                      f"{listed}", file=sys.stderr)  # fmt: skip
        if self.state.history.stopped_early:
            self.state.epoch = self.config.epochs
        if self.is_main:
            checkpoint.rewrite_metrics(self.out_dir, self.state.history)

    def _epochs(self) -> None:
        from tqdm.auto import tqdm

        state, config = self.state, self.config
        dtype = input_dtype(self.model)
        self.model.train()
        while state.epoch < config.epochs:
            epoch = state.epoch + 1
            start = time.perf_counter()
            if not self.model.training:  # (walking every module costs a small step's time)
                self.model.train()
            bar = None
            if self.show_progress:  # (a disabled bar still costs a small step's time)
                bar = tqdm(total=len(self.train), initial=state.epoch_step, leave=False,
                           desc=f"epoch {epoch}/{config.epochs}", file=sys.stderr)  # fmt: skip
            if state.epoch_step == 0:
                state.epoch_rng = torch.get_rng_state()
                state.epoch_loader_rng = [g.get_state() for g in state.loader_generators]
                state.sums, state.pending, state.count = {}, {}, 0
            batches = self.train.epoch(
                epoch,
                skip=state.epoch_step,
                rng_at_start=state.epoch_rng,
                loader_rng=state.epoch_loader_rng,
                rank=self.dist.rank,
                world=self.dist.world,
            )
            for x in batches:
                x = x.to(self.device, dtype, non_blocking=True)
                global_rows = (
                    self.train.global_size(state.epoch_step)
                    if self.train.loader is None
                    else len(x)
                )
                terms = self.step(x, global_rows, epoch)
                state.add_terms(terms, len(x))
                state.epoch_step += 1
                state.step += 1
                if bar is not None:  # formatting the postfix costs as much as a small step
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(terms['loss']):.4g}", refresh=False)
                if self._stop_now():
                    if bar is not None:
                        bar.close()
                    self._save_checkpoint()
                    raise self._interrupted()
                if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                    self._save_checkpoint()
            if bar is not None:
                bar.close()
            self._end_epoch(epoch, start)

    def _end_epoch(self, epoch: int, start: float) -> None:
        state = self.state
        record: dict[str, Any] = {"epoch": epoch, "step": state.step}
        sums, count = self._global_sums()
        record.update({f"train_{k}": v / max(count, 1) for k, v in sums.items()})
        improved = False
        if self.val is not None:
            val_terms = self.evaluate()
            record.update({f"val_{k}": v for k, v in val_terms.items()})
            c = self.config
            improved = state.record_val(
                val_terms["loss"], epoch, self.model, c.min_delta, c.smoothing
            )
            record["val_loss_smoothed"] = state.smoothed
        record["seconds"] = round(time.perf_counter() - start, 4)
        state.history.epochs.append(record)
        state.epoch, state.epoch_step = epoch, 0
        patience = self.config.patience
        if patience is not None and self.val is not None and not improved:
            state.bad_epochs += 1
            # stop only once the curve clearly turns up (overfitting): a plateau whose
            # noise hides a slow improvement runs on to the budget
            if state.bad_epochs >= patience and state.rising(self._window()):
                state.history.stopped_early = True
                state.epoch = self.config.epochs
        elif improved:
            state.bad_epochs = 0
        if self.out_dir is not None and self.is_main:
            # a fresh run's log replaces a previous one's only once it has an epoch: a run
            # that fails first leaves the folder (and an overwritten run's log) as it was
            if len(state.history.epochs) == 1:
                checkpoint.rewrite_metrics(self.out_dir, state.history)
            else:
                checkpoint.append_metrics(self.out_dir, record, state.history.run_id)
        self._save_checkpoint()
        self.log(
            f"epoch {epoch}: "
            + ", ".join(
                f"{k}={v:.5g}" for k, v in record.items() if k.startswith(("train_", "val_"))
            )
        )

    # -- one step ----------------------------------------------------------------------
    def step(self, x: torch.Tensor, global_rows: int, epoch: int) -> dict[str, torch.Tensor]:
        """One update on batch ``x``; returns the loss terms, detached, where they are (a
        float each would wait for the device every step)."""
        state = self.state
        where = StepPlace(epoch, state.epoch_step + 1, state.step + 1)
        self._report_progress()
        if self.optimizer is None:
            checked = {"checked": True} if self.data_checked else {}
            terms = loss_terms(self.model, self.model.train_step(x, **checked), "train_step")
            return {k: v.detach() for k, v in terms.items()}
        lbfgs = isinstance(self.optimizer, torch.optim.LBFGS)  # its line search needs it finite
        named = self.trainer.setting_name
        terms = finite_loss_terms(self.loss_fn, x, self.dist, self.device, where, not lbfgs, named)
        # DDP averages processes' gradients: each weighted by its share of the global batch
        scale = len(x) * self.dist.world / global_rows if self.dist.active else 1.0
        self._schedule_lr()
        if lbfgs:
            lbfgs_step(self.model, self.optimizer, lambda: self.loss_fn(x)["loss"], scale, where)
        else:
            clip = self.config.grad_clip
            gradient_step(self.model, self.optimizer, terms["loss"], scale, clip, where, x, named)
        return {k: torch.as_tensor(v).detach() for k, v in terms.items()}

    def _progress(self) -> float:
        """Completed steps over the budget's steps, 0 to 1."""
        return min(self.state.step / max(self.config.epochs * len(self.train), 1), 1.0)

    def _report_progress(self) -> None:
        tell = getattr(self.model, "set_progress", None)
        if tell is not None:
            tell(self._progress())

    def _schedule_lr(self) -> None:
        """The model's learning-rate factor at this step (see ``Autoencoder``)."""
        factor = getattr(self.model, "lr_factor", None)
        if factor is None:
            return
        for group in self.optimizer.param_groups:
            group["lr"] = self.config.lr * factor(self._progress())

    def evaluate(self, batches=None) -> dict[str, float]:
        """Mean loss terms on the validation data (or ``batches``)."""
        on_val = batches is None
        losses = mean_losses(self.model, self.val.epoch(0) if on_val else batches,
                             self.config.seed, self.device)  # fmt: skip
        if on_val:  # a loss that is not finite would choose no epoch
            named = self.trainer.setting_name
            check_validation_loss(losses["loss"], self.val, self.state.step, named)
        return losses

    # -- processes, files and messages ---------------------------------------------------
    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    @property
    def show_progress(self) -> bool:
        """Whether this process shows progress (a terminal, rank 0, unless set)."""
        if not self.is_main:
            return False
        if self.trainer.progress is not None:
            return self.trainer.progress
        return sys.stderr.isatty()

    def log(self, message: str) -> None:
        """A line for the user (stderr, when progress is shown); what models get as
        their ``log`` callable."""
        if self.show_progress:
            print(message, file=sys.stderr)

    def _stop_now(self) -> bool:
        # every process must stop at the same step, whichever received the signal
        return self.dist.any([self.trainer.stop_requested is not None], self.device)[0]

    def _global_sums(self) -> tuple[dict[str, float], int]:
        """Epoch metric sums and row count over all processes."""
        sums = self.state.epoch_sums()
        keys = sorted(sums)
        values = [sums[k] for k in keys] + [self.state.count]
        totals = self.dist.sum(values, self.device)
        return dict(zip(keys, totals[:-1])), int(totals[-1])

    def _save_checkpoint(self) -> None:
        if self.out_dir is None:
            return
        # collectives first: every process takes part, only rank 0 writes
        rng_states = self.dist.gather(torch.get_rng_state(), self.device)
        sums, count = self._global_sums()
        failed = None
        if self.is_main:
            cuda = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
            try:
                checkpoint.write(
                    self.out_dir, self.model, self.optimizer, self.state, self.config,
                    rng_states=rng_states, sums=sums, count=count, cuda_rng=cuda,
                    data=self._data_summary(),
                )  # fmt: skip
            except Exception as exc:
                failed = exc
        # no process goes on, or stops saying it saved, before the file is on disk
        if self.dist.any([failed is not None], self.device)[0]:
            if failed is not None:
                raise failed
            raise TrainingError("process 0 could not write the checkpoint (its error says why)")

    def _data_summary(self) -> dict:
        return {"train": self.train.summary(), "val": self.val and self.val.summary()}

    def _interrupted(self, pretraining: bool = False) -> TrainingInterrupted:
        reason = self.trainer.stop_requested or "a stop request in another process"
        said = checkpoint.interrupted_message(reason, self.out_dir, self.state.step, pretraining)
        saved = not pretraining and self.out_dir is not None
        return TrainingInterrupted(said, saved, self.trainer.stop_requested)
