"""The devices a run can train on, as registry entries: how to tell whether one is here, how to wait for its
queued work, how to read its peak memory. Adding a device is one ``register_device`` call in this file; the
``device`` setting's choices, ``auto``, the engine's timing and the benchmarks read these entries."""

from __future__ import annotations

import functools
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .registry import Registry
from .validators import ConfigError

AUTO = "auto"


def _process_peak_mb(device: torch.device) -> float:
    """The process's peak resident set size: what a device that shares the host's memory has for a peak."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _nothing(device: torch.device) -> None:
    """A device that runs synchronously, or that has no peak counter to reset."""


@dataclass(frozen=True)
class DeviceEntry:
    name: str
    available: Callable[[], bool]
    synchronize: Callable[[torch.device], None]  # waits for queued work: asynchronous devices need it to be timed
    peak_memory_mb: Callable[[torch.device], float]
    reset_peak_memory: Callable[[torch.device], None]
    auto_rank: int  # ``auto`` takes the available device of the highest rank
    benchmarked: bool  # a device of the benchmark matrix (``bench`` cells, ``--device`` of ``bench``)


DEVICES: Registry[DeviceEntry] = Registry("device")


def register_device(name: str, available: Callable[[], bool], auto_rank: int, *,
                    synchronize: Callable[[torch.device], None] = _nothing,
                    peak_memory_mb: Callable[[torch.device], float] = _process_peak_mb,
                    reset_peak_memory: Callable[[torch.device], None] = _nothing,
                    benchmarked: bool = False) -> None:
    DEVICES.add(name, DeviceEntry(name, available, synchronize, peak_memory_mb, reset_peak_memory, auto_rank,
                                  benchmarked))


register_device("cpu", lambda: True, 0, benchmarked=True)
register_device("cuda", torch.cuda.is_available, 2, synchronize=torch.cuda.synchronize,
                peak_memory_mb=lambda device: torch.cuda.max_memory_allocated(device) / 2 ** 20,
                reset_peak_memory=torch.cuda.reset_peak_memory_stats, benchmarked=True)
register_device("mps", torch.backends.mps.is_available, 1, synchronize=lambda device: torch.mps.synchronize())


def device_choices() -> tuple[str, ...]:
    """What the ``device`` setting accepts: ``auto`` and every registered device."""
    return (AUTO, *DEVICES.in_order())


def baseline_device() -> str:
    """What speed-ups are measured against: the first registered device (cpu)."""
    return DEVICES.in_order()[0]


def benchmarked_devices() -> tuple[str, ...]:
    return tuple(name for name in DEVICES.in_order() if DEVICES.get(name).benchmarked)


def resolve_device(name: str) -> torch.device:
    """The torch device ``name`` (or ``auto``) means here; a device that is not here is refused in one line."""
    available = [entry for entry in map(DEVICES.get, DEVICES.in_order()) if entry.available()]
    if name == AUTO:
        return torch.device(max(available, key=lambda entry: entry.auto_rank).name)
    if name not in [entry.name for entry in available]:
        raise ConfigError(f"device: {name!r} requested but not available on this machine; available: "
                          f"{', '.join(entry.name for entry in available)} (or {AUTO})")
    return torch.device(name)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """This CPU's feature flags (``avx512_bf16``, ``amx_bf16``, ...), from /proc/cpuinfo; empty where there is none."""
    cpuinfo = Path("/proc/cpuinfo")
    lines = cpuinfo.read_text().splitlines() if cpuinfo.exists() else []
    return frozenset(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))


def cpu_capability() -> str:
    """The widest vector instruction set PyTorch's CPU kernels use here (``AVX2``, ``AVX512``, ...)."""
    return torch.backends.cpu.get_cpu_capability()


def synchronize(device: torch.device) -> None:
    """Waits for the device's queued work: CUDA and MPS run asynchronously, so a time taken without this
    measures how fast Python queues kernels, not how fast the device runs them."""
    DEVICES.get(device.type).synchronize(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak memory allocated by tensors on CUDA; the process's peak resident set size elsewhere."""
    return DEVICES.get(device.type).peak_memory_mb(device)


def reset_peak_memory(device: torch.device) -> None:
    DEVICES.get(device.type).reset_peak_memory(device)
