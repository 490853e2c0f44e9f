"""Optimizers over stacked parameters: one ``StackedOptimizer`` steps every member of one optimizer type at once.

The parameters of K members are the rows of one [K, P] buffer; a stacked optimizer updates the rows
``[start, stop)`` (the stack keeps the members of one optimizer type adjacent) with a handful of tensor ops for all
of them, per-member hyperparameters being [n, 1] columns. The formulas are torch.optim's, with its defaults
(Adam's betas and eps, RMSprop's alpha and eps, Adadelta's rho and eps, SGD's dampening 0), so that each row
trains as the member's solo run, whose optimizer ``engine.build_optimizer`` makes, would train it; results agree
to float rounding, not bit for bit (an op order or a fused kernel's rounding differs here and there).
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from ...config import MOMENTUM_OPTIMIZERS, OPTIMIZERS, RunConfig

ADAM_BETAS = (0.9, 0.999)
ADAM_EPS = 1e-8
RMSPROP_ALPHA = 0.99
RMSPROP_EPS = 1e-8
ADADELTA_RHO = 0.9
ADADELTA_EPS = 1e-6
# torch.optim's state names, in its order; a momentum buffer exists only for a member with momentum
STATE_NAMES = {"sgd": ("momentum_buffer",), "adam": ("exp_avg", "exp_avg_sq"), "adamw": ("exp_avg", "exp_avg_sq"),
               "rmsprop": ("square_avg", "momentum_buffer"), "adadelta": ("square_avg", "acc_delta")}
COUNTS_STEPS = ("adam", "adamw", "rmsprop", "adadelta")  # the ones with a ``step`` in their state


def optimizer_order(configs: Sequence[RunConfig]) -> list[int]:
    """Member indices ordered so that each optimizer type's members are adjacent (stable within a type)."""
    return sorted(range(len(configs)), key=lambda index: OPTIMIZERS.index(configs[index].optimizer))


