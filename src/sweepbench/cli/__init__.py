"""The ``sweepbench`` command: argument parsing and printing only; the work lives in the modules.

- ``options``: the run settings as flags (one per ``RunConfig`` field) and ``--set``, shared options;
- ``train``: ``train``, ``models``, ``datasets``;
- ``runs``: ``ui``, ``report``, ``study``, ``bench``.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import warnings
from typing import Sequence

from ..config import ConfigError, SettingWarning
from ..data import DataNotFoundError
from ..engine import Terminated, interrupt_message, sigterm_interrupts
from .options import config_from_args
from .runs import add_bench_parser, add_report_parser, add_study_parser, add_ui_parser
from .train import add_train_parser, format_summary, show_datasets, show_models

__all__ = ["build_parser", "config_from_args", "format_summary", "main"]
PYTHON_SHOW_WARNING = warnings.showwarning


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweepbench", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    add_train_parser(commands)
    commands.add_parser("models", help="list registered models").set_defaults(handler=show_models)
    commands.add_parser("datasets", help="list registered datasets").set_defaults(handler=show_datasets)
    add_ui_parser(commands)
    add_report_parser(commands)
    add_study_parser(commands)
    add_bench_parser(commands)
    return parser


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Setting warnings as one ``sweepbench: warning:`` line; others as Python shows them."""
    if issubclass(category, SettingWarning):
        print(f"sweepbench: warning: {message}", file=sys.stderr)
    else:
        PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.showwarning = _show_warning
    for chatty in ("mlflow.store.db.utils", "alembic.runtime.migration"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        with sigterm_interrupts():
            if hasattr(args, "tracking_uri") and not getattr(args, "no_mlflow", False):
                from ..tracking.connect import check_tracking_uri

                args.tracking_uri = check_tracking_uri(args.tracking_uri, must_exist=args.command == "report")
            return args.handler(args)
    except (ConfigError, DataNotFoundError) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"sweepbench: {interrupt_message(interrupt)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)


