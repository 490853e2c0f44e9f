"""Checkpoints: what one holds (``checkpoint_state``, read back by ``restore_checkpoint``), written atomically,
and the checks that make resuming one honest.

Every way a checkpoint can be wrong for a resume is a ``ConfigError`` in one line,
``resume: <path>: <what is wrong>; <what is expected>``, raised before any data is loaded: the file
(``load_checkpoint``: it exists, is a readable torch file, a sweepbench checkpoint with a valid config) and its fit
to the run (``check_resumable``: the same model, model arguments, data split and optimizer, and epochs left to
train). ``resume_config`` resolves a resumed run's settings: the checkpoint's, except those the user gave.
"""

from __future__ import annotations

import dataclasses
import errno
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Collection, Sequence

import torch

from ..config import KWARGS_FIELDS, ConfigError, RunConfig, field_names
from ..models import get_model_entry
from .interrupts import uninterrupted
from .results import EpochRecord, best_record

if TYPE_CHECKING:
    from .solo import SoloStep


CHECKPOINT_FORMAT = 2  # 2: optimizer state is over the contiguous parameter buffers
TRACKING_KEY = "tracking"  # what callbacks asked the checkpoint to keep (the MLflow run id), optional
REQUIRED_KEYS = ("config", "epoch", "model", "optimizer", "scheduler", "scaler", "rng_cpu", "history",
                 "best_val_accuracy", "best_epoch")
EXPECTED = "expected a last.pt or best.pt that sweepbench train --checkpoint-dir wrote"
ZIP_MAGIC = b"PK\x03\x04"  # torch.save writes a zip archive
# What a resumed run cannot change: the trained weights, the data split and the optimizer state depend on them.
IDENTITY_FIELDS = ("model", "model_kwargs", "dataset", "dataset_kwargs", "val_size", "optimizer")
# Where a run reads and writes, not what it is: never taken from a checkpoint (see ``resume_config``).
LOCATION_FIELDS = ("data_dir", "download", "checkpoint_dir", "resume")
FULL_BYTES = 1 << 20  # a write that failed with less free space than this ran out of it
IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable")  # a resuming run keeps its own optimizer's


def checkpoint_state(config: RunConfig, history: Sequence[EpochRecord], training: dict[str, Any],
                     callbacks: Sequence[Any]) -> dict[str, Any]:
    """A checkpoint after ``history``'s epochs; ``training`` is the step's state of the run (``model``,
    ``optimizer``, ``scheduler``, ``scaler``, ``rng_cpu`` and, on CUDA, ``rng_cuda``), in a solo run's format."""
    best = best_record(history)
    return {
        "format": CHECKPOINT_FORMAT,
        "config": config.to_dict(),
        "epoch": len(history),
        **training,
        "history": [dataclasses.asdict(record) for record in history],
        "best_val_accuracy": best.val_accuracy if best else None,
        "best_epoch": best.epoch if best else None,
        "val_accuracy": history[-1].val_accuracy,
        TRACKING_KEY: tracking_records(callbacks),
    }


def save_checkpoints(folder: str | None, state: Callable[[], dict[str, Any]], improved: bool) -> dict[str, str]:
    """Writes ``state()`` to last.pt in ``folder``, and to best.pt when ``improved``; nothing without a folder.
    Returns where each lives."""
    if not folder:
        return {}
    directory = Path(folder)
    checkpoint = state()
    save_checkpoint(directory / "last.pt", checkpoint)
    if improved:
        save_checkpoint(directory / "best.pt", checkpoint)
    return {"last": str(directory / "last.pt"), "best": str(directory / "best.pt")}


def tracking_records(callbacks: Sequence[Any]) -> dict[str, str]:
    """What the callbacks ask a checkpoint to keep, from their optional ``checkpoint_record()`` method
    (``MlflowLogger``: its run id, so that a resumed run can continue that run)."""
    records: dict[str, str] = {}
    for callback in callbacks:
        record = getattr(callback, "checkpoint_record", None)
        if record is not None:
            records.update(record())
    return records


def restore_checkpoint(step: SoloStep, state: dict[str, Any]) -> list[EpochRecord]:
    """Loads ``state`` into a solo run's ``step``, then applies the run's own optimizer settings (see
    ``_apply_settings``); returns the epochs the checkpoint had run."""
    try:
        step.module.load_state_dict(state["model"])
        flags = [{name: group[name] for name in IMPLEMENTATION_FLAGS if name in group}
                 for group in step.optimizer.param_groups]
        step.optimizer.load_state_dict(state["optimizer"])
        for group, own in zip(step.optimizer.param_groups, flags):  # how this run's optimizer computes
            group.update(own)
        step.scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:  # a checkpoint of a run without fp16 has no scaler state: the scaler starts fresh
            step.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng_cpu"])
        if step.device.type == "cuda" and "rng_cuda" in state:
            torch.cuda.set_rng_state(state["rng_cuda"], step.device)
        history = [EpochRecord(**record) for record in state["history"]]
    except (KeyError, RuntimeError, TypeError, ValueError) as exc:
        raise ConfigError(f"resume: {step.config.resume}: its saved state does not fit this run "
                          f"({_first_line(exc)}); {EXPECTED} for this model and optimizer") from exc
    _apply_settings(step.optimizer, step.scheduler, step.config, state["config"], len(history))
    return history


