"""What a training run knows: the per-epoch history it returns and the state that a
checkpoint saves and a resume restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


@dataclass
class History:
    """Per-epoch metrics of a run (``epochs[i]`` is a dict of floats).

    ``best_epoch`` / ``best_val_loss``: the epoch with the best (smoothed) validation
    loss and its raw loss; ``kept_epoch``: the epoch whose weights the model holds at the
    end (the best one, unless the final weights were as good within the noise).
    ``rank`` / ``world_size``: the process that produced it under torchrun (0 / 1 in a
    single process); only rank 0 writes files.
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    kept_epoch: int | None = None
    rank: int = 0
    world_size: int = 1
    #: training settings a resume changed (allow_changes): {"epoch": the epochs done
    #: before, "changed": {setting: [before, after]}} per such resume
    changes: list[dict[str, Any]] = field(default_factory=list)
    #: the run's identity, carried by every file it writes (metrics lines, checkpoint,
    #: model.json, the weights): set when a fresh run starts, kept by a resume
    run_id: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def metric(self, name: str) -> list[float]:
        return [e[name] for e in self.epochs if name in e]

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "best_epoch": self.best_epoch,
            "best_val_loss": self.best_val_loss,
            "stopped_early": self.stopped_early,
            "changes": self.changes,
            "run_id": self.run_id,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        history = cls(d["epochs"], d["best_epoch"], d["best_val_loss"], d["stopped_early"])
        history.changes = list(d.get("changes", []))
        history.run_id = str(d.get("run_id", ""))
        return history


def read_is_free(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s value costs no wait: a CPU tensor's does (a device's waits
    for its queue, so its values are read back together when wanted)."""
    return t.device.type == "cpu"


class RunState:
    """Where a run is: completed epochs and steps, the running epoch's metric sums,
    early-stopping bookkeeping (on the smoothed validation loss) and the best weights."""

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.epoch_step = 0  # steps done in the current epoch
        self.step = 0
        self.sums: dict[str, float] = {}
        # the steps' loss terms (and rows) since sums was last read, where the model put
        # them: read back together when the sums are wanted (a read waits for the device;
        # once a step it kept a GPU from running ahead)
        self.pending: dict[str, list[tuple[torch.Tensor, int]]] = {}
        self.count = 0
        self.bad_epochs = 0
        self.best_val = math.inf  # the best smoothed validation loss
        self.smoothed: float | None = None  # the moving average of the validation loss
        self.best_state: dict[str, torch.Tensor] | None = None
        # a model that starts at a known solution (PCA's): its starting weights, which
        # the run keeps unless the trained ones do better beyond the validation noise
        self.start_state: dict[str, torch.Tensor] | None = None
        self.epoch_rng: torch.Tensor | None = None  # torch's RNG state when the epoch began
        # a DataLoader's own generators (Batches.loader_generators), and their states
        # when the epoch began
        self.loader_generators: list[torch.Generator] = []
        self.epoch_loader_rng: list[torch.Tensor] | None = None
        self.history = History()

    def add_terms(self, terms: dict[str, torch.Tensor], rows: int) -> None:
        """A step's loss terms (detached means over its ``rows`` rows) into the epoch's sums."""
        for k, v in terms.items():
            if read_is_free(v):  # no tensors kept, none stacked
                self.sums[k] = self.sums.get(k, 0.0) + float(v) * rows
                continue
            v = v.reshape(())
            if v.untyped_storage().nbytes() > v.element_size():
                v = v.clone()  # a view would keep its whole buffer alive until then
            self.pending.setdefault(k, []).append((v, rows))
        self.count += rows

    def epoch_sums(self) -> dict[str, float]:
        """The epoch's metric sums so far, the pending terms read back in one go."""
        if self.pending:
            totals = []
            for steps in self.pending.values():
                values = torch.stack([v for v, _ in steps]).double()
                rows = torch.tensor([n for _, n in steps], dtype=torch.float64)
                totals.append((values * rows.to(values.device)).sum())
            device = totals[0].device  # one model's terms: one device, one read
            for k, v in zip(self.pending, torch.stack([t.to(device) for t in totals]).tolist()):
                self.sums[k] = self.sums.get(k, 0.0) + v
            self.pending = {}
        return self.sums

    def record_val(
        self, loss: float, epoch: int, model, min_delta: float, smoothing: float
    ) -> bool:
        """Note a validation loss; True (and the weights kept) when its moving average
        is the best so far."""
        if self.smoothed is None:
            self.smoothed = loss
        else:
            self.smoothed = smoothing * self.smoothed + (1.0 - smoothing) * loss
        if self.smoothed < self.best_val - min_delta:
            self.best_val = self.smoothed
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.history.best_epoch = epoch
            self.history.best_val_loss = loss
            return True
        return False

    def record_start(self, loss: float, model) -> None:
        """Without validation data: the starting weights and their loss, to fall back on."""
        self.best_val = loss
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history.best_epoch = 0

    def _recent(self, window: int) -> np.ndarray:
        losses = [e["val_loss"] for e in self.history.epochs[-window:] if "val_loss" in e]
        return np.asarray(losses, dtype=np.float64)

    def rising(self, window: int) -> bool:
        """Whether the raw validation loss of the last ``window`` epochs rises: a least
        squares slope above zero by more than three standard errors (asked every epoch,
        a looser test would fire by chance on a long flat stretch)."""
        y = self._recent(window)
        if len(y) < 3:
            return False
        t = np.arange(len(y), dtype=np.float64) - (len(y) - 1) / 2
        slope = float(t @ (y - y.mean()) / (t @ t))
        residual = y - y.mean() - slope * t
        se = math.sqrt(float(residual @ residual) / (len(y) - 2) / float(t @ t))
        return slope > 3.0 * se

    def gap_is_real(self, min_delta: float, window: int) -> bool:
        """Whether the final weights are worse than the best ones beyond the noise: the
        smoothed loss above its best by more than ``min_delta`` and twice the spread of
        the last ``window`` raw losses around their own trend, or still rising."""
        if self.smoothed is None or self.smoothed <= self.best_val:
            return False
        if self.rising(window):
            return True
        y = self._recent(window)
        spread = float(np.std(y - y.mean())) if len(y) > 1 else 0.0
        return self.smoothed - self.best_val > max(min_delta, 2.0 * spread)


def listed_changes(changed: dict[str, list[Any]]) -> str:
    """A resume's changed settings ({setting: [before, after]}) as "lr 0.001 -> 0.0005"."""
    return ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items())


@dataclass(frozen=True)
class StepPlace:
    """Which step a message is about: "epoch E, step S (global step G)" as text."""

    epoch: int
    epoch_step: int
    step: int

    def __str__(self) -> str:
        return f"epoch {self.epoch}, step {self.epoch_step} (global step {self.step})"
