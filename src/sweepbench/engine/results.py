"""What a run produces: one ``EpochRecord`` per epoch, an ``Evaluation`` per evaluated split, and the
``RunResult`` at the end. The best epoch is derived from the history, here only (``best_record``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, NamedTuple, Sequence

import torch
from torch import nn

from ..config import RunConfig
from ..hardware import peak_memory_mb


@dataclass
class EpochRecord:
    epoch: int
    train_loss: float
    val_loss: float
    val_accuracy: float
    epoch_seconds: float
    samples_per_second: float
    lr: float
    eval_seconds: float

    def divergence(self) -> str | None:
        """Why the run diverged at this epoch (a loss that is NaN or infinite), else None."""
        if math.isfinite(self.train_loss) and math.isfinite(self.val_loss):
            return None
        return f"diverged: loss is {self.train_loss} at epoch {self.epoch}"


class Evaluation(NamedTuple):
    """A model's loss, accuracy and confusion matrix (rows: true class, on the CPU) over one split."""

    loss: float
    accuracy: float
    confusion: torch.Tensor


def best_record(history: Sequence[EpochRecord]) -> EpochRecord | None:
    """The epoch with the best validation accuracy, the first of equals; a diverged epoch never counts."""
    best = None
    for record in history:
        if record.divergence() is None and (best is None or record.val_accuracy > best.val_accuracy):
            best = record
    return best


def time_to_target(history: list[EpochRecord], target: float | None) -> float | None:
    """Training seconds until validation accuracy first reached ``target`` (None: no target, or never)."""
    if target is None:
        return None
    elapsed = 0.0
    for record in history:
        elapsed += record.epoch_seconds
        if record.val_accuracy >= target:
            return elapsed
    return None


@dataclass
class RunResult:
    """What a run produced; ``status``: a ``status.RunStatus``."""

    config: RunConfig
    status: str
    history: list[EpochRecord] = field(default_factory=list)
    device: str = ""
    device_name: str = ""
    test_accuracy: float | None = None
    test_loss: float | None = None
    per_class_accuracy: dict[str, float] = field(default_factory=dict)
    confusion_matrix: list[list[int]] = field(default_factory=list)
    time_to_target_seconds: float | None = None
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    peak_memory_mb: float = 0.0
    train_seconds: float = 0.0
    compile_seconds: float = 0.0  # building a compiled or captured step, before the first epoch: in no epoch
    wall_seconds: float = 0.0
    message: str = ""
    checkpoints: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

    def record_test(self, test: Evaluation, classes: Sequence[str]) -> None:
        """The test split's loss, accuracy and confusion matrix, with each class's accuracy."""
        per_class = test.confusion.diag().double() / test.confusion.sum(1).clamp(min=1)
        self.test_loss, self.test_accuracy = test.loss, test.accuracy
        self.per_class_accuracy = dict(zip(classes, per_class.tolist()))
        self.confusion_matrix = test.confusion.tolist()

    def finish(self, status: str, message: str, device: torch.device, started: float) -> None:
        """The figures a run has once it ends, however it ends; ``started``: ``time.perf_counter()`` at its start."""
        self.status, self.message = status, message
        best = best_record(self.history)
        self.best_val_accuracy, self.best_epoch = (best.val_accuracy, best.epoch) if best else (None, None)
        reached = time_to_target(self.history, self.config.target_accuracy)
        # what reaching it cost: a compiled or captured step's build counts, as the user waited for it too
        self.time_to_target_seconds = None if reached is None else reached + self.compile_seconds
        self.train_seconds = sum(record.epoch_seconds for record in self.history)
        self.peak_memory_mb = peak_memory_mb(device)
        self.wall_seconds = time.perf_counter() - started

    @property
    def val_accuracy(self) -> float | None:
        return self.history[-1].val_accuracy if self.history else None

    def summary(self) -> dict[str, Any]:
        """A JSON-ready digest: what ``sweepbench train --json`` prints."""
        epoch_seconds = [r.epoch_seconds for r in self.history]
        return {
            "status": self.status,
            "message": self.message,
            "model": self.config.model,
            "dataset": self.config.dataset,
            "device": self.device,
            "device_name": self.device_name,
            "precision": self.config.precision,
            "loader": self.config.loader,
            "step": self.config.step,
            "epochs_run": len(self.history),
            "val_accuracy": self.val_accuracy,
            "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch,
            "test_accuracy": self.test_accuracy,
            "test_loss": self.test_loss,
            "epoch_seconds": epoch_seconds,
            "samples_per_second": self.history[-1].samples_per_second if self.history else None,
            "time_to_target_seconds": self.time_to_target_seconds,
            "train_seconds": self.train_seconds,
            "compile_seconds": self.compile_seconds,
            "wall_seconds": self.wall_seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "per_class_accuracy": self.per_class_accuracy,
            "checkpoints": self.checkpoints,
        }
