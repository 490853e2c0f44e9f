"""This tree's engine against another commit's, in one process, interleaved: did a change move solo speed?

The other commit's ``src/sweepbench`` is extracted with ``git archive`` into a temporary folder as the package
``sweepbench_base`` (the package imports itself relatively, so both live side by side). Each round trains the seed
recipe (MNIST MLP hidden 128, batch 64, Adadelta lr 1.0, StepLR gamma 0.7; ``--epochs`` epochs) once with each
engine, the order alternating between rounds; the first epoch of every run is warm-up and left out. (Runs in two
threads cannot take turns by epoch: each calling thread gets its own OpenMP team, whose spinning slows the other.)
Prints the median and the fastest epoch of each engine, their ratios, and the spread of the per-round ratios; on a
noisy machine the fastest epochs are the steadier figure.

    .venv/bin/python benchmarks/engine_ab.py --base 1bd9882 [--rounds 5] [--epochs 4] [--device cpu]
"""

from __future__ import annotations

import argparse
import importlib
import io
import statistics
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))

from fused import SEED_RECIPE, hardware_line  # noqa: E402

import sweepbench  # noqa: E402


def archive_source(commit: str, folder: Path) -> Path:
    """``src/sweepbench`` at ``commit`` extracted under ``folder``; returns ``folder/src``."""
    archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", commit, "src/sweepbench"],
                             check=True, capture_output=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    return folder / "src"


def extract(commit: str, folder: Path) -> None:
    """``src/sweepbench`` at ``commit`` as ``folder/sweepbench_base``."""
    (archive_source(commit, folder) / "sweepbench").rename(folder / "sweepbench_base")


def epoch_seconds(package, args: argparse.Namespace) -> list[float]:
    """One run of the seed recipe with ``package``'s engine: its epoch seconds after the first."""
    config_module, engine = (importlib.import_module(f"{package.__name__}.{name}") for name in ("config", "engine"))
    config = config_module.RunConfig(**SEED_RECIPE, epochs=args.epochs, device=args.device, data_dir=args.data_dir)
    return [record.epoch_seconds for record in engine.train(config).history[1:]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base", required=True, help="the commit to compare against")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=4, help="per run; the first is warm-up")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--data-dir", default=str(PROJECT_ROOT.parent / "shared" / "data"))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        extract(args.base, Path(folder))
        sys.path.insert(0, folder)
        base = importlib.import_module("sweepbench_base")
        engines = {"base": base, "this tree": sweepbench}
        print(hardware_line(importlib.import_module("sweepbench.hardware").resolve_device(args.device)))
        print(f"seed recipe, {args.epochs} epochs per run (first left out), {args.rounds} rounds, base {args.base}")
        seconds: dict[str, list[float]] = {name: [] for name in engines}
        ratios = []
        for round_number in range(args.rounds):
            order = list(engines) if round_number % 2 == 0 else list(reversed(engines))
            medians = {}
            for name in order:
                epochs = epoch_seconds(engines[name], args)
                seconds[name] += epochs
                medians[name] = statistics.median(epochs)
            ratios.append(medians["this tree"] / medians["base"])
            print(f"  round {round_number + 1}: base {medians['base']:.3f} s, this tree {medians['this tree']:.3f} s "
                  f"({ratios[-1]:.3f}x)", flush=True)
    base_median, tree_median = (statistics.median(seconds[name]) for name in engines)
    base_fastest, tree_fastest = (min(seconds[name]) for name in engines)
    print(f"median epoch: base {base_median:.3f} s, this tree {tree_median:.3f} s, "
          f"ratio {tree_median / base_median:.3f} (per-round ratios {min(ratios):.3f}..{max(ratios):.3f})")
    print(f"fastest epoch: base {base_fastest:.3f} s, this tree {tree_fastest:.3f} s, "
          f"ratio {tree_fastest / base_fastest:.3f}")


if __name__ == "__main__":
    main()
