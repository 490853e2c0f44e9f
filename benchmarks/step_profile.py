"""Where a training step's time goes: the seed recipe's step (MNIST MLP, batch 64, Adadelta) split into batching,
forward, backward, zeroing and the optimizer step, each timed with the device synchronised around it, and the
whole step unsynchronised (what the engine's loop pays), per precision.

On a GPU a step this small is bound by the host (Python, autograd, kernel launches): the synchronised parts add up
to more than the unsynchronised step, and kernel launches per step (from the profiler) say how many the host
must issue.

    python benchmarks/step_profile.py --data-dir ../shared/data [--device cuda] [--steps 300]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn.functional as F

from sweepbench.config import RunConfig
from sweepbench.data import load_dataset
from sweepbench.engine import DeviceLoader, autocast, build_optimizer, contiguous_parameters, resolve_device, \
    zero_gradients
from sweepbench.hardware import device_name, synchronize
from sweepbench.models import create_model

RECIPE = dict(model="mnist_mlp", dataset="mnist", optimizer="adadelta", lr=1.0, lr_gamma=0.7, batch_size=64)


def build(args: argparse.Namespace, precision: str):
    config = RunConfig(**RECIPE, device=args.device, precision=precision, data_dir=args.data_dir)
    device = resolve_device(config.device)
    dataset = load_dataset(config.dataset, config.data_dir, val_size=config.val_size)
    torch.manual_seed(0)
    model = create_model(config.model).to(device)
    buffers = contiguous_parameters(model)
    optimizer = build_optimizer(config, buffers, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    loader = DeviceLoader(dataset.x_train, dataset.y_train, dataset, config, device)
    return config, device, model, buffers, optimizer, scaler, loader


def step(model, buffers, optimizer, scaler, images, labels, device, precision):
    with autocast(device, precision):
        loss = F.cross_entropy(model(images), labels)
    zero_gradients(buffers)
    scaler.scale(loss).backward()
    scaler.step(optimizer)
    scaler.update()


def timed_phases(args, precision) -> dict[str, float]:
    """Median milliseconds per phase, each between device synchronisations."""
    config, device, model, buffers, optimizer, scaler, loader = build(args, precision)
    batches = loader.batches(0)
    phases: dict[str, list[float]] = {name: [] for name in ("batch", "forward", "zero", "backward", "optimizer")}

    def clock(name, function):
        synchronize(device)
        started = time.perf_counter()
        result = function()
        synchronize(device)
        phases[name].append(1000 * (time.perf_counter() - started))
        return result

    for index in range(args.steps):
        images, labels = clock("batch", lambda: next(batches))
        with autocast(device, precision):
            loss = clock("forward", lambda: F.cross_entropy(model(images), labels))
        clock("zero", lambda: zero_gradients(buffers))
        clock("backward", lambda: scaler.scale(loss).backward())
        clock("optimizer", lambda: (scaler.step(optimizer), scaler.update()))
    return {name: statistics.median(values[10:]) for name, values in phases.items()}


def unsynchronised_step_ms(args, precision) -> tuple[float, int]:
    """Milliseconds per step over ``args.steps`` steps as the engine runs them (one sync at the end), and the
    kernel launches of one step."""
    config, device, model, buffers, optimizer, scaler, loader = build(args, precision)
    batches = list(loader.batches(0))[:args.steps + 10]
    for images, labels in batches[:10]:
        step(model, buffers, optimizer, scaler, images, labels, device, precision)
    synchronize(device)
    started = time.perf_counter()
    for images, labels in batches[10:]:
        step(model, buffers, optimizer, scaler, images, labels, device, precision)
    synchronize(device)
    per_step = 1000 * (time.perf_counter() - started) / (len(batches) - 10)
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.profiler.profile(activities=activities) as profile:
        step(model, buffers, optimizer, scaler, *batches[0], device, precision)
        synchronize(device)
    launches = sum(event.count for event in profile.key_averages() if event.key in ("cudaLaunchKernel",
                                                                                     "cuLaunchKernel",
                                                                                     "cudaLaunchKernelExC"))
    return per_step, launches


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--precisions", default="fp32,bf16,fp16")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device.type} ({device_name(device)}), {torch.get_num_threads()} threads, torch {torch.__version__},"
          f" python {platform.python_version()}; seed recipe step (MNIST MLP 784-128-10, batch 64, Adadelta)")
    print("| precision | batch ms | forward ms | zero ms | backward ms | optimizer ms | sum of synced parts ms |"
          " engine step ms (unsynced) | kernel launches per step |")
    print("|:--|--:|--:|--:|--:|--:|--:|--:|--:|")
    for precision in args.precisions.split(","):
        if device.type == "cpu" and precision == "fp16":
            continue
        phases = timed_phases(args, precision)
        per_step, launches = unsynchronised_step_ms(args, precision)
        print(f"| {precision} | " + " | ".join(f"{phases[name]:.3f}" for name in phases)
              + f" | {sum(phases.values()):.3f} | {per_step:.3f} | {launches or 'n/a'} |")


if __name__ == "__main__":
    main()
