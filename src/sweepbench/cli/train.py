"""``sweepbench train`` (one run with the one engine), ``models`` and ``datasets``."""

from __future__ import annotations

import argparse
import json
import math
import sys

from ..config import ConfigError, parse_overrides
from ..config import fields as config_fields
from ..paths import writable_folder
from ..status import RunStatus
from .options import add_config_flags, add_data_args, add_system_metrics_arg, add_tracking_args, config_from_args


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train one model with the one engine")
    add_config_flags(parser)
    parser.add_argument("--seeds", metavar="S1,S2,...",
                        help="train the run at each of these seeds at once, fused as one stacked model, and end "
                             "with the mean and spread across seeds (e.g. 0,1,2,3,4)")
    parser.add_argument("--json", action="store_true",
                        help="print the summary as one JSON line, alone on stdout (the text summary goes to stderr)")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    parser.add_argument("--register", metavar="NAME",
                        help="register the trained model in MLflow's Model Registry as a new version of NAME; the "
                             "alias 'best' moves to it when its final validation accuracy beats that of the version "
                             "it points at (validated on the same images)")
    add_data_args(parser)
    add_tracking_args(parser, default_experiment="train")
    add_system_metrics_arg(parser, "the run")
    parser.set_defaults(handler=_train)


def _train(args: argparse.Namespace) -> int:
    from ..engine import ProgressBar, train
    from ..engine.checkpoint import load_checkpoint, resume_config

    config, checkpoint = config_from_args(args), None
    if args.register is not None and (args.no_mlflow or args.seeds or not args.register.strip()):
        raise ConfigError(f"--register: {args.register!r} needs a name, MLflow logging (no --no-mlflow) and one "
                          f"run (no --seeds)")
    if config.checkpoint_dir:
        writable_folder("--checkpoint-dir", config.checkpoint_dir)
    if args.seeds:
        from .seeds import train_seeds

        return train_seeds(args, config)
    if config.resume:  # every check of the checkpoint comes before any data loads or MLflow run starts
        checkpoint = load_checkpoint(config.resume)
        given = {f.name for f in config_fields() if getattr(args, f.name) not in (None, [])} | \
            set(parse_overrides(args.set))
        config, changes = resume_config(config, given, checkpoint)
        for change in changes:
            print(f"sweepbench: warning: --resume: {change}", file=sys.stderr)
    if args.no_mlflow:
        result, run_id = train(config, [ProgressBar()]), None
    else:
        from ..tracking import MlflowLogger, browse_hint, train_tracked

        logger = MlflowLogger(args.experiment, args.tracking_uri, system_metrics=not args.no_system_metrics)
        if checkpoint is not None:
            print(f"sweepbench: note: --resume: {logger.continue_from(checkpoint, config)}", file=sys.stderr)
        _reconcile_experiment(logger)
        result, run_id = train_tracked(config, logger, [ProgressBar()]), logger.run_id
    human = sys.stderr if args.json else sys.stdout  # with --json, stdout is the JSON alone: `| jq` reads it
    print(format_summary(result.summary()), file=human)
    outage = None if args.no_mlflow else logger.outage
    if args.json:  # a run the store missed the end of still gives its summary
        print(json.dumps({**result.summary(), "mlflow_run_id": run_id, "tracking_outage": outage}))
    if outage:
        print(f"sweepbench: error: the run was not logged to its end: {outage}; `sweepbench runs "
              "reconcile` ends it once the store answers", file=sys.stderr)
        return 1
    if run_id and args.register:
        print(_register(logger, args.register), file=human)
    if run_id:
        print(f"mlflow run      {run_id} in experiment {logger.experiment!r} at {logger.tracking_uri}", file=human)
        print(f"browse          {browse_hint(logger.tracking_uri, logger.store.experiment_id_of(run_id))}",
              file=human)
    return 0 if result.status == RunStatus.COMPLETED else 1


def _register(logger, name: str) -> str:
    from ..tracking.models import BEST_ALIAS, register_if_better

    if logger.model_id is None:
        return "registered model: none (the run logged no model: it did not complete)"
    registration = register_if_better(logger.store, name, logger.run_id, logger.model_id)
    if registration.best_moved:
        best = f"{BEST_ALIAS!r} moved to it: models:/{name}@{BEST_ALIAS}"
    elif registration.not_comparable:
        best = f"{BEST_ALIAS!r} stays: {registration.not_comparable}, so the two do not compare"
    else:
        best = f"{BEST_ALIAS!r} stays on a version with at least as high a final validation accuracy"
    return f"registered model {registration.uri}; {best}"


def _reconcile_experiment(logger) -> None:
    """Ends KILLED the experiment's runs left RUNNING by a process of this host that is gone (SIGKILL, a crash),
    one line each: nothing else would ever end them."""
    from ..tracking import reconcile_experiment

    for run in reconcile_experiment(logger.store, logger.experiment):
        if run.ended:
            print(f"sweepbench: note: {run.describe()}", file=sys.stderr)


def percent(value: float | None) -> str:
    """A fraction as a percentage; "-" for a figure the run does not have (None, or NaN)."""
    return "-" if value is None or math.isnan(value) else f"{100 * value:.2f}%"


def format_summary(summary: dict) -> str:
    seconds = summary["epoch_seconds"]
    lines = [
        f"status          {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""),
        f"model/dataset   {summary['model']} on {summary['dataset']}",
        f"device          {summary['device']} ({summary['device_name']}), {summary['precision']}, "
        f"loader {summary['loader']}, step {summary['step']}",
        f"val accuracy    {percent(summary['val_accuracy'])} (best {percent(summary['best_val_accuracy'])} "
        f"at epoch {summary['best_epoch']})",
        f"test accuracy   {percent(summary['test_accuracy'])}",
        f"epoch seconds   {', '.join(f'{s:.2f}' for s in seconds) or '-'}"
        + (f" (compiling the step: {summary['compile_seconds']:.1f} s before the first)"
           if summary["compile_seconds"] else ""),
        f"samples/second  {summary['samples_per_second'] or 0:,.0f}",
        f"peak memory     {summary['peak_memory_mb']:.0f} MiB",
    ]
    if summary["time_to_target_seconds"] is not None:
        lines.append(f"time to target  {summary['time_to_target_seconds']:.2f} s")
    return "\n".join(lines)


def show_models(args: argparse.Namespace) -> int:
    from ..models import get_model_entry, list_models

    for name in list_models():
        entry = get_model_entry(name)
        kwargs = ", ".join(f"{key}={value}" for key, value in entry.defaults().items())
        print(f"{name:14} input {entry.input_shape}  ({kwargs})  {entry.description}")
    return 0


def show_datasets(args: argparse.Namespace) -> int:
    from ..data import get_dataset_entry, list_datasets

    for name in list_datasets():
        entry = get_dataset_entry(name)
        print(f"{name:14} {len(entry.classes)} classes  {'real' if entry.real else 'generated'}")
    return 0


