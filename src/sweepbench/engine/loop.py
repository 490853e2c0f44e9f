"""The one training loop. ``sweepbench train``, studies and benchmarks all call ``train(config, callbacks)``
and differ only in the callbacks they pass (progress, MLflow logging, Optuna pruning).

Timing is honest: ``epoch_seconds`` is the training pass alone, between CUDA synchronisations; evaluation is
timed apart.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig, SettingWarning, advice
from ..data import load_dataset
from ..hardware import autocast, device_name, resolve_device, set_precision_flags, synchronize
from ..models import check_config, check_fits, create_model
from .callbacks import Callback, StopTraining, TrainContext
from .checkpoint import DiskFullError, checkpoint_state, load_resume, restore_checkpoint, save_checkpoint
from .interrupts import interrupt_message
from .loaders import DeviceLoader, TorchvisionLoader, normalise
from .optimizer import build_optimizer, contiguous_parameters, zero_gradients
from .results import EpochRecord, RunResult


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int, precision: str) -> tuple[float, float, torch.Tensor]:
    """Loss, accuracy and the confusion matrix (rows: true class) over already-normalised device tensors."""
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for start in range(0, len(labels), batch_size):
        batch_images, batch_labels = images[start:start + batch_size], labels[start:start + batch_size]
        with autocast(device, precision):
            logits = model(batch_images)
        loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum")
        confusion += torch.bincount(batch_labels * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = max(len(labels), 1)
    return loss_sum.item() / count, confusion.diag().sum().item() / count, confusion


class _Run:
    """The state of one training run; ``train`` drives it epoch by epoch."""

    def __init__(self, config: RunConfig, callbacks: Sequence[Callback]) -> None:
        self.config, self.callbacks = config, list(callbacks)
        self.device = resolve_device(config.device)
        set_precision_flags(self.device, config.precision)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        check_config(config)
        resumed = load_resume(config) if config.resume else None  # a bad checkpoint fails before the data loads
        self.dataset = load_dataset(config.dataset, config.data_dir, config.download, config.val_size,
                                    **config.dataset_kwargs)
        check_fits(config.model, self.dataset.image_shape, config.dataset)  # shapes set by dataset_kwargs
        torch.manual_seed(config.seed)
        self.module = create_model(config.model, **config.model_kwargs).to(self.device)
        self.model = torch.compile(self.module) if config.compile else self.module
        self.parameter_buffers = contiguous_parameters(self.module)
        self.optimizer = build_optimizer(config, self.parameter_buffers, self.device)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.precision == "fp16")
        x_train, y_train = self.dataset.x_train, self.dataset.y_train
        if config.train_subset:
            x_train, y_train = x_train[:config.train_subset], y_train[:config.train_subset]
        for note in advice(config, self.device.type, len(x_train)):
            warnings.warn(note, SettingWarning, stacklevel=2)
        loader_class = DeviceLoader if config.loader == "device" else TorchvisionLoader
        self.loader = loader_class(x_train, y_train, self.dataset, config, self.device)
        self.x_val = normalise(self.dataset.x_val.to(self.device), self.dataset.mean, self.dataset.std)
        self.y_val = self.dataset.y_val.to(self.device)
        self.history: list[EpochRecord] = []
        self.best_val_accuracy: float | None = None
        self.best_epoch: int | None = None
        if resumed is not None:
            restore_checkpoint(self, resumed)
        self.context = TrainContext(config, self.dataset, self.module, self.device, device_name(self.device),
                                    self.history)

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training split; returns (mean loss, seconds), synchronised on CUDA. Batch losses
        stay on the device until the pass ends: no per-step host sync or float64 arithmetic."""
        self.model.train()
        batch_losses, batch_sizes = [], []
        synchronize(self.device)
        started = time.perf_counter()
        for images, labels in self.loader.batches(epoch):
            with autocast(self.device, self.config.precision):
                loss = F.cross_entropy(self.model(images), labels)
            zero_gradients(self.parameter_buffers)
            if self.scaler.is_enabled():
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
            else:
                loss.backward()
                self.optimizer.step()
            batch_losses.append(loss.detach())
            batch_sizes.append(len(labels))
        synchronize(self.device)
        seconds = time.perf_counter() - started
        sizes = torch.tensor(batch_sizes, dtype=torch.float64, device=self.device)
        return (torch.stack(batch_losses).double() @ sizes).item() / len(self.loader), seconds

    def run_epoch(self, epoch: int) -> EpochRecord:
        lr = self.optimizer.param_groups[0]["lr"]
        train_loss, seconds = self.train_epoch(epoch)
        self.scheduler.step()
        started = time.perf_counter()
        val_loss, val_accuracy, _ = evaluate(self.model, self.x_val, self.y_val, self.dataset.num_classes,
                                             self.config.eval_batch_size, self.config.precision)
        record = EpochRecord(epoch, train_loss, val_loss, val_accuracy, seconds, len(self.loader) / seconds, lr,
                             time.perf_counter() - started)
        self.history.append(record)
        return record

    def save_checkpoints(self, improved: bool) -> dict[str, str]:
        if not self.config.checkpoint_dir:
            return {}
        directory = Path(self.config.checkpoint_dir)
        state = checkpoint_state(self)
        save_checkpoint(directory / "last.pt", state)
        if improved:
            save_checkpoint(directory / "best.pt", state)
        return {"last": str(directory / "last.pt"), "best": str(directory / "best.pt")}

    def test(self, result: RunResult) -> None:
        x_test = normalise(self.dataset.x_test.to(self.device), self.dataset.mean, self.dataset.std)
        loss, accuracy, confusion = evaluate(self.model, x_test, self.dataset.y_test.to(self.device),
                                             self.dataset.num_classes, self.config.eval_batch_size,
                                             self.config.precision)
        result.record_test(loss, accuracy, confusion, self.dataset.classes)


