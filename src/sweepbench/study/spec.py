"""Study specs: TOML files in ``studies/`` describing an Optuna study, validated on load.

A spec is ``name``, ``model``, ``dataset`` and the tables ``[train]`` (fixed ``RunConfig`` fields),
``[objective]`` (one table, or an array of two for a Pareto study), ``[sampler]``, ``[pruner]``, ``[budget]``
and ``[search.<field>]``, where ``<field>`` is any ``RunConfig`` field or ``model_kwargs.<arg>`` /
``dataset_kwargs.<arg>``; ``[compare]`` is a sampler comparison's (``compare.spec``). Every error names the file,
the field and the allowed values.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..config import (KWARGS_FIELDS, ConfigError, RunConfig, apply_overrides, error_within, field_names,
                      searchable_fields)
from ..data import get_dataset_entry
from ..engine.fused.pack import PACK_RULES, pack_refusals
from ..models import check_fits, check_model_kwargs, get_model_entry
from .. import tomlcheck
from .samplers import SAMPLERS, sampler_names

PRUNERS = ("median", "hyperband", "none")
PARAM_TYPES = ("int", "float", "categorical")
DIRECTIONS = ("maximize", "minimize")
METRIC_DIRECTIONS = {"val_accuracy": "maximize", "val_loss": "minimize", "train_seconds": "minimize"}
EPOCH_METRICS = ("val_accuracy", "val_loss")

TOP_KEYS = ("name", "description", "model", "dataset", "train", "objective", "sampler", "pruner", "budget", "search",
            "compare")  # [compare] is read by ``sweepbench study compare`` (``compare.spec``); a study ignores it
SAMPLER_KEYS = ("name", "seed", "n_startup_trials")
PRUNER_KEYS = {"median": ("name", "n_startup_trials", "n_warmup_steps"),
               "hyperband": ("name", "min_resource", "reduction_factor"),
               "none": ("name",)}
PRUNER_MINIMUMS = {"min_resource": 1, "reduction_factor": 2}
BUDGET_KEYS = ("n_trials", "timeout", "max_failed_trials", "max_grid_points", "keep_checkpoints", "pack")
# What a study keeps of its trials' checkpoints: the best trial's best.pt (a Pareto study: each best trial's),
# every trial's best.pt and last.pt, or nothing.
KEEP_CHECKPOINTS = ("best", "all", "none")
OBJECTIVE_KEYS = ("metric", "direction")
PARAM_KEYS = {"int": ("type", "low", "high", "step", "log"),
              "float": ("type", "low", "high", "step", "log"),
              "categorical": ("type", "choices")}
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}")
MAX_SEED = 2**32 - 1  # numpy's and Optuna's samplers take seeds in [0, 2**32 - 1]
MAX_GRID_POINTS = 100_000


@dataclass(frozen=True)
class Objective:
    metric: str
    direction: str


@dataclass(frozen=True)
class ParamSpec:
    """One search-space dimension; ``name`` is a ``RunConfig`` field, dotted for model/dataset kwargs."""

    name: str
    type: str
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()

    def grid_size(self) -> int:
        """How many values a grid sampler walks through (an int range without a step: every integer)."""
        if self.type == "categorical":
            return len(self.choices)
        return int(round((self.high - self.low) / (self.step or 1))) + 1

    def grid_values(self) -> list:
        """The values a grid sampler walks through; needs choices or a step."""
        if self.type == "categorical":
            return list(self.choices)
        values = [self.low + index * (self.step or 1) for index in range(self.grid_size())]
        return [int(v) for v in values] if self.type == "int" else values


@dataclass(frozen=True)
class StudySpec:
    name: str
    base_config: RunConfig
    objectives: tuple[Objective, ...]
    search: tuple[ParamSpec, ...]
    sampler: str = "tpe"
    sampler_seed: int | None = None
    sampler_startup_trials: int | None = None
    pruner: str = "median"
    pruner_options: dict[str, int] = dataclasses.field(default_factory=dict)
    n_trials: int = 20
    timeout: float | None = None
    max_failed_trials: int = 20
    max_grid_points: int = MAX_GRID_POINTS
    keep_checkpoints: str = "best"
    pack: int = 1
    description: str = ""
    source: str = ""

    @property
    def directions(self) -> list[str]:
        return [objective.direction for objective in self.objectives]

    @property
    def metric_names(self) -> list[str]:
        return [objective.metric for objective in self.objectives]

    def with_overrides(self, n_trials: int | None = None, timeout: float | None = None, pack: int | None = None,
                       **config_changes: Any) -> StudySpec:
        """The same spec with a new budget and fixed training settings (``None`` keeps a value; kwargs tables
        are merged argument by argument). A searched setting cannot be fixed: the trials would ignore it."""
        changes = {key: value for key, value in config_changes.items() if value is not None}
        fixed = [*changes, *(f"{key}.{arg}" for key in KWARGS_FIELDS if key in changes for arg in changes[key])]
        searched = sorted(set(fixed) & {param.name for param in self.search})
        if searched:
            raise ConfigError(f"--set {', '.join(searched)}: searched by study {self.name!r}; "
                              "remove it from the spec's [search] to fix it")
        spec = dataclasses.replace(
            self,
            base_config=RunConfig.from_dict(apply_overrides(self.base_config.to_dict(), changes)),
            n_trials=self.n_trials if n_trials is None else tomlcheck.positive_int("--n-trials", n_trials),
            timeout=self.timeout if timeout is None else tomlcheck.positive_number("--timeout", timeout),
            pack=self.pack if pack is None else tomlcheck.positive_int("--pack", pack),
        )
        _check_pack(spec)
        return spec

    def target_trials(self) -> int:
        """``n_trials``, capped at the grid's size for the grid sampler (it has nothing more to try)."""
        if self.sampler != "grid":
            return self.n_trials
        return min(self.n_trials, self.grid_points())

    def grid_points(self) -> int:
        return math.prod(param.grid_size() for param in self.search)


