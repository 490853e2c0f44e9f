"""Where training batches come from. The default ``device`` loader keeps the whole dataset on the device and
batches by a seeded permutation; the ``torchvision`` loader (DataLoader, per-sample PIL transforms) is the
reference to measure against."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from ..config import RunConfig
from ..data import Dataset, PerSampleImageDataset


def data_order_seed(seed: int, epoch: int) -> int:
    """The seed of a run's batch order (and augmentation) in ``epoch``: one per (seed, epoch), so a resumed run
    draws the same batches as an uninterrupted one."""
    return seed * 100_003 + epoch


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(data_order_seed(seed, epoch))


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
        generator = epoch_generator(self.config.seed, epoch, self.device)
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
        torch.manual_seed(data_order_seed(self.config.seed, epoch))
        loader = torch.utils.data.DataLoader(
            self.dataset, batch_size=self.config.batch_size, shuffle=True,
            generator=torch.Generator().manual_seed(data_order_seed(self.config.seed, epoch)),
            pin_memory=self.device.type == "cuda")
        for images, labels in loader:
            yield images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
