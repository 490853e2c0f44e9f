"""A study's identity: the search space, the objectives and the fixed training settings its trials ran with.

Trials of two search spaces in one study give wrong answers (a "best trial" the current spec cannot produce, a
sampler fitted to a space that no longer exists), so the identity of the spec that created a study is stored with
it, and a run whose spec has another identity is refused in one line naming what changed, before anything is
written. To change a study's space on purpose, ``--new-spec-version`` records the new identity as the next spec
version; every trial carries the version it ran under (``spec_version``, and the MLflow tag
``sweepbench.spec_version``).

What is *not* identity, and may change between runs of one study: the budget (``n_trials``, ``timeout``,
``max_failed_trials``, ``pack``, ``keep_checkpoints``), the sampler and pruner (how the space is searched, not
what it is), the description, and where things are (``data_dir``, ``download``, ``checkpoint_dir``). A comment,
key order or a value written another way (``1e-1`` for ``0.1``, ``1`` for ``1.0``) changes nothing. The order of
a categorical's choices does count: Optuna stores a choice as its index and treats a reordered list as another
distribution.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
from typing import Any

import optuna

from ..config import ConfigError
from .spec import StudySpec

log = logging.getLogger(__name__)

VERSION_ATTR = "spec_version"  # study: the latest version; trial: the version it ran under
SPEC_ATTR = "spec"  # study user attrs "spec.<version>": {"fingerprint", "identity", "source", "recorded"}
VERSION_TAG = "sweepbench.spec_version"
FINGERPRINT_TAG = "sweepbench.spec_fingerprint"
LOCATION_FIELDS = ("data_dir", "download", "checkpoint_dir")
# RunConfig fields added after studies were first recorded: at this default a study is the study it was before
# the field existed, so its identity leaves the field out and a recorded study resumes as it was.
LATER_FIELDS = {"step": "eager"}
NEW_VERSION_FLAG = "--new-spec-version"
SHOWN_CHANGES = 4


def identity(spec: StudySpec) -> dict[str, Any]:
    """The spec's identity as one flat mapping of dotted names (``train.lr``, ``search.lr.high``,
    ``objective[0].metric``) to canonical values, so that two identities compare, and differ, key by key."""
    flat: dict[str, Any] = {}
    fixed = {key: value for key, value in spec.base_config.to_dict().items()
             if key not in LOCATION_FIELDS and not (key in LATER_FIELDS and value == LATER_FIELDS[key])}
    _flatten("train", fixed, flat)
    for index, objective in enumerate(spec.objectives):
        flat[f"objective[{index}].metric"] = objective.metric
        flat[f"objective[{index}].direction"] = objective.direction
    for param in spec.search:
        dimension = {"type": param.type, "low": param.low, "high": param.high, "step": param.step,
                     "log": param.log, "choices": list(param.choices) if param.type == "categorical" else None}
        for key, value in dimension.items():
            if value is not None:
                flat[f"search.{param.name}.{key}"] = _canonical(value)
    return dict(sorted(flat.items()))


def fingerprint(spec: StudySpec) -> str:
    """A short hash of the identity, for tags and messages."""
    text = json.dumps(identity(spec), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _flatten(prefix: str, values: dict[str, Any], into: dict[str, Any]) -> None:
    for key, value in values.items():
        if isinstance(value, dict):
            _flatten(f"{prefix}.{key}", value, into)
        else:
            into[f"{prefix}.{key}"] = _canonical(value)


def _canonical(value: Any) -> Any:
    """One spelling per value: an integral float as an int (TOML's ``1`` and ``1.0`` are one learning rate),
    lists element by element; JSON-safe, so an identity survives a round trip through the study's storage."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return int(value) if float(value).is_integer() and abs(value) < 2**53 else float(value)
    if isinstance(value, (list, tuple)):
        return [_canonical(item) for item in value]
    return str(value)


def changes(stored: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """What differs, in the words of the spec: ``search.lr.high 0.1 -> 0.01``, ``search.momentum added``,
    ``search.lr.step added (0.1)``. A search dimension added or removed is named once, as a whole."""
    dimensions_before, dimensions_now = {_dimension(key) for key in stored}, {_dimension(key) for key in current}
    whole = {name for name in dimensions_before ^ dimensions_now if name.startswith("search.")}
    described = [f"{name} {'added' if name in dimensions_now else 'removed'}" for name in sorted(whole)]
    for key in sorted(stored.keys() | current.keys()):
        if _dimension(key) in whole:
            continue
        if key not in stored:
            described.append(f"{key} added ({_show(current[key])})")
        elif key not in current:
            described.append(f"{key} removed (was {_show(stored[key])})")
        elif stored[key] != current[key]:
            described.append(f"{key} {_show(stored[key])} -> {_show(current[key])}")
    return described


def _dimension(key: str) -> str:
    """``search.lr.high`` -> ``search.lr`` (a whole dimension is added or removed); other keys stay whole."""
    if not key.startswith("search."):
        return key
    return key.rsplit(".", 1)[0]


def _show(value: Any) -> str:
    """A value as the spec's TOML writes it (``"adam"``, ``true``, ``[16, 32]``); no value as ``unset``."""
    return "unset" if value is None else json.dumps(value)


def versions(study: optuna.Study) -> dict[int, dict[str, Any]]:
    """The spec versions recorded with the study, oldest first: version -> its record."""
    attrs = study.user_attrs
    recorded = {int(key.split(".", 1)[1]): value for key, value in attrs.items()
                if key.startswith(f"{SPEC_ATTR}.") and key.split(".", 1)[1].isdigit()}
    return dict(sorted(recorded.items()))


def settle(study: optuna.Study, spec: StudySpec, where: str, new_version: bool = False) -> int:
    """The spec version this run works under: the study's latest when its identity is the spec's; the first,
    recorded now, for a study that has none yet; a new one when ``new_version`` is asked for and the identity
    changed. Otherwise a ``ConfigError`` naming what changed (``refusal``). Call it under the storage lock: two
    runs starting together with two specs must not both record theirs."""
    current = identity(spec)
    recorded = versions(study)
    if not recorded:
        if study.get_trials(deepcopy=False):
            log.warning(f"study {spec.name}: no spec recorded with its trials (made by an older sweepbench); "
                        f"recording this one's as version 1")
        return _record(study, spec, 1, current)
    latest = max(recorded)
    if recorded[latest]["identity"] == current:
        return latest
    if not new_version:
        raise refusal(study, spec, where)
    described = "; ".join(changes(recorded[latest]["identity"], current))
    log.warning(f"study {spec.name}: spec version {latest + 1} ({described}); its trials are tagged "
                f"{VERSION_TAG}={latest + 1}")
    return _record(study, spec, latest + 1, current)


def refusal(study: optuna.Study, spec: StudySpec, where: str) -> ConfigError | None:
    """The one-line refusal of a spec whose identity is not the study's latest; None when it is, or when the
    study has none recorded."""
    recorded, current = versions(study), identity(spec)
    latest = max(recorded, default=None)
    if latest is None or recorded[latest]["identity"] == current:
        return None
    described = changes(recorded[latest]["identity"], current)
    shown = "; ".join(described[:SHOWN_CHANGES]) + (f"; and {len(described) - SHOWN_CHANGES} more"
                                                    if len(described) > SHOWN_CHANGES else "")
    return ConfigError(f"study: {spec.name!r} in {where} was made from another spec (version {latest}, "
                       f"{recorded[latest]['source'] or 'no file'}): {shown}; give the spec a new name, use another "
                       f"--storage, or rerun with {NEW_VERSION_FLAG} to continue it as version {latest + 1}")


def _record(study: optuna.Study, spec: StudySpec, version: int, current: dict[str, Any]) -> int:
    study.set_user_attr(f"{SPEC_ATTR}.{version}", {
        "fingerprint": fingerprint(spec), "identity": current, "source": spec.source,
        "recorded": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    study.set_user_attr(VERSION_ATTR, version)
    return version


def version_of(study: optuna.Study, spec: StudySpec) -> int | None:
    """The latest recorded version whose identity is the spec's (None: none is)."""
    current = identity(spec)
    matching = [version for version, record in versions(study).items() if record["identity"] == current]
    return max(matching, default=None)
