"""K models of one architecture as one stacked model (HFTA-style): one [K, P] parameter buffer, one vmapped
``functional_call`` forward for all members, one backward that gives every member its own gradient.

Member k's parameters are row k of ``StackedModel.flat``, laid out by ``Layout``: each parameter a block of the
row, a ``nn.Linear`` weight stored transposed: the batched matmul's gradient for it then comes out in the storage
order and accumulates without a transposing copy (a forward and backward step of 8 MLPs of hidden size 640 at
batch 64 on one CPU thread: 12 ms instead of 21 ms, measured on a loaded machine). The stacked parameters
(``params``, leading axis K) are leaf views of ``flat`` whose gradients are views of ``flat_grad``, as
``engine.contiguous_parameters`` does for one model; each member's own module (``modules[k]``) has its parameters
as views of row k, so callbacks see the weights as they train.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, vmap

from ...config import ConfigError, RunConfig
from ...hardware import autocast
from ...models import create_model
from .masks import DropoutMasks, replace_dropout


@dataclass(frozen=True)
class Slot:
    """Where one parameter lives in a member's row."""

    name: str
    shape: torch.Size
    offset: int
    transposed: bool

    def view(self, rows: torch.Tensor) -> torch.Tensor:
        """The parameter as a view of ``rows``: [P] (one member) or [K, P] (the stack, giving [K, *shape])."""
        block = rows[..., self.offset:self.offset + self.shape.numel()]
        if self.transposed:
            return block.unflatten(-1, tuple(reversed(self.shape))).transpose(-1, -2)
        return block.unflatten(-1, self.shape)


class Layout:
    """The parameters of one architecture in a row of P numbers."""

    def __init__(self, module: nn.Module) -> None:
        if any(True for _ in module.buffers()) or not all(p.requires_grad for p in module.parameters()):
            raise ConfigError(f"model: fused training supports models whose state is trainable parameters only; "
                              f"{type(module).__name__} has buffers or frozen parameters")
        linear_weights = {f"{name}.weight".lstrip(".") for name, layer in module.named_modules()
                          if isinstance(layer, nn.Linear)}
        self.slots, offset = [], 0
        for name, param in module.named_parameters():
            self.slots.append(Slot(name, param.shape, offset, name in linear_weights))
            offset += param.numel()
        self.width = offset

    def views(self, rows: torch.Tensor) -> dict[str, torch.Tensor]:
        return {slot.name: slot.view(rows) for slot in self.slots}

    def stack(self, modules: Sequence[nn.Module]) -> torch.Tensor:
        first = next(modules[0].parameters())
        rows = torch.empty(len(modules), self.width, dtype=first.dtype, device=first.device)
        for row, module in zip(rows, modules):
            for view, param in zip(self.views(row).values(), module.parameters()):
                view.copy_(param.detach())
        return rows

    def bind(self, module: nn.Module, row: torch.Tensor) -> None:
        """Makes ``module``'s parameters views of ``row``."""
        for view, param in zip(self.views(row).values(), module.parameters()):
            param.data = view

    def solo_order(self, row: torch.Tensor) -> torch.Tensor:
        """A member's row as ``engine.contiguous_parameters`` lays its model out: parameters in order, row-major."""
        return torch.cat([view.reshape(-1) for view in self.views(row).values()])


def _leaf(data: torch.Tensor, grad: torch.Tensor) -> nn.Parameter:
    leaf = nn.Parameter(data)
    leaf.grad = grad
    return leaf


class StackedModel:
    """The members' models, built exactly as their solo runs build them (seed, then ``create_model``), stacked."""

    def __init__(self, configs: Sequence[RunConfig], image_shape: Sequence[int], device: torch.device) -> None:
        self.modules, rng_states = [], []
        for config in configs:
            torch.manual_seed(config.seed)
            self.modules.append(create_model(config.model, **config.model_kwargs).to(device))
            rng_states.append(torch.get_rng_state())
        self.layout = Layout(self.modules[0])
        self.flat = self.layout.stack(self.modules)
        self.flat_grad = torch.zeros_like(self.flat)
        self.params = {name: _leaf(data, grad) for (name, data), grad in
                       zip(self.layout.views(self.flat).items(), self.layout.views(self.flat_grad).values())}
        for module, row in zip(self.modules, self.flat):
            self.layout.bind(module, row)
        with torch.device("meta"):
            self.base = create_model(configs[0].model, **configs[0].model_kwargs)
        self.dropout = DropoutMasks(replace_dropout(self.base, image_shape), rng_states,
                                    [config.seed for config in configs], device)
        self.frozen_rows: torch.Tensor | None = None
        self.frozen_values: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.flat)

    def _member_forward(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, params, (images,))

    def train_losses(self, images: torch.Tensor, labels: torch.Tensor, precision: str,
                     flat: torch.Tensor | None = None, masks: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[K] mean losses: every member's training forward pass on its own batch ([K, B, *image], [K, B]) with
        the parameters of ``flat`` (default: the stack's leaves) and the dropout ``masks`` given (default: drawn
        now). ``PackStep.batches`` has put ``base`` in training mode."""
        params = self.params if flat is None else self.layout.views(flat)
        masks = self.dropout.draw(labels.shape[-1]) if masks is None else masks
        with autocast(self.flat.device, precision):
            logits = vmap(self._member_forward)({**params, **masks}, images)
            losses = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none")
            return losses.view(labels.shape).mean(1)  # one mean loss per member: summed, one backward

    def eval_logits(self, params: dict[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
        """[k, B, classes] from [B, *image]: the members whose stacked ``params`` are given, on the same batch."""
        self.base.eval()
        return vmap(self._member_forward, in_dims=(0, None))(params, images)

    def row_params(self, rows: Sequence[int]) -> dict[str, torch.Tensor]:
        """The stacked parameters of the members in ``rows`` (views when that is every row, in order)."""
        if list(rows) == list(range(len(self))):
            return {name: param.detach() for name, param in self.params.items()}
        return self.layout.views(self.flat.index_select(0, torch.tensor(rows, device=self.flat.device)))

    def backward(self, loss: torch.Tensor) -> None:
        """Fills ``flat_grad`` with every member's gradient of ``loss`` (the sum of their losses). Autograd warns
        once that a stacked gradient, a view with the row stride P, breaks its layout contract: the gradient is
        accumulated into that view in place, which is the point."""
        self.flat_grad.zero_()
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="grad and param do not obey the gradient layout contract")
            loss.backward()

    def freeze(self, row: int) -> None:
        """Keeps row ``row`` as it is now: ``restore_frozen`` puts it back after each optimizer step."""
        rows = {row} if self.frozen_rows is None else {row, *self.frozen_rows.tolist()}
        self.frozen_rows = torch.tensor(sorted(rows), device=self.flat.device)
        self.frozen_values = self.flat.index_select(0, self.frozen_rows)

    @torch.no_grad()
    def restore_frozen(self) -> None:
        if self.frozen_rows is not None:
            self.flat.index_copy_(0, self.frozen_rows, self.frozen_values)
