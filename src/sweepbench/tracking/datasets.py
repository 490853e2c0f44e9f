"""A training run's data as MLflow dataset inputs (``mlflow.log_input``'s records): one per split the run used,
named after the dataset, with a digest and the data's source, the split as the input's context. What MLflow's
runs table shows in its Dataset column. Nothing of the data itself is copied.

The digest of a split is derived from the dataset's fingerprint (sha256 over every split's bytes, computed once
per process) with the split and its rows: no second pass over the data, yet it changes whenever the data, the
validation split or the training subset does. MLflow keeps one input per (dataset, run), so each split needs a
digest of its own to be listed with its own context.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from mlflow.entities import Dataset as MlflowDataset
from mlflow.entities import DatasetInput, InputTag
from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

from ..config import RunConfig
from ..data import Dataset
from .store import Store

TRAINING, VALIDATION, TEST = "training", "validation", "test"  # MLflow's usual context names


def split_rows(dataset: Dataset, config: RunConfig, split: str) -> int:
    """How many examples of ``split`` the run uses (the training subset, when the config asks for one)."""
    if split == TRAINING:
        total = len(dataset.x_train)
        return min(config.train_subset, total) if config.train_subset else total
    return len(dataset.x_val) if split == VALIDATION else len(dataset.x_test)


def split_digest(dataset: Dataset, split: str, rows: int) -> str:
    return hashlib.sha256(f"{dataset.fingerprint}:{split}:{rows}".encode()).hexdigest()[:16]


def dataset_input(dataset: Dataset, config: RunConfig, split: str) -> DatasetInput:
    rows = split_rows(dataset, config, split)
    source = dataset.source
    source_type = "local" if Path(source).exists() else "code"  # MLflow's own source kinds and their JSON
    source_json = {"uri": source} if source_type == "local" else {"tags": {"source": source}}
    profile = {"num_rows": rows, "num_classes": dataset.num_classes, "image_shape": list(dataset.image_shape),
               "fingerprint": dataset.fingerprint}
    schema = {"mlflow_tensorspec": {
        "features": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "uint8",
                                                                   "shape": [-1, *dataset.image_shape]}}]),
        "targets": json.dumps([{"type": "tensor", "tensor-spec": {"dtype": "int64", "shape": [-1]}}])}}
    record = MlflowDataset(name=dataset.name, digest=split_digest(dataset, split, rows), source_type=source_type,
                           source=json.dumps(source_json),
                           schema=json.dumps(schema), profile=json.dumps(profile))
    return DatasetInput(record, tags=[InputTag(MLFLOW_DATASET_CONTEXT, split)])


def log_splits(store: Store, run_id: str, dataset: Dataset, config: RunConfig, splits: tuple[str, ...]) -> None:
    """Logs ``splits`` of ``dataset`` as ``run_id``'s inputs (MLflow ignores an input the run already has; a
    dataset that another worker inserted at the same moment is found on a second try: ``RetryingClient``)."""
    store.client.log_inputs(run_id, datasets=[dataset_input(dataset, config, split) for split in splits])
