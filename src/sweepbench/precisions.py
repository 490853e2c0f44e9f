"""The precisions a run can train in, as registry entries: the autocast dtype, whether a GradScaler scales the
loss, the devices each runs on, what it costs where it is a trap, and what a device must have for it. Adding a
precision is one ``register_precision`` call in this file; the ``precision`` setting's choices and help, autocast,
the engine's scaler, the pack rules, the benchmark matrix and its skip reasons read these entries."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable

import torch

from .devices import cpu_capability, cpu_flags
from .registry import Registry
from .validators import ConfigError

X86_BASELINE_FLAG = "sse2"  # every x86-64 CPU's flags line has it: the flags are x86 ones


def _always(device: torch.device) -> str | None:
    return None


def _cuda_bf16(device: torch.device) -> str | None:
    if device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"bf16 not supported by {torch.cuda.get_device_name(device)}"
    return None


@dataclass(frozen=True)
class PrecisionEntry:
    name: str
    help: str
    autocast_dtype: torch.dtype | None  # None: no autocast, parameters and activations in float32
    grad_scaler: bool  # the loss is scaled (fp16's small range)
    devices: tuple[str, ...] | None  # the devices it runs on; None: all
    tf32_matmul: bool = False  # float32 matmuls and convolutions on TF32 tensor cores
    traps: dict[str, str] = field(default_factory=dict)  # device type -> a warning: legal there, but a mistake
    unsupported: Callable[[torch.device], str | None] = _always  # why this device cannot run it, or None
    cpu_native_flags: tuple[str, ...] = ()  # CPU flags that run it natively; without any, a CPU emulates it
    cpu_emulated_cost: str = ""  # what emulation costs, as measured

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices

    def advised_on(self, device_type: str) -> bool:
        """Runs on ``device_type`` and is no trap there."""
        return self.runs_on(device_type) and device_type not in self.traps


PRECISIONS: Registry[PrecisionEntry] = Registry("precision")


def register_precision(entry: PrecisionEntry) -> None:
    PRECISIONS.add(entry.name, entry)


register_precision(PrecisionEntry("fp32", "float32", None, grad_scaler=False, devices=None))
register_precision(PrecisionEntry("tf32", "float32 matmuls on TF32 tensor cores", None, grad_scaler=False,
                                  devices=("cuda",), tf32_matmul=True))
register_precision(PrecisionEntry(
    "bf16", "bfloat16 autocast", torch.bfloat16, grad_scaler=False, devices=None, unsupported=_cuda_bf16,
    cpu_native_flags=("avx512_bf16", "amx_bf16"),
    cpu_emulated_cost="17x slower than fp32 for cifar_cnn on an AVX2-only AMD EPYC"))
register_precision(PrecisionEntry(
    "fp16", "float16 autocast with a GradScaler", torch.float16, grad_scaler=True, devices=None,
    traps={"cpu": "fp16 autocast on a CPU runs many times slower than fp32 (50x for the MNIST MLP); use fp32 on "
                  "CPU, or bf16 where the CPU has it natively (avx512_bf16, amx_bf16)"},
    cpu_native_flags=("avx512_fp16", "amx_fp16")))


def precision_choices() -> tuple[str, ...]:
    return tuple(PRECISIONS.in_order())


def precision_help() -> str:
    return "precision (" + "; ".join(f"{entry.name}: {entry.help}"
                                     for entry in map(PRECISIONS.get, PRECISIONS.in_order())) + ")"


def baseline_precision() -> str:
    """What speed-ups are measured against: the first registered precision (fp32)."""
    return PRECISIONS.in_order()[0]


def advised(device_type: str) -> list[str]:
    """The precisions to use on ``device_type``: those that run there and are no trap there."""
    return [name for name in PRECISIONS.in_order() if PRECISIONS.get(name).advised_on(device_type)]


def cpu_support(precision: str) -> str:
    """``native`` where this CPU has an instruction set for ``precision`` (or it needs none: fp32), ``emulated``
    where it has not (PyTorch then converts to float32 and back around every operation), ``unknown`` where its
    flags say nothing: no x86 flags line (an ARM CPU, macOS), whose names ``cpu_native_flags`` would not know."""
    entry = PRECISIONS.get(precision)
    flags = cpu_flags()
    if entry.autocast_dtype is None or set(entry.cpu_native_flags) & flags:
        return "native"
    return "emulated" if X86_BASELINE_FLAG in flags else "unknown"


def trap(precision: str, device_type: str) -> str | None:
    """The warning for ``precision`` on ``device_type``, where it is legal but almost surely a mistake: the
    entry's own, else, on a CPU that emulates it, what that costs."""
    entry = PRECISIONS.get(precision)
    note = entry.traps.get(device_type)
    if note is None and device_type == "cpu" and cpu_support(precision) == "emulated":
        note = (f"{precision} is emulated on this CPU ({cpu_capability()}, none of "
                f"{', '.join(entry.cpu_native_flags)}): {entry.cpu_emulated_cost or 'many times slower than fp32'}; "
                f"use fp32 here")
    return f"precision: {note}" if note else None


def check_precision(precision: str, device_type: str) -> None:
    """Refuses, in one line, a precision that does not run on ``device_type``."""
    entry = PRECISIONS.get(precision)
    if not entry.runs_on(device_type):
        raise ConfigError(f"precision: {precision!r} needs device {' or '.join(entry.devices or ())}, got "
                          f"{device_type}; on {device_type} use {', '.join(advised(device_type))}")


def set_precision_flags(device: torch.device, precision: str) -> None:
    """Refuses a precision the device cannot run (``check_precision``); sets the TF32 switches for it."""
    entry = PRECISIONS.get(precision)
    check_precision(precision, device.type)
    torch.backends.cuda.matmul.allow_tf32 = entry.tf32_matmul
    torch.backends.cudnn.allow_tf32 = entry.tf32_matmul


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = PRECISIONS.get(precision).autocast_dtype
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def uses_grad_scaler(precision: str) -> bool:
    return PRECISIONS.get(precision).grad_scaler
