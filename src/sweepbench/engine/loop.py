"""The one training loop. ``sweepbench train``, studies and benchmarks all call ``train(config, callbacks)`` (a
solo run) or ``engine.train_fused(configs, callbacks)`` (a pack of K); both are ``run_members`` over a step:
``SoloStep`` for one model, ``engine.fused.PackStep`` for K stacked ones. Setup, the epoch loop, evaluation,
divergence, the best epoch, checkpoints, callbacks and how a run ends are written once, here.

Timing is honest: ``epoch_seconds`` is the training pass alone, between device synchronisations; evaluation is
timed apart.
"""

from __future__ import annotations

import time
import warnings
from typing import Any, Protocol, Sequence

import torch

from ..config import ConfigError, RunConfig, SettingWarning, advice
from ..data import load_dataset
from ..hardware import device_name, reset_peak_memory, resolve_device, set_precision_flags, synchronize
from ..models import check_fits
from ..status import RunStatus
from ..steps import check_step_device
from .callbacks import Callback, StopTraining, TrainContext
from .checkpoint import DiskFullError, checkpoint_state, save_checkpoints
from .interrupts import interrupt_message
from .loaders import normalise
from .members import Member
from .results import EpochRecord, Evaluation, RunResult
from .solo import SoloStep

__all__ = ["Step", "failure_message", "run_members", "train"]


class Step(Protocol):
    """What trains K members one batch at a time (``SoloStep``: K = 1; ``engine.fused.PackStep``). Rows are the
    members' places in the step; ``check`` (the configs, and all else that can be checked before the data loads)
    runs first, and what it returns reaches ``__init__``."""

    modules: list[torch.nn.Module]  # by row: each member's model, as callbacks see it
    rows: list[int]  # by member index: the member's row

    @staticmethod
    def check(configs: Sequence[RunConfig]) -> Any: ...

    def prepare(self) -> float: ...  # builds a compiled or captured step before the first epoch; its seconds
    def __len__(self) -> int: ...  # training samples per epoch
    def history(self, row: int) -> list[EpochRecord]: ...  # the epochs run before (a resumed run's)
    def tags(self, index: int) -> dict[str, str] | None: ...  # TrainContext.pack of the member
    def batches(self, epoch: int) -> Any: ...
    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor: ...  # detached loss per row
    def learning_rates(self) -> list[float]: ...  # this epoch's, by row
    def step_schedules(self) -> None: ...
    def evaluate(self, rows: Sequence[int], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 batch_size: int) -> list[Evaluation]: ...
    def training_state(self, row: int, epochs: int) -> dict[str, Any]: ...  # see checkpoint_state
    def end(self, row: int) -> None: ...  # the member's rows train no more


