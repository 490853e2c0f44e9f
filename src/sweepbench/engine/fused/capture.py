"""A pack's captured step: the stacked forward, backward and every stacked optimizer's update of one batch as one
``engine.capture.Functional``, so that K members cost one compiled call (``step = "compiled"``) or one CUDA-graph
replay (``step = "graph"``) a batch, as a solo run's captured step does for one.

The gradient of the [K, P] parameter buffer is ``torch.func.grad`` of the members' summed losses. Dropout masks
are drawn eagerly before the call, each from its member's own generator (``masks.DropoutMasks``: a traced graph
cannot draw from K generators), and enter as inputs. The stacked optimizers count their steps on the device
(``StackedOptimizer.count_on_device``) and read their learning rates from columns that ``set_lr`` fills in
place, so a schedule never recompiles. Ended members' rows are put back after each call, outside it, as the
eager step does.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch.func import grad

from .optim import StackedOptimizer
from .stack import StackedModel


class PackFunctional:
    """``__call__(images, labels, *masks)``: one optimizer step of every member on its own batch ([K, B, *image],
    [K, B]); returns the K losses, detached."""

    def __init__(self, stack: StackedModel, optimizers: Sequence[StackedOptimizer], device: torch.device,
                 precision: str) -> None:
        self.stack, self.optimizers = stack, list(optimizers)
        self.device, self.precision = device, precision
        self.mask_names = [f"{site.name}.mask" for site in stack.dropout.sites]
        for optimizer in self.optimizers:
            optimizer.count_on_device()

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        masks = self.stack.dropout.draw(labels.shape[-1])
        return (images, labels, *(masks[name] for name in self.mask_names))

    def _losses(self, flat: torch.Tensor, images: torch.Tensor, labels: torch.Tensor,
                masks: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.stack.train_losses(images, labels, self.precision, flat, dict(zip(self.mask_names, masks)))
        return losses.sum(), losses.detach()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor, *masks: torch.Tensor) -> torch.Tensor:
        gradient, losses = grad(self._losses, has_aux=True)(self.stack.flat, images, labels, masks)
        with torch.no_grad():
            for optimizer in self.optimizers:
                optimizer.step(self.stack.flat, gradient)
        return losses

    def snapshot(self) -> "PackSnapshot":
        return PackSnapshot(self.stack, self.optimizers)


class PackSnapshot:
    """The pack's weights, optimizer state and step counts and its members' dropout generators, to put back
    after ``prepare`` trained on its warm-up batches."""

    def __init__(self, stack: StackedModel, optimizers: Sequence[StackedOptimizer]) -> None:
        self.stack, self.optimizers = stack, list(optimizers)
        self.flat = stack.flat.clone()
        self.states = [{name: rows.clone() for name, rows in optimizer.state.items()} for optimizer in optimizers]
        self.counts = [optimizer.step_count.clone() for optimizer in optimizers]
        self.generators = [generator.get_state() for generator in stack.dropout.generators]

    @torch.no_grad()
    def restore(self) -> None:
        self.stack.flat.copy_(self.flat)
        for optimizer, state, count in zip(self.optimizers, self.states, self.counts):
            for name, rows in optimizer.state.items():
                rows.copy_(state[name])
            optimizer.step_count.copy_(count)
        for generator, state in zip(self.stack.dropout.generators, self.generators):
            generator.set_state(state)
