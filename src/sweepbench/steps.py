"""How one training step runs, as registry entries: ``eager`` (PyTorch ops issued from Python one by one, the
reference), ``compiled`` (forward, backward and the optimizer update as one torch.compile graph) and ``graph``
(that step captured once in a CUDA graph and replayed per batch). A step other than eager removes the per-kernel
cost of Python, so that an epoch's time measures the device. What such a step cannot hold is refused here, in one
line, before anything trains (the ``step`` setting's validation, the engine and the benchmark's skip reasons call
these checks); it never falls back to eager in silence. The engine's side is ``engine.capture``."""

from __future__ import annotations

from dataclasses import dataclass

from .precisions import uses_grad_scaler
from .registry import Registry
from .validators import ConfigError


@dataclass(frozen=True)
class StepEntry:
    name: str
    help: str
    devices: tuple[str, ...] | None  # the devices it runs on; None: all
    captured: bool  # one compiled or captured function per batch shape, built before the first timed epoch

    def runs_on(self, device_type: str) -> bool:
        return self.devices is None or device_type in self.devices


STEPS: Registry[StepEntry] = Registry("step")


def register_step(entry: StepEntry) -> None:
    STEPS.add(entry.name, entry)


register_step(StepEntry("eager", "PyTorch ops issued from Python one by one", None, captured=False))
register_step(StepEntry("compiled", "forward, backward and optimizer update as one torch.compile graph", None,
                        captured=True))
register_step(StepEntry("graph", "that step captured once in a CUDA graph, replayed per batch", ("cuda",),
                        captured=True))


def step_choices() -> tuple[str, ...]:
    return tuple(STEPS.in_order())


def step_help() -> str:
    return "training step (" + "; ".join(f"{entry.name}: {entry.help}"
                                         for entry in map(STEPS.get, STEPS.in_order())) + ")"


def check_step_settings(step: str, precision: str, compile: bool) -> None:
    """Refuses, in one line, settings a compiled or captured step cannot hold."""
    if not STEPS.get(step).captured:
        return
    if uses_grad_scaler(precision):
        raise ConfigError(f"step: {step!r} cannot train precision {precision!r}: its GradScaler skips a step on a "
                          f"host-side check, which a compiled or captured step cannot hold; use bf16 or fp32, or "
                          f"step 'eager'")
    if compile:
        raise ConfigError(f"step: {step!r} compiles the whole step already, and compile = true would compile the "
                          f"model inside it again; set compile false, or step 'eager' to compile the model alone")


def check_step_device(step: str, device_type: str) -> None:
    """Refuses, in one line, a step that does not run on ``device_type``."""
    entry = STEPS.get(step)
    if not entry.runs_on(device_type):
        here = [name for name in STEPS.in_order() if STEPS.get(name).runs_on(device_type)]
        raise ConfigError(f"step: {step!r} needs device {' or '.join(entry.devices or ())}, got {device_type}; "
                          f"on {device_type} use {', '.join(here)}")
