"""The captured step: one run's training step as one function of a batch, compiled (``step = "compiled"``) or
captured in a CUDA graph (``step = "graph"``), so that an epoch costs the device's time, not Python's.

The function is functional where it must be and PyTorch's own where it can be: ``torch.func.grad_and_value``
gives the loss and the gradient of each parameter in one traceable call, written into the gradient of the run's
contiguous parameter buffer (``optimizer.contiguous_parameters``), and the update is torch.optim's own ``step`` unwrapped of the graph breaks it takes under
torch.compile, so every optimizer, weight decay and momentum train exactly as in the eager step. The learning
rate is a device tensor that StepLR fills in place, so a schedule never recompiles or re-captures; losses stay on
the device. ``steps.py`` refuses what cannot be in such a step (fp16's GradScaler, whose step skips on a host
check), and a recompile after ``prepare`` raises instead of compiling inside a timed epoch.

``prepare`` builds the function for each batch shape an epoch has (the full batch and the last, partial one),
on real batches, then puts the run back exactly as it was (weights, buffers, optimizer state, random state):
what it cost is the run's ``compile_seconds``, never part of an epoch.
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from ..devices import synchronize
from ..hardware import autocast

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a capture, as torch.cuda.graphs asks


class FunctionalStep:
    """``__call__(images, labels)``: one optimizer step of ``module`` on a batch, as one traceable function;
    returns the loss, detached, on the device."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
                 capturable: bool) -> None:
        self.module, self.optimizer = module, optimizer
        self.device, self.precision = device, precision
        self.names, self.parameters = zip(*module.named_parameters())  # views into the contiguous buffers
        self.update = inspect.unwrap(type(optimizer).step)  # torch.optim's step without its graph breaks
        optimizer._opt_called = True  # what the wrapper skipped would say: StepLR then knows the step ran
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)  # filled in place by StepLR
            group["fused"] = False  # torch.compile traces the single-tensor update; a CUDA graph captures it
            if "capturable" in group:
                group["capturable"] = capturable
        if capturable:
            _steps_to_device(optimizer, device)

    def loss(self, parameters: tuple[torch.Tensor, ...], images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with autocast(self.device, self.precision):
            logits = functional_call(self.module, dict(zip(self.names, parameters)), (images,))
        return F.cross_entropy(logits, labels)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Gradients by parameter, written into each parameter's ``grad`` (a view into its buffer's, which the
        optimizer updates): by buffer, they would be assembled from slices, element by element, in the graph."""
        gradients, loss = grad_and_value(self.loss)(self.parameters, images, labels)
        with torch.no_grad():
            for parameter, gradient in zip(self.parameters, gradients):
                parameter.grad.copy_(gradient)
            self.update(self.optimizer)
        return loss.detach()


def _steps_to_device(optimizer: torch.optim.Optimizer, device: torch.device) -> None:
    """A capturable optimizer counts its steps on the device; a checkpoint of an eager run has them on the CPU."""
    for state in optimizer.state.values():
        if isinstance(state.get("step"), torch.Tensor):
            state["step"] = state["step"].to(device)


class _Snapshot:
    """The run's weights, buffers, optimizer state and random state, to put back after ``prepare`` trained on
    its warm-up batches. Optimizer state that the warm-up created is zeroed: torch.optim's fresh state is zeros
    (SGD's momentum buffer starts as the first gradient, which a zero buffer also gives, with no dampening)."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device) -> None:
        self.module, self.optimizer, self.device = module, optimizer, device
        self.tensors = {name: tensor.detach().clone() for name, tensor in module.state_dict().items()}
        self.state = {id(param): {key: value.clone() for key, value in state.items()
                                  if isinstance(value, torch.Tensor)}
                      for param, state in optimizer.state.items()}
        self.rng_cpu = torch.get_rng_state()
        self.rng_cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None

    @torch.no_grad()
    def restore(self) -> None:
        for name, tensor in self.module.state_dict().items():
            tensor.copy_(self.tensors[name])
        for param, state in self.optimizer.state.items():
            saved = self.state.get(id(param), {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(saved[key]) if key in saved else value.zero_()
        torch.set_rng_state(self.rng_cpu)
        if self.rng_cuda is not None:
            torch.cuda.set_rng_state(self.rng_cuda, self.device)


def warmup_batches(batches: Iterator[tuple[torch.Tensor, torch.Tensor]], partial: int) -> list[tuple]:
    """A full batch and, where an epoch ends on a partial one of ``partial`` samples, that shape too: every
    shape the step will see."""
    images, labels = next(batches)
    shapes = [(images, labels)]
    if partial and partial != len(labels):
        shapes.append((images[:partial].contiguous(), labels[:partial].contiguous()))
    return shapes


class CompiledStep:
    """The functional step under ``torch.compile(fullgraph=True, dynamic=False)``: one graph per batch shape."""

    def __init__(self, functional: FunctionalStep) -> None:
        self.functional = functional
        self.compiled: Callable | None = None

    def prepare(self, shapes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Compiles the step for each shape (twice for the first: torch.optim creates its state on the first
        step), then puts the run back as it was; returns the seconds it took."""
        functional = self.functional
        started = time.perf_counter()
        snapshot = _Snapshot(functional.module, functional.optimizer, functional.device)
        torch._dynamo.reset()  # an earlier run's step in this process is done with; its cache entries go
        self.compiled = torch.compile(functional, fullgraph=True, dynamic=False)
        with torch._inductor.config.patch(fallback_random=True):  # dropout draws as the eager step draws
            for images, labels in [shapes[0], *shapes]:
                self.compiled(images, labels)
        snapshot.restore()
        synchronize(functional.device)
        return time.perf_counter() - started

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Only the guards that tell the shapes' graphs apart are checked: the others cost 85 us a step, a sixth
        of the seed recipe's, and would go unseen if what they watch changed, which between two batches of one
        training nothing does (the model stays in training mode; the learning rate is a tensor, its value no
        guard). A batch of a shape not prepared fails instead of compiling inside the epoch."""
        with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
            return self.compiled(images, labels)


class GraphStep:
    """The functional step captured in one CUDA graph per batch shape (sharing one memory pool), replayed with
    the batch copied into the graph's static input buffers."""

    def __init__(self, functional: FunctionalStep) -> None:
        self.functional = functional
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor]] = {}

    def prepare(self, shapes: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> float:
        functional = self.functional
        started = time.perf_counter()
        snapshot = _Snapshot(functional.module, functional.optimizer, functional.device)
        side = torch.cuda.Stream(functional.device)
        side.wait_stream(torch.cuda.current_stream(functional.device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                for images, labels in shapes:
                    functional(images, labels)
        torch.cuda.current_stream(functional.device).wait_stream(side)
        snapshot.restore()
        pool = None
        for images, labels in shapes:
            static_images, static_labels = images.clone(), labels.clone()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_loss = functional(static_images, static_labels)
            pool = graph.pool()
            self.graphs[len(labels)] = (graph, static_images, static_labels, static_loss)
        synchronize(functional.device)
        return time.perf_counter() - started

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        graph, static_images, static_labels, static_loss = self.graphs[len(labels)]
        static_images.copy_(images)
        static_labels.copy_(labels)
        graph.replay()
        return static_loss.clone()  # the next replay overwrites it


def captured_step(kind: str, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device,
                  precision: str) -> CompiledStep | GraphStep:
    """The ``step`` setting's captured step (``steps.py`` has refused what it cannot hold) of ``module``, whose
    parameters are views into the contiguous buffers ``optimizer`` updates."""
    functional = FunctionalStep(module, optimizer, device, precision, capturable=kind == "graph")
    return GraphStep(functional) if kind == "graph" else CompiledStep(functional)


def plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with its learning rates as floats, as an eager run's, so that a checkpoint
    of a captured step resumes under any step (``checkpoint.restore_checkpoint`` keeps the resuming run's own
    implementation flags: fused, capturable)."""
    groups = [{**group, "lr": float(group["lr"])} for group in state["param_groups"]]
    return {**state, "param_groups": groups}

