"""A packed study against the same study unpacked, on the one benchmark harness (``sweepbench.bench.harness``).

A cell per pack size: 1 (one trial at a time) and the spec's pack (or ``--pack K``). Each cell is the whole study,
as a member of its own (``<name>-pack<K>``, its own SQLite storage in a temporary folder, the same budget), run by
``study run``'s engine in this process under one parent run in MLflow (experiment ``packed-<name>``, in the store
of ``--tracking-uri``, else a temporary one). The table gives each cell's wall time, finished trials per minute,
best objective and speed-up over the unpacked study, with the machine beside the figures; it is logged to the
parent run, and each cell's study run with its trials is a child of it.

    python benchmarks/packed_study.py --data-dir ../shared/data [--pack 8] [--n-trials 16] [--tracking-uri URI]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import platform
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from sweepbench.bench.harness import CellsInOrder, Parent, Published, run_harness
from sweepbench.hardware import device_name
from sweepbench.status import MlflowStatus
from sweepbench.study import StudyOutcome, configure_logging, make_job, run_study
from sweepbench.study.spec import StudySpec, load_spec
from sweepbench.tracking import Store, environment_tags, process_tags

ROOT = Path(__file__).resolve().parent.parent
log = logging.getLogger("sweepbench.benchmarks.packed_study")


@dataclass
class PackedStudy(CellsInOrder):
    """The harness instance: cells are pack sizes, a cell's outcome its study's."""

    spec: StudySpec
    packs: tuple[int, ...]
    folder: Path

    def cells(self) -> tuple[int, ...]:
        return self.packs

    def run_cell(self, pack: int, parent: Parent) -> StudyOutcome:
        name = f"{self.spec.name}-pack{pack}"
        spec = dataclasses.replace(self.spec.with_overrides(pack=pack, checkpoint_dir=str(self.folder / name)),
                                   name=name)
        job = make_job(spec, f"sqlite:///{self.folder / spec.name}.db", parent.store.tracking_uri,
                       system_metrics=False, comparison=parent.experiment)
        outcome = run_study(dataclasses.replace(job, comparison_run_id=parent.run_id))
        log.info(f"pack {pack}: {outcome.reason()} in {outcome.wall_seconds:.1f} s")
        return outcome

    def failed(self, outcome: StudyOutcome) -> bool:
        return outcome.status != MlflowStatus.FINISHED

    def publish(self, outcomes: list[StudyOutcome], parent: Parent) -> Published:
        metric = self.spec.metric_names[0]
        rows = [{"pack": outcome.job.spec.pack, "finished": outcome.tally.finished,
                 "wall_s": outcome.wall_seconds, "trials_per_min": outcome.trials_per_minute,
                 f"best_{metric}": best_value(outcome)} for outcome in outcomes]
        table = pd.DataFrame(rows)
        table["speedup"] = table["trials_per_min"] / table["trials_per_min"].iloc[0]
        metrics = {f"trials_per_min.pack{row['pack']}": row["trials_per_min"] for row in rows}
        return Published(f"packed study {self.spec.name}", table, metrics=metrics)


def best_value(outcome: StudyOutcome) -> float | None:
    """The study's best first objective, or None when no trial completed (a cell stopped by its failures)."""
    complete = outcome.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    values = [trial.values[0] for trial in complete]
    if not values:
        return None
    return max(values) if outcome.study.directions[0] == optuna.study.StudyDirection.MAXIMIZE else min(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--spec", default=str(ROOT / "studies" / "mnist_mlp_packed.toml"))
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--pack", type=int, help="the packed cell's pack (default: the spec's)")
    parser.add_argument("--n-trials", type=int, default=16)
    parser.add_argument("--tracking-uri", help="MLflow store (default: a temporary SQLite file)")
    args = parser.parse_args()
    configure_logging()
    with tempfile.TemporaryDirectory(prefix="sweepbench-packed-") as folder:
        spec = load_spec(args.spec).with_overrides(n_trials=args.n_trials, data_dir=str(Path(args.data_dir).resolve()))
        packs = (1, args.pack or spec.pack)
        store = Store(args.tracking_uri or f"sqlite:///{folder}/mlflow.db")
        experiment = f"packed-{spec.name}"
        experiment_id = store.experiment(experiment, f"{spec.name}: packs {packs[1]} and 1 on the same budget")
        tags = {**environment_tags(torch.device("cpu")), **process_tags(), "benchmark": "packed_study"}
        run_id = store.start_run(experiment_id, f"packed-{spec.name}", "bench", tags)
        print(f"machine: {device_name(torch.device('cpu'))}, {os.cpu_count()} CPUs; torch {torch.__version__}, "
              f"Python {platform.python_version()}; {Path(args.spec).name}, {args.n_trials} trials", flush=True)
        result = run_harness(PackedStudy(spec, packs, Path(folder)), Parent(store, experiment, experiment_id, run_id))
        print(result.published.text("md"))
        print(f"MLflow parent run {run_id} ({result.status}) in experiment {experiment!r} at {store.tracking_uri}")
        if result.status != MlflowStatus.FINISHED:
            sys.exit(1)


if __name__ == "__main__":
    main()
