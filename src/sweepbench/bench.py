"""Device x precision benchmark matrix: ``sweepbench bench FILE``.

A benchmark file (``benchmarks/*.toml``) declares models x precisions, where a precision is a device/precision
pair such as ``cuda/fp16``, and optionally x loaders, ``torch.compile`` and batch sizes. Each cell of that grid
is trained ``repeats`` times by the one engine, repeat ``r`` (from 0) with seed ``seed + r``.

Timing: the first ``warmup_epochs`` epochs of every repeat are left out (allocator, cuDNN autotuning, compile);
a repeat's figure is the median of its remaining epochs (training pass only, CUDA-synchronised by the engine),
and a cell reports the median, min and max of those over its repeats. ``train_s`` and ``time_to_target_s`` are
the engine's totals, first epoch included, because that is what a user waits for.

A cell that cannot run on this machine (no CUDA, no bf16 on the GPU) becomes a row ``skipped: <reason>``.
Each cell is compared with its baseline cell: the same model and settings with the axes named in
``baseline`` (default: precision ``cpu/fp32``) set to the baseline's values.

MLflow: one parent run per benchmark holding the table (csv, md, html), a speed-up chart and the spec; one
child run per cell with the cell's figures (a skipped cell's run is KILLED, tagged ``skipped=<reason>``); and
under each cell one run per repeat, logged by ``MlflowLogger``.
"""

from __future__ import annotations

import itertools
import math
import os
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import pandas as pd
import torch
from .config import LOADERS, ConfigError, RunConfig
from .data import DataNotFoundError, get_dataset_entry
from .engine import RunResult, device_name, resolve_device, train
from .models import check_model_kwargs
from . import report, tomlcheck
from .tracking import MlflowLogger, Store, config_params, config_tags, environment_tags

PRECISIONS = ("cpu/fp32", "cpu/bf16", "cuda/fp32", "cuda/tf32", "cuda/fp16", "cuda/bf16")
SECTIONS = ("benchmark", "grid", "defaults", "models")
BENCHMARK_KEYS = ("name", "description", "repeats", "warmup_epochs", "baseline", "accuracy_tolerance")
AXES = ("precisions", "loaders", "compile", "batch_sizes")
BASELINE_KEYS = ("precision", "loader", "compile", "batch_size")
GRID_OWNED_FIELDS = ("device", "precision")
UNSUPPORTED_FIELDS = ("resume", "checkpoint_dir")
DEFAULT_BASELINE = "cpu/fp32"


@dataclass(frozen=True)
class Cell:
    """One grid point. ``precision`` is the device/precision pair (``cuda/fp16``); ``config`` runs it."""

    model: str
    precision: str
    loader: str
    compile: bool
    batch_size: int
    config: RunConfig = field(compare=False, hash=False)

    @property
    def device(self) -> str:
        return self.precision.split("/")[0]

    @property
    def axes(self) -> dict[str, Any]:
        return {"precision": self.precision, "loader": self.loader, "compile": self.compile,
                "batch_size": self.batch_size}

    @property
    def key(self) -> tuple:
        return (self.model, *self.axes.values())

    def baseline_key(self, baseline: dict[str, Any]) -> tuple:
        return (self.model, *{**self.axes, **baseline}.values())

    @property
    def label(self) -> str:
        compiled = " compiled" if self.compile else ""
        return f"{self.model} {self.precision} {self.loader} bs{self.batch_size}{compiled}"


@dataclass
class BenchSpec:
    name: str
    description: str
    repeats: int
    warmup_epochs: int
    baseline: dict[str, Any]
    accuracy_tolerance: float
    cells: list[Cell]
    text: str = ""


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
        return (f"{self.cell.label}: {self.status}, {self.figures['epoch_s_median']:.3f} s/epoch "
                f"(min {self.figures['epoch_s_min']:.3f}, max {self.figures['epoch_s_max']:.3f}), "
                f"test accuracy {self.figures['test_accuracy']:.4f}")


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
        return [o for o in self.outcomes if o.status != "ok" and not o.status.startswith("skipped")]