def load_spec(path: str | Path) -> StudySpec:
    data, _ = tomlcheck.read_toml(path, "study spec")
    return parse_spec(data, str(path))


def parse_spec(data: dict[str, Any], source: str = "<spec>") -> StudySpec:
    """Validates a parsed TOML document; a ``ConfigError`` names ``source`` and the bad field."""
    try:
        return _parse(data, source)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _parse(data: dict[str, Any], source: str) -> StudySpec:
    tomlcheck.check_keys("spec", data, TOP_KEYS)
    for required in ("name", "model", "dataset", "search"):
        if required not in data:
            raise ConfigError(f"{required}: missing; a study spec needs {', '.join(('name', 'model', 'dataset'))} "
                              "and a [search] table")
    name = tomlcheck.string("name", data["name"])
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"name: {name[:40]!r}{'...' if len(name) > 40 else ''} names files and databases; use "
                          "at most 100 letters, digits, '_', '.', '-'")
    base_config = _base_config(data)
    objectives = _objectives(data.get("objective", {"metric": "val_accuracy"}))
    search = tuple(_param(key, value, base_config) for key, value in tomlcheck.table("search", data["search"]).items())
    if not search:
        raise ConfigError("search: empty; give at least one [search.<field>] table")
    for param in search:
        if param.name in data.get("train", {}):
            raise ConfigError(f"search.{param.name}: also fixed in [train]; keep it in one place")
    sampler = tomlcheck.table("sampler", data.get("sampler", {}))
    tomlcheck.check_keys("sampler", sampler, SAMPLER_KEYS)
    sampler_name = tomlcheck.choice("sampler.name", sampler.get("name", "tpe"), sampler_names())
    pruner = tomlcheck.table("pruner", data.get("pruner", {}))
    default_pruner = "median" if len(objectives) == 1 else "none"
    pruner_name = tomlcheck.choice("pruner.name", pruner.get("name", default_pruner), PRUNERS)
    tomlcheck.check_keys(f"pruner ({pruner_name})", pruner, PRUNER_KEYS[pruner_name])
    budget = tomlcheck.table("budget", data.get("budget", {}))
    tomlcheck.check_keys("budget", budget, BUDGET_KEYS)
    n_trials = tomlcheck.positive_int("budget.n_trials", budget.get("n_trials", 20))
    spec = StudySpec(
        name=name, base_config=base_config, objectives=objectives, search=search,
        sampler=sampler_name,
        sampler_seed=tomlcheck.optional(sampler.get("seed"), _seed),
        sampler_startup_trials=tomlcheck.optional(sampler.get("n_startup_trials"),
                                         lambda v: tomlcheck.positive_int("sampler.n_startup_trials", v)),
        pruner=pruner_name,
        pruner_options={key: tomlcheck.positive_int(f"pruner.{key}", value, minimum=PRUNER_MINIMUMS.get(key, 0))
                        for key, value in pruner.items() if key != "name"},
        n_trials=n_trials,
        timeout=tomlcheck.optional(budget.get("timeout"), lambda v: tomlcheck.positive_number("budget.timeout", v)),
        max_failed_trials=tomlcheck.positive_int("budget.max_failed_trials", budget.get("max_failed_trials", n_trials)),
        max_grid_points=tomlcheck.positive_int("budget.max_grid_points",
                                               budget.get("max_grid_points", MAX_GRID_POINTS)),
        keep_checkpoints=tomlcheck.choice("budget.keep_checkpoints", budget.get("keep_checkpoints", "best"),
                                          KEEP_CHECKPOINTS),
        pack=tomlcheck.positive_int("budget.pack", budget.get("pack", 1)),
        description=tomlcheck.string("description", data.get("description", ""), allow_empty=True),
        source=source,
    )
    _check_combination(spec)
    _check_pack(spec)
    return spec


