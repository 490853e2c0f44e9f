"""One member of a pack: what ``engine.train`` keeps of a solo run (config, callbacks, history, best epoch, the
result) and how it ends, as a solo run ends."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ...config import RunConfig
from ..callbacks import Callback, TrainContext
from ..optimizer import contiguous_parameters
from ..results import EpochRecord, RunResult


@dataclass
class Member:
    index: int  # in the configs given to train_fused
    row: int  # in the stack
    config: RunConfig
    callbacks: list[Callback]
    context: TrainContext
    result: RunResult
    lr: float  # this epoch's, by the member's StepLR schedule
    best_val_accuracy: float | None = None
    best_epoch: int | None = None
    running: bool = True

    @property
    def history(self) -> list[EpochRecord]:
        return self.context.history

    def hook(self, name: str, *args: Any) -> None:
        """Calls ``name`` on each of the member's callbacks; what they raise propagates, as in ``engine.train``."""
        for callback in self.callbacks:
            getattr(callback, name)(self.context, *args)

    def add_record(self, record: EpochRecord) -> str | None:
        """Appends the epoch; returns why the member diverged, if it did (in ``engine.train``'s words)."""
        self.history.append(record)
        return record.divergence()

    def improved(self, record: EpochRecord) -> bool:
        """Whether ``record`` is the best validation accuracy yet, which it then becomes."""
        if self.best_val_accuracy is not None and record.val_accuracy <= self.best_val_accuracy:
            return False
        self.best_val_accuracy, self.best_epoch = record.val_accuracy, record.epoch
        return True

    def finish(self, status: str, message: str, started: float) -> None:
        """Ends the member as ``engine.train`` ends a run; its model leaves the stack (its own contiguous buffer,
        as a solo run's model has), then every callback's ``on_train_end`` sees the result."""
        self.running = False
        result = self.result
        result.status, result.message = status, message
        result.finish(self.history, self.config.target_accuracy, self.best_val_accuracy, self.best_epoch,
                      self.context.device, started)
        contiguous_parameters(self.context.model)
        self.hook("on_train_end", result)
