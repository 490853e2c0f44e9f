"""Running a benchmark on this machine: each cell's repeats through the engine, and its runs in MLflow through
the tracking layer."""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from ..config import ConfigError
from ..data import DataNotFoundError
from ..engine import Callback, EpochRecord, RunResult, StopTraining, TrainContext, device_name, resolve_device, train
from ..engine.interrupts import uninterrupted
from ..precisions import PRECISIONS
from ..status import MlflowStatus, RunStatus, mlflow_status
from ..steps import check_step_device
from ..tracking import (MlflowLogger, PausedWhileTimed, Store, SystemMetrics, config_params, config_tags,
                        environment_tags, process_tags, start_system_metrics)
from .harness import Parent, Published, run_harness
from .spec import BenchSpec, Cell
from .table import CellOutcome, build_table, cell_figures, plot_speedups

log = logging.getLogger(__name__)

CUT = "cut"  # how the status of a cell ``CellBudget`` stopped begins


def skip_reason(precision: str) -> str | None:
    """Why a device/precision pair cannot run on this machine, or None when it can."""
    device_type, dtype = precision.split("/")
    try:
        device = resolve_device(device_type)
    except ConfigError:
        return f"{device_type.upper()} not available"
    return PRECISIONS.get(dtype).unsupported(device)


def cell_skip_reason(cell: Cell) -> str | None:
    """Why a cell cannot run here: its device/precision pair (``skip_reason``), settings that cannot train
    together, or a step its device does not have; None when it can run."""
    reason = skip_reason(cell.precision) or cell.refused
    if reason is None:
        try:
            check_step_device(cell.step, cell.device)
        except ConfigError as refusal:
            reason = str(refusal)
    return reason


def start_cell_run(parent: Parent, cell: Cell, tags: dict[str, str]) -> str:
    """The cell's run, with the tags of the process that writes it: a cell stays open across the rounds, and
    should this process be killed, ``sweepbench runs reconcile`` ends the run KILLED."""
    tags = {**_cell_tags(cell), **process_tags(), **tags}
    return parent.store.start_run(parent.experiment_id, cell.label, "cell", tags, config_params(cell.config),
                                  parent.run_id)


def _cell_tags(cell: Cell) -> dict[str, str]:
    """The run schema's identity tags for a cell, plus which cell it is."""
    return {**config_tags(cell.config), "device": cell.device, "benchmark_cell": cell.label,
            "bench_precision": cell.precision, "compile": str(cell.compile), "step": cell.step}


class CellBudget(Callback):
    """Cuts a cell whose repeats are projected past ``budget`` seconds, after its first timed epoch (of its first
    repeat): the time spent so far, plus that epoch's training and evaluation for every epoch left, plus for
    every repeat left what this one spent outside its epochs (building a compiled step, say). A quick
    benchmark then keeps its stated time on a CPU where a cell is many times slower (emulated bf16), and the cell
    is reported as cut, with its projection and its one timed epoch, instead of silently taking the time."""

    def __init__(self, budget: float, warmup_epochs: int, repeats: int) -> None:
        self.budget, self.warmup_epochs, self.repeats = budget, warmup_epochs, repeats
        self.projected: float | None = None

    def on_train_start(self, context: TrainContext) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, context: TrainContext, record: EpochRecord) -> None:
        if record.epoch != self.warmup_epochs + 1:
            return
        epochs, elapsed = context.config.epochs, time.perf_counter() - self.started
        fixed = elapsed - sum(r.epoch_seconds + r.eval_seconds for r in context.history)  # a compile, say
        left = epochs * self.repeats - record.epoch
        projected = elapsed + left * (record.epoch_seconds + record.eval_seconds) + (self.repeats - 1) * fixed
        if projected > self.budget:
            self.projected = projected
            raise StopTraining(f"{CUT}: projected {projected:.0f} s for {self.repeats} repeat(s) of {epochs} "
                               f"epochs, past the cell budget of {self.budget:g} s", status=RunStatus.STOPPED)


