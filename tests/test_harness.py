"""The one benchmark mechanism (``bench.harness``) on a real MLflow store: cells in order under one parent run,
the table and charts published on it, and how the parent ends when a cell fails, raises or is interrupted. Its
real instances are tested where they live: the device x precision matrix (tests/test_bench.py) and the sampler
comparison (tests/test_compare.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd
import pytest

from sweepbench.bench.harness import CellsInOrder, Parent, Published, run_harness
from sweepbench.tracking import Store


@dataclass
class Squares(CellsInOrder):
    """A harness instance whose cell ``n`` makes one child run that records ``n * n``."""

    numbers: list[int]
    fail: set[int] = field(default_factory=set)
    raise_at: int | None = None
    interrupt_at: int | None = None

    def cells(self) -> list[int]:
        return self.numbers

    def run_cell(self, number: int, parent: Parent) -> tuple[int, str]:
        if number == self.raise_at:
            raise RuntimeError(f"cell {number} broke")
        if number == self.interrupt_at:
            raise KeyboardInterrupt
        run_id = parent.store.start_run(parent.experiment_id, f"square-{number}", "cell", parent_run_id=parent.run_id)
        parent.store.log(run_id, metrics={"square": number * number})
        parent.store.end_run(run_id, "FINISHED")
        return number, run_id

    def failed(self, outcome: tuple[int, str]) -> bool:
        return outcome[0] in self.fail

    def publish(self, outcomes: list[tuple[int, str]], parent: Parent) -> Published:
        table = pd.DataFrame({"n": [n for n, _ in outcomes], "square": [n * n for n, _ in outcomes]})
        figure, axes = plt.subplots()
        axes.plot(table["n"], table["square"])
        return Published("squares", table, notes=["n times n"], charts={"squares.png": figure},
                         metrics={"largest": float(table["square"].max())}, tags={"verdict": "quadratic"},
                         texts={"spec.txt": "numbers"})


def harness_parent(tmp_path: Path) -> Parent:
    store = Store(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = store.experiment("harness")
    return Parent(store, "harness", experiment_id, store.start_run(experiment_id, "squares", "bench"))


def test_cells_run_in_order_under_the_parent_which_gets_the_table_charts_and_figures(tmp_path: Path) -> None:
    parent, seen, stopped = harness_parent(tmp_path), [], []
    result = run_harness(Squares([3, 1, 2]), parent, on_cell=seen.append, after_cells=lambda: stopped.append(1))
    assert [n for n, _ in seen] == [3, 1, 2] and stopped == [1]
    assert result.status == "FINISHED" and list(result.published.table["square"]) == [9, 1, 4]
    client = parent.store.client
    run = client.get_run(parent.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.metrics["largest"] == 9 and run.data.tags["verdict"] == "quadratic"
    assert {item.path for item in client.list_artifacts(parent.run_id)} == {
        "table.csv", "table.md", "table.html", "squares.png", "spec.txt"}
    children = parent.store.child_runs([parent.experiment_id], parent.run_id)
    assert sorted(child.data.metrics["square"] for child in children) == [1, 4, 9]
    text = Path(client.download_artifacts(parent.run_id, "table.html", str(tmp_path))).read_text()
    assert "n times n" in text


def test_a_failed_cell_fails_the_parent_after_every_cell_ran(tmp_path: Path) -> None:
    parent = harness_parent(tmp_path)
    result = run_harness(Squares([1, 2, 3], fail={2}), parent)
    assert result.status == "FAILED" and len(result.outcomes) == 3
    assert parent.store.client.get_run(parent.run_id).info.status == "FAILED"


@pytest.mark.parametrize("stop, status", [("raise_at", "FAILED"), ("interrupt_at", "KILLED")])
def test_a_cell_that_raises_or_is_interrupted_ends_the_parent_and_still_runs_after_cells(
        tmp_path: Path, stop: str, status: str) -> None:
    parent, stopped = harness_parent(tmp_path), []
    with pytest.raises((RuntimeError, KeyboardInterrupt)):
        run_harness(Squares([1, 2, 3], **{stop: 2}), parent, after_cells=lambda: stopped.append(1))
    assert stopped == [1]
    assert parent.store.client.get_run(parent.run_id).info.status == status
    assert len(parent.store.child_runs([parent.experiment_id], parent.run_id)) == 1
