"""The step of a solo run (K = 1): one model, its torch.optim optimizer, StepLR schedule and GradScaler, with no
vmap in the way, so that a solo run is as fast as a plain PyTorch loop. ``engine.loop`` drives it; the fused step
(``engine.fused.step``) is the same interface for K > 1."""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..config import RunConfig
from ..data import Dataset
from ..hardware import autocast
from ..models import check_config, create_model
from ..precisions import uses_grad_scaler
from ..steps import STEPS
from .capture import FunctionalStep, captured_step, plain_optimizer_state, warmup_batches
from .checkpoint import load_resume, restore_checkpoint
from .loaders import DeviceLoader, TorchvisionLoader
from .optimizer import build_optimizer, contiguous_parameters, zero_gradients
from .results import EpochRecord, Evaluation


def evaluation_layout(images: torch.Tensor) -> torch.Tensor:
    """A batch of images in the memory layout its forward pass is fastest in: channels-last on a CPU, oneDNN's
    own layout for convolutions (with batches of 128, cifar_cnn's evaluation of 15,000 images takes 1.6 s instead of
    5.3 s at batch 1000 contiguous on the Xeon, 1.9 s instead of 5.7 s on the AVX-512 EPYC; benchmarks/RESULTS.md);
    as they are elsewhere (not measured on a GPU). Evaluation only: training keeps its layout."""
    if images.device.type == "cpu" and images.dim() == 4:
        return images.contiguous(memory_format=torch.channels_last)
    return images


@torch.inference_mode()
def evaluate(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
             batch_size: int, precision: str) -> Evaluation:
    """Loss, accuracy and the confusion matrix over already-normalised device tensors."""
    model.eval()
    device = images.device
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    confusion = torch.zeros(num_classes * num_classes, device=device, dtype=torch.int64)
    for start in range(0, len(labels), batch_size):
        batch_images = evaluation_layout(images[start:start + batch_size])
        batch_labels = labels[start:start + batch_size]
        with autocast(device, precision):
            logits = model(batch_images)
        loss_sum += F.cross_entropy(logits.float(), batch_labels, reduction="sum")
        confusion += torch.bincount(batch_labels * num_classes + logits.argmax(1), minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).cpu()
    count = max(len(labels), 1)
    return Evaluation(loss_sum.item() / count, confusion.diag().sum().item() / count, confusion)


class SoloStep:
    """One run's model and optimizer; ``__call__`` trains one batch."""

    @staticmethod
    def check(configs: Sequence[RunConfig]) -> dict[str, Any] | None:
        """The config, then the checkpoint it resumes (returned), before the data loads."""
        if len(configs) != 1:
            raise ValueError(f"a solo run trains one config, not {len(configs)}")
        check_config(configs[0])
        return load_resume(configs[0]) if configs[0].resume else None

    def __init__(self, configs: Sequence[RunConfig], dataset: Dataset, x_train: torch.Tensor,
                 y_train: torch.Tensor, device: torch.device, resumed: dict[str, Any] | None) -> None:
        config = self.config = configs[0]
        self.device, self.precision = device, config.precision
        torch.manual_seed(config.seed)
        self.module = create_model(config.model, **config.model_kwargs).to(device)
        self.model = torch.compile(self.module) if config.compile else self.module
        self.modules, self.rows = [self.module], [0]
        self.parameter_buffers = contiguous_parameters(self.module)
        self.optimizer = build_optimizer(config, self.parameter_buffers, device)
        self.scheduler = torch.optim.lr_scheduler.StepLR(self.optimizer, step_size=1, gamma=config.lr_gamma)
        self.scaler = torch.amp.GradScaler(device.type, enabled=uses_grad_scaler(config.precision))
        loader_class = DeviceLoader if config.loader == "device" else TorchvisionLoader
        self.loader = loader_class(x_train, y_train, dataset, config, device)
        self.resumed_history = restore_checkpoint(self, resumed) if resumed is not None else []
        self.captured = None
        if STEPS.get(config.step).captured:
            functional = FunctionalStep(self.module, self.optimizer, device, config.precision,
                                        capturable=config.step == "graph")
            self.captured = captured_step(config.step, functional)

    def __len__(self) -> int:
        return len(self.loader)

    def prepare(self) -> float:
        """Compiles or captures the step for the batch shapes of an epoch; 0 for the eager step."""
        if self.captured is None:
            return 0.0
        self.model.train()
        partial = len(self.loader) % self.config.batch_size
        return self.captured.prepare(lambda: warmup_batches(next(iter(self.loader.batches(1))), partial))

    def history(self, row: int) -> list[EpochRecord]:
        """The epochs run before this run started: a resumed checkpoint's."""
        return self.resumed_history

    def tags(self, index: int) -> dict[str, str] | None:
        return None

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.model.train()
        return self.loader.batches(epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step on a batch; returns its loss, detached, on the device (no host sync)."""
        if self.captured is not None:
            return self.captured(images, labels)
        with autocast(self.device, self.precision):
            loss = F.cross_entropy(self.model(images), labels)
        zero_gradients(self.parameter_buffers)
        if self.scaler.is_enabled():
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()
        return loss.detach()

    def learning_rates(self) -> list[float]:
        return [float(self.optimizer.param_groups[0]["lr"])]  # a captured step's is a device tensor

    def step_schedules(self) -> None:
        self.scheduler.step()

    def evaluate(self, rows: Sequence[int], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 batch_size: int) -> list[Evaluation]:
        return [evaluate(self.model, images, labels, num_classes, batch_size, self.precision)] if rows else []

    def training_state(self, row: int, epochs: int) -> dict[str, Any]:
        """The run's state for ``engine.checkpoint.checkpoint_state``."""
        state = {"model": self.module.state_dict(), "optimizer": plain_optimizer_state(self.optimizer.state_dict()),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
                 "rng_cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["rng_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def end(self, row: int) -> None:
        """Nothing to release: the run's model is its own."""
