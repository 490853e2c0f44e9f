"""The captured step: one run's training step as one function of a batch, compiled (``step = "compiled"``) or
captured in a CUDA graph (``step = "graph"``), so that an epoch costs the device's time, not Python's.

The function is functional where it must be and PyTorch's own where it can be: ``torch.func.grad_and_value``
gives the loss and the gradient of each parameter in one traceable call, written into the gradient of the run's
contiguous parameter buffer (``optimizer.contiguous_parameters``); the update is torch.optim's own ``step``,
unwrapped of the graph breaks it takes under torch.compile, so every optimizer, weight decay and momentum train
as in the eager step. The learning rate is a device tensor that StepLR fills in place, so a schedule never
recompiles or re-captures; losses stay on the device. ``steps.py`` refuses what cannot be in such a step (fp16's
GradScaler, whose step skips on a host check).

``prepare`` builds the function for each batch shape an epoch has (the full batch and the last, partial one),
on real batches, then puts the run back as it was (weights, buffers, optimizer state, random state), whether it
succeeded or not: what it cost is the run's ``compile_seconds``, never part of an epoch. After it, a batch of a
shape not prepared fails in one line instead of compiling or capturing inside a timed epoch; what else the
compiled graphs were built on is not checked again per batch (see ``CompiledStep.__call__``).
"""

from __future__ import annotations

import inspect
import time
from typing import Any, Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad_and_value

from ..devices import synchronize
from ..hardware import autocast

GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before a capture, as torch.cuda.graphs asks
Batch = tuple[torch.Tensor, torch.Tensor]


class Functional(Protocol):
    """What a captured step compiles or captures: ``__call__(*inputs(images, labels))`` is one optimizer step on
    a batch as one traceable function, returning the detached loss (one per member) on the device. ``inputs``
    runs eagerly before it (what cannot be traced: a pack's dropout masks drawn from its members' generators);
    ``snapshot()`` saves all the step changes, to be put back with ``restore()``."""

    device: torch.device

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]: ...
    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor: ...
    def snapshot(self) -> Any: ...


