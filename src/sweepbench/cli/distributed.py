"""Studies across many machines: ``study worker`` joins a running study from another machine (a Slurm array
task, a Kubernetes Job), ``storage serve`` runs Optuna's gRPC storage proxy in front of the study's database."""

from __future__ import annotations

import argparse
import sys

from ..config import parse_overrides
from .options import add_data_args, add_set_arg, add_tracking_args

DEFAULT_PROXY_PORT = 13000  # Optuna's own default
DEFAULT_CONNECTIONS, MAX_CONNECTIONS = 4, 64  # the proxy's connections to the database
DEFAULT_WAIT_SECONDS = 300


def add_worker_parser(study_commands: argparse._SubParsersAction) -> None:
    worker = study_commands.add_parser(
        "worker", help="join a running study from this machine: run its trials until it is settled (no parent "
                       "run of its own; the study's `study run` makes and ends it)")
    worker.add_argument("spec", metavar="FILE", help="the study's spec, as its `study run` was given it")
    worker.add_argument("--storage", required=True,
                        help="the study's shared storage: postgresql://<user>@<host>/<database>, mysql://..., or "
                             "grpc://<host>:<port> (sweepbench storage serve)")
    worker.add_argument("--workers", type=int, default=1, help="local worker processes (default: 1)")
    worker.add_argument("--wait", type=float, default=DEFAULT_WAIT_SECONDS,
                        help=f"seconds to wait for the study to be started (default: {DEFAULT_WAIT_SECONDS})")
    worker.add_argument("--device", help="override the spec's device, as the study's `study run` did")
    worker.add_argument("--precision", help="override the spec's precision, as the study's `study run` did")
    add_data_args(worker)
    add_tracking_args(worker)
    add_set_arg(worker)
    worker.set_defaults(handler=_study_worker)


def _study_worker(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..study import configure_logging, make_job, redact
    from ..study.joining import StudyNotStarted, join_study
    from ..study.processes import WorkersFailed
    from ..study.spec import load_spec

    if not args.wait >= 0:
        raise ConfigError(f"--wait: {args.wait!r} is out of range; it must be a number of seconds >= 0")
    changes = {"device": args.device, "precision": args.precision, "data_dir": args.data_dir,
               "download": args.download or None, **parse_overrides(args.set)}
    spec = load_spec(args.spec).with_overrides(**changes)
    job = make_job(spec, args.storage, args.tracking_uri, args.workers, system_metrics=False)
    configure_logging()
    print(f"study {spec.name}: worker for storage {redact(job.storage_url)}, tracking {job.tracking_uri}",
          flush=True)
    try:
        tally = join_study(job, args.wait)
    except (StudyNotStarted, WorkersFailed) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 1
    print(f"study {spec.name}: {tally.finished} of {spec.target_trials()} trials finished, {tally.failed} failed, "
          f"{tally.running} running; this worker is done")
    return 1 if tally.failed >= spec.max_failed_trials and tally.finished < spec.target_trials() else 0


def add_storage_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("storage", help="the studies' shared storage")
    storage_commands = parser.add_subparsers(dest="storage_command", required=True)
    serve = storage_commands.add_parser(
        "serve", help="serve a study database through Optuna's gRPC storage proxy: workers give "
                      "--storage grpc://HOST:PORT and hold no database connection of their own")
    serve.add_argument("--storage", required=True,
                       help="the database: postgresql://<user>@<host>/<database>, mysql://... or sqlite:///<file>")
    serve.add_argument("--host", default="127.0.0.1",
                       help="interface to listen on (default: 127.0.0.1; 0.0.0.0 for workers on other machines)")
    serve.add_argument("--port", type=int, default=DEFAULT_PROXY_PORT, help=f"default: {DEFAULT_PROXY_PORT}")
    serve.add_argument("--connections", type=int, default=DEFAULT_CONNECTIONS,
                       help=f"most database connections the proxy holds, whatever the workers (default: "
                            f"{DEFAULT_CONNECTIONS})")
    serve.set_defaults(handler=_storage_serve)


def _storage_serve(args: argparse.Namespace) -> int:
    from ..config import ConfigError
    from ..study import configure_logging
    from ..study.job import check_storage_url
    from ..study.storage.proxy import is_proxy, serve
    from ..tracking.connect import check_listen_address

    if not 1 <= args.connections <= MAX_CONNECTIONS:
        raise ConfigError(f"--connections: {args.connections} is out of range; it must be from 1 to "
                          f"{MAX_CONNECTIONS}")
    if is_proxy(args.storage):
        raise ConfigError("--storage: a gRPC proxy serves a database, not another proxy; give the database's URL "
                          "(postgresql://, mysql:// or sqlite:///)")
    storage_url = check_storage_url(args.storage)
    check_listen_address(args.host, args.port)
    configure_logging()
    try:
        serve(storage_url, args.host, args.port, args.connections)
    except KeyboardInterrupt:
        print("storage proxy stopped", file=sys.stderr)
    return 0
