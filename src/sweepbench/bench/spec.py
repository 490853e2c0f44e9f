"""A benchmark file (``benchmarks/*.toml``): its validation, and the grid of cells it expands to."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import (BENCH_GRID, BENCH_UNSUPPORTED, LOADERS, STEPS, ConfigError, RunConfig, apply_overrides,
                      bench_fields, error_within)
from ..data import get_dataset_entry
from ..devices import baseline_device, benchmarked_devices
from ..models import check_fits, check_model_kwargs
from ..precisions import advised, baseline_precision
from ..steps import check_step_settings
from .. import tomlcheck

# device/precision pairs: every benchmarked device with each precision that runs there and is no trap there
PRECISIONS = tuple(f"{device}/{precision}" for device in benchmarked_devices() for precision in advised(device))
SECTIONS = ("benchmark", "grid", "defaults", "models")
BENCHMARK_KEYS = ("name", "description", "repeats", "warmup_epochs", "baseline", "accuracy_tolerance",
                  "cell_budget_seconds")
AXES = ("precisions", "loaders", "compile", "steps", "batch_sizes")
BASELINE_KEYS = ("precision", "loader", "compile", "step", "batch_size")
GRID_OWNED_FIELDS = tuple(bench_fields(BENCH_GRID))
UNSUPPORTED_FIELDS = tuple(bench_fields(BENCH_UNSUPPORTED))
DEFAULT_BASELINE = f"{baseline_device()}/{baseline_precision()}"


@dataclass(frozen=True)
class Cell:
    """One grid point. ``precision`` is the device/precision pair (``cuda/fp16``); ``config`` runs it, unless
    ``refused`` says why its settings cannot train together (a captured step with fp16): a skipped cell."""

    model: str
    precision: str
    loader: str
    compile: bool
    step: str
    batch_size: int
    config: RunConfig = field(compare=False, hash=False)
    refused: str | None = field(default=None, compare=False, hash=False)

    @property
    def device(self) -> str:
        return self.precision.split("/")[0]

    @property
    def axes(self) -> dict[str, Any]:
        return {"precision": self.precision, "loader": self.loader, "compile": self.compile, "step": self.step,
                "batch_size": self.batch_size}

    @property
    def key(self) -> tuple:
        return (self.model, *self.axes.values())

    def baseline_key(self, baseline: dict[str, Any]) -> tuple:
        return (self.model, *{**self.axes, **baseline}.values())

    @property
    def label(self) -> str:
        compiled = " compiled" if self.compile else ""
        step = f" step={self.step}" if self.step != STEPS[0] else ""
        return f"{self.model} {self.precision} {self.loader} bs{self.batch_size}{compiled}{step}"


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
    cell_budget_seconds: float | None = None  # a cell projected past it is cut after its first timed epoch


def _check_list(label: str, values: Any, check: Callable[[str, Any], Any]) -> list:
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{label}: expected a non-empty array, got {values!r}")
    if len({repr(value) for value in values}) != len(values):
        raise ConfigError(f"{label}: {values!r} lists a value twice")
    for value in values:
        check(label, value)
    return values


AXIS_CHECKS: dict[str, Callable[[str, Any], Any]] = {
    "precisions": lambda label, value: tomlcheck.choice(label, value, PRECISIONS),
    "loaders": lambda label, value: tomlcheck.choice(label, value, LOADERS),
    "compile": tomlcheck.boolean,
    "steps": lambda label, value: tomlcheck.choice(label, value, STEPS),
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
        raise error_within(label, exc) from exc
    check_model_kwargs(config.model, config.model_kwargs, f"{label}.model_kwargs")
    check_fits(config.model, get_dataset_entry(config.dataset).image_shape, config.dataset, f"{label}.model")
    return config


def _model_cells(label: str, entry: Any, defaults: dict[str, Any], overrides: dict[str, Any],
                 grid: dict[str, Any], warmup_epochs: int) -> list[Cell]:
    """The cells of one ``[[models]]`` entry: its RunConfig fields over ``[defaults]``, its axes over ``[grid]``."""
    entry = tomlcheck.table(label, entry)
    fields = {key: value for key, value in entry.items() if key not in AXES and key != "label"}
    config = _run_config(label, apply_overrides({**defaults, **fields}, overrides))
    if config.epochs <= warmup_epochs:
        raise ConfigError(f"{label}.epochs: {config.epochs} leaves no timed epoch; with warmup_epochs = "
                          f"{warmup_epochs} it must be >= {warmup_epochs + 1}")
    axes = {"loaders": [config.loader], "compile": [config.compile], "steps": [config.step],
            "batch_sizes": [config.batch_size], **grid, **{key: value for key, value in entry.items() if key in AXES}}
    if "precisions" not in axes:
        raise ConfigError(f"{label}: no precisions; set grid.precisions (choose from: {', '.join(PRECISIONS)})")
    for axis in AXES:
        _check_list(f"{label}.{axis}" if axis in entry else f"grid.{axis}", axes[axis], AXIS_CHECKS[axis])
    name = tomlcheck.string(f"{label}.label", entry.get("label", config.model))
    return [_cell(name, config, precision, loader, compiled, step, batch_size)
            for batch_size, loader, compiled, step, precision in itertools.product(
                axes["batch_sizes"], axes["loaders"], axes["compile"], axes["steps"], axes["precisions"])]


def _cell(name: str, config: RunConfig, precision: str, loader: str, compiled: bool, step: str,
          batch_size: int) -> Cell:
    """A grid point; one whose settings cannot train together is a refused cell, which the table shows as
    skipped, with the refusal, instead of refusing the whole grid."""
    device, dtype = precision.split("/")
    cell_config = config.replace(device=device, precision=dtype, loader=loader, compile=compiled,
                                 batch_size=batch_size, step=STEPS[0])  # the eager step holds any precision
    try:
        check_step_settings(step, dtype, compiled)
    except ConfigError as refusal:
        cell_config.step = step  # never trained: the params of its skipped MLflow run say what was asked
        return Cell(name, precision, loader, compiled, step, batch_size, cell_config, refused=str(refusal))
    return Cell(name, precision, loader, compiled, step, batch_size, cell_config.replace(step=step))


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
                     cells=cells, text=text,
                     cell_budget_seconds=tomlcheck.optional(meta.get("cell_budget_seconds"), lambda seconds: float(
                         tomlcheck.positive_number("benchmark.cell_budget_seconds", seconds))))


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
