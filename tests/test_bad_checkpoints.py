"""``sweepbench train --resume FILE``: every bad checkpoint is one line and exit status 2, refused before any data
loads or MLflow run starts; a good one resumes honestly (the checkpoint's settings unless overridden, said on
stderr, applied to the optimizer and logged) and continues its MLflow run where MLflow allows."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Callable

import pytest
import torch
from mlflow import MlflowClient

from sweepbench.config import ConfigError, RunConfig
from sweepbench.engine import Callback, train
from sweepbench.engine.checkpoint import resume_config
from sweepbench.tracking import MlflowLogger, train_tracked
from tests.conftest import assert_refused, run_cli

SMALL = dict(model_kwargs={"hidden_size": 32}, train_subset=2000, val_size=1000, batch_size=256, device="cpu")
EPOCHS_DONE = 2


def small_config(data_dir: Path, **changes) -> RunConfig:
    return RunConfig(**{**SMALL, "data_dir": str(data_dir), "epochs": EPOCHS_DONE, **changes})


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, data_dir) -> Path:
    """A real last.pt after 2 of 2 epochs (adadelta, lr 1.0, hidden_size 32), written without MLflow."""
    folder = tmp_path_factory.mktemp("checkpoint")
    train(small_config(data_dir, checkpoint_dir=str(folder)))
    return folder / "last.pt"


def edited(folder: Path, source: Path, **changes) -> Path:
    """A copy of the checkpoint ``source`` with top-level keys changed (``config`` merged key by key)."""
    state = torch.load(source, weights_only=True)
    state["config"] = {**state["config"], **changes.pop("config", {})}
    state.update(changes)
    torch.save(state, folder / "edited.pt")
    return folder / "edited.pt"


def truncated(folder: Path, source: Path) -> Path:
    data = source.read_bytes()
    (folder / "truncated.pt").write_bytes(data[:len(data) // 2])
    return folder / "truncated.pt"


def random_bytes(folder: Path, source: Path) -> Path:
    (folder / "random.pt").write_bytes(random.Random(0).randbytes(4096))
    return folder / "random.pt"


def empty(folder: Path, source: Path) -> Path:
    (folder / "empty.pt").touch()
    return folder / "empty.pt"


def saved(name: str, value: object) -> Callable[[Path, Path], Path]:
    def make(folder: Path, source: Path) -> Path:
        torch.save(value, folder / name)
        return folder / name
    return make


# (id, the file to resume: made from the real checkpoint in a scratch folder, extra flags, the error's regex)
BAD_CHECKPOINTS = [
    ("missing", lambda folder, source: folder / "missing.pt", [],
     r"resume: \S+missing\.pt: no such file; expected a last\.pt or best\.pt"),
    ("directory", lambda folder, source: source.parent, [],
     r"resume: \S+: is a directory; expected a checkpoint file in it, e\.g\. \S+last\.pt"),
    ("empty", empty, [], r"resume: \S+empty\.pt: is empty; expected"),
    ("truncated", truncated, [], r"resume: \S+truncated\.pt: is a damaged or truncated torch file; expected"),
    ("random-bytes", random_bytes, [], r"resume: \S+random\.pt: is not a torch file; expected"),
    ("no-format-key", saved("weights.pt", {"weights": torch.zeros(3)}), [],
     r"resume: \S+weights\.pt: is not a sweepbench checkpoint \(a torch file without its 'format' key\)"),
    ("pickled-module", saved("module.pt", torch.nn.Linear(2, 2)), [],
     r"resume: \S+module\.pt: holds Python objects, not only tensors"),
    ("old-format", lambda folder, source: edited(folder, source, format=1), [],
     r"resume: \S+edited\.pt: is a sweepbench checkpoint of format 1; this version reads format 2 only"),
    ("incomplete", lambda folder, source: saved("partial.pt", {"format": 2, "config": {}})(folder, source), [],
     r"resume: \S+partial\.pt: is an incomplete sweepbench checkpoint \(no epoch, model, optimizer"),
    ("inconsistent", lambda folder, source: edited(folder, source, epoch=5), [],
     r"resume: \S+edited\.pt: is inconsistent \(epoch 5 with 2 epoch records\); expected"),
    ("invalid-config", lambda folder, source: edited(folder, source, config={"lr": -1.0}), [],
     r"resume: \S+edited\.pt: its config is invalid \(lr: -1\.0 is out of range; it must be > 0\); expected"),
    ("another-model", lambda folder, source: source, ["--model", "cifar_cnn"],
     r"resume: \S+last\.pt: model 'mnist_mlp' \(checkpoint\) differs from 'cifar_cnn' \(this run\); model, "
     r"model_kwargs, dataset, dataset_kwargs, val_size, optimizer cannot change on resume"),
    ("another-hidden-size", lambda folder, source: source, ["--model-arg", "hidden_size=64"],
     r"resume: \S+last\.pt: model_kwargs\.hidden_size 32 \(checkpoint\) differs from 64 \(this run\); "),
    ("another-dropout", lambda folder, source: source, ["--set", "model_kwargs.dropout=0.5"],
     r"model_kwargs\.dropout 0\.0 \(checkpoint\) differs from 0\.5 \(this run\)"),
    ("another-optimizer", lambda folder, source: source, ["--optimizer", "sgd", "--momentum", "0.9"],
     r"resume: \S+last\.pt: optimizer 'adadelta' \(checkpoint\) differs from 'sgd' \(this run\); "),
    ("another-dataset-and-split", lambda folder, source: source, ["--dataset", "fashion_mnist", "--val-size", "500"],
     r"dataset 'mnist' \(checkpoint\) differs from 'fashion_mnist' \(this run\), val_size 1000 \(checkpoint\) "
     r"differs from 500 \(this run\); "),
    ("fewer-epochs", lambda folder, source: source, ["--epochs", "1"],
     r"resume: \S+last\.pt: the checkpoint has already run 2 epochs, so epochs 1 leaves nothing to train; "
     r"give --epochs above 2"),
    ("no-epochs-left", lambda folder, source: source, [],
     r"the checkpoint has already run 2 epochs, so epochs 2 leaves nothing to train; give --epochs above 2"),
]


@pytest.mark.parametrize("make, extra, message", [case[1:] for case in BAD_CHECKPOINTS],
                         ids=[case[0] for case in BAD_CHECKPOINTS])
def test_a_bad_checkpoint_is_refused_in_one_line_before_data_or_mlflow(tmp_path, data_dir, checkpoint, make, extra,
                                                                       message):
    files, cwd, store = tmp_path / "files", tmp_path / "cwd", tmp_path / "other"
    files.mkdir(), cwd.mkdir()
    path = make(files, checkpoint)
    before = checkpoint.read_bytes()
    assert_refused(["train", "--resume", str(path), *extra, "--data-dir", str(data_dir),
                    "--tracking-uri", f"sqlite:///{store}/mlflow.db"], message, cwd)
    assert not store.exists(), "a refused resume must not even open the MLflow store, let alone create a run"
    assert checkpoint.read_bytes() == before


def test_the_engine_refuses_a_mismatched_checkpoint_before_loading_any_data(tmp_path, checkpoint):
    config = small_config(tmp_path / "no-data-here", optimizer="sgd", epochs=3, resume=str(checkpoint))
    with pytest.raises(ConfigError, match=r"optimizer 'adadelta' \(checkpoint\) differs from 'sgd'"):
        train(config)


def test_an_overridden_learning_rate_restarts_the_schedule_and_momentum_reaches_the_optimizer(tmp_path, data_dir):
    """The config wins over the optimizer state a checkpoint restores: lr is the schedule's start, so epoch 3
    runs at lr * lr_gamma ** 2, and a new momentum is the optimizer's momentum."""
    first, resumed = tmp_path / "first", tmp_path / "resumed"
    settings = dict(optimizer="sgd", lr=0.1, lr_gamma=0.5)
    train(small_config(data_dir, checkpoint_dir=str(first), **settings))
    result = train(small_config(data_dir, epochs=3, resume=str(first / "last.pt"), checkpoint_dir=str(resumed),
                                **{**settings, "lr": 0.4}, momentum=0.9))
    assert [record.lr for record in result.history] == pytest.approx([0.1, 0.05, 0.4 * 0.5 ** 2])
    group = torch.load(resumed / "last.pt", weights_only=True)["optimizer"]["param_groups"][0]
    assert group["momentum"] == 0.9 and group["initial_lr"] == 0.4


