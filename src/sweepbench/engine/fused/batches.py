"""Training batches for a pack: one on-device copy of the split, each member batched as its solo run would be."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from ..loaders import AUGMENT_PAD, DeviceLoader, epoch_generator, random_crop_flip


class PackBatches:
    """The split of a ``DeviceLoader`` (normalised, padded for augmentation, on the device) batched for K members
    at once: step s gives member k the batch its solo ``DeviceLoader`` gives it at step s (the permutation of
    ``epoch_generator(seed_k, epoch)``, then its crops and flips from that same generator), all K gathered by one
    ``index_select``."""

    def __init__(self, loader: DeviceLoader, seeds: Sequence[int], batch_size: int, augment: bool) -> None:
        self.images, self.labels, self.device = loader.images, loader.labels, loader.device
        self.seeds, self.batch_size, self.augment = list(seeds), batch_size, augment

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """([K, B, *image], [K, B]) per step; the last B is the remainder, as in a solo run."""
        generators = [epoch_generator(seed, epoch, self.device) for seed in self.seeds]
        orders = torch.stack([torch.randperm(len(self.labels), generator=generator, device=self.device)
                              for generator in generators])
        members = len(self.seeds)
        for start in range(0, len(self.labels), self.batch_size):
            index = orders[:, start:start + self.batch_size].reshape(-1)
            images = self.images.index_select(0, index)
            if self.augment:
                images = torch.cat([random_crop_flip(member_images, AUGMENT_PAD, generator)
                                    for member_images, generator in zip(images.chunk(members), generators)])
            yield images.unflatten(0, (members, -1)), self.labels.index_select(0, index).view(members, -1)
