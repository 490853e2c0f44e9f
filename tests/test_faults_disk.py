"""A full disk, for real: a small tmpfs mounted by the test (as root) holds the checkpoints, the MLflow store, or
both, while a real ``sweepbench train`` on MNIST runs. A checkpoint that does not fit ends the run FAILED with one
``disk full at <path>`` line and leaves no partial file behind; a store that cannot be written ends the command
without a traceback and its run is reconciled once there is space again."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Iterator

import pytest
from mlflow import MlflowClient

from tests.conftest import run_cli
from tests.test_reconcile import wait_for_running_run

BIG_MODEL = ("--model", "mnist_mlp", "--dataset", "mnist", "--model-arg", "hidden_size=512", "--train-subset", "2000",
             "--epochs", "3", "--device", "cpu")  # its checkpoints are 4.9 MB


@contextlib.contextmanager
def tmpfs(folder: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` mounted on ``folder`` for the block; the test skips where mounting is not allowed."""
    folder.mkdir(parents=True, exist_ok=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount rights): {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "--lazy", str(folder)], check=True)


def only_run(tracking_uri: str):
    client = MlflowClient(tracking_uri)
    [run] = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    return run


def assert_disk_full_failure(completed: subprocess.CompletedProcess, checkpoint: Path) -> None:
    """Exit status 1, one error line naming the checkpoint, no traceback, no partial file left."""
    errors = [line for line in completed.stderr.splitlines() if line.startswith("sweepbench: error:")]
    assert completed.returncode == 1, completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
    assert errors == [completed.stderr.splitlines()[-1]], completed.stderr
    assert errors[0].startswith(f"sweepbench: error: disk full at {checkpoint}: no space left"), errors[0]
    assert not list(checkpoint.parent.iterdir()), "a partial checkpoint was left on the full disk"


def test_a_checkpoint_larger_than_its_disk_fails_the_run_in_one_line(tmp_path: Path, data_dir: Path) -> None:
    tracking_uri = f"sqlite:///{tmp_path / 'mlflow.db'}"  # the store on the normal disk
    with tmpfs(tmp_path / "full", "600k") as checkpoints:
        completed = run_cli("train", *BIG_MODEL, "--checkpoint-dir", str(checkpoints), "--data-dir", str(data_dir),
                            "--tracking-uri", tracking_uri, timeout=300)
        assert_disk_full_failure(completed, checkpoints / "last.pt")
    run = only_run(tracking_uri)
    assert run.info.status == "FAILED"
    assert run.data.tags["error"].startswith(f"disk full at {checkpoints / 'last.pt'}: no space left")


def test_a_checkpoint_that_fills_the_stores_disk_still_records_the_failure(tmp_path: Path, data_dir: Path) -> None:
    """Store and checkpoints on one 3 MB disk: the partial checkpoint is removed, so the FAILED status fits."""
    with tmpfs(tmp_path / "full", "3m") as disk:
        tracking_uri = f"sqlite:///{disk / 'mlflow.db'}"
        completed = run_cli("train", *BIG_MODEL, "--checkpoint-dir", str(disk / "checkpoints"), "--data-dir",
                            str(data_dir), "--tracking-uri", tracking_uri, timeout=300)
        assert_disk_full_failure(completed, disk / "checkpoints" / "last.pt")
        run = only_run(tracking_uri)
        assert run.info.status == "FAILED" and run.data.tags["error"].startswith("disk full at ")


def fill(disk: Path) -> None:
    """Writes a file on ``disk`` until no byte is left."""
    with open(disk / f"filler-{uuid.uuid4().hex}", "wb", buffering=0) as filler:
        with contextlib.suppress(OSError):
            while True:
                filler.write(b"\0" * 65536)


@pytest.mark.slow
def test_a_store_whose_disk_fills_mid_run_ends_without_traceback_and_is_reconciled_later(tmp_path: Path,
                                                                                        data_dir: Path) -> None:
    """The store's own disk fills while the run trains (checkpoints elsewhere): the run's end cannot be written,
    so the run stays RUNNING; once there is space, ``sweepbench runs reconcile`` ends it KILLED."""
    with tmpfs(tmp_path / "full", "3m") as disk:
        tracking_uri = f"sqlite:///{disk / 'mlflow.db'}"
        process = subprocess.Popen(
            [sys.executable, "-m", "sweepbench.cli", "train", *BIG_MODEL[:-4], "--epochs", "10", "--checkpoint-dir",
             str(tmp_path / "checkpoints"), "--data-dir", str(data_dir), "--tracking-uri", tracking_uri],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        run_id = wait_for_running_run(disk / "mlflow.db", process)
        fill(disk)
        _, stderr = process.communicate(timeout=300)
        assert process.returncode == 1, stderr
        assert "Traceback" not in stderr, stderr
        assert "database or disk is full" in stderr, stderr
        assert MlflowClient(tracking_uri).get_run(run_id).info.status == "RUNNING"
        for filler in disk.glob("filler-*"):
            filler.unlink()
        completed = run_cli("runs", "reconcile", "--tracking-uri", tracking_uri, timeout=120)
        assert completed.returncode == 0, completed.stderr
        run = MlflowClient(tracking_uri).get_run(run_id)
        assert run.info.status == "KILLED" and "reconciled by sweepbench" in run.data.tags["stop_reason"]
