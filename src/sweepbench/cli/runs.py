"""The commands over many runs: ``ui``, ``report``, ``study run/show/export``, ``bench``, ``runs reconcile``; the
sampler comparison's ``study compare`` and ``compare-report`` are in ``compare``."""

from __future__ import annotations

import argparse
import sys

from ..config import DEVICES, PRECISIONS, parse_overrides
from ..devices import benchmarked_devices
from ..status import MlflowStatus
from ..validators import choice

PEOPLE_FORMATS = ("md", "html")  # a compact table by default; csv, json and latex hold every column
from .compare import add_compare_parsers
from .distributed import add_worker_parser
from .options import add_data_args, add_set_arg, add_system_metrics_arg, add_tracking_args, split_list, write_output


def add_ui_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("ui", help="start the MLflow UI on the project's store")
    parser.add_argument("--host", default="127.0.0.1", help="interface to bind (default: 127.0.0.1, local only)")
    parser.add_argument("--port", type=int, default=5000)
    add_tracking_args(parser)
    parser.set_defaults(handler=_ui)


def _ui(args: argparse.Namespace) -> int:
    from ..tracking import Store, experiment_url, is_server, resolve_tracking_uri, serve, ui_command
    from ..tracking.connect import check_listen_address

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


def add_report_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("report", help="comparison tables and charts from MLflow runs")
    parser.add_argument("--experiment", action="append", help="experiment to read (repeatable; default: all)")
    parser.add_argument("--filter", default="", help="MLflow search filter, e.g. \"params.optimizer = 'sgd'\"")
    parser.add_argument("--status", default=str(MlflowStatus.FINISHED),
                        help="FINISHED (trained to the end), PRUNED (pruned trials), FAILED, KILLED, RUNNING or all")
    parser.add_argument("--kind", default="train,trial,repeat",
                        help="run kinds, comma-separated: the runs that train (train, trial, repeat: the default) "
                             "and the summaries (study, bench, cell)")
    parser.add_argument("--group-by", default="model,dataset,device,precision,optimizer",
                        help="comma-separated params/tags to group by (tags first: device is the device used)")
    parser.add_argument("--metrics", help="comma-separated metrics, every column of each (default: md and html show "
                                          "test accuracy with its 95%% interval and training time with its "
                                          "speed-up; csv and json every column of accuracies, times, throughput "
                                          "and memory)")
    parser.add_argument("--spread", default="range", help="spread across repeats: range, iqr or std")
    parser.add_argument("--baseline", metavar="KEY=VALUE[,...]",
                        help="baseline group for speed-ups, e.g. precision=fp32 (default: device=cpu, precision=fp32, "
                             "loader=torchvision, compile=False for the keys that vary)")
    parser.add_argument("--format", help="md, csv, json, html or latex (default: from --output's suffix, else md)")
    parser.add_argument("--output", help="file to write (default: stdout)")
    parser.add_argument("--plot", metavar="DIR", help="write PNG charts (accuracy vs time, speed-ups) to DIR")
    parser.add_argument("--accuracy-metric", default="test_accuracy", help="y axis of the accuracy-vs-time chart")
    parser.add_argument("--time-metric", default="train_seconds", help="x axis and speed-up chart metric")
    add_tracking_args(parser)
    parser.set_defaults(handler=_report)


def _report(args: argparse.Namespace) -> int:
    from ..paths import output_file, writable_folder
    from ..report import (compact_view, compare_runs, export_table, format_for_path, load_runs, parse_baseline,
                          write_plots)
    from ..tracking import resolve_tracking_uri

    output_file("--output", args.output)
    if args.plot:
        writable_folder("--plot", args.plot)
    runs = load_runs(resolve_tracking_uri(args.tracking_uri), args.experiment, args.filter, args.status,
                     split_list(args.kind))
    comparison = compare_runs(runs, split_list(args.group_by), split_list(args.metrics), args.spread,
                              parse_baseline(args.baseline) if args.baseline else None)
    for note in comparison.notes:
        print(f"note: {note}", file=sys.stderr)
    charts = write_plots(runs, comparison, args.plot, args.accuracy_metric, args.time_metric) if args.plot else []
    for path in charts:
        print(f"wrote {path}", file=sys.stderr)
    fmt = args.format or (args.output and format_for_path(args.output)) or "md"
    table = compact_view(comparison) if args.metrics is None and fmt in PEOPLE_FORMATS else comparison.table
    text = export_table(table, fmt, comparison.notes,
                        f"sweepbench report: {', '.join(args.experiment or ['all experiments'])}", charts)
    if args.output:
        write_output(args.output, text)
    else:
        print(text)
    return 0


