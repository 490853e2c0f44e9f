"""The captured step against the eager one, in one process, interleaved: how near does an epoch get to the
device's compute limit? (Issue 18.)

Each round trains each recipe once per step (``eager``, ``compiled``; ``graph`` too with ``--device cuda``),
the order alternating between rounds; the first epoch of every run is left out. With ``--pack K`` each run is a
fused pack of K members (seeds 0..K-1) and an epoch trains all K. A compiled or captured run's
``compile_seconds`` (built before its first epoch) is reported apart: the first compiled run of the process starts
with an empty inductor cache (a temporary ``TORCHINDUCTOR_CACHE_DIR``), so its figure is the cold compile cost;
later runs find their kernels in that cache. Achieved GFLOP/s is the epoch's forward and backward FLOPs (counted
by ``torch.utils.flop_counter`` on one batch) over the median epoch.

    .venv/bin/python benchmarks/step.py [--rounds 5] [--epochs 3] [--device cpu] [--recipes seed,cifar_cnn]
                                        [--pack K]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="sweepbench-inductor-"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fused import SEED_RECIPE, hardware_line  # noqa: E402

from sweepbench.config import RunConfig  # noqa: E402
from sweepbench.data import load_dataset  # noqa: E402
from sweepbench.engine import RunResult, resolve_device, train, train_fused  # noqa: E402
from sweepbench.models import create_model  # noqa: E402

PROJECT_ROOT = Path(__file__).resolve().parents[1]
RECIPES = {
    "seed": SEED_RECIPE,
    "cifar_cnn": dict(model="cifar_cnn", dataset="cifar10", batch_size=128, optimizer="sgd", lr=0.05, momentum=0.9),
}


def epoch_flops(config: RunConfig) -> float:
    """Forward and backward FLOPs of one epoch: one batch's, counted, times the batches."""
    model = create_model(config.model, **config.model_kwargs)
    dataset = load_dataset(config.dataset, config.data_dir, False, config.val_size)
    train_size = min(len(dataset.y_train), config.train_subset or len(dataset.y_train))
    shape = dataset.image_shape
    images, labels = torch.randn(config.batch_size, *shape), torch.zeros(config.batch_size, dtype=torch.long)
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(model(images), labels).backward()
    return counter.get_total_flops() * train_size / config.batch_size


def run(config: RunConfig, pack: int) -> RunResult:
    """One run of ``config``, or its first member's result of a pack of ``pack`` seeds (the pack's epochs)."""
    if pack <= 1:
        return train(config)
    return train_fused([config.replace(seed=seed) for seed in range(pack)])[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=3, help="per run; the first is left out")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--recipes", default="seed,cifar_cnn")
    parser.add_argument("--train-subset", type=int, help="train on the first N images (default: all)")
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    parser.add_argument("--pack", type=int, default=1, help="train each run as a fused pack of K seeds")
    args = parser.parse_args()
    device = resolve_device(args.device)
    steps = ["eager", "compiled", *(["graph"] if device.type == "cuda" else [])]
    print(hardware_line(device))
    packed = f", each run a fused pack of {args.pack}" if args.pack > 1 else ""
    print(f"{args.epochs} epochs per run (first left out), {args.rounds} rounds, interleaved{packed}")
    for recipe in args.recipes.split(","):
        base = RunConfig(**RECIPES[recipe], epochs=args.epochs, device=args.device, data_dir=args.data_dir,
                         train_subset=args.train_subset)
        seconds: dict[str, list[float]] = {step: [] for step in steps}
        compile_seconds: dict[str, list[float]] = {step: [] for step in steps}
        for round_number in range(args.rounds):
            for step in steps if round_number % 2 == 0 else reversed(steps):
                result = run(base.replace(step=step), args.pack)
                seconds[step] += [record.epoch_seconds for record in result.history[1:]]
                compile_seconds[step].append(result.compile_seconds)
        flops = epoch_flops(base) * args.pack
        print(f"\n{recipe}: {RECIPES[recipe]}; {flops / 1e9:.1f} GFLOP per epoch (forward + backward)")
        eager = statistics.median(seconds["eager"])
        for step in steps:
            median, fastest = statistics.median(seconds[step]), min(seconds[step])
            built = compile_seconds[step]
            compile_text = (f", compile {built[0]:.1f} s cold, {statistics.median(built[1:]):.1f} s warm"
                            if step != "eager" and len(built) > 1 else "")
            print(f"  {step:8s} median epoch {median:.3f} s (fastest {fastest:.3f}), {eager / median:.2f}x eager, "
                  f"{flops / median / 1e9:.0f} GFLOP/s{compile_text}")


if __name__ == "__main__":
    main()
