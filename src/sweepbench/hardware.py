"""Facts about the machine a run runs on, shared by the engine, tracking and benchmarks: the device's name and
the environment (hardware, library versions, git commit) that a run records. What each device and precision does
(resolving, synchronising, peak memory, autocast, TF32 switches) is their registry entry's, in ``devices`` and
``precisions``; it is re-exported here."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from .devices import cpu_capability, peak_memory_mb, reset_peak_memory, resolve_device, synchronize
from .precisions import PRECISIONS, autocast, cpu_support, set_precision_flags

__all__ = ["autocast", "device_name", "environment_record", "environment_tags", "git_commit", "peak_memory_mb",
           "reset_peak_memory", "resolve_device", "set_precision_flags", "synchronize"]


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "cpu":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
        return platform.processor() or platform.machine()
    return device.type


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the checkout this package runs from; None outside a git checkout."""
    try:
        completed = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).resolve().parent,
                                   capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return completed.stdout.strip() if completed.returncode == 0 else None


def environment_tags(device: torch.device) -> dict[str, str]:
    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    tags = {
        "device": device.type,
        "device_name": device_name(device),
        "torch_version": torch.__version__,
        "cuda_version": torch.version.cuda or "none",
        "cudnn_version": str(cudnn) if cudnn else "none",
        "host": platform.node(),
        "python_version": platform.python_version(),
        "platform": platform.platform(),
        "cpu_capability": cpu_capability(),  # what the CPU runs, native or emulated, moves every CPU figure
        **{f"cpu_{name}": cpu_support(name) for name in PRECISIONS.in_order()
           if PRECISIONS.get(name).cpu_native_flags},
    }
    commit = git_commit()
    if commit:
        tags["git_commit"] = commit
        tags["mlflow.source.git.commit"] = commit
    return tags


def environment_record(device: torch.device) -> dict[str, Any]:
    """What ``environment.json`` holds: the tags plus the library versions and threads behind a figure."""
    import mlflow
    import numpy
    import pandas

    return {
        **environment_tags(device),
        "mlflow_version": mlflow.__version__,
        "numpy_version": numpy.__version__,
        "pandas_version": pandas.__version__,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
