"""One member of a training: its config, callbacks, history and result, and how it ends. A solo run is one
member; a fused pack has K."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..config import RunConfig
from .callbacks import Callback, TrainContext
from .results import EpochRecord, RunResult, best_record


@dataclass
class Member:
    index: int  # in the configs given to the engine
    row: int  # in the step (always 0 for a solo run)
    config: RunConfig
    callbacks: list[Callback]
    context: TrainContext
    result: RunResult
    running: bool = True

    @property
    def history(self) -> list[EpochRecord]:
        return self.context.history

    def hook(self, name: str, *args: Any) -> None:
        """Calls ``name`` on each of the member's callbacks; what they raise propagates."""
        for callback in self.callbacks:
            getattr(callback, name)(self.context, *args)

    def improved(self, record: EpochRecord) -> bool:
        """Whether ``record``, the latest epoch, is the best one so far."""
        return best_record(self.history) is record

    def finish(self) -> None:
        """Ends the member: every callback's ``on_train_end`` sees its finished result."""
        self.running = False
        self.hook("on_train_end", self.result)
