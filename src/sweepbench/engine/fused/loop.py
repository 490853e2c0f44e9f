"""``train_fused``: K runs of one architecture trained as one stacked model, each member seeing exactly what its
solo ``engine.train`` run would show its callbacks.

A pack shares the data (one on-device copy), the forward and backward passes and the evaluation passes; members
differ in seed (initial weights, batch order, dropout masks), optimizer and its hyperparameters, learning-rate
schedule, target accuracy and checkpoint folder. A member that diverges or that a callback stops (pruning) ends on
its own: its rows of the stack stay as they were from then on, and the others train on, unchanged by it. An ended
member still rides along in the training passes (the stack keeps its shape; its compute is wasted), not in the
evaluation passes.
Ctrl-C, SIGTERM or an exception ends every member still training as ``engine.train`` ends its run.
"""

from __future__ import annotations

import time
import uuid
import warnings
from typing import Sequence

import torch
import torch.nn.functional as F

from ...config import RunConfig, SettingWarning, advice
from ...data import load_dataset
from ...hardware import autocast, device_name, resolve_device, set_precision_flags, synchronize
from ...models import check_config, check_fits
from ..callbacks import Callback, StopTraining, TrainContext
from ..interrupts import interrupt_message
from ..loaders import DeviceLoader, normalise
from ..loop import failure_message
from ..results import EpochRecord, RunResult
from .batches import PackBatches
from .checkpoint import save_member_checkpoints
from .evaluate import evaluate_members
from .members import Member
from .optim import optimizer_order, stacked_optimizers
from .pack import check_pack, pack_tags
from .stack import StackedModel