def train(config: RunConfig, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Trains ``config.epochs`` epochs (continuing a checkpoint if ``config.resume``), then tests once.

    Raises ``ConfigError`` / ``DataNotFoundError`` before anything starts. Once started, every callback's
    ``on_train_end`` sees the outcome; an exception, Ctrl-C or SIGTERM is re-raised after that.
    """
    started = time.perf_counter()
    run = _Run(config, callbacks)
    result = RunResult(config, "completed", run.history, run.device.type, run.context.device_name, model=run.module)
    try:
        for callback in run.callbacks:
            callback.on_train_start(run.context)
        for epoch in range(len(run.history) + 1, config.epochs + 1):
            record = run.run_epoch(epoch)
            divergence = record.divergence()
            if divergence:
                result.status, result.message = "diverged", divergence
                break
            improved = run.best_val_accuracy is None or record.val_accuracy > run.best_val_accuracy
            if improved:
                run.best_val_accuracy, run.best_epoch = record.val_accuracy, epoch
            result.checkpoints = run.save_checkpoints(improved)
            for callback in run.callbacks:
                callback.on_epoch_end(run.context, record)
        if result.status == "completed":
            run.test(result)
    except StopTraining as stop:
        result.status, result.message = stop.status, stop.reason
    except KeyboardInterrupt as interrupt:
        result.status, result.message = "killed", interrupt_message(interrupt)
        _finish(run, result, started)
        raise
    except Exception as exc:
        result.status, result.message = "failed", failure_message(exc)
        _finish(run, result, started)
        raise
    _finish(run, result, started)
    return result


def failure_message(error: Exception) -> str:
    """A failed run's error: a full disk's own one line says it all; other errors are named by their type."""
    return str(error) if isinstance(error, DiskFullError) else f"{type(error).__name__}: {error}"


def _finish(run: _Run, result: RunResult, started: float) -> None:
    result.finish(run.history, run.config.target_accuracy, run.best_val_accuracy, run.best_epoch, run.device,
                  started)
    for callback in run.callbacks:
        callback.on_train_end(run.context, result)