# ---- the spec ---------------------------------------------------------------------------------------------

def _check_list(label: str, values: Any, check: Callable[[str, Any], Any]) -> list:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{label}: expected a non-empty array, got {values!r}")
    if len({repr(value) for value in values}) != len(values):
        raise ConfigError(f"{label}: {values!r} lists a value twice")
    for value in values:
        check(label, value)
    return values


def _check_bool(label: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(f"{label}: {value!r} is not allowed; choose one of: false, true")
    return value


AXIS_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "precisions": lambda label, value: tomlcheck.choice(label, value, PRECISIONS),
    "loaders": lambda label, value: tomlcheck.choice(label, value, LOADERS),
    "compile": _check_bool,
    "batch_sizes": tomlcheck.positive_int,
}


def _parse_baseline(value: Any) -> dict[str, Any]:
    """``"cpu/fp32"`` or ``{precision = "cpu/fp32", loader = "torchvision"}``, as axis -> value."""
    baseline = {"precision": value} if isinstance(value, str) else tomlcheck.table("benchmark.baseline", value)
    tomlcheck.check_keys("benchmark.baseline", baseline, BASELINE_KEYS)
    for key, axis in zip(BASELINE_KEYS, AXES):
        if key in baseline:
            AXIS_CHECKS[axis](f"benchmark.baseline.{key}", baseline[key])
    return baseline


def _run_config(label: str, values: dict[str, Any]) -> RunConfig:
    for name in GRID_OWNED_FIELDS + UNSUPPORTED_FIELDS:
        if name in values:
            how = "set it through grid.precisions" if name in GRID_OWNED_FIELDS else "not supported in benchmarks"
            raise ConfigError(f"{label}.{name}: {how}")
    try:
        config = RunConfig.from_dict(values)
    except ConfigError as exc:
        raise ConfigError(f"{label}: {exc}") from exc
    get_dataset_entry(config.dataset)
    check_model_kwargs(config.model, config.model_kwargs, f"{label}.model_kwargs")
    return config


def _model_cells(label: str, entry: Any, defaults: dict[str, Any], overrides: dict[str, Any],
                 grid: dict[str, Any], warmup_epochs: int) -> list[Cell]:
    """The cells of one ``[[models]]`` entry: its RunConfig fields over ``[defaults]``, its axes over ``[grid]``."""
    entry = tomlcheck.table(label, entry)
    fields = {key: value for key, value in entry.items() if key not in AXES and key != "label"}
    config = _run_config(label, {**defaults, **fields, **overrides})
    if config.epochs <= warmup_epochs:
        raise ConfigError(f"{label}.epochs: {config.epochs} leaves no timed epoch; with warmup_epochs = "
                          f"{warmup_epochs} it must be >= {warmup_epochs + 1}")
    axes = {"loaders": [config.loader], "compile": [config.compile], "batch_sizes": [config.batch_size],
            **grid, **{key: value for key, value in entry.items() if key in AXES}}
    if "precisions" not in axes:
        raise ConfigError(f"{label}: no precisions; set grid.precisions (choose from: {', '.join(PRECISIONS)})")
    for axis in AXES:
        _check_list(f"{label}.{axis}" if axis in entry else f"grid.{axis}", axes[axis], AXIS_CHECKS[axis])
    name = tomlcheck.string(f"{label}.label", entry.get("label", config.model))
    return [Cell(name, precision, loader, compiled, batch_size,
                 config.replace(device=precision.split("/")[0], precision=precision.split("/")[1], loader=loader,
                                compile=compiled, batch_size=batch_size))
            for batch_size, loader, compiled, precision in itertools.product(
                axes["batch_sizes"], axes["loaders"], axes["compile"], axes["precisions"])]


