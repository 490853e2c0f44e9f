"""The one training loop. ``sweepbench train``, studies and benchmarks all call ``train(config, callbacks)``
and differ only in the callbacks they pass (progress, MLflow logging, Optuna pruning).

Timing is honest: ``epoch_seconds`` is the training pass alone, between CUDA synchronisations; evaluation is
timed apart. The default ``device`` loader keeps the whole dataset on the device and batches by a seeded
permutation; the ``torchvision`` loader (DataLoader, per-sample PIL transforms) is the reference to measure against.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import platform
import resource
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .config import ConfigError, RunConfig
from .data import Dataset, PerSampleImageDataset, load_dataset
from .models import check_model_kwargs, create_model

CHECKPOINT_FORMAT = 2  # 2: optimizer state is over the contiguous parameter buffers


class StopTraining(Exception):
    """Raised by a callback to end a run early (an Optuna pruner, say); ``status`` becomes the run's status."""

    def __init__(self, reason: str, status: str = "stopped") -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Terminated(KeyboardInterrupt):
    """SIGTERM (a job scheduler, ``kill``, a container stopping) raised as an interruption: every place that
    handles Ctrl-C (a run ends KILLED, a trial is queued again) handles it the same way."""


def interrupt_message(interrupt: KeyboardInterrupt) -> str:
    return str(interrupt) or "interrupted (Ctrl-C)"


@contextlib.contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """Within the block, SIGTERM raises ``Terminated`` in the main thread instead of ending the process on the
    spot, which would leave MLflow runs RUNNING and trials unfinished."""

    def interrupt(signum: int, frame: Any) -> None:
        raise Terminated(f"terminated ({signal.Signals(signum).name})")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


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


@dataclass
class RunResult:
    """What a run produced. ``status``: completed, diverged, stopped/pruned (by a callback), failed or killed."""

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
    wall_seconds: float = 0.0
    message: str = ""
    checkpoints: dict[str, str] = field(default_factory=dict)
    model: nn.Module | None = field(default=None, repr=False)

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
            "wall_seconds": self.wall_seconds,
            "peak_memory_mb": self.peak_memory_mb,
            "per_class_accuracy": self.per_class_accuracy,
            "checkpoints": self.checkpoints,
        }


@dataclass
class TrainContext:
    """What callbacks see of a run in progress."""

    config: RunConfig
    dataset: Dataset
    model: nn.Module
    device: torch.device
    device_name: str
    history: list[EpochRecord]


class Callback:
    """Hooks into ``train``. ``on_train_end`` is called for every run that started, whatever its outcome."""

    def on_train_start(self, context: TrainContext) -> None:
        pass

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        pass

    def on_train_end(self, context: TrainContext, result: RunResult) -> None:
        pass


def resolve_device(name: str) -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    available = ["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else [])
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name not in available:
        raise ConfigError(f"device: {name!r} requested but not available on this machine; available: "
                          f"{', '.join(available)} (or auto)")
    return torch.device(name)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine()
    return device.type


def _set_precision_flags(device: torch.device, precision: str) -> None:
    if precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"precision: 'tf32' needs device cuda, got {device.type}; on {device.type} use fp32, bf16")
    allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


FUSED_OPTIMIZERS = ("sgd", "adam", "adamw")


def contiguous_parameters(module: nn.Module) -> list[nn.Parameter]:
    """Moves the trainable parameters of ``module``, and their gradients, into one contiguous buffer per
    (dtype, device) and returns those buffers, which the optimizer then updates instead of the many small
    tensors: on a CPU a small model's optimizer step is mostly per-tensor kernel overhead (one Adadelta step of
    the MNIST MLP: 0.36 ms over four tensors, 0.25 ms over one buffer). The module's parameters become views into
    the buffers, so the model, its ``state_dict`` and ``torch.compile`` see no difference. Gradients stay
    allocated: zero them with ``zero_gradients``, never ``set_to_none``, which would cut the views loose."""
    groups: dict[tuple[torch.dtype, torch.device], list[nn.Parameter]] = {}
    for param in module.parameters():
        if param.requires_grad:
            groups.setdefault((param.dtype, param.device), []).append(param)
    return [_flatten(params) for params in groups.values()]


def _flatten(params: list[nn.Parameter]) -> nn.Parameter:
    buffer = nn.Parameter(torch.cat([param.detach().reshape(-1) for param in params]))
    buffer.grad = torch.zeros_like(buffer)
    offset = 0
    for param in params:
        size = param.numel()
        param.data = buffer.data[offset:offset + size].view_as(param)
        param.grad = buffer.grad[offset:offset + size].view_as(param)
        offset += size
    return buffer


