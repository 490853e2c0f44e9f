import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.conftest import run_cli


@pytest.fixture
def cli_env(tmp_path):
    """Runs the CLI in a scratch folder, logging to a throwaway SQLite store."""
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", "SWEEPBENCH_DATA_DIR": str(tmp_path / "none")}


def test_train_json_is_one_summary_object_alone_on_stdout(data_dir, tmp_path, cli_env):
    completed = run_cli("train", "--dataset", "mnist", "--data-dir", str(data_dir), "--epochs", "2",
                        "--model-arg", "hidden_size=32", "--batch-size", "256", "--optimizer", "adam", "--lr", "0.003",
                        "--json", cwd=tmp_path, env=cli_env, check=True)
    summary = json.loads(completed.stdout)  # the whole of stdout: `| jq` reads it
    assert summary["status"] == "completed" and summary["val_accuracy"] > 0.9 and summary["test_accuracy"] > 0.9
    assert len(summary["epoch_seconds"]) == 2 and summary["samples_per_second"] > 0
    assert summary["mlflow_run_id"] and summary["step"] == "eager" and summary["compile_seconds"] == 0
    assert "test accuracy" in completed.stderr and "browse" in completed.stderr


def test_registries_are_listed(tmp_path):
    models = run_cli("models", cwd=tmp_path, check=True).stdout
    datasets = run_cli("datasets", cwd=tmp_path, check=True).stdout
    assert all(name in models for name in ("mnist_mlp", "cifar_lenet", "cifar_cnn"))
    assert all(name in datasets for name in ("mnist", "fashion_mnist", "cifar10", "synthetic"))


BAD_INPUTS = [
    (["--model", "resnet"], "registered models: cifar_cnn, cifar_lenet, mnist_mlp"),
    (["--dataset", "imagenet"], "registered datasets: cifar10, fashion_mnist, mnist, synthetic"),
    (["--optimizer", "lion"], "choose one of: sgd, adam, adamw, rmsprop, adadelta"),
    (["--lr", "-0.1"], "lr: -0.1 is out of range"),
    (["--precision", "fp8"], "choose one of: fp32, tf32, bf16, fp16"),
    (["--model-arg", "width=3"], "allowed: hidden_size, dropout, num_classes"),
    (["--dataset", "cifar10", "--model", "cifar_cnn"], "dataset 'cifar10' not found"),
]


@pytest.mark.parametrize("extra, expected", BAD_INPUTS, ids=[args[0][0] + "=" + args[0][1] for args in BAD_INPUTS])
def test_bad_input_exits_nonzero_with_one_clear_line(tmp_path, cli_env, extra, expected):
    completed = run_cli("train", *extra, cwd=tmp_path, env=cli_env)
    assert completed.returncode == 2
    assert expected in completed.stderr and "Traceback" not in completed.stderr
    assert len(completed.stderr.strip().splitlines()) == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA, so asking for it is not an error")
def test_asking_for_absent_cuda_is_a_clear_error(data_dir, tmp_path, cli_env):
    completed = run_cli("train", "--device", "cuda", "--data-dir", str(data_dir), cwd=tmp_path, env=cli_env)
    assert completed.returncode == 2
    assert "device: 'cuda' requested but not available on this machine; available: cpu" in completed.stderr


def test_the_ui_hint_names_the_command_as_the_user_ran_it(data_dir, tmp_path):
    args = ["train", "--data-dir", str(data_dir), "--train-subset", "500", "--val-size", "500",
            "--model-arg", "hidden_size=8"]
    args += ["--tracking-uri", f"sqlite:///{tmp_path.resolve()}/mlruns/mlflow.db"]  # the default here: not named
    as_module = run_cli(*args, cwd=tmp_path, check=True)
    assert re.search(r"browse +\S*python\S* -m sweepbench.cli ui, then open http://127.0.0.1:5000/", as_module.stdout)
    script = Path(sys.executable).parent / "sweepbench"  # a venv's script, its venv not activated
    as_script = subprocess.run([str(script), *args], cwd=tmp_path, capture_output=True, text=True, timeout=300,
                               env={**os.environ, "PATH": "/usr/bin:/bin"})
    assert as_script.returncode == 0, as_script.stderr
    assert f"browse          {script} ui, then open" in as_script.stdout
