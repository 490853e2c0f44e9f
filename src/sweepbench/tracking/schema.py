"""The run schema: what every sweepbench run in MLflow carries, so that reports can compare any mix of runs.

Every run that trains (a ``train`` run, a study trial, a benchmark repeat) has:

- params: every ``RunConfig`` field, flattened (``model_kwargs.hidden_size``), as the run was asked for;
- tags: ``sweepbench.kind`` (``train``, ``trial`` or ``repeat``), the run's identity as it actually ran (``model``,
  ``dataset``, the resolved ``device`` and ``device_name``, ``precision``, ``loader``, ``optimizer``,
  ``batch_size``, ``epochs``), the dataset's fingerprint and source, hardware and library versions, and ``status``;
  ``sweepbench.fused`` = ``false``, or for a run trained fused with others (``engine.fused``) ``true`` and its
  ``sweepbench.pack_id``, ``sweepbench.pack_size``, ``sweepbench.pack_member`` and ``sweepbench.epoch_time`` =
  ``pack`` (its epoch times are the whole pack's, so reports keep it apart from runs trained alone);
- metrics: per epoch ``train_loss``, ``val_loss``, ``val_accuracy``, ``epoch_seconds``, ``samples_per_second``,
  ``lr``, ``eval_seconds``; at the end ``test_accuracy``, ``test_loss``, ``best_val_accuracy``,
  ``time_to_target_seconds``, ``peak_memory_mb``, ``train_seconds``, ``total_seconds``, ``epoch_logging_seconds``.

Runs that summarise others carry ``sweepbench.kind`` = ``study`` (a study's parent), ``bench`` (a benchmark's
parent), ``cell`` (one benchmark cell over its repeats) or ``comparison`` (a sampler comparison's parent,
over its studies' parent runs); reports leave them out unless asked for. Stores
written before the tag existed are read by ``run_kind``.
"""

from __future__ import annotations

from typing import Any

from ..config import RunConfig
from ..engine import TrainContext
from ..engine.fused.pack import FUSED_TAG
from ..hardware import environment_tags

KIND_TAG = "sweepbench.kind"
TRAINING_KINDS = ("train", "trial", "repeat")
SUMMARY_KINDS = ("study", "bench", "cell", "comparison")
RUN_KINDS = TRAINING_KINDS + SUMMARY_KINDS


def flatten(values: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """``{"model_kwargs": {"hidden_size": 32}}`` -> ``{"model_kwargs.hidden_size": "32"}``."""
    flat: dict[str, str] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)
    return flat


def config_params(config: RunConfig) -> dict[str, str]:
    return flatten(config.to_dict())


def config_tags(config: RunConfig) -> dict[str, str]:
    """The identity tags a config gives a run before it runs (the device as asked; ``training_tags`` has the
    resolved one)."""
    return {"model": config.model, "dataset": config.dataset, "precision": config.precision,
            "loader": config.loader, "optimizer": config.optimizer, "batch_size": str(config.batch_size),
            "epochs": str(config.epochs)}


def training_tags(context: TrainContext) -> dict[str, str]:
    """The tags of a run that trains, as it runs (``KIND_TAG`` is set by the store)."""
    return {
        **environment_tags(context.device),
        **config_tags(context.config),
        "dataset": context.dataset.name,
        "dataset_fingerprint": context.dataset.fingerprint,
        "dataset_source": context.dataset.source,
        "status": "running",
        FUSED_TAG: "false",  # a run trained alone says so, and a report's column never reads "-" for it
        **(context.pack or {}),  # a fused run's pack: sweepbench.fused = "true", pack_id, pack_size, epoch_time
    }


def run_kind(tags: dict[str, str]) -> str:
    """A run's kind from its tags; runs logged before ``sweepbench.kind`` existed are recognised by the tags
    their writers set then (a benchmark parent had ``benchmark``, a cell ``benchmark_cell``, a repeat
    ``repeat``), and anything else is a ``train`` run."""
    kind = tags.get(KIND_TAG)
    if kind:
        return kind
    if "benchmark_cell" in tags:
        return "cell"
    if "benchmark" in tags:
        return "bench"
    if "repeat" in tags:
        return "repeat"
    return "train"