def zero_gradients(buffers: Sequence[nn.Parameter]) -> None:
    for buffer in buffers:
        buffer.grad.zero_()


def build_optimizer(config: RunConfig, params: Sequence[nn.Parameter], device: torch.device) -> torch.optim.Optimizer:
    """Fused kernels where PyTorch has them for this device, else its default for the device (a loop over
    tensors on CPU, which is one tensor per ``contiguous_parameters`` buffer; multi-tensor kernels on CUDA)."""
    fused = config.optimizer in FUSED_OPTIMIZERS and device.type in ("cpu", "cuda")
    kwargs: dict[str, Any] = {"lr": config.lr, "weight_decay": config.weight_decay}
    if fused:
        kwargs["fused"] = True
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, momentum=config.momentum, nesterov=config.nesterov, **kwargs)
    if config.optimizer == "rmsprop":
        return torch.optim.RMSprop(params, momentum=config.momentum, **kwargs)
    optimizer_class = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adadelta": torch.optim.Adadelta}
    return optimizer_class[config.optimizer](params, **kwargs)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """One generator per (seed, epoch), so a resumed run draws the same batches as an uninterrupted one."""
    return torch.Generator(device=device).manual_seed(seed * 100_003 + epoch)


def normalise(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 NCHW -> float32, standardised per channel; runs wherever ``images`` lives."""
    shape = (1, -1, 1, 1)
    mean_t = torch.tensor(mean, device=images.device).view(shape)
    std_t = torch.tensor(std, device=images.device).view(shape)
    return (images.float() / 255 - mean_t) / std_t


def random_crop_flip(padded: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Per-sample random crop (from images padded by ``pad``) and horizontal flip, batched on the device."""
    batch, channels = padded.shape[:2]
    height, width = padded.shape[2] - 2 * pad, padded.shape[3] - 2 * pad
    device = padded.device
    dy = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    dx = torch.randint(0, 2 * pad + 1, (batch,), generator=generator, device=device)
    rows = (dy[:, None] + torch.arange(height, device=device))[:, None, :, None]
    cols = (dx[:, None] + torch.arange(width, device=device))[:, None, None, :]
    crops = padded[torch.arange(batch, device=device)[:, None, None, None],
                   torch.arange(channels, device=device)[None, :, None, None], rows, cols]
    flip = torch.rand(batch, generator=generator, device=device) < 0.5
    return torch.where(flip[:, None, None, None], crops.flip(3), crops)


AUGMENT_PAD = 4


class DeviceLoader:
    """The whole split on the device, normalised once; batches by a seeded permutation, optional crop/flip."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, config: RunConfig,
                 device: torch.device) -> None:
        self.config, self.device = config, device
        self.images = normalise(images.to(device), dataset.mean, dataset.std)
        if config.augment:
            self.images = F.pad(self.images, (AUGMENT_PAD,) * 4, mode="reflect")
        self.labels = labels.to(device)

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = _epoch_generator(self.config.seed, epoch, self.device)
        order = torch.randperm(len(self.labels), generator=generator, device=self.device)
        for start in range(0, len(order), self.config.batch_size):
            index = order[start:start + self.config.batch_size]
            images = self.images.index_select(0, index)  # half the time of self.images[index] on CPU
            if self.config.augment:
                images = random_crop_flip(images, AUGMENT_PAD, generator)
            yield images, self.labels.index_select(0, index)


class TorchvisionLoader:
    """The classic reference: a DataLoader over PIL images with per-sample torchvision transforms."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, dataset: Dataset, config: RunConfig,
                 device: torch.device) -> None:
        from torchvision import transforms

        steps = []
        if config.augment:
            steps += [transforms.RandomCrop(images.shape[-1], padding=AUGMENT_PAD, padding_mode="reflect"),
                      transforms.RandomHorizontalFlip()]
        steps += [transforms.ToTensor(), transforms.Normalize(dataset.mean, dataset.std)]
        self.dataset = PerSampleImageDataset(images, labels, transforms.Compose(steps))
        self.config, self.device = config, device

    def __len__(self) -> int:
        return len(self.dataset)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        torch.manual_seed(self.config.seed * 100_003 + epoch)
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(self.config.seed * 100_003 + epoch),
            pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)


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


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on CUDA; the process's peak resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume: {path} is not a sweepbench checkpoint (format {state.get('format')!r})")
    return state


