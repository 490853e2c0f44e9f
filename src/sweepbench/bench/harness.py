"""The one benchmark mechanism: axes expand to cells; each cell makes its runs under one parent run in MLflow;
the cells' outcomes make a table with its comparisons; the table, its notes, its charts and its figures are
published on the parent run. Its instances: the device x precision matrix (``bench.run``: a cell is a
model/device/precision/... combination and its repeats), the sampler x seed comparison (``compare.run``: a cell is
one member study) and a study packed against unpacked (``benchmarks/packed_study.py``: a cell is the study at one
pack size)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Generic, Protocol, Sequence, TypeVar

import pandas as pd

from ..report import export_table
from ..status import MlflowStatus
from ..tracking import Store

CellT = TypeVar("CellT")
OutcomeT = TypeVar("OutcomeT")


@dataclass
class Parent:
    """The parent run a harness's cells make their runs under."""

    store: Store
    experiment: str
    experiment_id: str
    run_id: str


@dataclass
class Published:
    """What an instance publishes on its parent run once its cells have run: the table (as ``table.<fmt>``, or
    ``<stem>.<fmt>``) with notes, charts (PNG), metrics, tags and further text files (the spec, say). ``render``
    writes the table in a format, when an instance writes it its own way."""

    title: str
    table: pd.DataFrame
    notes: Sequence[str] = ()
    stem: str = "table"
    formats: Sequence[str] = ("csv", "md", "html")
    charts: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    render: Callable[[pd.DataFrame, str], str] | None = None

    def text(self, fmt: str) -> str:
        if self.render is not None:
            return self.render(self.table, fmt)
        return export_table(self.table, fmt, list(self.notes), self.title)


class Instance(Protocol[CellT, OutcomeT]):
    """One kind of benchmark: its cells, how they run under the parent run (``run_cells``: ``on_cell`` called
    as each is done, the outcomes returned in the order of ``cells()``), and what the outcomes publish (None
    when there is nothing to publish yet: a comparison with too few paired seeds, say). Most instances run
    their cells in order, one to its end before the next (``CellsInOrder``); the device matrix interleaves its
    cells' repeats in rounds."""

    def cells(self) -> Sequence[CellT]: ...
    def run_cells(self, parent: Parent, on_cell: Callable[[OutcomeT], None] | None = None) -> list[OutcomeT]: ...
    def publish(self, outcomes: list[OutcomeT], parent: Parent) -> Published | None: ...
    def failed(self, outcome: OutcomeT) -> bool: ...


class CellsInOrder:
    """``run_cells`` for an instance whose ``run_cell(cell, parent)`` runs one cell to its end."""

    def run_cells(self, parent: Parent, on_cell: Callable[[Any], None] | None = None) -> list[Any]:
        outcomes = []
        for cell in self.cells():
            outcomes.append(self.run_cell(cell, parent))
            if on_cell is not None:
                on_cell(outcomes[-1])
        return outcomes


@dataclass
class HarnessResult(Generic[OutcomeT]):
    outcomes: list[OutcomeT]
    published: Published | None
    status: str


def run_harness(instance: Instance[CellT, OutcomeT], parent: Parent,
                on_cell: Callable[[OutcomeT], None] | None = None,
                after_cells: Callable[[], None] | None = None) -> HarnessResult[OutcomeT]:
    """Runs every cell of ``instance`` under ``parent``'s run (``instance.run_cells``), then publishes on it, and
    ends it: FINISHED, FAILED when a cell failed (``instance.failed``) or the harness raised, KILLED on Ctrl-C.
    ``after_cells`` runs once the cells are done, whatever happened (stopping a monitor, say)."""
    with parent.store.lifecycle(parent.run_id) as ending:
        try:
            outcomes = instance.run_cells(parent, on_cell)
        finally:
            if after_cells is not None:
                after_cells()
        if any(instance.failed(outcome) for outcome in outcomes):
            ending.status = MlflowStatus.FAILED
        published = instance.publish(outcomes, parent)
        if published is not None:
            publish(parent, published)
            ending.tags = dict(published.tags)
    return HarnessResult(outcomes, published, ending.status)


def publish(parent: Parent, published: Published) -> None:
    store, run_id = parent.store, parent.run_id
    if published.metrics:
        store.log(run_id, metrics=published.metrics)
    for fmt in published.formats:
        store.log_text(run_id, published.text(fmt), f"{published.stem}.{fmt}")
    for name, chart in published.charts.items():
        store.log_figure(run_id, chart, name)
    for name, text in published.texts.items():
        store.log_text(run_id, text, name)
