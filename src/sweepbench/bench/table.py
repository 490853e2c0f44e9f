"""What a cell measured, and the benchmark's table: each cell against its baseline cell, and the speed-up chart."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Any, Sequence

import pandas as pd

from .. import report
from ..engine import RunResult
from ..precisions import cpu_support
from ..status import RunStatus
from .spec import BASELINE_KEYS, BenchSpec, Cell


@dataclass
class CellOutcome:
    """``status``: ``ok``, ``skipped: <reason>``, or ``<engine status>: <message>`` (failed, diverged...);
    ``figures``: the table columns measured over the completed repeats (see ``cell_figures``)."""

    cell: Cell
    status: str
    run_id: str
    figures: dict[str, Any] = field(default_factory=dict)

    def describe(self) -> str:
        """One progress line."""
        if self.figures.get("epoch_s_median") is None:
            return f"{self.cell.label}: {self.status}"
        accuracy = self.figures.get("test_accuracy")  # none for a cut cell: no repeat trained to its end
        return (f"{self.cell.label}: {self.status}, {self.figures['epoch_s_median']:.3f} s/epoch "
                f"(min {self.figures['epoch_s_min']:.3f}, max {self.figures['epoch_s_max']:.3f})"
                + ("" if accuracy is None else f", test accuracy {accuracy:.4f}"))


def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell_figures(cell: Cell, results: Sequence[RunResult], warmup_epochs: int,
                 loads: Sequence[float] = (), cut: bool = False) -> dict[str, Any]:
    """A cell's figures over its completed repeats (None where none completed), as table columns; of a ``cut``
    cell, the epoch figures of its one cut repeat.
    ``load_1m_max``: the highest 1-minute load average seen after a repeat; the benchmark alone makes it
    about the number of torch threads, so a higher figure means other work shared the cores. ``peak_memory_mb``:
    the first repeat's; on a CPU it is the process's peak so far, and the first round runs the cells in grid
    order, so a later round's repeat would read the peak of the whole first round."""
    completed = [result for result in results if result.status == RunStatus.COMPLETED]
    timed_runs = results if cut else completed  # a cut cell's one timed epoch is a figure
    timed = [result.history[warmup_epochs:] for result in timed_runs]
    epoch_medians = [statistics.median(r.epoch_seconds for r in records) for records in timed]
    reached = [r.time_to_target_seconds for r in completed if r.time_to_target_seconds is not None]
    target = cell.config.target_accuracy
    return {
        "precision_support": cpu_support(cell.config.precision) if cell.device == "cpu" else None,
        "repeats": len(completed),
        "epoch_s_median": _median_or_none(epoch_medians),
        "epoch_s_min": min(epoch_medians, default=None),
        "epoch_s_max": max(epoch_medians, default=None),
        "samples_per_s": _median_or_none([statistics.median(r.samples_per_second for r in records)
                                          for records in timed]),
        "train_s": _median_or_none([result.train_seconds for result in completed]),
        "compile_s": _median_or_none([result.compile_seconds for result in completed]),
        "target": target,
        "time_to_target_s": _median_or_none(reached),
        "target_reached": f"{len(reached)}/{len(completed)}" if target is not None and completed else None,
        "test_accuracy": _median_or_none([result.test_accuracy for result in completed]),
        "peak_memory_mb": completed[0].peak_memory_mb if completed else None,
        "load_1m_max": max(loads, default=None),
    }


def build_table(outcomes: Sequence[CellOutcome], spec: BenchSpec) -> pd.DataFrame:
    """One row per cell, in grid order, with speed-up and accuracy against each cell's baseline cell."""
    rows = [{"model": o.cell.model, **o.cell.axes, "status": o.status, **o.figures} for o in outcomes]
    return add_comparisons(pd.DataFrame(rows), spec.baseline, spec.accuracy_tolerance)


def add_comparisons(table: pd.DataFrame, baseline: dict[str, Any], tolerance: float) -> pd.DataFrame:
    """``report.add_comparisons`` over the cells (model and axes as keys): ``speedup`` (baseline median epoch
    seconds / the cell's), ``accuracy_delta`` (test accuracy minus the baseline's) and ``accuracy_flag`` (delta
    below ``-tolerance``); empty where either side has no figure (a skipped cell)."""
    figures = ["epoch_s_median", "test_accuracy"]
    table = table.astype({column: "float64" for column in figures})
    table, _ = report.add_comparisons(table, ["model", *BASELINE_KEYS], baseline,
                                      ratios=[("epoch_s_median", "speedup", True)],
                                      deltas=[("test_accuracy", "accuracy_delta")])
    table["accuracy_flag"] = [None if pd.isna(delta) else bool(delta < -tolerance)
                              for delta in table["accuracy_delta"]]
    return table


def plot_speedups(table: pd.DataFrame) -> Any:
    """``report.plot_speedups`` over the cells, labelled by the model and the axes that vary in the table."""
    axes = [axis for axis in BASELINE_KEYS if table[axis].nunique() > 1]
    return report.plot_speedups(table.rename(columns={"speedup": "epoch_s_median_speedup"}), ["model", *axes],
                                "epoch_s_median")
