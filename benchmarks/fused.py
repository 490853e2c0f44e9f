"""Fused training against solo runs, in one process: K ``engine.train`` runs one after the other, then the same K
runs as one pack (``engine.train_fused``), for K in ``--k``. Reports runs per minute both ways and their ratio.

Two recipes: ``seed`` (the seed tutorial's: MNIST MLP hidden 128, batch 64, Adadelta lr 1.0, StepLR gamma 0.7;
members differ in seed) and ``study`` (the widest model studies/mnist_mlp_quick.toml searches, at its smallest
batch size, with its first optimizer and lr_gamma; members differ in seed and in lr, spread over its lr range as
the study's log scale spreads it). A run's time is its whole ``train`` call: training, validation, test. A short
untimed fused and solo run first keeps data loading and warm-up out of the figures; CUDA is synchronised around
each timed call. The median of ``--repeats`` rounds is reported (solo and fused alternate within a round).
``--step`` trains solo runs and packs alike with that step (``compiled``, ``graph`` on CUDA); the warm-up builds
it once, and each timed run's own build (its ``compile_seconds``) is part of its time.

    .venv/bin/python benchmarks/fused.py --device cpu --k 4,8,16 [--epochs 1] [--train-subset N] [--repeats 3]
                                         [--step eager]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Callable

import torch

from sweepbench import devices
from sweepbench.config import RunConfig
from sweepbench.engine import device_name, resolve_device, train, train_fused
from sweepbench.hardware import synchronize
from sweepbench.steps import step_choices
from sweepbench.study.spec import load_spec

PROJECT_ROOT = Path(__file__).resolve().parents[1]
QUICK_STUDY = PROJECT_ROOT / "studies" / "mnist_mlp_quick.toml"
SEED_RECIPE = dict(model="mnist_mlp", dataset="mnist", model_kwargs={"hidden_size": 128}, optimizer="adadelta",
                   lr=1.0, lr_gamma=0.7, batch_size=64)
CPU_FLAGS = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def study_recipe(path: Path) -> tuple[dict, tuple[float, float]]:
    """The quick study's widest model at its smallest batch size, and its lr range."""
    spec = load_spec(path)
    search = {param.name: param for param in spec.search}
    base = spec.base_config
    recipe = dict(model=base.model, dataset=base.dataset, lr_gamma=base.lr_gamma,
                  model_kwargs={**base.model_kwargs, "hidden_size": int(search["model_kwargs.hidden_size"].high)},
                  batch_size=min(search["batch_size"].choices), optimizer=search["optimizer"].choices[0])
    return recipe, (search["lr"].low, search["lr"].high)


def member_configs(recipe: dict, k: int, lr_range: tuple[float, float] | None,
                   args: argparse.Namespace) -> list[RunConfig]:
    """K runs of ``recipe``, seeds 0..K-1; with ``lr_range``, learning rates spread over it on a log scale."""
    configs = []
    for seed in range(k):
        lr = recipe.get("lr")
        if lr_range:
            low, high = lr_range
            lr = low * (high / low) ** (seed / max(k - 1, 1))
        configs.append(RunConfig(**{**recipe, "lr": lr}, seed=seed, epochs=args.epochs, device=args.device,
                                 data_dir=args.data_dir, train_subset=args.train_subset, step=args.step))
    return configs


def timed(device: torch.device, work: Callable[[], object]) -> float:
    synchronize(device)
    started = time.perf_counter()
    work()
    synchronize(device)
    return time.perf_counter() - started


def compare(configs: list[RunConfig], device: torch.device, repeats: int) -> tuple[float, float]:
    """Median solo and fused runs per minute."""
    solo, fused = [], []
    for _ in range(repeats):
        solo.append(len(configs) * 60 / timed(device, lambda: [train(config) for config in configs]))
        fused.append(len(configs) * 60 / timed(device, lambda: train_fused(configs)))
    return statistics.median(solo), statistics.median(fused)


def warm_up(recipe: dict, args: argparse.Namespace) -> None:
    short = argparse.Namespace(**{**vars(args), "epochs": 1, "train_subset": 512})
    configs = member_configs(recipe, 2, None, short)
    train_fused(configs)
    train(configs[0])


def cpu_flags() -> str:
    """The CPU features that move these figures most (AVX-512, AMX), as this CPU has them."""
    flags = devices.cpu_flags()
    return " ".join(flag for flag in CPU_FLAGS if flag in flags) or f"none of {' '.join(CPU_FLAGS)}"


def hardware_line(device: torch.device) -> str:
    line = f"device {device.type} ({device_name(device)}), torch {torch.__version__}, " \
           f"{torch.get_num_threads()} threads, python {platform.python_version()}"
    return line + (f", cpu flags: {cpu_flags()}" if device.type == "cpu" else f", CUDA {torch.version.cuda}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--k", default="4,8,16", help="pack sizes, comma-separated")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--train-subset", type=int, help="train on the first N images (default: all 55000)")
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--study", default=str(QUICK_STUDY), help="the study spec of the 'study' recipe")
    parser.add_argument("--step", default="eager", choices=step_choices(), help="the training step of every run")
    args = parser.parse_args()
    device = resolve_device(args.device)
    study, lr_range = study_recipe(Path(args.study))
    recipes = {"seed": (SEED_RECIPE, None), "study": (study, lr_range)}
    print(hardware_line(device))
    print(f"seed: hidden {SEED_RECIPE['model_kwargs']['hidden_size']}, batch {SEED_RECIPE['batch_size']}, adadelta "
          f"lr 1.0; study: hidden {study['model_kwargs']['hidden_size']}, batch {study['batch_size']}, "
          f"{study['optimizer']} lr {lr_range[0]:g}..{lr_range[1]:g}; {args.epochs} epoch(s), "
          f"train_subset {args.train_subset or 'all'}, step {args.step}, median of {args.repeats}")
    warm_up(SEED_RECIPE, args)
    print(f"{'recipe':8} {'K':>3} {'solo runs/min':>14} {'fused runs/min':>15} {'ratio':>6}")
    for name, (recipe, spread) in recipes.items():
        for k in (int(value) for value in args.k.split(",")):
            solo, fused = compare(member_configs(recipe, k, spread, args), device, args.repeats)
            print(f"{name:8} {k:>3} {solo:>14.2f} {fused:>15.2f} {fused / solo:>5.2f}x", flush=True)


if __name__ == "__main__":
    main()
