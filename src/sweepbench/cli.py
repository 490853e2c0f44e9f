"""The ``sweepbench`` command: argument parsing and printing only; the work lives in the modules."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from .config import DEVICES, LOADERS, OPTIMIZERS, PRECISIONS, ConfigError, RunConfig
from .data import DataNotFoundError


class UsageError(Exception):
    """Bad command-line input that argparse cannot catch; printed as one line."""


def _add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with <dataset>.npz or torchvision's layout "
                                           "(default: $SWEEPBENCH_DATA_DIR, else the user cache dir)")
    parser.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")


def _add_train_parser(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("train", help="train one model with the one engine")
    parser.add_argument("--model", default="mnist_mlp")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="model keyword argument, e.g. hidden_size=256 (repeatable)")
    parser.add_argument("--dataset", default="mnist")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1.0)
    parser.add_argument("--lr-gamma", type=float, default=1.0, help="learning-rate decay per epoch (StepLR)")
    parser.add_argument("--optimizer", default="adadelta", help=f"one of: {', '.join(OPTIMIZERS)}")
    parser.add_argument("--momentum", type=float, default=0.0)
    parser.add_argument("--nesterov", action="store_true")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--device", default="auto", help=f"one of: {', '.join(DEVICES)}")
    parser.add_argument("--precision", default="fp32", help=f"one of: {', '.join(PRECISIONS)}")
    parser.add_argument("--loader", default="device", help=f"one of: {', '.join(LOADERS)}")
    parser.add_argument("--augment", action="store_true", help="random crop + flip (CIFAR)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--val-size", type=int, default=5000)
    parser.add_argument("--target-accuracy", type=float, help="validation accuracy for time-to-target")
    parser.add_argument("--checkpoint-dir")
    parser.add_argument("--resume", help="checkpoint to continue from")
    parser.add_argument("--json", action="store_true", help="end stdout with one JSON line")
    _add_data_args(parser)
    parser.set_defaults(handler=_train)


def parse_key_values(pairs: Sequence[str], option: str) -> dict:
    """``["hidden_size=256", "dropout=0.1"]`` -> ``{"hidden_size": 256, "dropout": 0.1}`` (values parsed as JSON)."""
    values = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"{option}: expected KEY=VALUE, got {pair!r}")
        try:
            values[key] = json.loads(raw)
        except json.JSONDecodeError:
            values[key] = raw
    return values


def config_from_args(args: argparse.Namespace) -> RunConfig:
    return RunConfig(
        model=args.model, model_kwargs=parse_key_values(args.model_arg, "--model-arg"), dataset=args.dataset,
        data_dir=args.data_dir, download=args.download, val_size=args.val_size, optimizer=args.optimizer,
        lr=args.lr, momentum=args.momentum, nesterov=args.nesterov, weight_decay=args.weight_decay,
        lr_gamma=args.lr_gamma, batch_size=args.batch_size, epochs=args.epochs, seed=args.seed,
        device=args.device, precision=args.precision, compile=args.compile, loader=args.loader,
        augment=args.augment, target_accuracy=args.target_accuracy, checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
    )


def _train(args: argparse.Namespace) -> int:
    from .engine import ProgressBar, train

    result = train(config_from_args(args), [ProgressBar()])
    print(format_summary(result.summary()))
    if args.json:
        print(json.dumps(result.summary()))
    return 0 if result.status == "completed" else 1


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.2f}%"


def format_summary(summary: dict) -> str:
    seconds = summary["epoch_seconds"]
    lines = [
        f"status          {summary['status']}" + (f" ({summary['message']})" if summary["message"] else ""),
        f"model/dataset   {summary['model']} on {summary['dataset']}",
        f"device          {summary['device']} ({summary['device_name']}), {summary['precision']}, "
        f"loader {summary['loader']}",
        f"val accuracy    {_percent(summary['val_accuracy'])} (best {_percent(summary['best_val_accuracy'])} "
        f"at epoch {summary['best_epoch']})",
        f"test accuracy   {_percent(summary['test_accuracy'])}",
        f"epoch seconds   {', '.join(f'{s:.2f}' for s in seconds) or '-'}",
        f"samples/second  {summary['samples_per_second'] or 0:,.0f}",
        f"peak memory     {summary['peak_memory_mb']:.0f} MiB",
    ]
    if summary["time_to_target_seconds"] is not None:
        lines.append(f"time to target  {summary['time_to_target_seconds']:.2f} s")
    return "\n".join(lines)


def _list_models(args: argparse.Namespace) -> int:
    from .models import get_model_entry, list_models

    for name in list_models():
        entry = get_model_entry(name)
        kwargs = ", ".join(f"{key}={value}" for key, value in entry.defaults().items())
        print(f"{name:14} input {entry.input_shape}  ({kwargs})  {entry.description}")
    return 0


def _list_datasets(args: argparse.Namespace) -> int:
    from .data import get_dataset_entry, list_datasets

    for name in list_datasets():
        entry = get_dataset_entry(name)
        print(f"{name:14} {len(entry.classes)} classes  {'real' if entry.real else 'generated'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sweepbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    _add_train_parser(commands)
    commands.add_parser("models", help="list registered models").set_defaults(handler=_list_models)
    commands.add_parser("datasets", help="list registered datasets").set_defaults(handler=_list_datasets)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except (ConfigError, DataNotFoundError, UsageError) as exc:
        print(f"sweepbench: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("sweepbench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
