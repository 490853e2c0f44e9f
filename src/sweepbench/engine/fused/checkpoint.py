"""A member's checkpoints, in the single-model format (``engine.checkpoint.checkpoint_state``), so that
``engine.train`` can resume a member of a pack as if it had trained alone.

The state is made as a solo run's: the member's weights in a model of its own, its optimizer state loaded into the
torch optimizer ``build_optimizer`` makes over the member's contiguous parameter buffer (torch.optim then holds
``step`` as it would, on the device for a fused optimizer), its StepLR stepped once per epoch done, its own random
state as ``rng_cpu``.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from torch import nn

from ..checkpoint import checkpoint_state, save_checkpoint
from ..optimizer import build_optimizer
from .members import Member
from .optim import StackedOptimizer
from .stack import StackedModel


def _scheduler_after(optimizer: torch.optim.Optimizer, gamma: float, epochs: int) -> torch.optim.lr_scheduler.StepLR:
    """The solo run's StepLR after ``epochs`` epochs: stepped as often, which sets its learning rate exactly as
    the solo run's (its warning about a step before ``optimizer.step()`` does not apply: nothing trains here)."""
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=gamma)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(epochs):
            scheduler.step()
    return scheduler


def member_checkpoint_state(member: Member, stack: StackedModel, optimizer: StackedOptimizer,
                            device: torch.device) -> dict[str, Any]:
    """What ``checkpoint_state`` holds for the member's solo run after the same epochs."""
    row = stack.flat[member.row]
    torch_optimizer = build_optimizer(member.config, [nn.Parameter(stack.layout.solo_order(row))], device)
    scheduler = _scheduler_after(torch_optimizer, member.config.lr_gamma, len(member.history))
    saved = optimizer.member_state(member.row - optimizer.rows.start)
    state = {name: value if name == "step" else stack.layout.solo_order(value) for name, value in saved.items()}
    groups = torch_optimizer.state_dict()["param_groups"]
    torch_optimizer.load_state_dict({"state": {0: state} if state else {}, "param_groups": groups})
    run = SimpleNamespace(config=member.config, history=member.history, module=member.context.model,
                          optimizer=torch_optimizer, scheduler=scheduler,
                          scaler=torch.amp.GradScaler(device.type, enabled=False),
                          best_val_accuracy=member.best_val_accuracy, best_epoch=member.best_epoch,
                          callbacks=member.callbacks, device=device)
    checkpoint = checkpoint_state(run)
    model = checkpoint["model"]
    for name, tensor in model.items():  # views of the stack: saved as they are, they would save all of it
        model[name] = tensor.clone(memory_format=torch.contiguous_format)
    checkpoint["rng_cpu"] = stack.dropout.rng_cpu(member.row)
    if device.type == "cuda":
        checkpoint["rng_cuda"] = stack.dropout.rng_device(member.row)
    return checkpoint


def save_member_checkpoints(member: Member, stack: StackedModel, optimizer: StackedOptimizer,
                            device: torch.device, improved: bool) -> dict[str, str]:
    """Writes last.pt (and best.pt when ``improved``) to the member's checkpoint_dir, as ``engine.train`` does."""
    if not member.config.checkpoint_dir:
        return {}
    directory = Path(member.config.checkpoint_dir)
    state = member_checkpoint_state(member, stack, optimizer, device)
    save_checkpoint(directory / "last.pt", state)
    if improved:
        save_checkpoint(directory / "best.pt", state)
    return {"last": str(directory / "last.pt"), "best": str(directory / "best.pt")}