class CellRun:
    """One cell of the matrix across the benchmark's rounds: its MLflow run (a child of the parent's, started at
    once), its repeats so far, and its outcome once it is done (``outcome``). A cell that cannot run here is done
    at once, recorded as skipped."""

    def __init__(self, cell: Cell, spec: BenchSpec, parent: Parent, system: SystemMetrics | None) -> None:
        self.cell, self.spec, self.parent, self.system = cell, spec, parent, system
        self.results: list[RunResult] = []
        self.loads: list[float] = []  # the 1-minute load average after each repeat: other work shows there
        self.budget = (None if spec.cell_budget_seconds is None
                       else CellBudget(spec.cell_budget_seconds, spec.warmup_epochs, spec.repeats))
        self.outcome: CellOutcome | None = None
        reason = cell_skip_reason(cell)
        hardware = {} if reason else environment_tags(resolve_device(cell.device))
        self.run_id = start_cell_run(parent, cell, hardware)
        if reason is not None:
            self.outcome = CellOutcome(cell, f"skipped: {reason}", self.run_id,
                                       cell_figures(cell, [], spec.warmup_epochs))
            parent.store.end_run(self.run_id, MlflowStatus.KILLED, {"status": self.outcome.status, "skipped": reason})

    def run_repeat(self, repeat: int) -> None:
        """Trains repeat ``repeat`` (from 1, seed ``seed + repeat - 1``); the cell is done after its last repeat
        or one that did not complete. A failing repeat (a crash inside ``torch.compile``, say) fails the cell and
        the benchmark goes on; a ``ConfigError`` or a missing dataset is a mistake in the spec or the setup, and
        is raised once the cell's run is ended FAILED."""
        try:
            result = train(self.cell.config.replace(seed=self.cell.config.seed + repeat - 1), self._callbacks(repeat))
        except Exception as exc:
            self._end(CellOutcome(self.cell, f"failed: {type(exc).__name__}: {exc}", self.run_id,
                                  cell_figures(self.cell, [], self.spec.warmup_epochs)), MlflowStatus.FAILED)
            if isinstance(exc, (ConfigError, DataNotFoundError)):
                raise
            return
        result.model = None  # not a figure: held, every repeat's would stay in (GPU) memory to the end, and in
        self.results.append(result)  # the peak memory of the cells after it
        self.loads.append(os.getloadavg()[0])
        if result.status != RunStatus.COMPLETED or repeat == self.spec.repeats:
            self._finish()

    def _callbacks(self, repeat: int) -> list[Callback]:
        logger = MlflowLogger(self.parent.experiment, self.parent.store.tracking_uri,
                              f"{self.cell.label} repeat {repeat}", self.run_id,
                              tags={"repeat": str(repeat), "benchmark_cell": self.cell.label},
                              log_model=False, log_artifacts=False, kind="repeat")
        callbacks: list[Callback] = [logger, self.budget] if self.budget is not None and repeat == 1 else [logger]
        if self.system is not None:  # first: stopped before the warm-up's last record is logged
            callbacks.insert(0, PausedWhileTimed(self.system, self.spec.warmup_epochs))
        return callbacks

    def _finish(self) -> None:
        """The cell's figures over its repeats, logged on its run, which ends with the last repeat's status."""
        last = self.results[-1]
        status = "ok" if last.status == RunStatus.COMPLETED else f"{last.status}: {last.message}"
        was_cut = self.budget is not None and self.budget.projected is not None
        figures = cell_figures(self.cell, self.results, self.spec.warmup_epochs, self.loads, cut=was_cut)
        if was_cut:
            status, figures["projected_s"] = last.message, self.budget.projected
        outcome = CellOutcome(self.cell, status, self.run_id, figures)
        self.parent.store.log(self.run_id, metrics=_finite(outcome.figures))
        self._end(outcome, mlflow_status(last.status))

    def _end(self, outcome: CellOutcome, status: str) -> None:
        self.parent.store.end_run(self.run_id, status, {"status": outcome.status})
        self.outcome = outcome

    def stop(self, reason: str) -> None:
        """Ends the run of a cell that is not done, KILLED, when the benchmark stops before it (Ctrl-C, an
        error in another cell), with its figures over the repeats it finished: they are not lost."""
        if self.outcome is not None:
            return
        status = f"{RunStatus.KILLED}: {reason} after {len(self.results)}/{self.spec.repeats} repeat(s)"
        outcome = CellOutcome(self.cell, status, self.run_id,
                              cell_figures(self.cell, self.results, self.spec.warmup_epochs, self.loads))
        self.parent.store.log(self.run_id, metrics=_finite(outcome.figures))
        self._end(outcome, MlflowStatus.KILLED)


RoundHook = Callable[[int, int, int], None]  # (round, rounds, cells in it), as a round starts


def run_cells(cells: Sequence[Cell], spec: BenchSpec, parent: Parent, system: SystemMetrics | None = None,
              on_cell: Callable[[CellOutcome], None] | None = None,
              on_round: RoundHook | None = None) -> list[CellOutcome]:
    """Runs the cells' repeats in rounds, repeat r of every cell before repeat r + 1 of any, under runs that are
    children of ``parent``'s; ``on_cell`` sees each cell's outcome once it is done (a skipped cell's at once, a
    cut or failed one's in its round, the others' in the last), ``on_round`` each round as it starts. Returns
    the outcomes in the cells' order. Interleaved, a slow phase of the machine (benchmarks/RESULTS.md: a VM can
    run a third slower for tens of seconds) falls on one repeat of several cells rather than on every repeat of
    one cell, and the median of three or more repeats leaves it out. ``system``, the parent's system metrics
    monitor, is paused while an epoch is timed. On Ctrl-C or any error raised out of a cell (a mistake in the
    spec, say), every cell not done ends KILLED (``CellRun.stop``) and the exception goes on."""
    runs: list[CellRun] = []
    try:
        for cell in cells:
            runs.append(CellRun(cell, spec, parent, system))
            _announce(runs[-1], on_cell)
        for repeat in range(1, spec.repeats + 1):
            left = [run for run in runs if run.outcome is None]
            if left and on_round is not None:
                on_round(repeat, spec.repeats, len(left))
            for run in left:
                run.run_repeat(repeat)
                _announce(run, on_cell)
    except KeyboardInterrupt:
        _stop(runs, "interrupted")
        raise
    except Exception as exc:
        _stop(runs, f"the benchmark stopped ({type(exc).__name__})")
        raise
    return [run.outcome for run in runs]