class StackedOptimizer:
    """One optimizer type over the stack rows ``rows``; ``configs`` are those rows' members, in row order."""

    def __init__(self, kind: str, configs: Sequence[RunConfig], rows: slice, width: int,
                 device: torch.device) -> None:
        self.kind, self.configs, self.rows, self.device = kind, list(configs), rows, device
        self.steps = 0
        self.step_count: torch.Tensor | None = None  # the steps as a device scalar, in a captured step
        self.weight_decay = self._column([c.weight_decay for c in configs], skip_if_zero=True)
        self.momentum = self._column([c.momentum for c in configs], skip_if_zero=True) \
            if kind in MOMENTUM_OPTIMIZERS else None
        self.nesterov = torch.tensor([[c.nesterov] for c in configs], device=device) \
            if any(c.nesterov for c in configs) else None
        names = [name for name in STATE_NAMES[kind] if name != "momentum_buffer" or self.momentum is not None]
        self.state = {name: torch.zeros(len(configs), width, device=device) for name in names}
        self.set_lr([c.lr for c in configs])

    def _column(self, values: Sequence[float], skip_if_zero: bool) -> torch.Tensor | None:
        """Per-member values as an [n, 1] column; None where no member needs the term (ops skipped)."""
        if skip_if_zero and not any(values):
            return None
        return torch.tensor(values, dtype=torch.float32, device=self.device).unsqueeze(1)

    def set_lr(self, lrs: Sequence[float]) -> None:
        """This epoch's learning rates, one per member (each member's StepLR schedule is kept by the caller),
        written into the columns in place: a captured step reads them where it was built."""
        self._set("neg_lr", self._column([-lr for lr in lrs], skip_if_zero=False))
        if self.kind == "adamw" and self.weight_decay is not None:  # 1 - lr * wd in float64, as the fused kernel
            self._set("decay", self._column([1 - lr * c.weight_decay for lr, c in zip(lrs, self.configs)], False))

    def _set(self, name: str, column: torch.Tensor) -> None:
        if hasattr(self, name):
            getattr(self, name).copy_(column)
        else:
            setattr(self, name, column)

    def count_on_device(self) -> None:
        """Counts steps in a device scalar from now on (a captured step: a Python count would be a constant of
        the compiled graph). Its bias corrections are then float32 tensors, as torch.optim's capturable Adam's."""
        self.step_count = torch.tensor(float(self.steps), device=self.device)

    def steps_done(self) -> int:
        return self.steps if self.step_count is None else int(self.step_count.item())

    def bias_corrections(self, beta1: float, beta2: float) -> tuple[float | torch.Tensor, float | torch.Tensor]:
        """Adam's ``1 - beta1 ** t`` and ``sqrt(1 - beta2 ** t)`` after t steps."""
        if self.step_count is None:
            return 1 - beta1 ** self.steps, math.sqrt(1 - beta2 ** self.steps)
        return 1 - beta1 ** self.step_count, (1 - beta2 ** self.step_count).sqrt()

    @torch.no_grad()
    def step(self, params: torch.Tensor, grads: torch.Tensor) -> None:
        """Updates rows ``self.rows`` of the [K, P] ``params`` in place from ``grads``."""
        if self.step_count is None:
            self.steps += 1
        else:
            self.step_count.add_(1)
        UPDATES[self.kind](self, params[self.rows], grads[self.rows])

    def member_state(self, position: int) -> dict[str, torch.Tensor]:
        """The torch.optim state names and values of this optimizer's ``position``-th member: ``step`` (a CPU
        float32 scalar, as torch.optim keeps it unless fused) and views of the member's [P] rows of the others
        (in the stack's layout)."""
        state: dict[str, torch.Tensor] = {}
        if self.kind in COUNTS_STEPS:
            state["step"] = torch.tensor(float(self.steps_done()))
        config = self.configs[position]
        for name, rows in self.state.items():
            if name != "momentum_buffer" or config.momentum > 0:
                state[name] = rows[position]
        return state

    def weight_decayed(self, param: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
        return grad if self.weight_decay is None else grad.addcmul(param, self.weight_decay)


def _sgd(opt: StackedOptimizer, param: torch.Tensor, grad: torch.Tensor) -> None:
    """SGD with dampening 0. The buffer starts at zero: momentum * 0 + grad is the first step's grad, exactly."""
    grad = opt.weight_decayed(param, grad)
    if opt.momentum is not None:
        buffer = opt.state["momentum_buffer"]
        buffer.mul_(opt.momentum).add_(grad)
        grad = buffer if opt.nesterov is None else torch.where(opt.nesterov, grad.addcmul(buffer, opt.momentum),
                                                               buffer)
    param.addcmul_(grad, opt.neg_lr)


def _adam(opt: StackedOptimizer, param: torch.Tensor, grad: torch.Tensor, decoupled: bool = False) -> None:
    if not decoupled:
        grad = opt.weight_decayed(param, grad)
    elif opt.weight_decay is not None:
        param.mul_(opt.decay)
    beta1, beta2 = ADAM_BETAS
    exp_avg, exp_avg_sq = opt.state["exp_avg"], opt.state["exp_avg_sq"]
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    correction1, root_correction2 = opt.bias_corrections(beta1, beta2)
    denominator = exp_avg_sq.sqrt().div_(root_correction2).add_(ADAM_EPS)
    param.addcmul_(exp_avg.div(denominator), opt.neg_lr / correction1)


def _adamw(opt: StackedOptimizer, param: torch.Tensor, grad: torch.Tensor) -> None:
    _adam(opt, param, grad, decoupled=True)


def _rmsprop(opt: StackedOptimizer, param: torch.Tensor, grad: torch.Tensor) -> None:
    """Not centered. A member without momentum in a pack with momentum gets buffer = grad / avg each step."""
    grad = opt.weight_decayed(param, grad)
    square_avg = opt.state["square_avg"]
    square_avg.mul_(RMSPROP_ALPHA).addcmul_(grad, grad, value=1 - RMSPROP_ALPHA)
    average = square_avg.sqrt().add_(RMSPROP_EPS)
    if opt.momentum is None:
        param.addcmul_(grad.div(average), opt.neg_lr)
        return
    buffer = opt.state["momentum_buffer"]
    buffer.mul_(opt.momentum).addcdiv_(grad, average)
    param.addcmul_(buffer, opt.neg_lr)


def _adadelta(opt: StackedOptimizer, param: torch.Tensor, grad: torch.Tensor) -> None:
    grad = opt.weight_decayed(param, grad)
    square_avg, acc_delta = opt.state["square_avg"], opt.state["acc_delta"]
    square_avg.mul_(ADADELTA_RHO).addcmul_(grad, grad, value=1 - ADADELTA_RHO)
    std = square_avg.add(ADADELTA_EPS).sqrt_()
    delta = acc_delta.add(ADADELTA_EPS).sqrt_().div_(std).mul_(grad)
    acc_delta.mul_(ADADELTA_RHO).addcmul_(delta, delta, value=1 - ADADELTA_RHO)
    param.addcmul_(delta, opt.neg_lr)


UPDATES: dict[str, Callable[[StackedOptimizer, torch.Tensor, torch.Tensor], None]] = {
    "sgd": _sgd, "adam": _adam, "adamw": _adamw, "rmsprop": _rmsprop, "adadelta": _adadelta}


def stacked_optimizers(configs: Sequence[RunConfig], width: int, device: torch.device) -> list[StackedOptimizer]:
    """One stacked optimizer per optimizer type, over the rows of ``configs``, which are in stack order (the
    members of one type adjacent, see ``optimizer_order``)."""
    optimizers, start = [], 0
    for kind in OPTIMIZERS:
        members = [config for config in configs if config.optimizer == kind]
        if members:
            optimizers.append(StackedOptimizer(kind, members, slice(start, start + len(members)), width, device))
            start += len(members)
    return optimizers