def test_an_fp32_checkpoint_resumes_in_fp16_with_a_fresh_grad_scaler(tmp_path, data_dir, checkpoint):
    result = train(small_config(data_dir, epochs=3, precision="fp16", resume=str(checkpoint)))
    assert result.status == "completed" and len(result.history) == 3


def test_resume_settings_come_from_the_checkpoint_except_those_given(tmp_path, checkpoint):
    """Not given: the checkpoint's; given: the user's, with a line for each that differs; ``checkpoint_dir`` stays
    the checkpoint's folder only for a checkpoint still in it (a copy elsewhere does not write back there)."""
    asked = RunConfig(epochs=4, lr=0.25, batch_size=64, resume=str(checkpoint))
    config, changes = resume_config(asked, {"epochs", "lr", "resume"}, torch.load(checkpoint, weights_only=True))
    assert (config.epochs, config.lr, config.batch_size, config.val_size) == (4, 0.25, 256, 1000)
    assert (config.model_kwargs, config.optimizer, config.checkpoint_dir) == ({"hidden_size": 32}, "adadelta",
                                                                              str(checkpoint.parent))
    assert changes == ["lr 0.25 (given) differs from the checkpoint's 1.0; using 0.25",
                       "epochs 4 (given) differs from the checkpoint's 2; using 4"]
    copy = tmp_path / "copy.pt"
    shutil.copy(checkpoint, copy)
    config, _ = resume_config(asked.replace(resume=str(copy)), {"epochs"}, torch.load(copy, weights_only=True))
    assert config.checkpoint_dir is None and config.lr == 1.0


