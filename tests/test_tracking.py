"""MLflow tracking against real stores: SQLite in a temp dir, and a real ``mlflow server`` over HTTP."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from sweepbench.config import RunConfig, field_names
from sweepbench.data import load_dataset
from sweepbench.engine import Callback, StopTraining, evaluate, normalise, train
from sweepbench.models import create_model
from sweepbench.tracking import (MlflowLogger, default_tracking_uri, ensure_experiment, fluent_tracking_uri,
                                 git_commit, resolve_tracking_uri, stop_process_group)
from tests.conftest import free_port, mlflow_server, run_cli, wait_for_http

EPOCH_METRICS = ("train_loss", "val_loss", "val_accuracy", "epoch_seconds", "samples_per_second", "lr")
FINAL_METRICS = ("test_accuracy", "time_to_target_seconds", "peak_memory_mb", "train_seconds", "total_seconds")
RUN_ARTIFACTS = {"checkpoints", "confusion_matrix.png", "learning_curve.png", "per_class_accuracy.csv",
                 "environment.json"}
TRAIN_ARGS = ("--model-arg", "hidden_size=32", "--optimizer", "sgd", "--lr", "0.1", "--batch-size", "256",
              "--device", "cpu")


def sqlite_uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"


def quick_config(data_dir: Path, **changes) -> RunConfig:
    settings = dict(data_dir=str(data_dir), model_kwargs={"hidden_size": 32}, train_subset=2000, optimizer="sgd",
                    lr=0.05, epochs=2, device="cpu")
    return RunConfig(**{**settings, **changes})


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """One SQLite store for the in-process tests (creating its tables takes seconds)."""
    folder = tmp_path_factory.mktemp("store")
    (folder / "mlruns").mkdir()
    return sqlite_uri(folder)


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory, data_dir):
    """One real ``sweepbench train`` in a fresh project folder, logging to the default store there."""
    project = tmp_path_factory.mktemp("project")
    completed = run_cli("train", *TRAIN_ARGS, "--epochs", "2", "--seed", "3", "--target-accuracy", "0.5",
                        "--experiment", "cli-test", "--data-dir", str(data_dir), "--json", cwd=project,
                        env={"MLFLOW_TRACKING_URI": ""}, check=True)
    summary = json.loads(completed.stdout)  # --json: the JSON alone on stdout, the text lines on stderr
    uri = sqlite_uri(project)
    return {"summary": summary, "uri": uri, "project": project, "client": MlflowClient(uri),
            "run": MlflowClient(uri).get_run(summary["mlflow_run_id"]), "stderr": completed.stderr}


def test_default_store_is_sqlite_inside_mlruns_and_the_env_overrides_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert default_tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"
    assert resolve_tracking_uri() == default_tracking_uri() and not (tmp_path / "mlruns").exists()
    ensure_experiment("first", resolve_tracking_uri())
    assert (tmp_path / "mlruns" / "mlflow.db").is_file(), "the store is made when it is first written to"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1")
    assert resolve_tracking_uri() == "http://127.0.0.1:1"
    assert resolve_tracking_uri("sqlite:////elsewhere/mlflow.db") == "sqlite:////elsewhere/mlflow.db"


def test_experiments_keep_their_artifacts_beside_the_sqlite_file(store):
    experiment_id = ensure_experiment("artifacts-here", store)
    assert ensure_experiment("artifacts-here", store) == experiment_id
    location = MlflowClient(store).get_experiment(experiment_id).artifact_location
    assert location == (Path(store.removeprefix("sqlite:///")).parent / "artifacts").as_uri()


@pytest.mark.slow
def test_a_cli_run_logs_every_param_and_tag(cli_run, data_dir):
    run = cli_run["run"]
    assert run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert f"mlflow run      {run.info.run_id} in experiment 'cli-test'" in cli_run["stderr"]
    assert run.info.artifact_uri.startswith((cli_run["project"] / "mlruns" / "artifacts").as_uri())
    expected_params = (set(field_names()) - {"model_kwargs"}) | {"model_kwargs.hidden_size"}
    assert set(run.data.params) == expected_params
    assert (run.data.params["model_kwargs.hidden_size"], run.data.params["lr"], run.data.params["epochs"],
            run.data.params["optimizer"]) == ("32", "0.1", "2", "sgd")
    tags = run.data.tags
    assert (tags["device"], tags["precision"], tags["loader"], tags["dataset"]) == ("cpu", "fp32", "device", "mnist")
    assert tags["dataset_fingerprint"] == load_dataset("mnist", data_dir).fingerprint
    assert tags["torch_version"] == torch.__version__ and tags["device_name"] and tags["host"]
    assert {"cuda_version", "cudnn_version", "python_version"} <= set(tags)
    assert tags.get("git_commit") == git_commit()


@pytest.mark.slow
def test_a_cli_run_logs_metrics_per_epoch_at_their_step_and_final_metrics(cli_run):
    client, run_id, summary = cli_run["client"], cli_run["run"].info.run_id, cli_run["summary"]
    for name in EPOCH_METRICS:
        assert [metric.step for metric in client.get_metric_history(run_id, name)] == [1, 2], name
    assert [m.value for m in client.get_metric_history(run_id, "epoch_seconds")] == summary["epoch_seconds"]
    metrics = cli_run["run"].data.metrics
    assert set(FINAL_METRICS) <= set(metrics)
    assert metrics["test_accuracy"] == summary["test_accuracy"]
    assert metrics["time_to_target_seconds"] == summary["time_to_target_seconds"]
    assert metrics["total_seconds"] == summary["wall_seconds"] and metrics["epoch_logging_seconds"] > 0


@pytest.mark.slow
def test_a_cli_run_logs_its_artifacts(cli_run):
    client, run_id = cli_run["client"], cli_run["run"].info.run_id
    assert RUN_ARTIFACTS <= {artifact.path for artifact in client.list_artifacts(run_id)}
    assert {a.path for a in client.list_artifacts(run_id, "checkpoints")} == {"checkpoints/best.pt",
                                                                              "checkpoints/last.pt"}
    folder = Path(mlflow.artifacts.download_artifacts(run_id=run_id, tracking_uri=cli_run["uri"]))
    per_class = (folder / "per_class_accuracy.csv").read_text().splitlines()
    assert per_class[0] == "class,accuracy" and len(per_class) == 11
    environment = json.loads((folder / "environment.json").read_text())
    assert environment["torch_version"] == torch.__version__ and environment["mlflow_version"] == mlflow.__version__
    for image in ("confusion_matrix.png", "learning_curve.png"):
        assert (folder / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def logged_splits(client: MlflowClient, run_id: str) -> dict[str, object]:
    """A run's dataset inputs by their context (the split), as MLflow's runs table reads them."""
    inputs = client.get_run(run_id).inputs.dataset_inputs
    return {next(tag.value for tag in item.tags if tag.key == "mlflow.data.context"): item.dataset
            for item in inputs}


@pytest.mark.slow
def test_a_cli_run_logs_each_split_it_used_as_an_mlflow_dataset_input(cli_run, data_dir):
    splits = logged_splits(cli_run["client"], cli_run["run"].info.run_id)
    assert set(splits) == {"training", "validation", "test"}
    dataset = load_dataset("mnist", data_dir)
    rows = {name: json.loads(record.profile)["num_rows"] for name, record in splits.items()}
    assert rows == {"training": len(dataset.x_train), "validation": len(dataset.x_val),
                    "test": len(dataset.x_test)}
    assert {record.name for record in splits.values()} == {"mnist"}
    assert len({record.digest for record in splits.values()}) == 3, "one dataset per split, each its own digest"
    for record in splits.values():
        assert record.source_type == "local"
        assert json.loads(record.source) == {"uri": str(data_dir / "mnist.npz")}
        assert json.loads(record.profile)["fingerprint"] == cli_run["run"].data.tags["dataset_fingerprint"]


@pytest.mark.slow
def test_a_cli_run_has_mlflow_system_metrics_and_the_off_switch_and_mlflows_variable_turn_them_off(cli_run, tmp_path,
                                                                                                  data_dir):
    client, run_id = cli_run["client"], cli_run["run"].info.run_id
    names = {name for name in cli_run["run"].data.metrics if name.startswith("system/")}
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= names
    assert client.get_metric_history(run_id, "system/cpu_utilization_percentage")
    for switch, env in ((("--no-system-metrics",), {}), ((), {"MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING": "false"})):
        completed = run_cli("train", *TRAIN_ARGS, "--epochs", "1", "--train-subset", "500", *switch, "--json",
                            "--data-dir", str(data_dir), cwd=tmp_path, env={"MLFLOW_TRACKING_URI": "", **env},
                            check=True)
        run = MlflowClient(sqlite_uri(tmp_path)).get_run(json.loads(completed.stdout)["mlflow_run_id"])
        assert run.info.status == "FINISHED" and not [m for m in run.data.metrics if m.startswith("system/")]


def test_a_training_subset_has_its_own_digest_and_a_pruned_run_never_used_the_test_split(store, data_dir):
    subset, pruned = MlflowLogger("inputs", store, log_artifacts=False), MlflowLogger("inputs", store)
    train(quick_config(data_dir, epochs=1, train_subset=1000), [subset])
    train(quick_config(data_dir), [RaiseAt(1, StopTraining("pruned at epoch 1", "pruned")), pruned])
    client = MlflowClient(store)
    small, stopped = logged_splits(client, subset.run_id), logged_splits(client, pruned.run_id)
    assert json.loads(small["training"].profile)["num_rows"] == 1000
    assert json.loads(stopped["training"].profile)["num_rows"] == 2000
    assert small["training"].digest != stopped["training"].digest
    assert small["validation"].digest == stopped["validation"].digest, "the same validation split, the same digest"
    assert set(small) == {"training", "validation", "test"} and set(stopped) == {"training", "validation"}


@pytest.mark.slow
def test_the_logged_checkpoint_reproduces_the_logged_test_accuracy(cli_run, data_dir):
    run = cli_run["run"]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/last.pt",
                                               tracking_uri=cli_run["uri"])
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = create_model("mnist_mlp", hidden_size=32)
    model.load_state_dict(state["model"])
    mnist = load_dataset("mnist", data_dir)
    _, accuracy, _ = evaluate(model, normalise(mnist.x_test, mnist.mean, mnist.std), mnist.y_test, 10, 1000, "fp32")
    assert accuracy == run.data.metrics["test_accuracy"]


@pytest.mark.slow
def test_the_logged_model_loads_with_mlflow_and_predicts_like_the_checkpoint(cli_run, data_dir):
    run = cli_run["run"]
    [output] = run.outputs.model_outputs
    logged = cli_run["client"].get_logged_model(output.model_id)
    assert logged.status == "READY" and logged.source_run_id == run.info.run_id
    assert {metric.key: metric.value for metric in logged.metrics}["test_accuracy"] == run.data.metrics["test_accuracy"]
    with fluent_tracking_uri(cli_run["uri"]):
        loaded = mlflow.pytorch.load_model(f"runs:/{run.info.run_id}/model")
        served = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
        model_info = mlflow.models.get_model_info(f"runs:/{run.info.run_id}/model")
        checkpoint = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="checkpoints/last.pt")
    assert model_info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"] == (-1, 1, 28, 28)
    trained = create_model("mnist_mlp", hidden_size=32)
    trained.load_state_dict(torch.load(checkpoint, weights_only=True)["model"])
    mnist = load_dataset("mnist", data_dir)
    images = normalise(mnist.x_test[:500], mnist.mean, mnist.std)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(images), trained.eval()(images))
        torch.testing.assert_close(torch.as_tensor(served.predict(images.numpy())), trained(images))
    accuracy = (loaded(images).argmax(1) == mnist.y_test[:500]).double().mean().item()
    assert accuracy > 0.8


class RaiseAt(Callback):
    def __init__(self, epoch: int, error: BaseException) -> None:
        self.epoch, self.error = epoch, error

    def on_epoch_end(self, context, record) -> None:
        if record.epoch == self.epoch:
            raise self.error


def finished_run(uri: str, logger: MlflowLogger):
    return MlflowClient(uri).get_run(logger.run_id)


def test_a_run_that_raises_ends_failed_with_the_error_recorded(store, data_dir):
    logger = MlflowLogger("failures", store)
    with pytest.raises(RuntimeError, match="disk on fire"):
        train(quick_config(data_dir), [RaiseAt(1, RuntimeError("disk on fire")), logger])
    run = finished_run(store, logger)
    assert run.info.status == "FAILED" and run.data.tags["status"] == "failed"
    assert run.data.tags["error"] == "RuntimeError: disk on fire"


def test_a_diverged_run_is_failed_and_a_pruned_one_finished_and_named_pruned(store, data_dir):
    diverged, pruned = MlflowLogger("statuses", store), MlflowLogger("statuses", store, log_artifacts=False)
    train(quick_config(data_dir, lr=1e6, epochs=3), [diverged])
    train(quick_config(data_dir), [RaiseAt(1, StopTraining("pruned at epoch 1", "pruned")), pruned])
    assert finished_run(store, diverged).info.status == "FAILED"
    assert finished_run(store, diverged).data.tags["error"].startswith("diverged")
    run = finished_run(store, pruned)
    assert (run.info.status, run.data.tags["status"], run.data.tags["stop_reason"]) == ("FINISHED", "pruned",
                                                                                        "pruned at epoch 1")
    assert run.info.run_name.endswith(" [pruned]")
    assert MlflowClient(store).list_artifacts(pruned.run_id) == []


def test_child_runs_point_at_their_parent(store, data_dir):
    client = MlflowClient(store)
    parent = client.create_run(ensure_experiment("nested", store), run_name="study")
    child = MlflowLogger("nested", store, run_name="trial-0", parent_run_id=parent.info.run_id,
                         tags={"trial": "0"}, log_artifacts=False)
    train(quick_config(data_dir, epochs=1), [child])
    client.set_terminated(parent.info.run_id)
    run = finished_run(store, child)
    assert run.data.tags["mlflow.parentRunId"] == parent.info.run_id and run.data.tags["trial"] == "0"
    assert run.info.run_name == "trial-0" and run.info.status == "FINISHED"


def test_logging_the_model_leaves_the_global_tracking_uri_as_it_was(store, data_dir, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:////nowhere/else.db")
    logger = MlflowLogger("global-state", store)
    train(quick_config(data_dir, epochs=1), [logger])
    assert finished_run(logger.tracking_uri, logger).outputs.model_outputs
    assert os.environ["MLFLOW_TRACKING_URI"] == "sqlite:////nowhere/else.db"
    assert mlflow.get_tracking_uri() == "sqlite:////nowhere/else.db"


def wait_for_first_epoch(client: MlflowClient, experiment_id: str, process: subprocess.Popen) -> str:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        runs = client.search_runs([experiment_id], "metrics.val_accuracy >= 0")
        if runs:
            return runs[0].info.run_id
        time.sleep(0.3)
    raise AssertionError(f"no epoch logged; train exited {process.poll()}: {process.communicate()}")


@pytest.mark.slow
@pytest.mark.parametrize("signum, message", [(signal.SIGINT, "interrupted (Ctrl-C)"),
                                             (signal.SIGTERM, "terminated (SIGTERM)")])
def test_ctrl_c_or_sigterm_ends_the_run_killed(store, data_dir, signum, message):
    experiment = f"interrupted-by-{signum.name}"  # its own experiment: the store is shared by the module's tests
    experiment_id = ensure_experiment(experiment, store)  # tables exist before a second process opens it
    process = subprocess.Popen(
        [sys.executable, "-m", "sweepbench.cli", "train", *TRAIN_ARGS, "--epochs", "500", "--experiment",
         experiment, "--tracking-uri", store, "--data-dir", str(data_dir)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        client = MlflowClient(store)
        run_id = wait_for_first_epoch(client, experiment_id, process)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signum, stderr
    assert stderr.strip().endswith(f"sweepbench: {message}")
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "killed"
    assert run.data.tags["stop_reason"] == message
    assert client.search_runs([experiment_id], "attributes.status = 'RUNNING'") == []


@pytest.fixture(scope="module")
def tracking_server(tmp_path_factory):
    """A real tracking server on 127.0.0.1 with a temp SQLite backend, serving artifacts; always stopped."""
    with mlflow_server(tmp_path_factory.mktemp("server")) as url:
        yield url


@pytest.mark.slow
def test_a_run_logged_to_a_server_over_http_reads_back_through_report(tracking_server, tmp_path, data_dir):
    trained = run_cli("train", *TRAIN_ARGS, "--experiment", "remote", "--tracking-uri", tracking_server,
                      "--data-dir", str(data_dir), "--json", cwd=tmp_path, check=True)
    summary = json.loads(trained.stdout.strip().splitlines()[-1])
    client = MlflowClient(tracking_server)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert RUN_ARTIFACTS <= {artifact.path for artifact in client.list_artifacts(run.info.run_id)}
    assert not (tmp_path / "mlruns" / "mlflow.db").exists()
    reported = run_cli("report", "--tracking-uri", tracking_server, "--experiment", "remote", "--format", "json",
                       cwd=tmp_path, check=True)
    [row] = json.loads(reported.stdout)
    assert (row["model"], row["device"], row["optimizer"], row["runs"]) == ("mnist_mlp", "cpu", "sgd", 1)
    assert row["test_accuracy_median"] == summary["test_accuracy"]
    assert row["train_seconds_median"] == summary["train_seconds"]


@pytest.mark.slow
def test_ui_serves_the_project_store_on_localhost_and_stops_on_ctrl_c(tmp_path):
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "ui", "--port", str(port)], cwd=tmp_path,
                               env={**os.environ, "MLFLOW_TRACKING_URI": ""}, stdout=subprocess.PIPE, text=True,
                               start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", process)
        process.send_signal(signal.SIGINT)
        stdout, _ = process.communicate(timeout=60)
    finally:
        stop_process_group(process)
    assert f"at http://127.0.0.1:{port}" in stdout and f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db" in stdout
    assert process.returncode == 130
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)


def log_splits_at_once(tracking_uri: str, train_subset: int, runs: int = 2) -> list[BaseException]:
    """``runs`` new runs (a study's workers) log the same new training and validation splits at the same moment;
    returns the errors they met."""
    from sweepbench.tracking.datasets import TRAINING, VALIDATION, log_splits
    from sweepbench.tracking.store import Store

    dataset = load_dataset("synthetic", val_size=100, num_classes=4, image_shape=(1, 8, 8))
    config = RunConfig(dataset="synthetic", train_subset=train_subset)
    store = Store(tracking_uri)
    experiment_id = store.experiment("dataset-race")
    run_ids = [store.start_run(experiment_id, f"worker-{index}", "train") for index in range(runs)]
    barrier, errors = threading.Barrier(runs), []

    def log(run_id: str) -> None:
        barrier.wait()
        try:
            log_splits(Store(tracking_uri), run_id, dataset, config, (TRAINING, VALIDATION))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=log, args=(run_id,)) for run_id in run_ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for run_id in run_ids:
        assert errors or set(logged_splits(store.client, run_id)) == {TRAINING, VALIDATION}
    return errors


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_workers_logging_a_new_dataset_at_once_all_succeed(where, store, tracking_server):
    """MLflow checks for a dataset, then inserts it: two workers logging a new one at once both insert, and one
    met the primary key (a whole fused pack FAILed on it in CI). Each round is a new dataset (its own digest)."""
    tracking_uri = store if where == "sqlite" else tracking_server
    errors = [error for rounds in range(1, 6) for error in log_splits_at_once(tracking_uri, 1000 + rounds, runs=3)]
    assert not errors, [f"{type(error).__name__}: {str(error)[:200]}" for error in errors]
