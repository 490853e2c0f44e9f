"""A ``train`` run's fixed cost (issue 24), this tree against another commit's, interleaved: wall time of the
whole command minus its training epochs.

The run is the issue's: ``sweepbench train --model cifar_cnn --dataset cifar10 --epochs 1 --train-subset 2000``
with MLflow's embedded SQLite store, each tree its own. The other commit's ``src/sweepbench`` is extracted with
``git archive`` into a temporary folder and run with ``PYTHONPATH`` pointing there, with this virtualenv's
packages. A first, untimed run of each tree creates its store (and, where the tree has one, its npz cache); then
each round runs both, the order alternating. Each command is a fresh process, as a user runs it, defaults and all
(system metrics included where the tree has them). Prints every run, the medians, and the fixed part after as a
fraction of before (the issue's goal: under a third). ``--floor`` first times, each in a fresh process, the parts
of such a run that no change of sweepbench removes: the imports of torch (with ``torch._dynamo``, which the first
``torch.optim`` optimizer imports) and MLflow, and the opening of a SQLite store. ``--untracked`` adds, in each
round, this tree's command with ``--no-mlflow``: the fixed part of a run that logs nothing at all, which no way of
doing the tracking (in this process or beside it) can go under. ``--beside`` adds ``tracking_beside.py``: MLflow's
side in a second process beside training, a bound on that design.

    .venv/bin/python benchmarks/train_fixed_cost.py --base c3c3567 [--rounds 3] [--floor] [--untracked] [--beside]
                                                    [--data-dir ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from engine_ab import archive_source  # noqa: E402
from fused import hardware_line  # noqa: E402

FLOOR = {
    "import torch": "import torch",
    "import torch, then the first optimizer (torch._dynamo)":
        "import torch; torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)",
    "import mlflow.entities": "import mlflow.entities",
    "import MLflow, then open a SQLite store": "import sys; from mlflow import MlflowClient; "
                                               "MlflowClient(sys.argv[1]).search_experiments(max_results=1)",
}
TRAIN = ["train", "--model", "cifar_cnn", "--dataset", "cifar10", "--epochs", "1", "--train-subset", "2000",
         "--json"]


def train_command(label: str, store: Path, data_dir: str) -> list[str]:
    """The command a label times: ``train`` logged to ``store``, with ``--no-mlflow`` (``untracked``), or the
    second-process bound (``beside``)."""
    uri = f"sqlite:///{store}/mlflow.db"
    if label == "beside":
        return [sys.executable, str(Path(__file__).resolve().parent / "tracking_beside.py"), uri, "--data-dir",
                data_dir]
    tracking = ["--no-mlflow"] if label == "untracked" else ["--tracking-uri", uri]
    return [sys.executable, "-m", "sweepbench.cli", *TRAIN, "--data-dir", data_dir, *tracking]


def run_train(source: Path, command: list[str], store: Path) -> tuple[float, float]:
    """``command`` in ``store`` with ``source`` first on the path: (wall seconds, training seconds)."""
    started = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True, cwd=store,
                          env={**os.environ, "PYTHONPATH": str(source)})
    wall = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} exited {done.returncode}:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    return wall, sum(summary["epoch_seconds"])


def print_floor(store: Path, repeats: int = 3) -> None:
    """The median wall time of each ``FLOOR`` snippet in a fresh process (the store made by an untimed run)."""
    uri = f"sqlite:///{store}/mlflow.db"
    subprocess.run([sys.executable, "-c", FLOOR["import MLflow, then open a SQLite store"], uri], check=True)
    for name, code in FLOOR.items():
        times = []
        for _ in range(repeats):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-c", code, uri], check=True)
            times.append(time.perf_counter() - started)
        print(f"floor: {name:55} {statistics.median(times):.2f} s ({', '.join(f'{t:.2f}' for t in times)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against (e.g. c3c3567)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--floor", action="store_true", help="first time the imports no change of ours removes")
    parser.add_argument("--untracked", action="store_true", help="also time this tree's command with --no-mlflow")
    parser.add_argument("--beside", action="store_true", help="also time tracking_beside.py (a second process)")
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    args.data_dir = str(Path(args.data_dir).resolve())  # each command runs in its store's folder
    print(hardware_line(torch.device("cpu")))
    with tempfile.TemporaryDirectory(prefix="sweepbench-fixed-cost-") as folder:
        if args.floor:
            print_floor(Path(folder))
        trees = {"before": archive_source(args.base, Path(folder) / "base"), "after": PROJECT_ROOT / "src"}
        trees.update({label: PROJECT_ROOT / "src" for label in ("untracked", "beside") if getattr(args, label)})
        stores = {label: Path(folder) / f"store-{label}" for label in trees}
        commands = {label: train_command(label, stores[label], args.data_dir) for label in trees}
        for label, source in trees.items():
            stores[label].mkdir()
            run_train(source, commands[label], stores[label])
        fixed: dict[str, list[float]] = {label: [] for label in trees}
        for round_index in range(args.rounds):
            order = list(trees) if round_index % 2 == 0 else list(reversed(trees))
            for label in order:
                wall, training = run_train(trees[label], commands[label], stores[label])
                fixed[label].append(wall - training)
                print(f"round {round_index + 1} {label:9} wall {wall:5.1f} s, training {training:4.2f} s, "
                      f"fixed {wall - training:5.1f} s", flush=True)
    medians = {label: statistics.median(values) for label, values in fixed.items()}
    print(f"median fixed part: before {medians['before']:.1f} s, after {medians['after']:.1f} s, "
          f"after/before {medians['after'] / medians['before']:.2f} (goal: under 0.33)")
    for label in ("untracked", "beside"):
        if label in medians:
            print(f"{label}: {medians[label]:.1f} s, {medians[label] / medians['before']:.2f} of before")


if __name__ == "__main__":
    main()
