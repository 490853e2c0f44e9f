"""The callback interface of ``train``: what callbacks see (``TrainContext``), their hooks (``Callback``), how
one ends a run early (``StopTraining``), and the progress bar of ``sweepbench train`` (``ProgressBar``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import RunConfig
from ..data import Dataset
from ..status import RunStatus
from .results import EpochRecord, RunResult


class StopTraining(Exception):
    """Raised by a callback to end a run early (an Optuna pruner, say); ``status`` becomes the run's status."""

    def __init__(self, reason: str, status: RunStatus = RunStatus.STOPPED) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


@dataclass
class TrainContext:
    """What callbacks see of a run in progress."""

    config: RunConfig
    dataset: Dataset
    model: nn.Module
    device: torch.device
    device_name: str
    history: list[EpochRecord]
    pack: dict[str, str] | None = None  # tags of the fused pack the run trains in (engine.fused); None alone


class Callback:
    """Hooks into ``train``. ``on_train_end`` is called for every run that started, whatever its outcome."""

    def on_train_start(self, context: TrainContext) -> None:
        pass

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        pass

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        pass


class ProgressBar(Callback):
    """A tqdm bar over epochs showing the latest losses and validation accuracy."""

    def on_train_start(self, context: TrainContext) -> None:
        from tqdm import tqdm

        done = len(context.history)
        self.bar = tqdm(total=context.config.epochs, initial=done, unit="epoch",
                        desc=f"{context.config.model} on {context.config.dataset} ({context.device.type})")

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        self.bar.set_postfix(train_loss=f"{record.train_loss:.4f}", val_acc=f"{record.val_accuracy:.4f}",
                             epoch_s=f"{record.epoch_seconds:.2f}")
        self.bar.update()

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        self.bar.close()
