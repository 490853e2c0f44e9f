"""Remakes the README's pictures in docs/ from a real study: run it after a UI change.

    .venv/bin/python docs/screenshots.py [--data-dir ../shared/data] [--n-trials 6]

In a temporary project folder it runs the README's quick study (fewer trials, shorter epochs: the pictures show
the views, not a result), ``sweepbench report --plot``, then renders with headless Chromium (``tests.conftest.
render``) the MLflow UI's runs table, the best trial's charts, the registered model's page, and optuna-dashboard.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mlflow import MlflowClient  # noqa: E402

from sweepbench.tracking import experiment_url, stop_process_group  # noqa: E402
from tests.conftest import free_port, mlflow_server, render, run_cli, wait_for_http  # noqa: E402

STUDY = "mnist_mlp_quick"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--n-trials", type=int, default=6)
    parser.add_argument("--output", default=str(ROOT / "docs"))
    args = parser.parse_args()
    output = Path(args.output)
    with tempfile.TemporaryDirectory(prefix="sweepbench-screenshots-") as folder_name:
        folder, env = Path(folder_name), {"MLFLOW_TRACKING_URI": ""}
        run_cli("study", "run", str(ROOT / "studies" / f"{STUDY}.toml"), "--n-trials", str(args.n_trials),
                "--set", "epochs=3", "--set", "train_subset=10000", "--data-dir", args.data_dir, cwd=folder,
                env=env, check=True)
        run_cli("report", "--experiment", STUDY, "--plot", str(folder / "plots"), cwd=folder, env=env, check=True)
        shutil.copy(folder / "plots" / "accuracy_vs_time.png", output / "report-accuracy-vs-time.png")
        uri = f"sqlite:///{folder / 'mlruns' / 'mlflow.db'}"
        with mlflow_server(folder, uri) as base_url:
            render_mlflow(base_url, uri, output)
        render_dashboard(folder, output)
    for profile in output.glob("chrome-profile-*"):  # render's fresh browser profiles, one per picture
        shutil.rmtree(profile)
    for picture in sorted(output.glob("*.png")):
        print(f"wrote {picture}")
    return 0


def render_mlflow(base_url: str, tracking_uri: str, output: Path) -> None:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(STUDY)
    render(experiment_url(base_url, experiment.experiment_id), output / "mlflow-runs-table.png")
    best = client.get_model_version_by_alias(STUDY, "best")
    render(f"{base_url}/#/experiments/{experiment.experiment_id}/runs/{best.run_id}/model-metrics"
           "?workflowType=machine_learning", output / "mlflow-trial-charts.png", size="1400,1100")
    render(f"{base_url}/#/models/{STUDY}", output / "mlflow-registered-model.png", size="1400,600")


def render_dashboard(folder: Path, output: Path) -> None:
    port = free_port()
    process = subprocess.Popen([sys.executable, "-m", "sweepbench.cli", "study", "dashboard", STUDY, "--port",
                                str(port)], cwd=folder, stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        url = process.stdout.readline().split(": ", 1)[1].split(" ")[0]  # the link the command prints
        wait_for_http(url, process, timeout=60)
        render(url, output / "optuna-dashboard.png", size="1400,1000")
    finally:
        stop_process_group(process)


if __name__ == "__main__":
    sys.exit(main())