class _Run:
    """The state of one training run; ``train`` drives it epoch by epoch."""

    def __init__(self, config: RunConfig, callbacks: Sequence[Callback]) -> None:
        self.config, self.callbacks = config, list(callbacks)
        self.device = resolve_device(config.device)
        _set_precision_flags(self.device, config.precision)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        check_model_kwargs(config.model, config.model_kwargs)
        self.dataset = load_dataset(config.dataset, config.data_dir, config.download, config.val_size,
                                    **config.dataset_kwargs)
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
        loader_class = DeviceLoader if config.loader == "device" else TorchvisionLoader
        self.loader = loader_class(x_train, y_train, self.dataset, config, self.device)
        self.x_val = normalise(self.dataset.x_val.to(self.device), self.dataset.mean, self.dataset.std)
        self.y_val = self.dataset.y_val.to(self.device)
        self.history: list[EpochRecord] = []
        self.best_val_accuracy: float | None = None
        self.best_epoch: int | None = None
        if config.resume:
            self._restore(load_checkpoint(config.resume))
        self.context = TrainContext(config, self.dataset, self.module, self.device, device_name(self.device),
                                    self.history)

    def _restore(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if self.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], self.device)
        self.history.extend(EpochRecord(**record) for record in state["history"])
        self.best_val_accuracy, self.best_epoch = state["best_val_accuracy"], state["best_epoch"]

    def _checkpoint_state(self) -> dict[str, Any]:
        state = {
            "format": CHECKPOINT_FORMAT,
            "config": self.config.to_dict(),
            "epoch": len(self.history),
            "model": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng_cpu": torch.get_rng_state(),
            "history": [dataclasses.asdict(record) for record in self.history],
            "best_val_accuracy": self.best_val_accuracy,
            "best_epoch": self.best_epoch,
            "val_accuracy": self.history[-1].val_accuracy,
        }
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def train_epoch(self, epoch: int) -> tuple[float, float]:
        """One pass over the training split; returns (mean loss, seconds), synchronised on CUDA. Batch losses
        stay on the device until the pass ends: no per-step host sync or float64 arithmetic."""
        self.model.train()
        batch_losses, batch_sizes = [], []
        _synchronize(self.device)
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
        _synchronize(self.device)
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
        state = self._checkpoint_state()
        save_checkpoint(directory / "last.pt", state)
        if improved:
            save_checkpoint(directory / "best.pt", state)
        return {"last": str(directory / "last.pt"), "best": str(directory / "best.pt")}

    def test(self, result: RunResult) -> None:
        x_test = normalise(self.dataset.x_test.to(self.device), self.dataset.mean, self.dataset.std)
        loss, accuracy, confusion = evaluate(self.model, x_test, self.dataset.y_test.to(self.device),
                                             self.dataset.num_classes, self.config.eval_batch_size,
                                             self.config.precision)
        per_class = confusion.diag().double() / confusion.sum(1).clamp(min=1)
        result.test_loss, result.test_accuracy = loss, accuracy
        result.per_class_accuracy = dict(zip(self.dataset.classes, per_class.tolist()))
        result.confusion_matrix = confusion.tolist()


def _time_to_target(history: list[EpochRecord], target: float | None) -> float | None:
    if target is None:
        return None
    elapsed = 0.0
    for record in history:
        elapsed += record.epoch_seconds
        if record.val_accuracy >= target:
            return elapsed
    return None


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
            if not (math.isfinite(record.train_loss) and math.isfinite(record.val_loss)):
                result.status, result.message = "diverged", f"diverged: loss is {record.train_loss} at epoch {epoch}"
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
        result.status, result.message = "failed", f"{type(exc).__name__}: {exc}"
        _finish(run, result, started)
        raise
    _finish(run, result, started)
    return result


def _finish(run: _Run, result: RunResult, started: float) -> None:
    result.best_val_accuracy, result.best_epoch = run.best_val_accuracy, run.best_epoch
    result.time_to_target_seconds = _time_to_target(run.history, run.config.target_accuracy)
    result.train_seconds = sum(record.epoch_seconds for record in run.history)
    result.peak_memory_mb = peak_memory_mb(run.device)
    result.wall_seconds = time.perf_counter() - started
    for callback in run.callbacks:
        callback.on_train_end(run.context, result)


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