def add_study_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("study", help="Optuna studies declared as TOML files (studies/*.toml)")
    study_commands = parser.add_subparsers(dest="study_command", required=True)
    run = study_commands.add_parser("run", help="run a study, or resume it up to its target of finished trials")
    run.add_argument("spec", metavar="FILE", help="study spec, e.g. studies/mnist_mlp_quick.toml")
    run.add_argument("--n-trials", type=int, help="target of finished (complete + pruned) trials, in total")
    run.add_argument("--timeout", type=float, help="seconds after which each worker starts no new trial")
    run.add_argument("--storage", help="Optuna RDB storage URL, e.g. postgresql://postgres@127.0.0.1/optuna "
                                       "(default: sqlite:///<cwd>/mlruns/studies/<name>.db)")
    run.add_argument("--workers", type=int, default=1, help="local worker processes on the same storage")
    run.add_argument("--pack", type=int, help="trials each worker trains at once, fused where they share an "
                                              "architecture (default: the spec's budget.pack, else 1)")
    run.add_argument("--heartbeat-interval", type=int,
                     help="seconds between trial heartbeats (default: 10); a trial silent for 3 of them is "
                          "failed and retried")
    run.add_argument("--new-spec-version", action="store_true",
                     help="continue a study whose spec changed (search space, objective or fixed settings) as its "
                          "next spec version; its later trials are tagged with it (without this: refused)")
    run.add_argument("--device", help=f"override the spec's device: {', '.join(DEVICES)}")
    run.add_argument("--precision", help=f"override the spec's precision: {', '.join(PRECISIONS)}")
    add_data_args(run)
    add_tracking_args(run)
    add_system_metrics_arg(run, "the study's parent run")
    add_set_arg(run)
    run.set_defaults(handler=_study_run)
    show = study_commands.add_parser("show", help="print the best trials, each parameter's importance and the "
                                                  "best model's models:/ URI")
    _add_stored_study_args(show)
    show.add_argument("--limit", type=int, default=10, help="trials to list, best first (default: 10; 0: all)")
    add_tracking_args(show)
    show.set_defaults(handler=_study_show)
    dashboard = study_commands.add_parser("dashboard", help="serve optuna-dashboard on the study's storage "
                                                            "(pip install -e \".[dashboard]\")")
    _add_stored_study_args(dashboard)
    dashboard.add_argument("--host", default="127.0.0.1")
    dashboard.add_argument("--port", type=int, default=8080)
    dashboard.set_defaults(handler=_study_dashboard)
    export = study_commands.add_parser("export", help="export the trials table (study.trials_dataframe())")
    _add_stored_study_args(export)
    export.add_argument("--format", default="md", help="md, csv or html (also json, latex)")
    export.add_argument("--output", help="file to write (default: stdout)")
    export.set_defaults(handler=_study_export)
    add_worker_parser(study_commands)
    add_compare_parsers(study_commands)


def _add_stored_study_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="study name")
    parser.add_argument("--storage", help="Optuna storage URL (default: sqlite:///<cwd>/mlruns/studies/<name>.db)")


def _study_run(args: argparse.Namespace) -> int:
    from ..study.spec import load_spec
    from ..study import configure_logging, make_job, redact, run_study
    from ..study.processes import WorkersFailed

    changes = {"device": args.device, "precision": args.precision, "data_dir": args.data_dir,
               "download": args.download or None, **parse_overrides(args.set)}
    spec = load_spec(args.spec).with_overrides(n_trials=args.n_trials, timeout=args.timeout, pack=args.pack,
                                               **changes)
    job = make_job(spec, args.storage, args.tracking_uri, args.workers, args.heartbeat_interval,
                   args.new_spec_version, not args.no_system_metrics)
    configure_logging()
    print(f"study {spec.name}: target {spec.target_trials()} finished trials, {job.workers} worker(s), "
          f"storage {redact(job.storage_url)}, tracking {job.tracking_uri}", flush=True)
    try:
        outcome = run_study(job)
    except WorkersFailed as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 1
    print(outcome.describe())
    return 0 if outcome.status == MlflowStatus.FINISHED else 1


def _study_show(args: argparse.Namespace) -> int:
    from ..study import describe_importances, describe_study, open_existing_study

    from ..study.registry import describe_registered_model
    from ..tracking import Store

    study = open_existing_study(args.name, args.storage)
    print(describe_study(study, args.limit))
    print()
    print(describe_importances(study))
    print(describe_registered_model(Store(args.tracking_uri), args.name))
    return 0


def _study_dashboard(args: argparse.Namespace) -> int:
    """Optuna's own dashboard on the study's storage, found and checked as ``study show`` finds it."""
    from ..study import open_existing_study
    from ..validators import ConfigError

    study = open_existing_study(args.name, args.storage)
    try:
        import optuna_dashboard
    except ImportError:
        raise ConfigError('study dashboard: optuna-dashboard is not installed; pip install -e ".[dashboard]" '
                          '(or pip install optuna-dashboard)') from None
    study_id = study._study_id
    print(f"optuna-dashboard for study {args.name}: http://{args.host}:{args.port}/dashboard/studies/{study_id} "
          f"(Ctrl-C to stop)", flush=True)
    optuna_dashboard.run_server(study._storage, host=args.host, port=args.port)
    return 0