class _Pack:
    """The state of one fused run; ``train_fused`` drives it epoch by epoch."""

    def __init__(self, configs: Sequence[RunConfig], callbacks: Sequence[Sequence[Callback]]) -> None:
        check_pack(configs)
        first = configs[0]
        self.device = resolve_device(first.device)
        set_precision_flags(self.device, first.precision)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        check_config(first)
        self.dataset = load_dataset(first.dataset, first.data_dir, any(c.download for c in configs),
                                    first.val_size, **first.dataset_kwargs)
        check_fits(first.model, self.dataset.image_shape, first.dataset)
        order = optimizer_order(configs)  # stack rows: each optimizer type's members adjacent
        stacked_configs = [configs[index] for index in order]
        self.stack = StackedModel(stacked_configs, self.dataset.image_shape, self.device)
        self.optimizers = stacked_optimizers(stacked_configs, self.stack.layout.width, self.device)
        self.batches = PackBatches(self._loader(configs), [c.seed for c in stacked_configs], first.batch_size,
                                   first.augment)
        self.x_val = normalise(self.dataset.x_val.to(self.device), self.dataset.mean, self.dataset.std)
        self.y_val = self.dataset.y_val.to(self.device)
        self.precision, self.eval_batch_size = first.precision, first.eval_batch_size
        self.pack_id = uuid.uuid4().hex
        self.members = sorted((self._member(index, row, configs[index], callbacks[index], len(configs))
                               for row, index in enumerate(order)), key=lambda member: member.index)

    def _loader(self, configs: Sequence[RunConfig]) -> DeviceLoader:
        first = configs[0]
        x_train, y_train = self.dataset.x_train, self.dataset.y_train
        if first.train_subset:
            x_train, y_train = x_train[:first.train_subset], y_train[:first.train_subset]
        for config in configs:
            for note in advice(config, self.device.type, len(x_train)):
                warnings.warn(note, SettingWarning, stacklevel=2)
        return DeviceLoader(x_train, y_train, self.dataset, first, self.device)

    def _member(self, index: int, row: int, config: RunConfig, callbacks: Sequence[Callback], size: int) -> Member:
        module, name = self.stack.modules[row], device_name(self.device)
        context = TrainContext(config, self.dataset, module, self.device, name, [],
                               pack=pack_tags(self.pack_id, size, index))
        result = RunResult(config, "completed", context.history, self.device.type, name, model=module)
        return Member(index, row, config, list(callbacks), context, result, config.lr)

    @property
    def running(self) -> list[Member]:
        return [member for member in self.members if member.running]

    def train_epoch(self, epoch: int) -> tuple[list[float], float]:
        """One pass for the whole pack; returns each row's mean training loss and the pass's seconds."""
        batch_losses, batch_sizes = [], []
        synchronize(self.device)
        started = time.perf_counter()
        for images, labels in self.batches.batches(epoch):
            with autocast(self.device, self.precision):
                logits = self.stack.train_logits(images)
                losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
                losses = losses.view(labels.shape).mean(1)  # one mean loss per member: summed, one backward
            self.stack.backward(losses.sum())
            for optimizer in self.optimizers:
                optimizer.step(self.stack.flat, self.stack.flat_grad)
            self.stack.restore_frozen()
            batch_losses.append(losses.detach())
            batch_sizes.append(labels.shape[1])
        synchronize(self.device)
        seconds = time.perf_counter() - started
        sizes = torch.tensor(batch_sizes, dtype=torch.float64, device=self.device)
        totals = (sizes @ torch.stack(batch_losses).double()).tolist()
        return [total / len(self.batches) for total in totals], seconds

    def step_schedules(self) -> None:
        """Each member's StepLR(step_size=1, gamma=lr_gamma) step, into its stacked optimizer."""
        for member in self.members:
            member.lr = member.lr * member.config.lr_gamma
        by_row = sorted(self.members, key=lambda member: member.row)
        for optimizer in self.optimizers:
            optimizer.set_lr([member.lr for member in by_row[optimizer.rows]])

    def run_epoch(self, epoch: int, started: float) -> None:
        running = self.running
        lrs = [member.lr for member in running]
        train_losses, seconds = self.train_epoch(epoch)
        self.step_schedules()
        eval_started = time.perf_counter()
        evaluations = evaluate_members(self.stack, [member.row for member in running], self.x_val, self.y_val,
                                       self.dataset.num_classes, self.eval_batch_size, self.precision)
        eval_seconds = time.perf_counter() - eval_started
        for member, lr, evaluation in zip(running, lrs, evaluations):
            record = EpochRecord(epoch, train_losses[member.row], evaluation.loss, evaluation.accuracy, seconds,
                                 len(self.batches) / seconds, lr, eval_seconds)
            self.end_epoch(member, record, started)

    def end_epoch(self, member: Member, record: EpochRecord, started: float) -> None:
        """What ``engine.train`` does after an epoch, for one member: divergence, best epoch, checkpoints,
        callbacks (a ``StopTraining`` ends this member only)."""
        divergence = member.add_record(record)
        if divergence:
            self.end(member, "diverged", divergence, started)
            return
        improved = member.improved(record)
        optimizer = next(o for o in self.optimizers if o.kind == member.config.optimizer)
        member.result.checkpoints = save_member_checkpoints(member, self.stack, optimizer, self.device, improved)
        self.hook_or_stop(member, "on_epoch_end", record, started=started)

    def hook_or_stop(self, member: Member, name: str, *args: object, started: float) -> None:
        try:
            member.hook(name, *args)
        except StopTraining as stop:
            self.end(member, stop.status, stop.reason, started)

    def end(self, member: Member, status: str, message: str, started: float) -> None:
        self.stack.freeze(member.row)
        member.finish(status, message, started)

    def test_and_end(self, started: float) -> None:
        """Tests every member still training (all epochs done: completed) in one pass, then ends each."""
        running = self.running
        if not running:
            return
        x_test = normalise(self.dataset.x_test.to(self.device), self.dataset.mean, self.dataset.std)
        evaluations = evaluate_members(self.stack, [member.row for member in running], x_test,
                                       self.dataset.y_test.to(self.device), self.dataset.num_classes,
                                       self.eval_batch_size, self.precision)
        for member, evaluation in zip(running, evaluations):
            member.result.record_test(evaluation.loss, evaluation.accuracy, evaluation.confusion,
                                      self.dataset.classes)
            self.end(member, "completed", "", started)


def train_fused(configs: Sequence[RunConfig],
                callbacks: Sequence[Sequence[Callback]] | None = None) -> list[RunResult]:
    """Trains ``configs`` (members of one pack: see ``pack_key``) as one stacked model; ``callbacks[i]`` are
    member i's. Returns each member's result, in order, as ``engine.train(configs[i], callbacks[i])`` would.

    Raises ``ConfigError`` / ``DataNotFoundError`` before anything starts (members that cannot share a pack, a
    setting fused training lacks). Once started, every member's callbacks see its outcome; an exception, Ctrl-C or
    SIGTERM ends each member still training (failed, killed) and is then re-raised.
    """
    started = time.perf_counter()
    if callbacks is None:
        callbacks = [()] * len(configs)
    if len(callbacks) != len(configs):
        raise ValueError(f"train_fused: {len(configs)} configs but {len(callbacks)} callback lists")
    pack = _Pack(configs, callbacks)
    try:
        for member in pack.members:
            pack.hook_or_stop(member, "on_train_start", started=started)
        for epoch in range(1, configs[0].epochs + 1):
            if not pack.running:
                break
            pack.run_epoch(epoch, started)
        pack.test_and_end(started)
    except KeyboardInterrupt as interrupt:
        _end_running(pack, "killed", interrupt_message(interrupt), started)
        raise
    except Exception as exc:
        _end_running(pack, "failed", failure_message(exc), started)
        raise
    return [member.result for member in pack.members]


def _end_running(pack: _Pack, status: str, message: str, started: float) -> None:
    for member in pack.running:
        pack.end(member, status, message, started)
