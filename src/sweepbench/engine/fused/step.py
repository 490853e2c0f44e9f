"""The step of a fused pack: K runs of one architecture as one stacked model, each member training exactly as its
solo run would. ``engine.loop.run_members`` drives it as it drives a solo run's step; ``train_fused`` is that.

A pack shares the data (one on-device copy), the forward and backward passes and the evaluation passes; members
differ in seed (initial weights, batch order, dropout masks), optimizer and its hyperparameters, learning-rate
schedule, target accuracy and checkpoint folder. A member that diverges or that a callback stops (pruning) ends on
its own: its rows of the stack stay as they were from then on (``end``), and the others train on, unchanged by it.
An ended member still rides along in the training passes (the stack keeps its shape; its compute is wasted), not
in the evaluation passes.
"""

from __future__ import annotations

import uuid
import warnings
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from ...config import RunConfig
from ...data import Dataset
from ...models import check_config
from ...steps import STEPS
from ..capture import captured_step, warmup_batches
from ..callbacks import Callback
from ..loaders import DeviceLoader
from ..loop import run_members
from ..optimizer import build_optimizer, contiguous_parameters
from ..results import EpochRecord, Evaluation, RunResult
from .batches import PackBatches
from .capture import PackFunctional
from .evaluate import evaluate_members
from .optim import StackedOptimizer, optimizer_order, stacked_optimizers
from .pack import check_pack, pack_tags
from .stack import StackedModel