def _apply_settings(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.StepLR,
                    config: RunConfig, saved: dict[str, Any], epochs_done: int) -> None:
    """Loading the optimizer and scheduler state also loads the checkpoint's hyperparameters; the run's own
    config wins, so that what trains is what the config (and MLflow) says. ``lr`` is the schedule's start: a
    changed ``lr`` or ``lr_gamma`` puts the next epoch at ``lr * lr_gamma ** epochs_done``, as if the run had had
    them from its first epoch; unchanged ones leave the saved learning rate exactly as it was."""
    for group in optimizer.param_groups:
        for name in ("momentum", "nesterov", "weight_decay"):
            if name in group:
                group[name] = getattr(config, name)
    if (config.lr, config.lr_gamma) == (saved["lr"], saved["lr_gamma"]):
        return
    scheduler.gamma = config.lr_gamma
    scheduler.base_lrs = [config.lr] * len(optimizer.param_groups)
    for group in optimizer.param_groups:
        group["initial_lr"], group["lr"] = config.lr, config.lr * config.lr_gamma ** epochs_done


class DiskFullError(OSError):
    """A checkpoint that did not fit on its disk: an ``OSError`` with errno ENOSPC whose text is one line,
    ``disk full at <path>: ...``, where torch's own error says nothing of space."""

    def __init__(self, path: Path) -> None:
        super().__init__(errno.ENOSPC, f"disk full at {path}: no space left on the device to write this "
                                       f"checkpoint; free space there or set checkpoint_dir to another disk",
                         str(path))

    def __str__(self) -> str:
        return self.strerror


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Writes atomically: a reader sees the old file or the new one, never half of one. The partial file is
    removed on any error (left behind, it would keep a full disk full); running out of space is raised as
    ``DiskFullError``. Ctrl-C or SIGTERM waits for the write to end: torch turns an interrupt raised inside its
    writes to a Python file into a RuntimeError, which would fail the run instead of interrupting it."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with uninterrupted():
            path.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as file:  # a Python file: its ENOSPC OSError stays in torch's error's context
                torch.save(state, file)
            os.replace(partial, path)
    except BaseException as exc:
        disk_full = isinstance(exc, Exception) and _out_of_space(exc, path.parent)
        partial.unlink(missing_ok=True)
        if disk_full:
            raise DiskFullError(path) from exc
        raise


def _out_of_space(error: BaseException, folder: Path) -> bool:
    """Whether ``error`` (raised while the partial file is still there) means the disk is full: an ENOSPC in
    its chain of causes, or torch's write error (``unexpected pos ...``, which hides the OSError when torch writes
    to a path) while less than ``FULL_BYTES`` are free in ``folder``."""
    cause: BaseException | None = error
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
            return True
        cause = cause.__cause__ or cause.__context__
    if not isinstance(error, RuntimeError):
        return False
    try:
        stats = os.statvfs(folder)
    except OSError:
        return False
    return stats.f_bavail * stats.f_frsize < FULL_BYTES


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint at ``path``, once it is known to be a readable sweepbench checkpoint with a valid config."""
    state = _read_torch_file(Path(path))
    if not isinstance(state, dict) or "format" not in state:
        raise ConfigError(f"resume: {path}: is not a sweepbench checkpoint (a torch file without its 'format' key); "
                          f"{EXPECTED}")
    if state["format"] != CHECKPOINT_FORMAT:
        raise ConfigError(f"resume: {path}: is a sweepbench checkpoint of format {state['format']!r}; this version "
                          f"reads format {CHECKPOINT_FORMAT} only")
    missing = [key for key in REQUIRED_KEYS if key not in state]
    if missing:
        raise ConfigError(f"resume: {path}: is an incomplete sweepbench checkpoint (no {', '.join(missing)}); "
                          f"{EXPECTED}")
    epoch, history = state["epoch"], state["history"]
    if isinstance(epoch, bool) or not isinstance(epoch, int) or not isinstance(history, list) or \
            len(history) != epoch:
        raise ConfigError(f"resume: {path}: is inconsistent (epoch {epoch!r} with "
                          f"{len(history) if isinstance(history, list) else 'no'} epoch records); {EXPECTED}")
    saved_config(state, path)
    return state


def _read_torch_file(path: Path) -> Any:
    if not path.exists():
        raise ConfigError(f"resume: {path}: no such file; {EXPECTED}")
    if path.is_dir():
        raise ConfigError(f"resume: {path}: is a directory; expected a checkpoint file in it, e.g. "
                          f"{path / 'last.pt'}")
    try:
        with path.open("rb") as file:
            head = file.read(len(ZIP_MAGIC))
            file.seek(0)
            state = torch.load(file, map_location="cpu", weights_only=True) if head else None
    except OSError as exc:
        raise ConfigError(f"resume: {path}: cannot be read ({exc.strerror or exc}); {EXPECTED}") from exc
    except Exception as exc:  # torch.load's errors for a bad file are of many types, and many lines long
        if head != ZIP_MAGIC:
            problem = "is not a torch file"
        elif "Weights only load failed" in str(exc):
            problem = "holds Python objects, not only tensors and plain values (a pickled model?)"
        else:
            problem = "is a damaged or truncated torch file"
        raise ConfigError(f"resume: {path}: {problem}; {EXPECTED}") from exc
    if not head:
        raise ConfigError(f"resume: {path}: is empty; {EXPECTED}")
    return state


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def saved_config(state: dict[str, Any], path: str | os.PathLike) -> RunConfig:
    """The config the checkpoint's run had."""
    values = state["config"]
    if not isinstance(values, dict):
        raise ConfigError(f"resume: {path}: its config is not a table; {EXPECTED}")
    try:
        return RunConfig.from_dict(values)
    except (ConfigError, TypeError) as exc:
        raise ConfigError(f"resume: {path}: its config is invalid ({_first_line(exc)}); {EXPECTED} by this "
                          f"version") from exc


