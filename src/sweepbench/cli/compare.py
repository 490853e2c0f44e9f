"""``study compare`` (run a sampler comparison) and ``study compare-report`` (its report, from the stores)."""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

from ..config import DEVICES, PRECISIONS, parse_overrides
from ..status import MlflowStatus
from .options import add_data_args, add_set_arg, add_tracking_args, split_list, write_output

FORMATS = ("md", "csv", "json", "html")


def add_compare_parsers(study_commands: argparse._SubParsersAction) -> None:
    compare = study_commands.add_parser(
        "compare", help="compare samplers over paired seeds: one study per sampler x seed, then the report")
    compare.add_argument("spec", metavar="FILE", help="study spec, e.g. studies/mnist_mlp_compare.toml (its "
                                                      "[compare] table gives samplers, seeds and target)")
    compare.add_argument("--samplers", help="comma-separated, at least two of tpe, random, cmaes, gp "
                                            "(default: the spec's compare.samplers, else all four)")
    compare.add_argument("--seeds", type=int, help="paired seeds per sampler, from the spec's sampler.seed "
                                                   "(default: compare.seeds, else 10)")
    compare.add_argument("--target", type=float, help="objective value to count trials and seconds to "
                                                      "(default: compare.target, else the median final best)")
    compare.add_argument("--n-trials", type=int, help="finished trials per study")
    compare.add_argument("--pack", type=int, help="trials each worker trains at once, fused")
    compare.add_argument("--workers", type=int, default=1, help="local worker processes per study")
    compare.add_argument("--storage", help="one Optuna storage URL for every member study (default: one SQLite "
                                           "file each in mlruns/studies/)")
    compare.add_argument("--heartbeat-interval", type=int, help="seconds between trial heartbeats (default: 10)")
    compare.add_argument("--device", help=f"override the spec's device: {', '.join(DEVICES)}")
    compare.add_argument("--precision", help=f"override the spec's precision: {', '.join(PRECISIONS)}")
    _add_output_args(compare)
    add_data_args(compare)
    add_tracking_args(compare)
    add_set_arg(compare)
    compare.set_defaults(handler=_compare)
    report = study_commands.add_parser("compare-report",
                                       help="a comparison's table, verdicts and curves, rebuilt from the stores")
    report.add_argument("name", help="comparison name (the spec's name)")
    report.add_argument("--storage", help="the Optuna storage the member studies are in (default: their SQLite "
                                          "files in mlruns/studies/)")
    report.add_argument("--curves", metavar="FILE.png", help="also write the anytime curves here")
    _add_output_args(report)
    add_tracking_args(report)
    report.set_defaults(handler=_compare_report)


def _add_output_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="md", help=f"{', '.join(FORMATS)} (default: md, with the verdicts)")
    parser.add_argument("--output", help="file to write the table to (default: stdout)")


def _check_output(args: argparse.Namespace) -> None:
    from ..paths import output_file
    from ..validators import choice

    choice("--format", args.format, FORMATS)
    output_file("--output", args.output)
    if getattr(args, "curves", None):
        output_file("--curves", args.curves)


def _compare(args: argparse.Namespace) -> int:
    from ..compare.run import render, run_comparison
    from ..compare.spec import load_comparison
    from ..study import configure_logging

    _check_output(args)
    comparison = load_comparison(args.spec, split_list(args.samplers), args.seeds, args.target)
    changes = {"device": args.device, "precision": args.precision, "data_dir": args.data_dir,
               "download": args.download or None, **parse_overrides(args.set)}
    study = comparison.study.with_overrides(n_trials=args.n_trials, pack=args.pack, **changes)
    comparison = dataclasses.replace(comparison, study=study)
    configure_logging()
    print(comparison.describe(), flush=True)
    outcome = run_comparison(comparison, Path(args.spec).read_text(), args.storage, args.tracking_uri,
                             args.workers, args.heartbeat_interval)
    if outcome.report is not None:
        _emit(render(outcome.report, args.format), args.output)
    print(f"comparison {comparison.name}: {outcome.status} in {outcome.wall_seconds:.0f} s; MLflow parent run "
          f"{outcome.run_id}", file=sys.stderr)
    return 0 if outcome.status == MlflowStatus.FINISHED else 1


def _compare_report(args: argparse.Namespace) -> int:
    from ..compare.report import curves_figure
    from ..compare.run import render, report_from_store

    _check_output(args)
    report, results = report_from_store(args.name, args.tracking_uri, args.storage)
    if args.curves:
        figure = curves_figure(report.comparison, results, report.paired_seeds)
        Path(args.curves).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(args.curves, dpi=100)
    _emit(render(report, args.format), args.output)
    return 0


def _emit(text: str, output: str | None) -> None:
    if output:
        write_output(output, text)
    else:
        print(text)
