"""The ``sweepbench`` command: argument parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from typing import Sequence

from .config import (DEVICES, KWARGS_FIELDS, PRECISIONS, ConfigError, RunConfig, apply_overrides, parse_overrides)
from .config import fields as config_fields
from .data import DataNotFoundError
from .engine import Terminated, interrupt_message, sigterm_interrupts
from .validators import choice


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with <dataset>.npz or torchvision's layout "
                                           "(default: $SWEEPBENCH_DATA_DIR, else the user cache dir)")
    parser.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")


FLAG_TYPES = {"int": int, "float": float}


def _add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field, from its metadata (``--batch-size``; ``--model-arg KEY=VALUE`` for
    ``model_kwargs``), plus ``--set KEY=VALUE`` for any field. Unset flags keep the config's defaults."""
    for f in config_fields():
        if f.name in ("data_dir", "download"):
            continue  # _add_data_args: shared with study run and bench
        help_text = f.metadata["help"] + (f"; one of: {', '.join(f.metadata['choices'])}" if f.metadata["choices"]
                                          else "")
        if f.name in KWARGS_FIELDS:
            parser.add_argument(f"--{f.name.split('_')[0]}-arg", dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
        elif f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=None, help=help_text)
        else:
            default = f.default if f.default is not None else "none"
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=FLAG_TYPES.get(f.type.split(" ")[0], str),
                                help=f"{help_text} (default: {default})")
    _add_set_arg(parser)


def _add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run setting, e.g. lr=0.01, model_kwargs.hidden_size=256 (repeatable; over the "
                             "other options)")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train one model with the one engine")
    _add_config_flags(parser)
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    parser.add_argument("--no-mlflow", action="store_true", help="do not log the run to MLflow")
    _add_data_args(parser)
    _add_tracking_args(parser, default_experiment="train")
    parser.set_defaults(handler=_train)


