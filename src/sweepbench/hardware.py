"""Facts about the machine a run runs on, shared by the engine, tracking and benchmarks: which device, its name,
the precision settings and autocast for it, CUDA synchronisation, peak memory, and the environment (hardware,
library versions, git commit) that a run records."""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import resource
import subprocess
from pathlib import Path
from typing import Any

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    available = ["cpu"] + (["cuda"] if cuda else []) + (["mps"] if mps else [])
    if name == "auto":
        return torch.device("cuda" if cuda else "mps" if mps else "cpu")
    if name not in available:
        raise ConfigError(f"device: {name!r} requested but not available on this machine; available: "
                          f"{', '.join(available)} (or auto)")
    return torch.device(name)


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


def set_precision_flags(device: torch.device, precision: str) -> None:
    if precision == "tf32" and device.type != "cuda":
        raise ConfigError(f"precision: 'tf32' needs device cuda, got {device.type}; on {device.type} use fp32, bf16")
    allow_tf32 = precision == "tf32"
    torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    torch.backends.cudnn.allow_tf32 = allow_tf32


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float16
        return torch.autocast(device_type=device.type, dtype=dtype)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work: CUDA and MPS run asynchronously, so a time taken without this
    measures how fast Python queues kernels, not how fast the device runs them."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated by tensors on CUDA; the process's peak resident set size elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