class _Training:
    """The state of one training of K >= 1 members; ``run_members`` drives it epoch by epoch."""

    def __init__(self, configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]],
                 step_type: type[Step]) -> None:
        if not configs:
            raise ConfigError("configs: no run config to train; a fused pack needs at least one")
        first = configs[0]
        self.device = resolve_device(first.device)
        set_precision_flags(self.device, first.precision)
        check_step_device(first.step, self.device.type)
        reset_peak_memory(self.device)
        checked = step_type.check(configs)  # a bad config, checkpoint or pack fails before the data loads
        self.dataset = load_dataset(first.dataset, first.data_dir, any(c.download for c in configs),
                                    first.val_size, **first.dataset_kwargs)
        check_fits(first.model, self.dataset.image_shape, first.dataset)  # shapes set by dataset_kwargs
        x_train, y_train = self.dataset.x_train, self.dataset.y_train
        if first.train_subset:
            x_train, y_train = x_train[:first.train_subset], y_train[:first.train_subset]
        for config in configs:
            for note in advice(config, self.device.type, len(x_train)):
                warnings.warn(note, SettingWarning, stacklevel=3)
        self.step = step_type(configs, self.dataset, x_train, y_train, self.device, checked)
        self.x_val = normalise(self.dataset.x_val.to(self.device), self.dataset.mean, self.dataset.std)
        self.y_val = self.dataset.y_val.to(self.device)
        self.eval_batch_size = first.eval_batch_size
        self.members = [self._member(index, self.step.rows[index], config, callbacks[index])
                        for index, config in enumerate(configs)]

    def _member(self, index: int, row: int, config: RunConfig, callbacks: Sequence[Callback]) -> Member:
        module, name = self.step.modules[row], device_name(self.device)
        context = TrainContext(config, self.dataset, module, self.device, name, self.step.history(row),
                               pack=self.step.tags(index))
        result = RunResult(config, RunStatus.COMPLETED, context.history, self.device.type, name, model=module)
        return Member(index, row, config, list(callbacks), context, result)

    def prepare(self) -> None:
        """The step's compile or capture, before any timed epoch; its seconds go to every member's result."""
        compile_seconds = self.step.prepare()
        for member in self.members:
            member.result.compile_seconds = compile_seconds

    @property
    def running(self) -> list[Member]:
        return [member for member in self.members if member.running]

    def train_epoch(self, epoch: int) -> tuple[list[float], float]:
        """One pass over the training split; returns each row's mean loss and the pass's seconds, synchronised.
        Batch losses stay on the device until the pass ends: no per-step host sync or float64 arithmetic."""
        batch_losses, batch_sizes = [], []
        batches = self.step.batches(epoch)  # a generator: its batches are made inside the timed pass
        synchronize(self.device)
        started = time.perf_counter()
        for images, labels in batches:
            batch_losses.append(self.step(images, labels))
            batch_sizes.append(labels.shape[-1])
        synchronize(self.device)
        seconds = time.perf_counter() - started
        sizes = torch.tensor(batch_sizes, dtype=torch.float64, device=self.device)
        totals = (sizes @ torch.stack(batch_losses).view(len(batch_sizes), -1).double()).tolist()
        return [total / len(self.step) for total in totals], seconds

    def evaluate(self, members: Sequence[Member], images: torch.Tensor, labels: torch.Tensor) -> list[Evaluation]:
        return self.step.evaluate([member.row for member in members], images, labels, self.dataset.num_classes,
                                  self.eval_batch_size)

    def run_epoch(self, epoch: int, started: float) -> None:
        running = self.running
        lrs = self.step.learning_rates()
        train_losses, seconds = self.train_epoch(epoch)
        self.step.step_schedules()
        eval_started = time.perf_counter()
        evaluations = self.evaluate(running, self.x_val, self.y_val)
        eval_seconds = time.perf_counter() - eval_started
        for member, evaluation in zip(running, evaluations):
            record = EpochRecord(epoch, train_losses[member.row], evaluation.loss, evaluation.accuracy, seconds,
                                 len(self.step) / seconds, lrs[member.row], eval_seconds)
            self.end_epoch(member, record, started)

    def end_epoch(self, member: Member, record: EpochRecord, started: float) -> None:
        """After an epoch, for one member: divergence, best epoch, checkpoints, callbacks (a ``StopTraining``
        ends this member only)."""
        member.history.append(record)
        divergence = record.divergence()
        if divergence:
            self.end(member, RunStatus.DIVERGED, divergence, started)
            return
        member.result.checkpoints = save_checkpoints(member.config.checkpoint_dir,
                                                     lambda: self.checkpoint(member), member.improved(record))
        self.hook_or_stop(member, "on_epoch_end", record, started=started)

    def checkpoint(self, member: Member) -> dict[str, Any]:
        training = self.step.training_state(member.row, len(member.history))
        return checkpoint_state(member.config, member.history, training, member.callbacks)

    def hook_or_stop(self, member: Member, name: str, *args: object, started: float) -> None:
        try:
            member.hook(name, *args)
        except StopTraining as stop:
            self.end(member, stop.status, stop.reason, started)

    def end(self, member: Member, status: str, message: str, started: float) -> None:
        """Ends one member: its result's figures (peak memory while its step still holds it), then the step lets
        its row go, then its callbacks see the result."""
        member.result.finish(status, message, self.device, started)
        self.step.end(member.row)
        member.finish()

    def end_running(self, status: str, message: str, started: float) -> None:
        for member in self.running:
            self.end(member, status, message, started)

    def test_and_end(self, started: float) -> None:
        """Tests every member still training (all epochs done: completed) in one pass, then ends each."""
        running = self.running
        if not running:
            return
        x_test = normalise(self.dataset.x_test.to(self.device), self.dataset.mean, self.dataset.std)
        evaluations = self.evaluate(running, x_test, self.dataset.y_test.to(self.device))
        for member, evaluation in zip(running, evaluations):
            member.result.record_test(evaluation, self.dataset.classes)
            self.end(member, RunStatus.COMPLETED, "", started)


def run_members(configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]],
                step_type: type[Step]) -> list[RunResult]:
    """Trains ``configs`` through one ``step_type`` step; ``callbacks[i]`` are member i's. Returns each member's
    result, in order.

    Raises ``ConfigError`` / ``DataNotFoundError`` before anything starts. Once started, every member's callbacks
    see its outcome; an exception, Ctrl-C or SIGTERM ends each member still training (failed, killed) and is then
    re-raised.
    """
    started = time.perf_counter()
    if len(callbacks) != len(configs):
        raise ValueError(f"{len(configs)} configs but {len(callbacks)} callback lists")
    training = _Training(configs, callbacks, step_type)
    try:
        for member in training.members:
            training.hook_or_stop(member, "on_train_start", started=started)
        if training.running:  # every member may have been stopped at its start: nothing to compile for
            training.prepare()
        for epoch in range(len(training.members[0].history) + 1, configs[0].epochs + 1):
            if not training.running:
                break
            training.run_epoch(epoch, started)
        training.test_and_end(started)
    except KeyboardInterrupt as interrupt:
        training.end_running(RunStatus.KILLED, interrupt_message(interrupt), started)
        raise
    except Exception as exc:
        training.end_running(RunStatus.FAILED, failure_message(exc), started)
        raise
    return [member.result for member in training.members]


def train(config: RunConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Trains ``config.epochs`` epochs (continuing a checkpoint if ``config.resume``), then tests once.

    Raises ``ConfigError`` / ``DataNotFoundError`` before anything starts. Once started, every callback's
    ``on_train_end`` sees the outcome; an exception, Ctrl-C or SIGTERM is re-raised after that.
    """
    return run_members([config], [callbacks], SoloStep)[0]


def failure_message(error: Exception) -> str:
    """A failed run's error: a full disk's own one line says it all; other errors are named by their type."""
    return str(error) if isinstance(error, DiskFullError) else f"{type(error).__name__}: {error}"