def check_resumable(state: dict[str, Any], config: RunConfig) -> None:
    """Refuses a run that differs from the checkpoint in an ``IDENTITY_FIELDS`` setting, or that has no epochs
    left to train; each difference is named, with both values."""
    path, saved = config.resume, saved_config(state, config.resume)
    differences = [f"{name} {theirs!r} (checkpoint) differs from {ours!r} (this run)"
                   for name, theirs, ours in _identity_differences(saved, config)]
    if differences:
        raise ConfigError(f"resume: {path}: {', '.join(differences)}; {', '.join(IDENTITY_FIELDS)} cannot change "
                          f"on resume: leave them out to use the checkpoint's, or train anew without --resume")
    done = state["epoch"]
    if config.epochs <= done:
        raise ConfigError(f"resume: {path}: the checkpoint has already run {done} epochs, so epochs "
                          f"{config.epochs} leaves nothing to train; give --epochs above {done}")


def _identity_differences(saved: RunConfig, config: RunConfig) -> list[tuple[str, Any, Any]]:
    """(setting, checkpoint's value, run's value) per identity setting that differs; model arguments are
    compared with the model's defaults filled in, one by one."""
    differences = []
    for name in IDENTITY_FIELDS:
        theirs, ours = getattr(saved, name), getattr(config, name)
        if name == "model_kwargs":
            if saved.model == config.model:  # else the model's difference says it all
                defaults = get_model_entry(config.model).defaults()
                theirs, ours = {**defaults, **theirs}, {**defaults, **ours}
                differences += [(f"{name}.{key}", theirs.get(key), ours.get(key))
                                for key in sorted({*theirs, *ours}) if theirs.get(key) != ours.get(key)]
        elif theirs != ours:
            differences.append((name, theirs, ours))
    return differences


def resume_config(config: RunConfig, given: Collection[str], state: dict[str, Any]) -> tuple[RunConfig, list[str]]:
    """The settings of a run that resumes ``state``: the checkpoint's, except the ``given`` fields of
    ``config`` (what the user set; a given kwargs table is merged over the checkpoint's) and the
    ``LOCATION_FIELDS``, which are ``config``'s, save that ``checkpoint_dir``, when not given, stays the folder
    the checkpoint was written to. Returns that config, checked by ``check_resumable``, and one line per given
    setting that differs from the checkpoint's."""
    path, saved = config.resume, saved_config(state, config.resume)
    values, notes = saved.to_dict(), []
    for name in field_names():
        if name not in given and name not in LOCATION_FIELDS:
            continue
        value = getattr(config, name)
        if name in KWARGS_FIELDS:
            value = {**values[name], **value}
        if name not in LOCATION_FIELDS and name not in IDENTITY_FIELDS and value != values[name]:
            notes.append(f"{name} {value!r} (given) differs from the checkpoint's {values[name]!r}; using {value!r}")
        values[name] = value
    if "checkpoint_dir" not in given and saved.checkpoint_dir and \
            Path(saved.checkpoint_dir).resolve() == Path(path).resolve().parent:
        values["checkpoint_dir"] = saved.checkpoint_dir
    resolved = RunConfig.from_dict(values)
    check_resumable(state, resolved)
    return resolved, notes


def load_resume(config: RunConfig) -> dict[str, Any]:
    """The checkpoint ``config.resume`` names, checked as a file and against ``config``."""
    state = load_checkpoint(config.resume)
    check_resumable(state, config)
    return state
