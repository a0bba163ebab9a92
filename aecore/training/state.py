"""What a training run knows: the per-epoch history it returns and the state that a
checkpoint saves and a resume restores."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class History:
    """Per-epoch metrics of a run (``epochs[i]`` is a dict of floats).

    ``rank`` / ``world_size``: the process that produced it under torchrun (0 / 1 in a
    single process); only rank 0 writes files.
    """

    epochs: list[dict[str, Any]] = field(default_factory=list)
    best_epoch: int | None = None
    best_val_loss: float | None = None
    stopped_early: bool = False
    rank: int = 0
    world_size: int = 1

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
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        return cls(d["epochs"], d["best_epoch"], d["best_val_loss"], d["stopped_early"])


class RunState:
    """Where a run is: completed epochs and steps, the running epoch's metric sums,
    early-stopping bookkeeping and the best weights so far."""

    def __init__(self) -> None:
        self.epoch = 0  # completed epochs
        self.epoch_step = 0  # steps done in the current epoch
        self.step = 0
        self.sums: dict[str, float] = {}
        self.count = 0
        self.bad_epochs = 0
        self.best_val = math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.epoch_rng: torch.Tensor | None = None  # torch's RNG state when the epoch began
        self.history = History()

    def record_val(self, terms: dict[str, float], epoch: int, model, min_delta: float) -> bool:
        """Note a validation result; True (and the weights kept) when it is the best."""
        loss = terms["loss"]
        if loss < self.best_val - min_delta:
            self.best_val = loss
            self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            self.history.best_epoch = epoch
            self.history.best_val_loss = loss
            return True
        return False