class FunctionalStep:
    """A solo run's step as a ``Functional``: one optimizer step of ``module`` on a batch."""

    def __init__(self, module: nn.Module, optimizer: torch.optim.Optimizer, device: torch.device, precision: str,
                 capturable: bool) -> None:
        self.module, self.optimizer = module, optimizer
        self.device, self.precision = device, precision
        trained = [(name, parameter) for name, parameter in module.named_parameters() if parameter.requires_grad]
        self.names, self.parameters = zip(*trained)  # views into the contiguous buffers; frozen ones stay as they are
        self.update = inspect.unwrap(type(optimizer).step)  # torch.optim's step without its graph breaks
        optimizer._opt_called = True  # what the wrapper skipped would say: StepLR then knows the step ran
        for group in optimizer.param_groups:
            group["lr"] = torch.tensor(float(group["lr"]), device=device)  # filled in place by StepLR
            if not capturable:
                group["fused"] = False  # torch.compile traces the single-tensor update, not a fused kernel
            elif "capturable" in group:
                group["capturable"] = True  # steps and learning rate on the device, no host sync to capture
        if capturable:  # a fused update (SGD, Adam, AdamW on CUDA) takes the tensor learning rate as it is
            _steps_to_device(optimizer, device)

    def inputs(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return images, labels

    def snapshot(self) -> "_Snapshot":
        return _Snapshot(self.module, self.optimizer, self.device)

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
        self.tensors = {name: tensor.detach().clone() for name, tensor in self._tensors().items()}
        self.state = {id(param): {key: value.clone() for key, value in state.items()
                                  if isinstance(value, torch.Tensor)}
                      for param, state in optimizer.state.items()}
        self.rng_cpu = torch.get_rng_state()
        self.rng_device = _DEVICE_RNG[device.type][0](device) if device.type in _DEVICE_RNG else None

    def _tensors(self) -> dict[str, torch.Tensor]:
        """Parameters and every buffer (BatchNorm's running statistics and count; non-persistent ones too)."""
        return {**dict(self.module.named_parameters()), **dict(self.module.named_buffers())}

    @torch.no_grad()
    def restore(self) -> None:
        for name, tensor in self._tensors().items():
            tensor.copy_(self.tensors[name])
        for param, state in self.optimizer.state.items():
            saved = self.state.get(id(param), {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor):
                    value.copy_(saved[key]) if key in saved else value.zero_()
        torch.set_rng_state(self.rng_cpu)
        if self.rng_device is not None:
            _DEVICE_RNG[self.device.type][1](self.rng_device, self.device)


_DEVICE_RNG: dict[str, tuple[Callable, Callable]] = {  # device type -> (get, set) of its random state
    "cuda": (torch.cuda.get_rng_state, torch.cuda.set_rng_state),
    "mps": (lambda device: torch.mps.get_rng_state(), lambda state, device: torch.mps.set_rng_state(state)),
}


def batch_size(labels: torch.Tensor) -> int:
    """Samples per member in a batch: labels are [B] (a solo run) or [K, B] (a pack)."""
    return labels.shape[-1]


def warmup_batches(first: Batch, partial: int) -> list[Batch]:
    """The ``first`` batch of an epoch and, where an epoch ends on a partial one of ``partial`` samples, that
    shape too: every shape the step will see. The batch axis is the labels' last (a pack's are [K, B])."""
    images, labels = first
    shapes = [(images, labels)]
    axis = labels.dim() - 1
    if partial and partial != batch_size(labels):
        shapes.append((images.narrow(axis, 0, partial).contiguous(), labels.narrow(axis, 0, partial).contiguous()))
    return shapes


class _Captured:
    """What the compiled and the graph step share: ``prepare`` around a snapshot, the prepared shapes."""

    def __init__(self, functional: Functional) -> None:
        self.functional = functional
        self.prepared: list[int] = []

    def prepare(self, draw: Callable[[], list[Batch]]) -> float:
        """Builds the step for each shape ``draw()`` gives, then puts the run back as it was before the draw
        (whatever happens); returns the seconds it took."""
        functional = self.functional
        started = time.perf_counter()
        snapshot = functional.snapshot()
        try:
            shapes = draw()
            self.build(shapes)
            self.prepared = [batch_size(labels) for _, labels in shapes]
        finally:
            snapshot.restore()
        synchronize(functional.device)
        return time.perf_counter() - started

    def build(self, shapes: list[Batch]) -> None:
        raise NotImplementedError

    def not_prepared(self, size: int) -> RuntimeError:
        return RuntimeError(f"step: a batch of {size} samples was not prepared; prepared: "
                            f"{', '.join(map(str, self.prepared))}")


class CompiledStep(_Captured):
    """The functional step under ``torch.compile(fullgraph=True, dynamic=False)``: one graph per batch shape."""

    def build(self, shapes: list[Batch]) -> None:
        """Compiles a graph per shape (the first shape twice: torch.optim creates its state on the first step,
        and the graph of the steps after it is another)."""
        torch._dynamo.reset()  # an earlier run's step in this process is done with; its cache entries go
        self.compiled = torch.compile(self.functional, fullgraph=True, dynamic=False)
        with torch._inductor.config.patch(fallback_random=True):  # dropout draws as the eager step draws
            for images, labels in [shapes[0], *shapes]:
                self.compiled(*self.functional.inputs(images, labels))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Only the guards that tell the shapes' graphs apart are checked (the others cost 85 us a step, a sixth
        of the seed recipe's). So what the graphs were built on is taken as unchanged between batches: training
        mode (``SoloStep.batches`` sets it before each epoch), grad mode, autocast, the optimizer's
        hyperparameters other than the learning rate (a tensor, its value no guard; ``restore_checkpoint``
        applies the run's own before ``prepare``). A change to one of them would go unseen, not recompile."""
        if batch_size(labels) not in self.prepared:
            raise self.not_prepared(batch_size(labels))
        inputs = self.functional.inputs(images, labels)
        with torch.compiler.set_stance("fail_on_recompile", skip_guard_eval_unsafe=True):
            return self.compiled(*inputs)


class GraphStep(_Captured):
    """The functional step captured in one CUDA graph per batch shape, replayed with the batch copied into the
    graph's static input buffers. The graphs share one memory pool although they do not replay in the order
    they were captured: safe here because each replay's only output, the loss, is copied out at once."""

    def build(self, shapes: list[Batch]) -> None:
        functional, device = self.functional, self.functional.device
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(GRAPH_WARMUP_STEPS):
                for images, labels in shapes:
                    functional(*functional.inputs(images, labels))
        torch.cuda.current_stream(device).wait_stream(side)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, tuple[torch.Tensor, ...], torch.Tensor]] = {}
        pool = None
        for images, labels in shapes:
            static_inputs = tuple(tensor.clone() for tensor in functional.inputs(images, labels))
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                static_loss = functional(*static_inputs)
            pool = graph.pool()
            self.graphs[batch_size(labels)] = (graph, static_inputs, static_loss)

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if batch_size(labels) not in self.graphs:
            raise self.not_prepared(batch_size(labels))
        graph, static_inputs, static_loss = self.graphs[batch_size(labels)]
        for static, given in zip(static_inputs, self.functional.inputs(images, labels), strict=True):
            static.copy_(given)
        graph.replay()
        return static_loss.clone()  # the next replay overwrites it


def captured_step(kind: str, functional: Functional) -> CompiledStep | GraphStep:
    """The ``step`` setting's captured step (``steps.py`` has refused what it cannot hold) of ``functional``."""
    return GraphStep(functional) if kind == "graph" else CompiledStep(functional)


def plain_optimizer_state(state: dict[str, Any]) -> dict[str, Any]:
    """An optimizer ``state_dict`` with its learning rates as floats, as an eager run's, so that a checkpoint
    of a captured step resumes under any step (``checkpoint.restore_checkpoint`` keeps the resuming run's own
    implementation flags: fused, capturable)."""
    groups = [{**group, "lr": float(group["lr"])} for group in state["param_groups"]]
    return {**state, "param_groups": groups}