def _check_cells(cells: list[Cell], baseline: dict[str, Any]) -> None:
    keys = [cell.key for cell in cells]
    duplicates = sorted({cell.label for cell in cells if keys.count(cell.key) > 1})
    if duplicates:
        raise ConfigError(f"models: cells {duplicates} appear twice; give repeated models a distinct label")
    for cell in cells:
        if cell.baseline_key(baseline) not in keys:
            raise ConfigError(f"benchmark.baseline: {baseline} has no cell to compare {cell.label!r} with; "
                              "add the baseline's values to the grid")


def parse_spec(document: dict[str, Any], name: str, text: str = "", **overrides: Any) -> BenchSpec:
    """Validates a parsed benchmark TOML and expands its grid. ``overrides`` are RunConfig fields (epochs,
    data_dir, download) set in every cell over the file; None leaves a field as the file has it."""
    tomlcheck.check_keys("benchmark file", tomlcheck.table("benchmark file", document), SECTIONS)
    meta = tomlcheck.table("benchmark", document.get("benchmark", {}))
    tomlcheck.check_keys("benchmark", meta, BENCHMARK_KEYS)
    grid = tomlcheck.table("grid", document.get("grid", {}))
    tomlcheck.check_keys("grid", grid, AXES)
    models = document.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigError('models: expected at least one [[models]] table, e.g. model = "mnist_mlp"')
    warmup_epochs = tomlcheck.positive_int("benchmark.warmup_epochs", meta.get("warmup_epochs", 1), minimum=0)
    defaults = tomlcheck.table("defaults", document.get("defaults", {}))
    overrides = {key: value for key, value in overrides.items() if value is not None}
    cells = [cell for index, entry in enumerate(models)
             for cell in _model_cells(f"models[{index}]", entry, defaults, overrides, grid, warmup_epochs)]
    tolerance = meta.get("accuracy_tolerance", 0.01)
    if not 0 <= tomlcheck.number("benchmark.accuracy_tolerance", tolerance) <= 1:
        raise ConfigError(f"benchmark.accuracy_tolerance: {tolerance!r} is out of range; it must be in [0, 1]")
    baseline = _parse_baseline(meta.get("baseline", DEFAULT_BASELINE))
    _check_cells(cells, baseline)
    return BenchSpec(name=tomlcheck.string("benchmark.name", meta.get("name", name)),
                     description=tomlcheck.string("benchmark.description", meta.get("description", ""),
                                                  allow_empty=True),
                     repeats=tomlcheck.positive_int("benchmark.repeats", meta.get("repeats", 3)),
                     warmup_epochs=warmup_epochs, baseline=baseline, accuracy_tolerance=float(tolerance),
                     cells=cells, text=text)


