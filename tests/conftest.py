"""Shared fixtures: the real datasets in ../shared/data and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SWEEPBENCH_TEST_DATA", PROJECT_ROOT.parent / "shared" / "data")).resolve()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA not available on this machine")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The real MNIST / CIFAR-10 copies; the tests are about real data, so their absence is an error."""
    if not (SHARED_DATA / "mnist.npz").exists():
        raise FileNotFoundError(f"real datasets expected in {SHARED_DATA} (set SWEEPBENCH_TEST_DATA)")
    return SHARED_DATA


def run_cli(*args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600,
            check: bool = False) -> subprocess.CompletedProcess:
    """Runs ``python -m sweepbench.cli ARGS`` as a real subprocess and captures its output."""
    full_env = {**os.environ, **(env or {})}
    completed = subprocess.run([sys.executable, "-m", "sweepbench.cli", *args], cwd=cwd, env=full_env,
                               capture_output=True, text=True, timeout=timeout)
    if check and completed.returncode != 0:
        raise AssertionError(f"sweepbench {' '.join(args)} exited {completed.returncode}:\n{completed.stderr}")
    return completed
