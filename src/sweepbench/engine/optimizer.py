"""The optimizer, and the contiguous parameter buffers it updates instead of the model's many small tensors."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from ..config import RunConfig


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
