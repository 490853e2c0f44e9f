"""Runs a comparison on the one benchmark harness (``bench.harness``): every sampler x seed member as a normal
study (exactly N, resume, workers, the spec's pruner), seed by seed, under one comparison parent run in MLflow;
then the report, logged to that run. A rerun resumes: finished members are skipped, a cut one resumes as any study
does, and the parent run is reopened. The report can be rebuilt from the stores alone (``report_from_store``)."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..bench.harness import CellsInOrder, Parent, Published, run_harness
from ..config import ConfigError
from ..report.export import export_table
from ..status import MlflowStatus
from ..study import StudyJob, make_job, run_study
from ..study.coordination import Tally
from ..study.spec import parse_spec
from ..tracking import Store
from .. import tomlcheck
from ..tracking.store import DESCRIPTION_TAG
from .report import ComparisonReport, build_report, curves_figure, paired_seeds
from .results import MemberResult, load_member, load_results
from .spec import Comparison, parse_comparison

log = logging.getLogger(__name__)

COMPARISON_TAG = "sweepbench.comparison"
SPEC_ARTIFACT = "spec/comparison.toml"
TABLE_FORMATS = ("md", "csv", "json", "html")
PROGRESS_BAR_ENV = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"


@dataclass
class ComparisonOutcome:
    comparison: Comparison
    run_id: str
    status: str
    report: ComparisonReport | None
    wall_seconds: float


def plan_params(comparison: Comparison) -> dict[str, str]:
    """What the comparison's parent run records of its plan: a rerun with another plan is refused."""
    return {"samplers": ",".join(comparison.samplers), "seeds": ",".join(map(str, comparison.seeds)),
            "n_trials": str(comparison.study.target_trials()),
            "target": "" if comparison.target is None else repr(comparison.target),
            "objective": f"{comparison.study.metric_names[0]} ({comparison.direction})"}


def member_jobs(comparison: Comparison, storage_url: str | None, tracking_uri: str | None, workers: int,
                heartbeat_interval: int | None) -> dict[tuple[str, int], StudyJob]:
    """Every member's job, made (and so checked) before any study or run exists."""
    return {(sampler, seed): make_job(comparison.member_spec(sampler, seed), storage_url, tracking_uri, workers,
                                      heartbeat_interval, system_metrics=False, comparison=comparison.name)
            for sampler, seed in comparison.members()}


def run_comparison(comparison: Comparison, spec_text: str, storage_url: str | None = None,
                   tracking_uri: str | None = None, workers: int = 1,
                   heartbeat_interval: int | None = None) -> ComparisonOutcome:
    started = time.perf_counter()
    jobs = member_jobs(comparison, storage_url, tracking_uri, workers, heartbeat_interval)
    store = Store(next(iter(jobs.values())).tracking_uri)
    run_id = open_comparison_run(store, comparison, spec_text)
    parent = Parent(store, comparison.name, store.experiment_id_of(run_id), run_id)
    instance = SamplerComparison(comparison, jobs, storage_url)
    result = run_harness(instance, parent)
    return ComparisonOutcome(comparison, run_id, result.status, instance.report, time.perf_counter() - started)


@dataclass
class SamplerComparison(CellsInOrder):
    """The sampler x seed comparison as an instance of the one benchmark harness (``bench.harness``): a cell is
    one member study (a sampler at a seed), run or resumed as any study, its parent run a child of the
    comparison's; the outcomes publish the report (``report``) once the seeds pair up."""

    comparison: Comparison
    jobs: dict[tuple[str, int], StudyJob]
    storage_url: str | None
    report: ComparisonReport | None = None

    def cells(self) -> list[tuple[str, int]]:
        return list(self.jobs)

    def run_cell(self, member: tuple[str, int], parent: Parent) -> bool:
        """Whether the member study reached its target."""
        job = dataclasses.replace(self.jobs[member], comparison_run_id=parent.run_id)
        finished, line = _run_member(job, member, self.storage_url, self.comparison)
        log.info(f"[{list(self.jobs).index(member) + 1}/{len(self.jobs)}] study {job.spec.name}: {line}")
        return finished

    def failed(self, finished: bool) -> bool:
        return not finished

    def publish(self, outcomes: list[bool], parent: Parent) -> Published | None:
        """Per-sampler metrics, the table in every format with the verdicts, the curves, the conclusion as the
        run's description."""
        results = load_results(self.comparison, self.storage_url)
        if not paired_seeds(self.comparison, results):
            return None
        report = self.report = build_report(self.comparison, results)
        metrics = {f"{column}.{row['sampler']}": row[column] for row in report.table.to_dict("records")
                   for column in ("final_best_iqm", "auc_iqm", "mean_rank")}
        charts = {"curves.png": curves_figure(report.comparison, results, report.paired_seeds)}
        return Published(f"comparison {self.comparison.name}", report.table, report.notes(), "comparison",
                         TABLE_FORMATS, charts, metrics, {"conclusion": report.conclusion,
                                                          DESCRIPTION_TAG: report.conclusion},
                         render=lambda table, fmt: render(report, fmt))


