"""Which runs can train together in one pack, and the tags that describe a member's pack."""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable, Sequence

from ...config import ConfigError, RunConfig
from ...models import get_model_entry
from ...precisions import PRECISIONS, uses_grad_scaler

# What changes shapes or the step schedule: every member of a pack has the same.
SHARED_FIELDS = ("model", "model_kwargs", "dataset", "dataset_kwargs", "data_dir", "val_size", "train_subset",
                 "batch_size", "eval_batch_size", "epochs", "device", "precision", "compile", "step", "loader",
                 "augment")
# What each member has of its own.
MEMBER_FIELDS = ("lr", "lr_gamma", "momentum", "nesterov", "weight_decay", "optimizer", "seed", "target_accuracy",
                 "checkpoint_dir")
# Neither: ``download`` (any member's allows it), ``resume`` (refused).
OTHER_FIELDS = ("download", "resume")
PACK_TAG_PREFIX = "sweepbench."
FUSED_TAG = f"{PACK_TAG_PREFIX}fused"  # "true" on a member of a pack; the tracking layer logs "false" on others
PACK_SIZE_TAG = f"{PACK_TAG_PREFIX}pack_size"
SCALED = [name for name in PRECISIONS.in_order() if uses_grad_scaler(name)]  # precisions with a GradScaler


def _unscaled_advice() -> str:
    """The precisions a pack can train in, e.g. "fp32 or bf16 (tf32 on cuda)"."""
    unscaled = [PRECISIONS.get(name) for name in PRECISIONS.in_order() if name not in SCALED]
    everywhere = " or ".join(entry.name for entry in unscaled if entry.devices is None)
    somewhere = "; ".join(f"{entry.name} on {'/'.join(entry.devices)}" for entry in unscaled if entry.devices)
    return f"{everywhere} ({somewhere})" if somewhere else everywhere


# What a pack cannot train, one rule per field: (refused(value), what a pack needs, advice). The one home of these
# rules: the engine refuses members that break one, a packed study's spec is checked against them (study.spec).
PACK_RULES: dict[str, tuple[Callable[[Any], bool], str, str]] = {
    "resume": (bool, "no resume", "a fused run starts every member anew; resume a member's checkpoint with "
                                  "engine.train"),
    "compile": (bool, "compile = False", "fused training runs its vmapped model eagerly; use compile false"),
    "loader": (lambda loader: loader != "device", "loader = 'device'",
               "fused training batches on the device; use loader 'device'"),
    "precision": (uses_grad_scaler, f"precision other than {' or '.join(map(repr, SCALED))}",
                  f"{', '.join(SCALED)} needs a loss scaler per member, which fused training does not have; use "
                  f"{_unscaled_advice()}"),
}


def _shared_value(config: RunConfig, name: str) -> Any:
    value = getattr(config, name)
    if name == "model_kwargs":  # {} and the defaults spelled out are one model
        value = {**get_model_entry(config.model).defaults(), **value}
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted((key, _hashable(item)) for key, item in value.items()))
    if isinstance(value, list):
        return tuple(_hashable(item) for item in value)
    return value


def pack_key(config: RunConfig) -> tuple:
    """What a run must share with the other members of its pack: equal keys can train fused."""
    return tuple((name, _hashable(_shared_value(config, name))) for name in SHARED_FIELDS)


def pack_groups(configs: Sequence[RunConfig]) -> list[list[int]]:
    """Indices of ``configs`` grouped by ``pack_key``, groups in order of first appearance, indices in order."""
    groups: dict[tuple, list[int]] = defaultdict(list)
    for index, config in enumerate(configs):
        groups[pack_key(config)].append(index)
    return list(groups.values())


def check_pack(configs: Sequence[RunConfig]) -> None:
    """Refuses, in one line naming the field, members that cannot train in one pack or settings a pack lacks."""
    if not configs:
        raise ConfigError("configs: a fused pack needs at least one run config")
    for index, config in enumerate(configs):
        _check_member(index, config)
    first = configs[0]
    for index, config in enumerate(configs[1:], start=1):
        for name in SHARED_FIELDS:
            ours, theirs = _shared_value(config, name), _shared_value(first, name)
            if ours != theirs:
                raise ConfigError(f"{name}: member {index} has {ours!r} but member 0 has {theirs!r}; a fused pack's "
                                  f"members share {', '.join(SHARED_FIELDS)} (pack_groups groups runs that do)")
    folders = [config.checkpoint_dir for config in configs if config.checkpoint_dir]
    repeated = sorted({folder for folder in folders if folders.count(folder) > 1})
    if repeated:
        raise ConfigError(f"checkpoint_dir: {repeated[0]!r} is given to more than one member; each member needs a "
                          f"folder of its own")


def _check_member(index: int, config: RunConfig) -> None:
    for name, _, advice in pack_refusals(config):
        raise ConfigError(f"{name}: member {index} has {getattr(config, name)!r}; {advice}")


def pack_refusals(config: RunConfig) -> list[tuple[str, str, str]]:
    """The ``PACK_RULES`` that ``config`` breaks, as (field, what a pack needs, advice)."""
    return [(name, needs, advice) for name, (refused, needs, advice) in PACK_RULES.items()
            if refused(getattr(config, name))]


def pack_tags(pack_id: str, size: int, member: int) -> dict[str, str]:
    """What ``TrainContext.pack`` holds for member ``member`` of a pack of ``size``: tags for the tracker. A
    member's epoch_seconds is the pack's epoch time (``epoch_time``: pack)."""
    return {FUSED_TAG: "true", f"{PACK_TAG_PREFIX}pack_id": pack_id,
            PACK_SIZE_TAG: str(size), f"{PACK_TAG_PREFIX}pack_member": str(member),
            f"{PACK_TAG_PREFIX}epoch_time": "pack"}
