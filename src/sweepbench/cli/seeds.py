"""``sweepbench train --seeds 0,1,2,3,4``: the same run at several seeds, trained fused as one stacked model
(``engine.fused``), ending with the mean and spread across seeds: the seed noise that tells whether two
configurations really differ. Each seed is its own MLflow run (the run schema, plus the pack's tags)."""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import uuid
from pathlib import Path
from typing import Sequence

from ..config import ConfigError, RunConfig
from ..status import RunStatus
from .train import percent

SEED_GROUP_TAG = "sweepbench.seed_group"  # the runs of one ``--seeds`` command
MAX_SEEDS = 1024
SUMMARY_METRICS = ("best_val_accuracy", "test_accuracy")


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``: two or more distinct seeds >= 0."""
    try:
        seeds = [int(part) for part in text.split(",")]
    except ValueError:
        raise ConfigError(f"--seeds: {text!r} is not a comma-separated list of integers, e.g. 0,1,2,3") from None
    if len(seeds) < 2 or len(set(seeds)) != len(seeds) or min(seeds) < 0 or len(seeds) > MAX_SEEDS:
        raise ConfigError(f"--seeds: {text!r} must list 2 to {MAX_SEEDS} distinct seeds >= 0, e.g. 0,1,2,3")
    return seeds


def seed_configs(config: RunConfig, seeds: Sequence[int]) -> list[RunConfig]:
    """One config per seed; each seed's checkpoints in ``<checkpoint_dir>/seed-<seed>``."""
    if config.resume:
        raise ConfigError("--seeds: a fused run cannot resume a checkpoint; resume each seed's run on its own")
    return [config.replace(seed=seed, checkpoint_dir=str(Path(config.checkpoint_dir) / f"seed-{seed}")
                           if config.checkpoint_dir else None) for seed in seeds]


def train_seeds(args: argparse.Namespace, config: RunConfig) -> int:
    from ..engine import ProgressBar, train_fused
    from ..engine.fused.pack import check_pack

    configs = seed_configs(config, parse_seeds(args.seeds))
    check_pack(configs)
    callbacks: list[list] = [[] for _ in configs]
    loggers = [] if args.no_mlflow else _loggers(args, configs)
    for member, logger in zip(callbacks, loggers):
        member.append(logger)
    callbacks[0].insert(0, ProgressBar())  # one bar: the pack's epochs are every seed's
    results = train_fused(configs, callbacks)
    summaries = [result.summary() for result in results]
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone
    print(format_seeds(summaries, [config.seed for config in configs]), file=human)
    if loggers:
        print(f"mlflow runs     {len(loggers)} in experiment {args.experiment!r} at {loggers[0].tracking_uri}, "
              f"tag {SEED_GROUP_TAG} = {loggers[0].tags[SEED_GROUP_TAG]}", file=human)
    if args.json:
        runs = [{**summary, "seed": config.seed, "mlflow_run_id": logger.run_id if loggers else None}
                for summary, config, logger in zip(summaries, configs, loggers or [None] * len(configs))]
        print(json.dumps({"runs": runs, "across_seeds": across_seeds(summaries)}))
    return 0 if all(result.status == RunStatus.COMPLETED for result in results) else 1


def _loggers(args: argparse.Namespace, configs: Sequence[RunConfig]) -> list:
    """One MLflow run per seed, metrics and tags only: a model or checkpoint per seed is what ``--checkpoint-dir``
    is for."""
    from ..tracking import MlflowLogger

    group = uuid.uuid4().hex[:12]
    return [MlflowLogger(args.experiment, args.tracking_uri, log_model=False, log_artifacts=False,
                         tags={SEED_GROUP_TAG: group}) for _ in configs]


def across_seeds(summaries: Sequence[dict]) -> dict[str, dict[str, float | int]]:
    """Mean, standard deviation, min and max of each summary metric over the seeds that completed."""
    spread = {}
    for metric in SUMMARY_METRICS:
        values = [summary[metric] for summary in summaries if summary["status"] == RunStatus.COMPLETED
                  and summary[metric] is not None]
        if values:
            spread[metric] = {"runs": len(values), "mean": statistics.fmean(values),
                              "std": statistics.stdev(values) if len(values) > 1 else math.nan,
                              "min": min(values), "max": max(values)}
    return spread


def format_seeds(summaries: Sequence[dict], seeds: Sequence[int]) -> str:
    lines = [f"{'seed':>6}  {'status':10} {'best val':>9} {'test':>8}  pack epoch seconds"]
    for summary, seed in zip(summaries, seeds):
        seconds = ", ".join(f"{value:.2f}" for value in summary["epoch_seconds"])
        lines.append(f"{seed:>6}  {summary['status']:10} "
                     f"{percent(summary['best_val_accuracy']):>9} {percent(summary['test_accuracy']):>8}  {seconds}")
    for metric, values in across_seeds(summaries).items():
        lines.append(f"{metric} over {values['runs']} seeds: mean {percent(values['mean'])}, std "
                     f"{percent(values['std'])}, range {percent(values['min'])} - {percent(values['max'])}")
    return "\n".join(lines)