def _study_export(args: argparse.Namespace) -> int:
    from ..paths import output_file
    from ..study import export_trials, open_existing_study

    output_file("--output", args.output)
    text = export_trials(open_existing_study(args.name, args.storage), args.format)
    if args.output:
        write_output(args.output, text)
    else:
        print(text)
    return 0


def add_bench_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("bench", help="device x precision benchmark matrix from a TOML file")
    parser.add_argument("spec", metavar="FILE", help="benchmark file, e.g. benchmarks/quick.toml")
    parser.add_argument("--repeats", type=int, help="repeats per cell (default: the file's, else 3)")
    parser.add_argument("--epochs", type=int, help="epochs per repeat for every cell (default: the file's)")
    parser.add_argument("--device", action="append", choices=benchmarked_devices(),
                        help="run only the cells on this device, plus their baseline cells (repeatable)")
    parser.add_argument("--experiment", help="MLflow experiment name (default: bench-<benchmark name>)")
    parser.add_argument("--format", default="md", help="table format: md, csv, json, html or latex")
    parser.add_argument("--output", help="also write the table to this file")
    add_set_arg(parser)
    add_data_args(parser)
    add_tracking_args(parser)
    add_system_metrics_arg(parser, "the benchmark's parent run (never during a timed epoch)")
    parser.set_defaults(handler=_bench)


def _bench(args: argparse.Namespace) -> int:
    from ..bench import load_spec, run_benchmark
    from ..paths import output_file
    from ..report import EXPORT_FORMATS, export_table
    from ..tracking import browse_hint

    choice("--format", args.format, EXPORT_FORMATS)
    output_file("--output", args.output)
    spec = load_spec(args.spec, repeats=args.repeats, devices=args.device, epochs=args.epochs,
                     data_dir=args.data_dir, download=args.download or None, **parse_overrides(args.set))
    print(f"benchmark {spec.name}: {len(spec.cells)} cells x {spec.repeats} repeats", file=sys.stderr, flush=True)
    report = run_benchmark(spec, args.tracking_uri, args.experiment,
                           on_cell=lambda outcome: print(outcome.describe(), file=sys.stderr, flush=True),
                           system_metrics=not args.no_system_metrics, on_round=_print_round)
    text = export_table(report.table, args.format, title=f"benchmark {report.spec.name}")
    print(text)
    if args.output:
        write_output(args.output, text)
    print(f"mlflow parent run {report.parent_run_id} in experiment {report.experiment!r} at {report.tracking_uri}",
          file=sys.stderr)
    print(f"browse: {browse_hint(report.tracking_uri, report.experiment_id)}", file=sys.stderr)
    return 1 if report.failed else 0


def _print_round(round_number: int, rounds: int, cells: int) -> None:
    print(f"round {round_number}/{rounds}: repeat {round_number} of {cells} cell(s)", file=sys.stderr, flush=True)


def add_runs_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("runs", help="upkeep of the MLflow runs")
    runs_commands = parser.add_subparsers(dest="runs_command", required=True)
    reconcile = runs_commands.add_parser(
        "reconcile", help="end KILLED the RUNNING runs of this host whose process is gone (killed, crashed)")
    reconcile.add_argument("--experiment", action="append", help="experiment to reconcile (repeatable; default: all)")
    add_tracking_args(reconcile)
    reconcile.set_defaults(handler=_runs_reconcile)


def _runs_reconcile(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..tracking import Store, reconcile_dead_runs

    store = Store(args.tracking_uri)
    names = store.experiment_names()
    unknown = sorted(set(args.experiment or []) - set(names.values()))
    if unknown:
        raise ConfigError(f"--experiment: no experiment {', '.join(map(repr, unknown))} in {store.tracking_uri}; "
                          f"experiments there: {', '.join(sorted(names.values())) or 'none'}")
    ids = [id_ for id_, name in names.items() if not args.experiment or name in args.experiment]
    runs = reconcile_dead_runs(store, ids)
    for run in runs:
        if run.ended:
            print(f"{run.describe()} (experiment {names[run.experiment_id]!r})")
    ended, elsewhere = sum(run.ended for run in runs), sum(run.elsewhere for run in runs)
    print(f"reconciled: {ended} RUNNING run(s) ended KILLED; left RUNNING: {len(runs) - ended - elsewhere} whose "
          f"process runs, {elsewhere} of other hosts (reconcile those on their host)")
    return 0
