"""The seed tutorial's recipe through both input paths, in one process.

MNIST MLP, batch 64, Adadelta lr 1.0, StepLR gamma 0.7, 14 epochs: once through the `torchvision` reference
loader (DataLoader, per-sample PIL transforms) and once through the `device` loader (whole dataset on the device).
Then one CIFAR-10 epoch of `cifar_cnn` both ways. Prints per-epoch times, medians and the ratio.
``--batch-size`` departs from the recipe on purpose: at batch 64 on a CPU the device path is bound by the model's
own per-step compute, and a larger batch shows how much of the gap is the input path alone.

    python benchmarks/seed_recipe.py --data-dir ../shared/data [--device cuda] [--epochs 14] [--cifar-epochs 1]
"""

from __future__ import annotations

import argparse
import platform
import statistics

import torch

from sweepbench.config import RunConfig
from sweepbench.engine import device_name, resolve_device, train

SEED_RECIPE = dict(model="mnist_mlp", dataset="mnist", optimizer="adadelta", lr=1.0, lr_gamma=0.7, batch_size=64)
CIFAR_RECIPE = dict(model="cifar_cnn", dataset="cifar10", optimizer="sgd", lr=0.05, momentum=0.9, batch_size=64)


def compare_loaders(recipe: dict, epochs: int, args: argparse.Namespace) -> None:
    medians = {}
    for loader in ("torchvision", "device"):
        config = RunConfig(**{**recipe, "batch_size": args.batch_size}, epochs=epochs, loader=loader,
                           device=args.device, data_dir=args.data_dir, seed=args.seed)
        result = train(config)
        seconds = [record.epoch_seconds for record in result.history]
        medians[loader] = statistics.median(seconds)
        print(f"  {loader:11} epoch seconds {' '.join(f'{s:.2f}' for s in seconds)}")
        print(f"  {loader:11} median {medians[loader]:.3f} s/epoch, train total {sum(seconds):.1f} s, "
              f"val {result.val_accuracy:.4f}, test {result.test_accuracy:.4f}")
    print(f"  ratio torchvision/device per epoch: {medians['torchvision'] / medians['device']:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=14)
    parser.add_argument("--cifar-epochs", type=int, default=1, help="0 skips CIFAR-10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=SEED_RECIPE["batch_size"], help="the recipe's is 64")
    args = parser.parse_args()
    device = resolve_device(args.device)
    print(f"device {device.type} ({device_name(device)}), {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, CUDA {torch.version.cuda}, python {platform.python_version()}")
    print(f"MNIST MLP seed recipe, {args.epochs} epochs, batch {args.batch_size}:")
    compare_loaders(SEED_RECIPE, args.epochs, args)
    if args.cifar_epochs:
        print(f"CIFAR-10 cifar_cnn, {args.cifar_epochs} epoch(s), SGD momentum 0.9, batch {args.batch_size}:")
        compare_loaders(CIFAR_RECIPE, args.cifar_epochs, args)


if __name__ == "__main__":
    main()