def _check_pack(spec: StudySpec) -> None:
    """A packed study's trials must be able to train fused: the engine's own rules (``engine.fused.PACK_RULES``),
    on fixed settings only, so that no trial breaks one at run time."""
    if spec.pack == 1:
        return
    searched = {param.name for param in spec.search}
    for name, (_, needs, _) in PACK_RULES.items():
        if name in searched:
            raise ConfigError(f"budget.pack: {spec.pack} trains trials fused, which needs {needs} (fixed, not "
                              f"searched); set budget.pack = 1 or fix {name} in [train]")
    for name, needs, advice in pack_refusals(spec.base_config):
        raise ConfigError(f"budget.pack: {spec.pack} trains trials fused, which needs {needs} (train.{name} is "
                          f"{getattr(spec.base_config, name)!r}: {advice}); or set budget.pack = 1")


def _base_config(data: dict[str, Any]) -> RunConfig:
    get_model_entry(tomlcheck.string("model", data["model"]))
    get_dataset_entry(tomlcheck.string("dataset", data["dataset"]))
    train = tomlcheck.table("train", data.get("train", {}))
    for key in ("model", "dataset"):
        if key in train:
            raise ConfigError(f"train.{key}: set {key} at the top level of the spec, not in [train]")
    tomlcheck.check_keys("train", train, [name for name in field_names() if name not in ("model", "dataset")])
    try:
        config = RunConfig.from_dict({"model": data["model"], "dataset": data["dataset"], **train})
    except ConfigError as exc:
        raise error_within("train", exc) from exc
    check_model_kwargs(config.model, config.model_kwargs, "train.model_kwargs")
    check_fits(config.model, get_dataset_entry(config.dataset).image_shape, config.dataset)
    return config


def _objectives(raw: Any) -> tuple[Objective, ...]:
    tables = [raw] if isinstance(raw, dict) else raw
    if not isinstance(tables, list) or not 1 <= len(tables) <= 2:
        raise ConfigError("objective: expected one table, or an array of two tables for a Pareto study")
    objectives = []
    for index, table in enumerate(tables):
        label = "objective" if len(tables) == 1 else f"objective[{index}]"
        table = tomlcheck.table(label, table)
        tomlcheck.check_keys(label, table, OBJECTIVE_KEYS)
        metric = tomlcheck.choice(f"{label}.metric", table.get("metric", "val_accuracy"), tuple(METRIC_DIRECTIONS))
        direction = tomlcheck.choice(f"{label}.direction", table.get("direction", METRIC_DIRECTIONS[metric]),
                                     DIRECTIONS)
        objectives.append(Objective(metric, direction))
    if len(objectives) == 2 and objectives[0].metric == objectives[1].metric:
        raise ConfigError(f"objective: both objectives are {objectives[0].metric!r}; a Pareto study needs two metrics")
    return tuple(objectives)


def _param(name: str, raw: Any, base_config: RunConfig) -> ParamSpec:
    label = f"search.{name}"
    table = tomlcheck.table(label, raw)
    _check_search_field(name, base_config)
    kind = tomlcheck.choice(f"{label}.type", table.get("type"), PARAM_TYPES)
    tomlcheck.check_keys(f"{label} ({kind})", table, PARAM_KEYS[kind])
    if kind == "categorical":
        choices = table.get("choices")
        if not isinstance(choices, list) or not choices:
            raise ConfigError(f"{label}.choices: expected a non-empty array of values")
        param = ParamSpec(name, kind, choices=tuple(choices))
    else:
        param = _numeric_param(label, name, kind, table)
    _check_values(label, param, base_config)
    return param


