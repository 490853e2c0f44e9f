"""The ``sweepbench`` command: argument parsing and printing only; the work lives in the modules.

- ``options``: the run settings as flags (one per ``RunConfig`` field) and ``--set``, shared options;
- ``train``: ``train``, ``models``, ``datasets``;
- ``runs``: ``ui``, ``report``, ``study``, ``bench``, ``runs reconcile``.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import warnings
from typing import Sequence

from ..config import ConfigError, SettingWarning
from ..data import DataNotFoundError
from ..engine import Terminated, interrupt_message, sigterm_interrupts
from ..engine.checkpoint import DiskFullError
from ..retry import PermanentError, ServiceUnavailable, causes
from .distributed import add_storage_parser
from .options import config_from_args
from .runs import add_bench_parser, add_report_parser, add_runs_parser, add_study_parser, add_ui_parser
from .train import add_train_parser, format_summary, show_datasets, show_models

__all__ = ["build_parser", "config_from_args", "format_summary", "main"]
PYTHON_SHOW_WARNING = warnings.showwarning
# mlflow.store.db.utils logs each database error with its traceback (a wall of lines) and then raises it again
CHATTY_LOGGERS = {"mlflow.store.db.utils": logging.CRITICAL, "alembic.runtime.migration": logging.WARNING}
SQLITE_FULL = "database or disk is full"  # SQLite's error (SQLITE_FULL) when its file cannot grow


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
    add_runs_parser(commands)
    add_storage_parser(commands)
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
    for chatty, level in CHATTY_LOGGERS.items():
        logging.getLogger(chatty).setLevel(level)
    try:
        with sigterm_interrupts():
            if hasattr(args, "tracking_uri") and not getattr(args, "no_mlflow", False):
                from ..tracking.connect import check_tracking_uri

                args.tracking_uri = check_tracking_uri(args.tracking_uri,
                                                       must_exist=args.command in ("report", "runs")
                                                       or getattr(args, "study_command", "") == "compare-report")
            return args.handler(args)
    except (ConfigError, DataNotFoundError) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        print(f"sweepbench: {interrupt_message(interrupt)}", file=sys.stderr)
        return 128 + (signal.SIGTERM if isinstance(interrupt, Terminated) else signal.SIGINT)
    except BrokenPipeError:
        _silence_stdout()
        return 128 + signal.SIGPIPE
    except (ServiceUnavailable, PermanentError) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:
        message = disk_full_message(exc, getattr(args, "tracking_uri", None))
        if message is None:
            raise
        print(f"sweepbench: error: {message}", file=sys.stderr)
        return 1


def _silence_stdout() -> None:
    """After the reader of stdout went away (``| head``): what is still buffered goes nowhere, quietly, instead
    of into a BrokenPipeError as the interpreter exits."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())


def disk_full_message(error: BaseException, tracking_uri: str | None) -> str | None:
    """One line for an error a full disk caused, else None: a checkpoint's ``DiskFullError``, and SQLite's
    "database or disk is full" from an MLflow store, which then could not record the run's end either."""
    chain = causes(error)
    checkpoint = next((str(cause) for cause in chain if isinstance(cause, DiskFullError)), None)
    if not any(SQLITE_FULL in str(cause) for cause in chain):
        return checkpoint
    store = (f"the MLflow store {tracking_uri} could not be written ({SQLITE_FULL}), so its run stays RUNNING "
             f"until `sweepbench runs reconcile` (or the next `sweepbench train`) ends it once there is space")
    return f"{checkpoint}; {store}" if checkpoint else f"disk full: {store}"