class PackStep:
    """The stacked model, its stacked optimizers and the pack's batches; ``__call__`` trains one batch of every
    member. Rows are stack rows: each optimizer type's members adjacent (``optimizer_order``)."""

    @staticmethod
    def check(configs: Sequence[RunConfig]) -> None:
        check_pack(configs)
        check_config(configs[0])

    def __init__(self, configs: Sequence[RunConfig], dataset: Dataset, x_train: torch.Tensor,
                 y_train: torch.Tensor, device: torch.device, checked: None) -> None:
        first = configs[0]
        self.device, self.precision = device, first.precision
        order = optimizer_order(configs)
        self.configs = [configs[index] for index in order]  # by row
        self.rows = sorted(range(len(configs)), key=order.__getitem__)
        self.stack = StackedModel(self.configs, dataset.image_shape, device)
        self.modules = self.stack.modules
        self.optimizers = stacked_optimizers(self.configs, self.stack.layout.width, device)
        loader = DeviceLoader(x_train, y_train, dataset, first, device)
        self.pack_batches = PackBatches(loader, [config.seed for config in self.configs], first.batch_size,
                                        first.augment)
        self.lrs = [config.lr for config in self.configs]  # this epoch's, by row, as each member's StepLR has it
        self.pack_id, self.size = uuid.uuid4().hex, len(configs)
        self.captured = None
        if STEPS.get(first.step).captured:
            functional = PackFunctional(self.stack, self.optimizers, device, first.precision)
            self.captured = captured_step(first.step, functional)

    def __len__(self) -> int:
        return len(self.pack_batches)

    def prepare(self) -> float:
        """Compiles or captures the pack's step for the batch shapes of an epoch; 0 for the eager step."""
        if self.captured is None:
            return 0.0
        self.stack.base.train()
        partial = len(self) % self.configs[0].batch_size
        return self.captured.prepare(lambda: warmup_batches(next(iter(self.pack_batches.batches(1))), partial))

    def history(self, row: int) -> list[EpochRecord]:
        return []

    def tags(self, index: int) -> dict[str, str]:
        return pack_tags(self.pack_id, self.size, index)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.stack.base.train()  # evaluation left it in eval mode
        return self.pack_batches.batches(epoch)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """One optimizer step of every member on its own batch ([K, B, *image]); returns the K losses, detached."""
        if self.captured is not None:
            losses = self.captured(images, labels)
        else:
            losses = self.stack.train_losses(images, labels, self.precision)
            self.stack.backward(losses.sum())
            for optimizer in self.optimizers:
                optimizer.step(self.stack.flat, self.stack.flat_grad)
            losses = losses.detach()
        self.stack.restore_frozen()
        return losses

    def learning_rates(self) -> list[float]:
        return list(self.lrs)

    def step_schedules(self) -> None:
        """Each member's StepLR(step_size=1, gamma=lr_gamma) step, into its stacked optimizer."""
        self.lrs = [lr * config.lr_gamma for lr, config in zip(self.lrs, self.configs)]
        for optimizer in self.optimizers:
            optimizer.set_lr(self.lrs[optimizer.rows])

    def evaluate(self, rows: Sequence[int], images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 batch_size: int) -> list[Evaluation]:
        return evaluate_members(self.stack, rows, images, labels, num_classes, batch_size, self.precision)

    def _optimizer(self, row: int) -> StackedOptimizer:
        return next(optimizer for optimizer in self.optimizers if optimizer.rows.start <= row < optimizer.rows.stop)

    def training_state(self, row: int, epochs: int) -> dict[str, Any]:
        """The member's state as its solo run's ``SoloStep.training_state`` after the same ``epochs``: its
        weights in a model of its own, its optimizer state loaded into the torch optimizer ``build_optimizer``
        makes over the member's contiguous parameter buffer (torch.optim then holds ``step`` as it would), its
        StepLR stepped once per epoch done, its own random state as ``rng_cpu``."""
        config, layout = self.configs[row], self.stack.layout
        torch_optimizer = build_optimizer(config, [nn.Parameter(layout.solo_order(self.stack.flat[row]))],
                                          self.device)
        scheduler = _scheduler_after(torch_optimizer, config.lr_gamma, epochs)
        optimizer = self._optimizer(row)
        saved = optimizer.member_state(row - optimizer.rows.start)
        state = {name: value if name == "step" else layout.solo_order(value) for name, value in saved.items()}
        groups = torch_optimizer.state_dict()["param_groups"]
        torch_optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": groups})
        model = {name: tensor.clone(memory_format=torch.contiguous_format)  # views of the stack: as they are,
                 for name, tensor in self.modules[row].state_dict().items()}  # they would save all of it
        training = {"model": model, "optimizer": torch_optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "scaler": torch.amp.GradScaler(self.device.type, enabled=False).state_dict(),
                    "rng_cpu": self.stack.dropout.rng_cpu(row)}
        if self.device.type == "cuda":
            training["rng_cuda"] = self.stack.dropout.rng_device(row)
        return training

    def end(self, row: int) -> None:
        """The member's rows stay as they are; its model leaves the stack (its own contiguous buffer, as a solo
        run's model has)."""
        self.stack.freeze(row)
        contiguous_parameters(self.modules[row])


def _scheduler_after(optimizer: torch.optim.Optimizer, gamma: float, epochs: int) -> torch.optim.lr_scheduler.StepLR:
    """The solo run's StepLR after ``epochs`` epochs: stepped as often, which sets its learning rate exactly as
    the solo run's (its warning about a step before ``optimizer.step()`` does not apply: nothing trains here)."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs):
            scheduler.step()
    return scheduler


def train_fused(configs: Sequence[RunConfig],
                callbacks: Sequence[Sequence[Callback]] | None = None) -> list[RunResult]:
    """Trains ``configs`` (members of one pack: see ``pack_key``) as one stacked model; ``callbacks[i]`` are
    member i's. Returns each member's result, in order, as ``engine.train(configs[i], callbacks[i])`` would.

    Raises ``ConfigError`` / ``DataNotFoundError`` before anything starts (members that cannot share a pack, a
    setting fused training lacks). Once started, every member's callbacks see its outcome; an exception, Ctrl-C or
    SIGTERM ends each member still training (failed, killed) and is then re-raised.
    """
    return run_members(configs, [()] * len(configs) if callbacks is None else callbacks, PackStep)
