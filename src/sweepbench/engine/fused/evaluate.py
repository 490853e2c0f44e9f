"""Validation and test of many members at once: ``engine.evaluate``, vmapped over the members' parameters."""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ...hardware import autocast
from ..results import Evaluation
from .stack import StackedModel


@torch.inference_mode()
def evaluate_members(stack: StackedModel, rows: Sequence[int], images: torch.Tensor, labels: torch.Tensor,
                     num_classes: int, batch_size: int, precision: str) -> list[Evaluation]:
    """The members in stack ``rows`` over already-normalised device tensors, batched like ``engine.evaluate``
    (each forward pass takes ``batch_size`` images for every member); one result per row."""
    params = stack.row_params(rows)
    members, device = len(rows), images.device
    loss_sums = torch.zeros(members, device=device, dtype=torch.float64)
    cells = num_classes * num_classes
    confusion = torch.zeros(members * cells, device=device, dtype=torch.int64)
    member_offsets = torch.arange(members, device=device).unsqueeze(1) * cells
    for start in range(0, len(labels), batch_size):
        batch_images, batch_labels = images[start:start + batch_size], labels[start:start + batch_size]
        with autocast(device, precision):
            logits = stack.eval_logits(params, batch_images).float()
        losses = F.cross_entropy(logits.flatten(0, 1), batch_labels.repeat(members), reduction="none")
        loss_sums += losses.view(members, -1).sum(1)
        cell = member_offsets + batch_labels * num_classes + logits.argmax(2)
        confusion += torch.bincount(cell.flatten(), minlength=members * cells)
    confusions = confusion.view(members, num_classes, num_classes).cpu()
    count = max(len(labels), 1)
    correct = confusions.diagonal(dim1=1, dim2=2).sum(1).tolist()
    return [Evaluation(loss / count, hits / count, matrix)
            for loss, hits, matrix in zip(loss_sums.tolist(), correct, confusions)]
