"""A packed study against the same study unpacked, in one command, on the same budget.

Runs ``studies/mnist_mlp_packed.toml`` (or ``--spec``) twice, each in a fresh temporary project (its own Optuna
storage and MLflow store): once with ``--pack 1`` (one trial at a time) and once with the spec's pack (or
``--pack K``). Prints the wall time, finished trials per minute and best validation accuracy of each, with the
machine beside the figures.

    python benchmarks/packed_study.py --data-dir ../shared/data [--pack 8] [--n-trials 16]
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna
import torch

from sweepbench.hardware import device_name
from sweepbench.study.spec import load_spec

ROOT = Path(__file__).resolve().parent.parent


def run_study(spec: Path, pack: int, args: argparse.Namespace) -> tuple[float, optuna.Study]:
    project = Path(tempfile.mkdtemp(prefix=f"sweepbench-pack{pack}-"))
    command = [sys.executable, "-m", "sweepbench.cli", "study", "run", str(spec), "--pack", str(pack),
               "--data-dir", str(Path(args.data_dir).resolve()), "--n-trials", str(args.n_trials)]
    started = time.perf_counter()
    completed = subprocess.run(command, cwd=project, capture_output=True, text=True,
                               env={**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{project}/mlruns/mlflow.db"})
    wall = time.perf_counter() - started
    if completed.returncode != 0:
        sys.exit(f"study run --pack {pack} failed:\n{completed.stderr}")
    name = load_spec(spec).name
    return wall, optuna.load_study(study_name=name, storage=f"sqlite:///{project}/mlruns/studies/{name}.db")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spec", default=str(ROOT / "studies" / "mnist_mlp_packed.toml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--pack", type=int, help="the packed run's pack (default: the spec's)")
    parser.add_argument("--n-trials", type=int, default=16)
    args = parser.parse_args()
    spec = Path(args.spec).resolve()
    pack = args.pack or load_spec(spec).pack
    print(f"machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
          f"Python {platform.python_version()}; {spec.name}, {args.n_trials} trials")
    for label, size in (("unpacked", 1), (f"pack {pack}", pack)):
        wall, study = run_study(spec, size, args)
        finished = [trial for trial in study.trials if trial.state.is_finished() and trial.values]
        print(f"{label:10} wall {wall:6.1f} s, {60 * len(finished) / wall:5.1f} finished trials/min, "
              f"best val_accuracy {study.best_value:.4f} ({len(finished)} trials)")


if __name__ == "__main__":
    main()