def _run_member(job: StudyJob, member: tuple[str, int], storage_url: str | None,
                comparison: Comparison) -> tuple[bool, str]:
    """Runs (or resumes) one member study; whether it reached its target, and a line saying how it ended."""
    study = load_member(comparison, *member, storage_url)
    if study is not None:
        tally = Tally.of(study.get_trials(deepcopy=False))
        if tally.finished >= job.spec.target_trials() and not tally.running:
            return True, f"already at {tally.finished} finished trials"
    outcome = run_study(job)
    return outcome.status == MlflowStatus.FINISHED, f"{outcome.reason()} in {outcome.wall_seconds:.0f} s"


def open_comparison_run(store: Store, comparison: Comparison, spec_text: str) -> str:
    """The comparison's parent run: the one in its experiment, reopened, or a new one with the plan as params and
    the spec as an artifact. A plan that differs from the recorded one is refused in one line."""
    experiment_id = store.experiment(comparison.name, comparison.study.description or None)
    existing = find_comparison_run(store, comparison.name)
    params = plan_params(comparison)
    if existing is not None:
        recorded = {key: existing.data.params.get(key) for key in params}
        changed = [f"{key} {recorded[key]!r} (now {value!r})" for key, value in params.items()
                   if recorded[key] != value]
        if changed:
            raise ConfigError(f"compare: comparison {comparison.name!r} was run with {'; '.join(changed)}; "
                              "rerun it with the same plan, or give the spec another name")
        store.reopen(existing.info.run_id)
        return existing.info.run_id
    run_id = store.start_run(experiment_id, f"comparison-{comparison.name}", "comparison",
                             {COMPARISON_TAG: comparison.name}, params)
    store.log_text(run_id, spec_text, SPEC_ARTIFACT)
    return run_id


def find_comparison_run(store: Store, name: str):
    experiment = store.client.get_experiment_by_name(name)
    if experiment is None:
        return None
    runs = store.client.search_runs([experiment.experiment_id], f"tags.`{COMPARISON_TAG}` = '{name}' AND "
                                    "tags.`sweepbench.kind` = 'comparison'", order_by=["attributes.start_time ASC"])
    return runs[0] if runs else None


def render(report: ComparisonReport, fmt: str) -> str:
    """The table; md adds the notes (verdicts and conclusion) below it, html puts them in the page."""
    text = export_table(report.table, fmt, notes=report.notes(), title=f"comparison {report.comparison.name}")
    if fmt == "md":
        text += "\n\n" + "\n".join(f"- {note}" for note in report.notes())
    return text


def comparison_from_store(store: Store, name: str) -> Comparison:
    """The comparison as its parent run recorded it: the spec it logged and the plan in its params."""
    run = find_comparison_run(store, name)
    if run is None:
        names = sorted(store.experiment_names().values())
        raise ConfigError(f"compare-report: no comparison {name!r} in the MLflow store; experiments there: "
                          f"{', '.join(names) or 'none'}")
    with tempfile.TemporaryDirectory() as folder, _no_progress_bar():
        path = Path(store.client.download_artifacts(run.info.run_id, SPEC_ARTIFACT, folder))
        data, _ = tomlcheck.read_toml(path, "study spec")
    params = run.data.params
    study = parse_spec(data, f"{name} (logged spec)").with_overrides(n_trials=int(params["n_trials"]))
    comparison = parse_comparison(study, {}, params["samplers"].split(","), len(params["seeds"].split(",")),
                                  float(params["target"]) if params["target"] else None)
    return dataclasses.replace(comparison, seeds=tuple(int(seed) for seed in params["seeds"].split(",")))


@contextlib.contextmanager
def _no_progress_bar() -> Iterator[None]:
    """MLflow draws a download progress bar on stderr, for one small file too."""
    saved = os.environ.get(PROGRESS_BAR_ENV)
    os.environ[PROGRESS_BAR_ENV] = "false"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(PROGRESS_BAR_ENV)
        else:
            os.environ[PROGRESS_BAR_ENV] = saved


def report_from_store(name: str, tracking_uri: str | None, storage_url: str | None
                      ) -> tuple[ComparisonReport, list[MemberResult]]:
    comparison = comparison_from_store(Store(tracking_uri), name)
    results = load_results(comparison, storage_url)
    return build_report(comparison, results), results