def load_spec(path: str | Path, *, repeats: int | None = None, devices: Sequence[str] | None = None,
              **overrides: Any) -> BenchSpec:
    """Reads and validates a benchmark file. ``repeats`` and RunConfig ``overrides`` (epochs, data_dir,
    download) replace the file's; ``devices`` keeps the cells on those devices and the baselines they need."""
    path = Path(path)
    document, text = tomlcheck.read_toml(path, "benchmark file")
    try:
        spec = parse_spec(document, path.stem, text, **overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from exc
    if repeats is not None:
        spec.repeats = tomlcheck.positive_int("--repeats", repeats)
    if devices:
        spec.cells = filter_devices(spec.cells, devices, spec.baseline)
    return spec


def filter_devices(cells: list[Cell], devices: Sequence[str], baseline: dict[str, Any]) -> list[Cell]:
    """The cells on ``devices``, plus the baseline cells they are compared with (so speed-ups stay defined)."""
    needed = {cell.baseline_key(baseline) for cell in cells if cell.device in devices}
    return [cell for cell in cells if cell.device in devices or cell.key in needed]


# ---- running ------------------------------------------------------------------------------------------------

def skip_reason(precision: str) -> str | None:
    """Why a device/precision pair cannot run on this machine, or None when it can."""
    device_type, dtype = precision.split("/")
    try:
        device = resolve_device(device_type)
    except ConfigError:
        return f"{device_type.upper()} not available"
    if device.type == "cuda" and dtype == "bf16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"bf16 not supported by {device_name(device)}"
    return None


@dataclass
class _Tracking:
    """Where a benchmark's runs go: the store, the experiment and the parent run."""

    store: Store
    experiment: str
    experiment_id: str
    parent_run_id: str

    def start_cell(self, cell: Cell, tags: dict[str, str]) -> str:
        return self.store.start_run(self.experiment_id, cell.label, "cell", {**_cell_tags(cell), **tags},
                                    config_params(cell.config), self.parent_run_id)


def _cell_tags(cell: Cell) -> dict[str, str]:
    """The run schema's identity tags for a cell, plus which cell it is."""
    return {**config_tags(cell.config), "device": cell.device, "benchmark_cell": cell.label,
            "bench_precision": cell.precision, "compile": str(cell.compile)}


def _run_repeats(cell: Cell, repeats: int, tracking: _Tracking,
                 cell_run_id: str) -> tuple[list[RunResult], list[float]]:
    """The repeats' results, and the 1-minute load average after each: other work on the machine shows there."""
    results, loads = [], []
    for repeat in range(1, repeats + 1):
        logger = MlflowLogger(tracking.experiment, tracking.store.tracking_uri, f"{cell.label} repeat {repeat}",
                              cell_run_id, tags={"repeat": str(repeat), "benchmark_cell": cell.label},
                              log_model=False, log_artifacts=False, kind="repeat")
        results.append(train(cell.config.replace(seed=cell.config.seed + repeat - 1), [logger]))
        loads.append(os.getloadavg()[0])
        if results[-1].status != "completed":
            break
    return results, loads


def run_cell(cell: Cell, spec: BenchSpec, tracking: _Tracking) -> CellOutcome:
    """Runs one cell's repeats under its own MLflow run; a cell that cannot run here is recorded as skipped.

    A failing cell (a crash inside ``torch.compile``, say) is recorded and the benchmark goes on; a
    ``ConfigError`` or a missing dataset is a mistake in the spec or the setup, and stops it.
    """
    reason = skip_reason(cell.precision)
    hardware = {} if reason else environment_tags(resolve_device(cell.device))
    store, run_id = tracking.store, tracking.start_cell(cell, hardware)
    if reason is not None:
        outcome = CellOutcome(cell, f"skipped: {reason}", run_id, cell_figures(cell, [], spec.warmup_epochs))
        store.end_run(run_id, "KILLED", {"status": outcome.status, "skipped": reason})
        return outcome
    try:
        results, loads = _run_repeats(cell, spec.repeats, tracking, run_id)
    except KeyboardInterrupt:
        store.end_run(run_id, "KILLED", {"status": "killed: interrupted"})
        raise
    except Exception as exc:
        outcome = CellOutcome(cell, f"failed: {type(exc).__name__}: {exc}", run_id,
                              cell_figures(cell, [], spec.warmup_epochs))
        store.end_run(run_id, "FAILED", {"status": outcome.status})
        if isinstance(exc, (ConfigError, DataNotFoundError)):
            raise
        return outcome
    status = "ok" if results[-1].status == "completed" else f"{results[-1].status}: {results[-1].message}"
    outcome = CellOutcome(cell, status, run_id, cell_figures(cell, results, spec.warmup_epochs, loads))
    store.log(run_id, metrics=_finite(outcome.figures))
    store.end_run(run_id, "FINISHED" if status == "ok" else "FAILED", {"status": status})
    return outcome


def _finite(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers among ``values`` (skipped cells have none), as metrics to log."""
    return {key: value for key, value in values.items() if isinstance(value, (int, float))
            and not isinstance(value, bool) and math.isfinite(value)}


# ---- figures and the table ----------------------------------------------------------------------------------

def _median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def cell_figures(cell: Cell, results: Sequence[RunResult], warmup_epochs: int,
                 loads: Sequence[float] = ()) -> dict[str, Any]:
    """A cell's figures over its completed repeats (None where none completed), as table columns.
    ``load_1m_max``: the highest 1-minute load average seen after a repeat; the benchmark alone makes it
    about the number of torch threads, so a higher figure means other work shared the cores."""
    completed = [result for result in results if result.status == "completed"]
    timed = [result.history[warmup_epochs:] for result in completed]
    epoch_medians = [statistics.median(r.epoch_seconds for r in records) for records in timed]
    reached = [r.time_to_target_seconds for r in completed if r.time_to_target_seconds is not None]
    target = cell.config.target_accuracy
    return {
        "repeats": len(completed),
        "epoch_s_median": _median_or_none(epoch_medians),
        "epoch_s_min": min(epoch_medians, default=None),
        "epoch_s_max": max(epoch_medians, default=None),
        "samples_per_s": _median_or_none([statistics.median(r.samples_per_second for r in records)
                                          for records in timed]),
        "train_s": _median_or_none([result.train_seconds for result in completed]),
        "target": target,
        "time_to_target_s": _median_or_none(reached),
        "target_reached": f"{len(reached)}/{len(completed)}" if target is not None and completed else None,
        "test_accuracy": _median_or_none([result.test_accuracy for result in completed]),
        "peak_memory_mb": max((result.peak_memory_mb for result in completed), default=None),
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


# ---- the benchmark ------------------------------------------------------------------------------------------

def _parent_tags(spec: BenchSpec) -> dict[str, str]:
    tags = {**environment_tags(torch.device("cpu")), "benchmark": spec.name, "repeats": str(spec.repeats),
            "warmup_epochs": str(spec.warmup_epochs), "baseline": str(spec.baseline),
            "accuracy_tolerance": str(spec.accuracy_tolerance), "torch_threads": str(torch.get_num_threads())}
    if torch.cuda.is_available():
        tags["cuda_device_name"] = device_name(torch.device("cuda"))
    return tags


def _log_report(tracking: _Tracking, spec: BenchSpec, outcomes: Sequence[CellOutcome], table: pd.DataFrame) -> None:
    """Comparisons on each cell run; the table, chart and spec on the parent."""
    store, parent = tracking.store, tracking.parent_run_id
    for outcome, (_, row) in zip(outcomes, table.iterrows()):
        flag = {} if row["accuracy_flag"] is None else {"accuracy_flag": str(row["accuracy_flag"])}
        store.log(outcome.run_id, metrics=_finite({"speedup": row["speedup"],
                                                   "accuracy_delta": row["accuracy_delta"]}), tags=flag)
    for fmt in ("csv", "md", "html"):
        store.log_text(parent, report.export_table(table, fmt, title=f"benchmark {spec.name}"), f"table.{fmt}")
    store.log_figure(parent, plot_speedups(table), "speedup.png")
    if spec.text:
        store.log_text(parent, spec.text, f"{spec.name}.toml")


def run_benchmark(spec: BenchSpec, tracking_uri: str | None = None, experiment: str | None = None,
                  on_cell: Callable[[CellOutcome], None] | None = None) -> BenchReport:
    """Runs every cell of ``spec`` under one MLflow parent run and returns the table."""
    store = Store(tracking_uri)
    experiment = experiment or f"bench-{spec.name}"
    experiment_id = store.experiment(experiment, spec.description or None)
    parent_run_id = store.start_run(experiment_id, spec.name, "bench", _parent_tags(spec))
    tracking = _Tracking(store, experiment, experiment_id, parent_run_id)
    with store.lifecycle(parent_run_id):
        outcomes = []
        for cell in spec.cells:
            outcomes.append(run_cell(cell, spec, tracking))
            if on_cell:
                on_cell(outcomes[-1])
        table = build_table(outcomes, spec)
        _log_report(tracking, spec, outcomes, table)
    return BenchReport(spec, outcomes, table, parent_run_id, experiment, experiment_id, store.tracking_uri)
