"""Training: ``Trainer`` (settings and ``fit``), the run loop, seeded batches,
checkpoints and resume, optimizers, and multi-process training under torchrun."""

from aecore.config import TrainConfig
from aecore.training.state import History
from aecore.training.trainer import Trainer

__all__ = ["History", "TrainConfig", "Trainer"]