def _numeric_param(label: str, name: str, kind: str, table: dict[str, Any]) -> ParamSpec:
    number = tomlcheck.integer if kind == "int" else tomlcheck.number
    for key in ("low", "high"):
        if key not in table:
            raise ConfigError(f"{label}.{key}: missing; a {kind} parameter needs low and high")
    low, high = number(f"{label}.low", table["low"]), number(f"{label}.high", table["high"])
    log = table.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{label}.log: expected true or false, got {log!r}")
    step = tomlcheck.optional(table.get("step"),
                              lambda v: tomlcheck.positive_number(f"{label}.step", number(f"{label}.step", v)))
    if low > high:
        raise ConfigError(f"{label}: low ({low}) must be <= high ({high})")
    if step is not None and step > high - low and low != high:
        raise ConfigError(f"{label}.step: {step} is larger than the range [{low}, {high}], which would leave one "
                          f"value; it must be <= {high - low}")
    if log and low <= 0:
        raise ConfigError(f"{label}.low: {low} must be > 0 with log = true")
    if log and step is not None and not (kind == "int" and step == 1):
        raise ConfigError(f"{label}: log = true cannot be combined with step")
    return ParamSpec(name, kind, low=low, high=high, step=step, log=log)


def _check_search_field(name: str, base_config: RunConfig) -> None:
    head, dot, arg = name.partition(".")
    if dot:
        if head not in KWARGS_FIELDS or not arg:
            raise ConfigError(f"search.{name}: dotted names must be model_kwargs.<arg> or dataset_kwargs.<arg>")
        if head == "model_kwargs":
            check_model_kwargs(base_config.model, {arg: None}, f"search.{name}")
        if arg in getattr(base_config, head):
            raise ConfigError(f"search.{name}: also fixed in [train].{head}; keep it in one place")
        return
    allowed = searchable_fields()
    if name not in allowed:
        raise ConfigError(f"search.{name}: not a searchable field; allowed: {', '.join(allowed)}, "
                          "model_kwargs.<arg>, dataset_kwargs.<arg>")


def _check_values(label: str, param: ParamSpec, base_config: RunConfig) -> None:
    """Runs the endpoints and choices of a field through ``RunConfig`` validation, those of a model argument
    through the model's own checks (a hidden size reaching below 1 is refused here, not trained at 11%)."""
    values = param.choices if param.type == "categorical" else (param.low, param.high)
    head, _, argument = param.name.partition(".")
    for value in values:
        if head == "model_kwargs":
            check_model_kwargs(base_config.model, {argument: value}, f"search.{head}")
            continue
        if head == "dataset_kwargs":
            continue
        try:
            base_config.replace(**{param.name: value})
        except ConfigError as exc:
            raise ConfigError(f"{label}: {exc}") from exc


def _seed(value: Any) -> int:
    seed = tomlcheck.positive_int("sampler.seed", value, minimum=0)
    if seed > MAX_SEED:
        raise ConfigError(f"sampler.seed: {seed} is out of range; it must be in [0, {MAX_SEED}]")
    return seed


def _check_combination(spec: StudySpec) -> None:
    if spec.pruner != "none" and len(spec.objectives) > 1:
        raise ConfigError(f"pruner.name: {spec.pruner!r} cannot prune a multi-objective study; use 'none'")
    if spec.pruner != "none" and spec.objectives[0].metric not in EPOCH_METRICS:
        raise ConfigError(f"pruner.name: {spec.pruner!r} needs a per-epoch first objective "
                          f"({', '.join(EPOCH_METRICS)}); use 'none' for {spec.objectives[0].metric!r}")
    sampler = SAMPLERS.get(spec.sampler)
    if spec.sampler_startup_trials is not None and not sampler.startup_trials:
        with_startup = [name for name in sampler_names() if SAMPLERS.get(name).startup_trials]
        raise ConfigError(f"sampler.n_startup_trials: the {spec.sampler!r} sampler has no startup phase; "
                          f"it applies to {', '.join(with_startup)}")
    if not sampler.multi_objective and len(spec.objectives) > 1:
        pareto = [name for name in sampler_names() if SAMPLERS.get(name).multi_objective]
        raise ConfigError(f"sampler.name: {spec.sampler!r} is single-objective; choose one of: {', '.join(pareto)}")
    if spec.sampler == "grid":
        for param in spec.search:
            if param.type == "float" and param.step is None:
                raise ConfigError(f"search.{param.name}: the grid sampler needs a step (or type categorical)")
        if spec.grid_points() > spec.max_grid_points:
            raise ConfigError(f"search: the grid has {spec.grid_points():,} points, more than budget.max_grid_points "
                              f"= {spec.max_grid_points:,}; add steps, narrow the ranges, use sampler 'tpe' or "
                              "'random', or raise budget.max_grid_points")
