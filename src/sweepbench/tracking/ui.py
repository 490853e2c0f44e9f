"""Serving the MLflow UI for a store: the command, and running it until Ctrl-C without leaving children."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from typing import Sequence

from .store import artifact_root

PROGRAM = "sweepbench"


def ui_command(tracking_uri: str, host: str, port: int) -> list[str]:
    """``mlflow ui`` for a database store, with one worker: enough for one person, light on a laptop."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", tracking_uri, "--host", host,
               "--port", str(port), "--workers", "1"]
    root = artifact_root(tracking_uri)
    return command + (["--default-artifact-root", root] if root else [])


def serve(command: Sequence[str], stop_timeout: float = 15) -> int:
    """Runs a server command in its own session until it exits or Ctrl-C; then stops its whole process
    group (``mlflow ui`` starts uvicorn as a child, which must not outlive it)."""
    process = subprocess.Popen(list(command), start_new_session=True)
    try:
        return process.wait()
    except KeyboardInterrupt:
        stop_process_group(process, stop_timeout)
        raise


def stop_process_group(process: subprocess.Popen, timeout: float = 15) -> None:
    """SIGTERM to the process group led by ``process``; then SIGKILL to whatever is left of it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()




UI_HOST, UI_PORT = "127.0.0.1", 5000
# MLflow's UI (3.10 and later) opens an experiment in its GenAI view unless the link asks for the model-training
# view: its "GenAI | Model training" switch reads this URL parameter, else the browser's last choice, and no
# longer the experiment's ``mlflow.experimentKind`` tag (tests/test_ui.py renders both links in chromium).
MODEL_TRAINING_VIEW = "workflowType=machine_learning"


def experiment_url(base_url: str, experiment_id: str) -> str:
    """The link that opens an experiment on its runs table in the MLflow UI at ``base_url``."""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}?{MODEL_TRAINING_VIEW}"


def invoked_as() -> str:
    """The command as the user ran it, so a hint can be pasted as it is: ``sweepbench`` where that is on the
    PATH, else the script's path as typed (``.venv/bin/sweepbench`` in a venv not activated), or
    ``<python> -m sweepbench.cli``."""
    script = sys.argv[0] if sys.argv else ""
    if Path(script).name != PROGRAM:
        return f"{_shortest(sys.executable)} -m sweepbench.cli"
    on_path = shutil.which(PROGRAM)
    if on_path and Path(on_path).resolve() == Path(script).resolve():
        return PROGRAM
    return script


def _shortest(path: str) -> str:
    relative = os.path.relpath(path)
    return relative if len(relative) < len(path) else path


def browse_hint(tracking_uri: str, experiment_id: str) -> str:
    """How to see an experiment's runs: its link on a tracking server, or ``sweepbench ui`` and the link."""
    from .store import default_tracking_uri, is_server

    if is_server(tracking_uri):
        return experiment_url(tracking_uri, experiment_id)
    command = f"{invoked_as()} ui" + ("" if tracking_uri == default_tracking_uri() else
                                      f" --tracking-uri {tracking_uri}")
    return f"{command}, then open {experiment_url(f'http://{UI_HOST}:{UI_PORT}', experiment_id)}"
