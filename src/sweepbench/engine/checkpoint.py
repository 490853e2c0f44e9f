"""Checkpoints: what one holds (``checkpoint_state``, read back by ``restore_checkpoint``), written atomically
and checked for its format on loading."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from ..config import ConfigError
from .results import EpochRecord

if TYPE_CHECKING:
    from .loop import _Run


CHECKPOINT_FORMAT = 2  # 2: optimizer state is over the contiguous parameter buffers


def checkpoint_state(run: _Run) -> dict[str, Any]:
    state = {
        "format": CHECKPOINT_FORMAT,
        "config": run.config.to_dict(),
        "epoch": len(run.history),
        "model": run.module.state_dict(),
        "optimizer": run.optimizer.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "history": [dataclasses.asdict(record) for record in run.history],
        "best_val_accuracy": run.best_val_accuracy,
        "best_epoch": run.best_epoch,
        "val_accuracy": run.history[-1].val_accuracy,
    }
    if run.device.type == "cuda":
        state["rng_cuda"] = torch.cuda.get_rng_state(run.device)
    return state


def restore_checkpoint(run: _Run, state: dict[str, Any]) -> None:
    run.module.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    torch.set_rng_state(state["rng_cpu"])
    if run.device.type == "cuda" and "rng_cuda" in state:
        torch.cuda.set_rng_state(state["rng_cuda"], run.device)
    run.history.extend(EpochRecord(**record) for record in state["history"])
    run.best_val_accuracy, run.best_epoch = state["best_val_accuracy"], state["best_epoch"]


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes atomically: a reader sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    torch.save(state, partial)
    os.replace(partial, path)


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume: {path} is not a sweepbench checkpoint (format {state.get('format')!r})")
    return state