def runs(uri: str) -> list:
    client = MlflowClient(uri)
    return client.search_runs([e.experiment_id for e in client.search_experiments()])


def epoch_steps(uri: str, run_id: str, metric: str = "val_accuracy") -> list[tuple[int, float]]:
    return [(m.step, m.value) for m in sorted(MlflowClient(uri).get_metric_history(run_id, metric),
                                              key=lambda m: m.step)]


@pytest.mark.slow
def test_an_override_is_warned_about_applied_and_logged(tmp_path, data_dir, checkpoint):
    """A checkpoint that names no MLflow run (written without MLflow) resumes into a new run, and says so; the
    given lr and epochs win over the checkpoint's, one warning line each, and MLflow logs what was used."""
    uri = f"sqlite:///{tmp_path}/store/mlflow.db"
    completed = run_cli("train", "--resume", str(checkpoint), "--epochs", "3", "--lr", "0.5", "--checkpoint-dir",
                        str(tmp_path / "resumed"), "--data-dir", str(data_dir), "--tracking-uri", uri, "--json",
                        cwd=tmp_path, check=True)
    messages = [line for line in completed.stderr.splitlines() if line.startswith("sweepbench:")]
    assert messages == [
        "sweepbench: warning: --resume: lr 0.5 (given) differs from the checkpoint's 1.0; using 0.5",
        "sweepbench: warning: --resume: epochs 3 (given) differs from the checkpoint's 2; using 3",
        "sweepbench: note: --resume: the checkpoint names no MLflow run (it was written without MLflow, or before "
        "sweepbench kept the run id); logging to a new run"]
    [run] = runs(uri)
    assert (run.data.params["lr"], run.data.params["epochs"], run.data.params["optimizer"]) == ("0.5", "3", "adadelta")
    assert run.data.params["model_kwargs.hidden_size"] == "32" and run.data.params["val_size"] == "1000"
    assert run.data.tags["sweepbench.resumed_at_epoch"] == "2" and run.info.status == "FINISHED"
    assert [(step, lr) for step, lr in epoch_steps(uri, run.info.run_id, "lr")] == [(1, 1.0), (2, 1.0), (3, 0.5)]
    state = torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)
    assert state["config"]["lr"] == 0.5 and state["optimizer"]["param_groups"][0]["lr"] == 0.5
    assert state["tracking"] == {"mlflow_run_id": run.info.run_id}


class Interrupt(Callback):
    """Ctrl-C after epoch 1's checkpoint is written, before the MLflow logger logs that epoch."""

    def on_epoch_end(self, context, record):
        raise KeyboardInterrupt


@pytest.mark.slow
def test_a_resumed_train_continues_its_mlflow_run_and_a_changed_one_starts_a_linked_run(tmp_path, data_dir):
    uri, folder = f"sqlite:///{tmp_path}/store/mlflow.db", tmp_path / "checkpoints"
    logger = MlflowLogger("train", uri)
    with pytest.raises(KeyboardInterrupt):
        train_tracked(small_config(data_dir, checkpoint_dir=str(folder)), logger, [Interrupt()])
    run_id = logger.run_id
    MlflowClient(uri).update_run(run_id, status="RUNNING")  # as a SIGKILLed process leaves it
    assert torch.load(folder / "last.pt", weights_only=True)["tracking"] == {"mlflow_run_id": run_id}
    args = ("--data-dir", str(data_dir), "--tracking-uri", uri, "--json")

    resumed = run_cli("train", "--resume", str(folder / "last.pt"), *args, cwd=tmp_path, check=True)
    assert f"sweepbench: note: --resume: continuing MLflow run {run_id} after its epoch 1" in resumed.stderr
    assert "warning" not in resumed.stderr
    [run] = runs(uri)
    assert run.info.run_id == run_id and run.info.status == "FINISHED" and run.data.tags["status"] == "completed"
    assert "stop_reason" not in run.data.tags and run.data.tags["sweepbench.resumed_at_epoch"] == "1"
    assert [step for step, _ in epoch_steps(uri, run_id)] == [1, 2]
    assert torch.load(folder / "last.pt", weights_only=True)["epoch"] == 2  # it kept checkpointing there

    extended = run_cli("train", "--resume", str(folder / "last.pt"), "--epochs", "3", *args, cwd=tmp_path,
                       check=True)
    assert (f"not continuing MLflow run {run_id}: epochs differ from the params it logged, which MLflow cannot "
            f"change; logging to a new run tagged sweepbench.resumed_from_run") in extended.stderr
    new = next(run for run in runs(uri) if run.info.run_id != run_id)
    assert new.data.tags["sweepbench.resumed_from_run"] == run_id and new.data.params["epochs"] == "3"
    assert [step for step, _ in epoch_steps(uri, new.info.run_id)] == [1, 2, 3]
    assert epoch_steps(uri, new.info.run_id)[:2] == epoch_steps(uri, run_id)
    assert MlflowClient(uri).get_run(run_id).data.params["epochs"] == "2"