def _stop(runs: Sequence[CellRun], reason: str) -> None:
    """``CellRun.stop`` of every run, each whatever the others' did, and none cut short by a second Ctrl-C."""
    with uninterrupted():
        for run in runs:
            try:
                run.stop(reason)
            except Exception as exc:  # the store may be what stopped the benchmark; the next run may still end
                log.warning(f"{run.cell.label}: its run could not be ended ({type(exc).__name__}: {exc}); "
                            "`sweepbench runs reconcile` ends it once this process is gone")


def _announce(run: CellRun, on_cell: Callable[[CellOutcome], None] | None) -> None:
    if run.outcome is not None and on_cell is not None:
        on_cell(run.outcome)


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (skipped cells have none), as metrics to log."""
    return {key: value for key, value in values.items() if isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


# ---- the benchmark ------------------------------------------------------------------------------------------

@dataclass
class BenchReport:
    spec: BenchSpec
    outcomes: list[CellOutcome]
    table: pd.DataFrame
    parent_run_id: str
    experiment: str
    experiment_id: str
    tracking_uri: str

    @property
    def failed(self) -> list[CellOutcome]:
        """Cells that broke: neither ok, skipped (cannot run here) nor cut (its budget stopped it, by design)."""
        return [o for o in self.outcomes if o.status != "ok" and not o.status.startswith(("skipped", CUT))]


def _parent_tags(spec: BenchSpec) -> dict[str, str]:
    """The parent run's tags, its process's among them: ``runs reconcile`` ends it, as its cells, once the
    process is gone."""
    tags = {**environment_tags(torch.device("cpu")), **process_tags(), "benchmark": spec.name,
            "repeats": str(spec.repeats), "warmup_epochs": str(spec.warmup_epochs), "baseline": str(spec.baseline),
            "accuracy_tolerance": str(spec.accuracy_tolerance), "torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        tags["cuda_device_name"] = device_name(torch.device("cuda"))
    return tags


@dataclass
class DeviceMatrix:
    """The device x precision matrix as an instance of the one benchmark harness (``harness``): a cell is a
    model/device/precision/loader/compile/step/batch combination and its repeats; the table compares each with
    its baseline cell. A failed cell is in the table and the command's exit status; the parent run still
    finishes."""

    spec: BenchSpec
    system: SystemMetrics | None = None  # the parent's system metrics, paused while an epoch is timed
    on_round: RoundHook | None = None

    def cells(self) -> list[Cell]:
        return self.spec.cells

    def run_cells(self, parent: Parent, on_cell: Callable[[CellOutcome], None] | None = None) -> list[CellOutcome]:
        """Every cell, their repeats interleaved in rounds (``run_cells``)."""
        return run_cells(self.cells(), self.spec, parent, self.system, on_cell, self.on_round)

    def failed(self, outcome: CellOutcome) -> bool:
        return False

    def publish(self, outcomes: list[CellOutcome], parent: Parent) -> Published:
        """The comparisons on each cell run; the table, chart and spec for the parent."""
        spec, table = self.spec, build_table(outcomes, self.spec)
        for outcome, (_, row) in zip(outcomes, table.iterrows()):
            flag = {} if row["accuracy_flag"] is None else {"accuracy_flag": str(row["accuracy_flag"])}
            parent.store.log(outcome.run_id, metrics=_finite({"speedup": row["speedup"],
                                                              "accuracy_delta": row["accuracy_delta"]}), tags=flag)
        return Published(f"benchmark {spec.name}", table, charts={"speedup.png": plot_speedups(table)},
                         texts={f"{spec.name}.toml": spec.text} if spec.text else {})

    def stop_monitor(self) -> None:
        if self.system is not None:
            self.system.stop()


def run_benchmark(spec: BenchSpec, tracking_uri: str | None = None, experiment: str | None = None,
                  on_cell: Callable[[CellOutcome], None] | None = None,
                  system_metrics: bool = True, on_round: RoundHook | None = None) -> BenchReport:
    """Runs every cell of ``spec`` under one MLflow parent run and returns the table (the repeats in rounds:
    ``run_cells``). The parent run has MLflow's system metrics, sampled everywhere but in the timed epochs
    (``tracking.system``)."""
    store = Store(tracking_uri)
    experiment = experiment or f"bench-{spec.name}"
    experiment_id = store.experiment(experiment, spec.description or None)
    parent = Parent(store, experiment, experiment_id, store.start_run(experiment_id, spec.name, "bench",
                                                                      _parent_tags(spec)))
    matrix = DeviceMatrix(spec, start_system_metrics(store.tracking_uri, parent.run_id, system_metrics), on_round)
    result = run_harness(matrix, parent, on_cell, after_cells=matrix.stop_monitor)
    return BenchReport(spec, result.outcomes, result.published.table, parent.run_id, experiment, experiment_id,
                       store.tracking_uri)
