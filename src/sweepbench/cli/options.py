"""Options shared by the commands: the run settings as flags and ``--set``, data and tracking options, output."""

from __future__ import annotations

import argparse
import sys

from ..config import KWARGS_FIELDS, RunConfig, apply_overrides, parse_overrides
from ..config import fields as config_fields


def add_data_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data-dir", help="folder with <dataset>.npz or torchvision's layout "
                                           "(default: $SWEEPBENCH_DATA_DIR, else the user cache dir)")
    parser.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")


FLAG_TYPES = {"int": int, "float": float}


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per ``RunConfig`` field, from its metadata (``--batch-size``; ``--model-arg KEY=VALUE`` for
    ``model_kwargs``), plus ``--set KEY=VALUE`` for any field. Unset flags keep the config's defaults."""
    for f in config_fields():
        if f.name in ("data_dir", "download"):
            continue  # add_data_args: shared with study run and bench
        help_text = f.metadata["help"] + (f"; one of: {', '.join(f.metadata['choices'])}" if f.metadata["choices"]
                                          else "")
        if f.name in KWARGS_FIELDS:
            parser.add_argument(f"--{f.name.split('_')[0]}-arg", dest=f.name, action="append", default=[],
                                metavar="KEY=VALUE", help=f"{help_text} (repeatable)")
        elif f.type == "bool":
            parser.add_argument(f"--{f.name.replace('_', '-')}", action="store_true", default=None, help=help_text)
        else:
            default = f.default if f.default is not None else "none"
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=FLAG_TYPES.get(f.type.split(" ")[0], str),
                                help=f"{help_text} (default: {default})")
    add_set_arg(parser)


def add_set_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any run setting, e.g. lr=0.01, model_kwargs.hidden_size=256 (repeatable; over the "
                             "other options)")


def add_tracking_args(parser: argparse.ArgumentParser, default_experiment: str | None = None) -> None:
    if default_experiment is not None:
        parser.add_argument("--experiment", default=default_experiment,
                            help=f"MLflow experiment name (default: {default_experiment})")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else "
                                               "sqlite:///<cwd>/mlruns/mlflow.db)")


def add_system_metrics_arg(parser: argparse.ArgumentParser, run: str) -> None:
    parser.add_argument("--no-system-metrics", action="store_true",
                        help=f"do not log MLflow's system metrics (CPU, memory, disk, network, GPU) on {run}; "
                             "also MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING=false. Sampled every 2 s, or "
                             "$MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL")


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config the ``train`` flags describe: the flags given, then ``--set`` over them."""
    values = {f.name: getattr(args, f.name) for f in config_fields()
              if f.name not in KWARGS_FIELDS and getattr(args, f.name) is not None}
    for name in KWARGS_FIELDS:
        option = f"--{name.split('_')[0]}-arg"
        values = apply_overrides(values, parse_overrides(getattr(args, name), option, prefix=f"{name}."))
    return RunConfig.from_dict(apply_overrides(values, parse_overrides(args.set)))


def split_list(values: str | None) -> list[str] | None:
    return [value.strip() for value in values.split(",") if value.strip()] if values else None


def write_output(path: str, text: str) -> None:
    from ..report.export import write_export

    made = write_export(path, text)  # the path was checked when the command started (paths.output_file)
    print(f"wrote {path}" + (f" (made the folder {made})" if made else ""), file=sys.stderr)


