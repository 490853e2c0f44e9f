"""Dropout in a pack: each member's masks drawn from its own random state, as its solo run draws them.

A solo run on a CPU draws its dropout masks from the global CPU generator, in the state ``torch.manual_seed(seed)``
and building the model left it: ``F.dropout`` in training is ``input * empty_like(input).bernoulli_(1 - p) /
(1 - p)``. A vmapped forward cannot draw per member, so each member keeps a generator in its solo state, the masks
are drawn before the forward pass with that same call (a loop over members and dropout layers: only random number
generation, one ``bernoulli_`` of a batch's activations per member and layer) and ``MaskedDropout`` applies them.
Models without dropout draw nothing. On CUDA a solo run's dropout is a fused kernel with another use of the
generator, so masks there are the member's own (seeded by its seed) but not its solo run's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from ...config import ConfigError

UNSUPPORTED_DROPOUT = (nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)


class MaskedDropout(nn.Module):
    """Dropout by a given mask (already scaled by 1 / (1 - p)), which ``functional_call`` swaps in as ``mask``."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("mask", torch.empty(0), persistent=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs * self.mask.to(inputs.dtype) if self.training else inputs


@dataclass(frozen=True)
class DropoutSite:
    name: str  # the module's path in the model
    feature_shape: tuple[int, ...]  # one sample's input to it
    p: float


def replace_dropout(model: nn.Module, image_shape: Sequence[int]) -> list[DropoutSite]:
    """Replaces the ``nn.Dropout`` layers of ``model`` (on the meta device) by ``MaskedDropout``; returns them in
    the order a forward pass reaches them, which is the order a solo run draws their masks in."""
    sites: list[DropoutSite] = []
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, UNSUPPORTED_DROPOUT):
            raise ConfigError(f"model: fused training supports nn.Dropout only; {name} is {type(module).__name__}")
        if isinstance(module, nn.Dropout) and module.p > 0:
            hooks.append(module.register_forward_pre_hook(
                lambda layer, args, name=name: sites.append(DropoutSite(name, tuple(args[0].shape[1:]), layer.p))))
    model(torch.empty(1, *image_shape, device="meta"))
    for hook in hooks:
        hook.remove()
    if len({site.name for site in sites}) < len(sites):
        raise ConfigError("model: fused training supports a dropout layer called once per forward pass only")
    for site in sites:
        parent, _, child = site.name.rpartition(".")
        setattr(model.get_submodule(parent), child, MaskedDropout())
    return sites


class DropoutMasks:
    """Each member's generator, and the per-step masks drawn from them, stacked along the member axis."""

    def __init__(self, sites: list[DropoutSite], rng_states: Sequence[torch.Tensor], seeds: Sequence[int],
                 device: torch.device) -> None:
        self.sites, self.rng_states, self.device = sites, list(rng_states), device
        self.generators = [self._generator(state, seed) for state, seed in zip(rng_states, seeds)]

    def _generator(self, rng_state: torch.Tensor, seed: int) -> torch.Generator:
        generator = torch.Generator(self.device)
        if self.device.type == "cpu":
            generator.set_state(rng_state)
        else:
            generator.manual_seed(seed)
        return generator

    def draw(self, batch_size: int) -> dict[str, torch.Tensor]:
        """``{"<layer>.mask": [K, batch_size, *features]}`` for ``functional_call``; empty without dropout."""
        masks = {}
        for site in self.sites:
            keep = 1 - site.p
            shape = (batch_size, *site.feature_shape)
            drawn = [torch.empty(shape, device=self.device).bernoulli_(keep, generator=generator)
                     for generator in self.generators]
            masks[f"{site.name}.mask"] = torch.stack(drawn).div_(keep)
        return masks

    def rng_cpu(self, row: int) -> torch.Tensor:
        """The state a solo run's global CPU generator would be in (what a checkpoint's ``rng_cpu`` holds)."""
        return self.generators[row].get_state() if self.device.type == "cpu" else self.rng_states[row].clone()

    def rng_device(self, row: int) -> torch.Tensor:
        return self.generators[row].get_state()
