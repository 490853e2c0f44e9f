"""Many workers on one PostgreSQL study, direct or through Optuna's gRPC storage proxy (issue 20): the peak of
connections the study's database holds (``pg_stat_activity``) and finished trials per minute.

Each mode gets a fresh database on the PostgreSQL at ``--postgres`` and a fresh MLflow server (SQLite backend)
in a temporary folder. The study's head (``study run --workers K``) and ``study worker --workers K`` commands on
the same machine make ``--workers`` worker processes in all; through the proxy, every worker and the head give
``--storage grpc://`` and only ``storage serve`` opens connections to the database. Trials are tiny (an MLP on
the synthetic dataset, one epoch) so that the storage, not training, is what the workers wait on; on 2 cores,
32 processes also wait on each other, which both modes share. The poll samples every 0.1 s from a connection to
another database, not counted.

    python benchmarks/many_workers.py [--workers 8,16,32] [--per-command 8] [--trials-per-worker 4]
                                      [--postgres postgresql://postgres@127.0.0.1:5432]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import optuna
import psycopg2
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused import hardware_line  # noqa: E402
from tests.conftest import mlflow_server, storage_proxy  # noqa: E402

from sweepbench.study import normalize_storage_url  # noqa: E402

SPEC = """
name = "many-workers"
model = "mnist_mlp"
dataset = "synthetic"
[train]
epochs = 1
train_subset = 512
val_size = 256
batch_size = 128
device = "cpu"
[sampler]
name = "random"
seed = 0
[pruner]
name = "none"
[budget]
n_trials = {n_trials}
[search."model_kwargs.hidden_size"]
type = "int"
low = 16
high = 64
[search.lr]
type = "float"
low = 1e-3
high = 1e-1
log = true
"""


class ConnectionPeak:
    """Samples ``pg_stat_activity`` for ``database`` every 0.1 s in a thread; ``peak`` is the most seen."""

    def __init__(self, server: str, database: str) -> None:
        self.server, self.database, self.peak = server, database, 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)

    def sample(self) -> None:
        with contextlib.closing(psycopg2.connect(f"{self.server}/postgres")) as connection:
            connection.autocommit = True
            with connection.cursor() as cursor:
                while not self.stop.wait(0.1):
                    cursor.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.database,))
                    self.peak = max(self.peak, cursor.fetchone()[0])

    def __enter__(self) -> ConnectionPeak:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        self.thread.join()


@contextlib.contextmanager
def fresh_database(server: str):
    name = f"sweepbench_many_{uuid.uuid4().hex[:10]}"
    with contextlib.closing(psycopg2.connect(f"{server}/postgres")) as admin:
        admin.autocommit = True
        with admin.cursor() as cursor:
            cursor.execute(f"CREATE DATABASE {name}")
        try:
            yield name
        finally:
            with admin.cursor() as cursor:
                cursor.execute(f"DROP DATABASE {name} WITH (FORCE)")


def run_mode(mode: str, args: argparse.Namespace, folder: Path) -> str:
    with fresh_database(args.postgres) as database, mlflow_server(folder) as tracking:
        url = normalize_storage_url(f"{args.postgres}/{database}")
        with contextlib.ExitStack() as stack:
            storage = stack.enter_context(storage_proxy(url, folder)) if mode == "proxy" else url
            peak = stack.enter_context(ConnectionPeak(args.postgres, database))
            started = time.perf_counter()
            commands = run_commands(folder, storage, tracking, args)
            wall = time.perf_counter() - started
        failed = [index for index, (_, code) in enumerate(commands) if code != 0]
        if failed:
            kept = Path(tempfile.mkdtemp(prefix=f"sweepbench-many-{mode}-failed-"))
            for log in folder.glob("command-*.log"):
                shutil.copy(log, kept)
            lines = (folder / f"command-{failed[0]}.log").read_text().splitlines()
            said = [line for line in lines if not line.startswith(("trial ", "  "))]
            sys.exit(f"{mode}: {commands[failed[0]][0]} failed (every command's log: {kept}):\n"
                     + "\n".join(said[-40:]))
        study = optuna.load_study(study_name="many-workers", storage=url)
        finished = [trial for trial in study.trials if trial.state.is_finished() and trial.values]
        if not finished:
            sys.exit(f"{mode}: no trial finished")
        first = min(trial.datetime_start for trial in finished)
        last = max(trial.datetime_complete for trial in finished)
        per_minute = 60 * len(finished) / (last - first).total_seconds()
        return (f"{mode:6} peak {peak.peak:3d} database connections, {per_minute:6.1f} finished trials/min "
                f"({len(finished)} trials, first start to last end), wall {wall:5.1f} s")


def run_commands(folder: Path, storage: str, tracking: str, args: argparse.Namespace) -> list[tuple[str, int]]:
    """The head, then ``study worker`` commands until ``--workers`` processes in all; their exit statuses."""
    spec = folder / "many-workers.toml"
    spec.write_text(SPEC.format(n_trials=args.n_trials))
    common = ["--storage", storage, "--tracking-uri", tracking, "--workers", str(args.per_command)]
    commands = [["study", "run", str(spec), *common, "--no-system-metrics"]]
    commands += [["study", "worker", str(spec), *common]] * (args.workers_total // args.per_command - 1)
    processes = []
    for index, command in enumerate(commands):
        with (folder / f"command-{index}.log").open("w") as log:
            processes.append(subprocess.Popen([sys.executable, "-m", "sweepbench.cli", *command], cwd=folder,
                                              stdout=log, stderr=subprocess.STDOUT))
    return [(" ".join(command[:2]), process.wait()) for command, process in zip(commands, processes)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", default="32", help="worker processes in all, comma-separated for several runs")
    parser.add_argument("--per-command", type=int, default=8, help="worker processes per command")
    parser.add_argument("--trials-per-worker", type=int, default=4, help="the study's trials: this many a worker")
    parser.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432",
                        help="the server (no database): a fresh database is made per mode and dropped")
    args = parser.parse_args()
    print(f"{hardware_line(torch.device('cpu'))}, {os.cpu_count()} CPUs; Optuna {optuna.__version__}; "
          f"{args.per_command} workers per command, {args.trials_per_worker} trials per worker", flush=True)
    for workers in (int(count) for count in args.workers.split(",")):
        run = argparse.Namespace(**vars(args), workers_total=workers, n_trials=workers * args.trials_per_worker)
        for mode in ("direct", "proxy"):
            with tempfile.TemporaryDirectory(prefix=f"sweepbench-many-{mode}-") as folder:
                print(f"{workers:3d} workers, {run.n_trials} trials: {run_mode(mode, run, Path(folder))}",
                      flush=True)


if __name__ == "__main__":
    main()
