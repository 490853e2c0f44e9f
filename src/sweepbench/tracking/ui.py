"""Serving the MLflow UI for a store: the command, and running it until Ctrl-C without leaving children."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
from typing import Sequence

from .store import artifact_root


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