def _add_tracking_args(parser: argparse.ArgumentParser, default_experiment: str | None = None) -> None:
    if default_experiment is not None:
        parser.add_argument("--experiment", default=default_experiment,
                            help=f"MLflow experiment name (default: {default_experiment})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///<cwd>/mlruns/mlflow.db)")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config the ``train`` flags describe: the flags given, then ``--set`` over them."""
    values = {f.name: getattr(args, f.name) for f in config_fields()
              if f.name not in KWARGS_FIELDS and getattr(args, f.name) is not None}
    for name in KWARGS_FIELDS:
        option = f"--{name.split('_')[0]}-arg"
        values = apply_overrides(values, parse_overrides(getattr(args, name), option, prefix=f"{name}."))
    return RunConfig.from_dict(apply_overrides(values, parse_overrides(args.set)))


def _train(args: argparse.Namespace) -> int:
    from .engine import ProgressBar, train
    from .engine.checkpoint import load_checkpoint, resume_config

    config, checkpoint = config_from_args(args), None
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
        from .tracking import MlflowLogger, browse_hint, train_tracked

        logger = MlflowLogger(args.experiment, args.tracking_uri)
        if checkpoint is not None:
            print(f"sweepbench: note: --resume: {logger.continue_from(checkpoint, config)}", file=sys.stderr)
        result, run_id = train_tracked(config, logger, [ProgressBar()]), logger.run_id
    print(format_summary(result.summary()))
    if run_id:
        print(f"mlflow run      {run_id} in experiment {logger.experiment!r} at {logger.tracking_uri}")
        print(f"browse          {browse_hint(logger.tracking_uri, logger.store.experiment_id_of(run_id))}")
    if args.json:
        print(json.dumps({**result.summary(), "mlflow_run_id": run_id}))
    return 0 if result.status == "completed" else 1


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_summary(summary: dict) -> str:
    seconds = summary["epoch_seconds"]
    lines = [
        f"status          {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""),
        f"model/dataset   {summary['model']} on {summary['dataset']}",
        f"device          {summary['device']} ({summary['device_name']}), {summary['precision']}, "
        f"loader {summary['loader']}",
        f"val accuracy    {_percent(summary['val_accuracy'])} (best {_percent(summary['best_val_accuracy'])} "
        f"at epoch {summary['best_epoch']})",
        f"test accuracy   {_percent(summary['test_accuracy'])}",
        f"epoch seconds   {', '.join(f'{s:.2f}' for s in seconds) or '-'}",
        f"samples/second  {summary['samples_per_second'] or 0:,.0f}",
        f"peak memory     {summary['peak_memory_mb']:.0f} MiB",
    ]
    if summary["time_to_target_seconds"] is not None:
        lines.append(f"time to target  {summary['time_to_target_seconds']:.2f} s")
    return "\n".join(lines)


def _list_models(args: argparse.Namespace) -> int:
    from .models import get_model_entry, list_models

    for name in list_models():
        entry = get_model_entry(name)
        kwargs = ", ".join(f"{key}={value}" for key, value in entry.defaults().items())
        print(f"{name:14} input {entry.input_shape}  ({kwargs})  {entry.description}")
    return 0


def _list_datasets(args: argparse.Namespace) -> int:
    from .data import get_dataset_entry, list_datasets

    for name in list_datasets():
        entry = get_dataset_entry(name)
        print(f"{name:14} {len(entry.classes)} classes  {'real' if entry.real else 'generated'}")
    return 0


def _split(values: str | None) -> list[str] | None:
    return [value.strip() for value in values.split(",") if value.strip()] if values else None


def _add_ui_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ui", help="start the MLflow UI on the project's store")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=5000)
    _add_tracking_args(parser)
    parser.set_defaults(handler=_ui)


def _ui(args: argparse.Namespace) -> int:
    from .tracking import Store, experiment_url, is_server, resolve_tracking_uri, serve, ui_command
    from .tracking.connect import check_listen_address

    uri = resolve_tracking_uri(args.tracking_uri)
    if not is_server(uri):
        check_listen_address(args.host, args.port)
    base_url = uri if is_server(uri) else f"http://{args.host}:{args.port}"
    for experiment_id, name in sorted(Store(uri).experiment_names().items(), key=lambda item: item[1]):
        print(f"  {name}: {experiment_url(base_url, experiment_id)}")
    if is_server(uri):
        print(f"MLflow UI: {uri} (served by the tracking server itself)")
        return 0
    print(f"MLflow UI for {uri} at {base_url} (Ctrl-C to stop); the links above open each experiment's runs",
          flush=True)
    return serve(ui_command(uri, args.host, args.port))


def _add_report_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="comparison tables and charts from MLflow runs")
    parser.add_argument("--experiment", action="append", help="experiment to read (repeatable; default: all)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.optimizer = 'sgd'\"")
    parser.add_argument("--status", default="FINISHED", help="FINISHED, FAILED, KILLED (pruned trials among them), "
                                                             "RUNNING or all")
    parser.add_argument("--kind", default="train,trial,repeat",
                        help="run kinds, comma-separated: the runs that train (train, trial, repeat: the default) "
                             "and the summaries (study, bench, cell)")
    parser.add_argument("--group-by", default="model,dataset,device,precision,optimizer",
                        help="comma-separated params/tags to group by (tags first: device is the device used)")
    parser.add_argument("--metrics", help="comma-separated metrics (default: accuracies, times, throughput, memory)")
    parser.add_argument("--spread", default="range", help="spread across repeats: range, iqr or std")
    parser.add_argument("--baseline", metavar="KEY=VALUE[,...]",
                        help="baseline group for speed-ups, e.g. precision=fp32 (default: device=cpu, precision=fp32, "
                             "loader=torchvision, compile=False for the keys that vary)")
    parser.add_argument("--format", help="md, csv, json, html or latex (default: from --output's suffix, else md)")
    parser.add_argument("--output", help="file to write (default: stdout)")
    parser.add_argument("--plot", metavar="DIR", help="write PNG charts (accuracy vs time, speed-ups) to DIR")
    parser.add_argument("--accuracy-metric", default="test_accuracy", help="y axis of the accuracy-vs-time chart")
    parser.add_argument("--time-metric", default="train_seconds", help="x axis and speed-up chart metric")
    _add_tracking_args(parser)
    parser.set_defaults(handler=_report)


def _write_output(path: str, text: str) -> None:
    from .report.export import write_export

    made = write_export(path, text)  # the path was checked when the command started (paths.output_file)
    print(f"wrote {path}" + (f" (made the folder {made})" if made else ""), file=sys.stderr)


def _report(args: argparse.Namespace) -> int:
    from .paths import output_file, writable_folder
    from .report import compare_runs, export_table, format_for_path, load_runs, parse_baseline, write_plots
    from .tracking import resolve_tracking_uri

    output_file("--output", args.output)
    if args.plot:
        writable_folder("--plot", args.plot)
    runs = load_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.filter, args.status,
                     _split(args.kind))
    comparison = compare_runs(runs, _split(args.group_by), _split(args.metrics), args.spread,
                              parse_baseline(args.baseline) if args.baseline else None)
    for note in comparison.notes:
        print(f"note: {note}", file=sys.stderr)
    text = export_table(comparison.table, args.format or (args.output and format_for_path(args.output)) or "md",
                        comparison.notes, f"sweepbench report: {', '.join(args.experiment or ['all experiments'])}")
    if args.output:
        _write_output(args.output, text)
    else:
        print(text)
    if args.plot:
        for path in write_plots(runs, comparison, args.plot, args.accuracy_metric, args.time_metric):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _add_study_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("study", help="Optuna studies declared as TOML files (studies/*.toml)")
    study_commands = parser.add_subparsers(dest="study_command", required=True)
    run = study_commands.add_parser("run", help="run a study, or resume it up to its target of finished trials")
    run.add_argument("spec", metavar="FILE", help="study spec, e.g. studies/mnist_mlp_quick.toml")
    run.add_argument("--n-trials", type=int, help="target of finished (complete + pruned) trials, in total")
    run.add_argument("--timeout", type=float, help="seconds after which each worker starts no new trial")
    run.add_argument("--storage", help="Optuna RDB storage URL, e.g. postgresql://postgres@127.0.0.1/optuna "
                                       "(default: sqlite:///<cwd>/mlruns/studies/<name>.db)")
    run.add_argument("--workers", type=int, default=1, help="local worker processes on the same storage")
    run.add_argument("--heartbeat-interval", type=int,
                     help="seconds between trial heartbeats (default: 10); a trial silent for 3 of them is "
                          "failed and retried")
    run.add_argument("--device", help=f"override the spec's device: {', '.join(DEVICES)}")
    run.add_argument("--precision", help=f"override the spec's precision: {', '.join(PRECISIONS)}")
    _add_data_args(run)
    _add_tracking_args(run)
    _add_set_arg(run)
    run.set_defaults(handler=_study_run)
    show = study_commands.add_parser("show", help="print the best trials and each parameter's importance")
    _add_stored_study_args(show)
    show.add_argument("--limit", type=int, default=10, help="trials to list, best first (default: 10; 0: all)")
    show.set_defaults(handler=_study_show)
    export = study_commands.add_parser("export", help="export the trials table (study.trials_dataframe())")
    _add_stored_study_args(export)
    export.add_argument("--format", default="md", help="md, csv or html (also json, latex)")
    export.add_argument("--output", help="file to write (default: stdout)")
    export.set_defaults(handler=_study_export)


def _add_stored_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="study name")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<cwd>/mlruns/studies/<name>.db)")


def _study_run(args: argparse.Namespace) -> int:
    from .study.spec import load_spec
    from .study import configure_logging, make_job, redact, run_study

    changes = {"device": args.device, "precision": args.precision, "data_dir": args.data_dir,
               "download": args.download or None, **parse_overrides(args.set)}
    spec = load_spec(args.spec).with_overrides(n_trials=args.n_trials, timeout=args.timeout, **changes)
    job = make_job(spec, args.storage, args.tracking_uri, args.workers, args.heartbeat_interval)
    configure_logging()
    print(f"study {spec.name}: target {spec.target_trials()} finished trials, {job.workers} worker(s), "
          f"storage {redact(job.storage_url)}, tracking {job.tracking_uri}", flush=True)
    outcome = run_study(job)
    print(outcome.describe())
    return 0 if outcome.status == "FINISHED" else 1


def _study_show(args: argparse.Namespace) -> int:
    from .study import describe_importances, describe_study, open_existing_study

    study = open_existing_study(args.name, args.storage)
    print(describe_study(study, args.limit))
    print()
    print(describe_importances(study))
    return 0


def _study_export(args: argparse.Namespace) -> int:
    from .paths import output_file
    from .study import export_trials, open_existing_study

    output_file("--output", args.output)
    text = export_trials(open_existing_study(args.name, args.storage), args.format)
    if args.output:
        _write_output(args.output, text)
    else:
        print(text)
    return 0


def _add_bench_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="device x precision benchmark matrix from a TOML file")
    parser.add_argument("spec", metavar="FILE", help="benchmark file, e.g. benchmarks/quick.toml")
    parser.add_argument("--repeats", type=int, help="repeats per cell (default: the file's, else 3)")
    parser.add_argument("--epochs", type=int, help="epochs per repeat for every cell (default: the file's)")
    parser.add_argument("--device", action="append", choices=("cpu", "cuda"),
                        help="run only the cells on this device, plus their baseline cells (repeatable)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: bench-<benchmark name>)")
    parser.add_argument("--format", default="md", help="table format: md, csv, json, html or latex")
    parser.add_argument("--output", help="also write the table to this file")
    _add_set_arg(parser)
    _add_data_args(parser)
    _add_tracking_args(parser)
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from .bench import load_spec, run_benchmark
    from .paths import output_file
    from .report import EXPORT_FORMATS, export_table
    from .tracking import browse_hint

    choice("--format", args.format, EXPORT_FORMATS)
    output_file("--output", args.output)
    spec = load_spec(args.spec, repeats=args.repeats, devices=args.device, epochs=args.epochs,
                     data_dir=args.data_dir, download=args.download or None, **parse_overrides(args.set))
    print(f"benchmark {spec.name}: {len(spec.cells)} cells x {spec.repeats} repeats", file=sys.stderr, flush=True)
    report = run_benchmark(spec, args.tracking_uri, args.experiment,
                           on_cell=lambda outcome: print(outcome.describe(), file=sys.stderr, flush=True))
    text = export_table(report.table, args.format, title=f"benchmark {report.spec.name}")
    print(text)
    if args.output:
        _write_output(args.output, text)
    print(f"mlflow parent run {report.parent_run_id} in experiment {report.experiment!r} at {report.tracking_uri}",
          file=sys.stderr)
    print(f"browse: {browse_hint(report.tracking_uri, report.experiment_id)}", file=sys.stderr)
    return 1 if report.failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweepbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    commands.add_parser("models", help="list registered models").set_defaults(handler=_list_models)
    commands.add_parser("datasets", help="list registered datasets").set_defaults(handler=_list_datasets)
    _add_ui_parser(commands)
    _add_report_parser(commands)
    _add_study_parser(commands)
    _add_bench_parser(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for chatty in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        with sigterm_interrupts():
            if hasattr(args, "tracking_uri") and not getattr(args, "no_mlflow", False):
                from .tracking.connect import check_tracking_uri

                args.tracking_uri = check_tracking_uri(args.tracking_uri, must_exist=args.command == "report")
            return args.handler(args)
    except (ConfigError, DataNotFoundError) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"sweepbench: {interrupt_message(interrupt)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


if __name__ == "__main__":
    sys.exit(main())
