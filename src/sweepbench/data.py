"""Dataset registry and sources.

A real dataset is looked for, in order, in the data directory (``--data-dir``, else ``SWEEPBENCH_DATA_DIR``,
else the user cache dir) as ``<name>.npz`` (keys ``x_train, y_train, x_test, y_test``) or in torchvision's
on-disk layout; then it is downloaded by torchvision into that directory if downloading is allowed; else a
``DataNotFoundError`` lists every path tried. It is never replaced by synthetic data.

Every dataset is held in memory as uint8 NCHW tensors; normalisation happens on the training device.
A fixed validation split is carved from the training set with a constant seed, the same for every run.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .datacache import KEYS as ARRAY_KEYS
from .datacache import cached_arrays
from .registry import Registry
from .validators import ConfigError

VAL_SPLIT_SEED = 20240601
DATA_DIR_ENV = "SWEEPBENCH_DATA_DIR"

MNIST_CLASSES = tuple(str(d) for d in range(10))
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                   "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")


class DataNotFoundError(FileNotFoundError):
    """A real dataset is nowhere to be found; the message lists the paths tried and how to provide it."""


@dataclass
class RawArrays:
    """A dataset as it comes from its source: uint8 images (N, H, W) or (N, H, W, C), integer labels."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    source: str
    classes: tuple[str, ...] | None = None


@dataclass
class Dataset:
    """Train / validation / test splits as uint8 NCHW tensors and int64 labels, with per-channel statistics."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_val: torch.Tensor
    y_val: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    source: str

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 (first 16 hex digits) over every split's bytes: tells two copies of a dataset apart."""
        digest = hashlib.sha256()
        for tensor in (self.x_train, self.y_train, self.x_val, self.y_val, self.x_test, self.y_test):
            digest.update(tensor.numpy().tobytes())
        return digest.hexdigest()[:16]


@dataclass(frozen=True)
class DatasetEntry:
    name: str
    loader: Callable[..., RawArrays]
    classes: tuple[str, ...]
    real: bool
    image_shape: tuple[int, ...] | None  # one image's (C, H, W); None where dataset_kwargs decide it


DATASETS: Registry[DatasetEntry] = Registry("dataset")


def register_dataset(classes: tuple[str, ...], real: bool = True,
                     image_shape: tuple[int, ...] | None = None) -> Callable:
    """Registers ``loader(data_dir: Path, download: bool, **kwargs) -> RawArrays`` under its function name;
    ``image_shape`` (C, H, W), when fixed, lets a model's input be checked before any data loads."""
    return DATASETS.decorator(lambda loader: DatasetEntry(loader.__name__, loader, tuple(classes), real,
                                                          image_shape))


def list_datasets() -> list[str]:
    return DATASETS.names()


def get_dataset_entry(name: str) -> DatasetEntry:
    return DATASETS.get(name)


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    if data_dir:
        return Path(data_dir).expanduser().resolve()
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV]).expanduser().resolve()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sweepbench")) / "data"


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = False,
                 val_size: int = 5000, **kwargs: Any) -> Dataset:
    """Loads (once per process) and splits a registered dataset."""
    entry = get_dataset_entry(name)
    directory = resolve_data_dir(data_dir) if entry.real else Path()
    hashable = {key: tuple(value) if isinstance(value, list) else value for key, value in kwargs.items()}
    return _load_cached(entry.name, directory, download, val_size, tuple(sorted(hashable.items())))


def forget_loaded_datasets() -> None:
    """Lets go of the datasets this process loaded (a process that only checked them, before its workers run)."""
    _load_cached.cache_clear()


@functools.lru_cache(maxsize=4)
def _load_cached(name: str, directory: Path, download: bool, val_size: int, kwargs: tuple) -> Dataset:
    entry = DATASETS.get(name)
    try:
        raw = entry.loader(directory, download, **dict(kwargs))
    except TypeError as exc:
        raise ConfigError(f"dataset_kwargs for {name!r}: {exc}") from exc
    dataset = _split(name, raw, raw.classes or entry.classes, val_size)
    _check_contents(dataset, entry)
    return dataset


def _check_contents(dataset: Dataset, entry: DatasetEntry) -> None:
    """Images of the registered shape and labels within the class range: a file that breaks either fails here,
    in one line naming it, not at the first batch."""
    shapes = {tuple(dataset.x_train.shape[1:]), tuple(dataset.x_test.shape[1:])}
    if len(shapes) > 1 or (entry.image_shape and shapes != {entry.image_shape}):
        raise ConfigError(f"{dataset.source}: images of shape {tuple(dataset.x_train.shape[1:])} (train) and "
                          f"{tuple(dataset.x_test.shape[1:])} (test); dataset {dataset.name!r} has "
                          f"{entry.image_shape or 'one shape for both'} (C, H, W)")
    for split, images, labels in (("train", dataset.x_train, dataset.y_train), ("val", dataset.x_val, dataset.y_val),
                                  ("test", dataset.x_test, dataset.y_test)):
        if len(images) != len(labels):
            raise ConfigError(f"{dataset.source}: {len(images)} {split} images but {len(labels)} labels")
        if len(labels) and (labels.min() < 0 or labels.max() >= dataset.num_classes):
            raise ConfigError(f"{dataset.source}: {split} labels from {labels.min().item()} to "
                              f"{labels.max().item()}; dataset {dataset.name!r} has {dataset.num_classes} classes, "
                              f"labels 0 to {dataset.num_classes - 1}")


def _to_nchw(images: np.ndarray) -> torch.Tensor:
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise ConfigError(f"images must be uint8, got {images.dtype}")
    tensor = torch.from_numpy(np.ascontiguousarray(images))
    if tensor.ndim == 3:
        return tensor.unsqueeze(1).contiguous()
    if tensor.ndim == 4 and tensor.shape[-1] in (1, 3):
        return tensor.permute(0, 3, 1, 2).contiguous()
    raise ConfigError(f"images must be (N, H, W) or (N, H, W, C), got shape {tuple(images.shape)}")


def _split(name: str, raw: RawArrays, classes: tuple[str, ...], val_size: int) -> Dataset:
    x_all, y_all = _to_nchw(raw.x_train), torch.as_tensor(np.asarray(raw.y_train), dtype=torch.int64).flatten()
    if val_size >= len(x_all):
        raise ConfigError(f"val_size: {val_size} leaves no training data ({len(x_all)} training images)")
    order = torch.randperm(len(x_all), generator=torch.Generator().manual_seed(VAL_SPLIT_SEED))
    val_idx, train_idx = order[:val_size], order[val_size:]
    x_train = x_all[train_idx].contiguous()
    mean, std = _channel_mean_std(x_train)
    return Dataset(
        name=name,
        x_train=x_train, y_train=y_all[train_idx].contiguous(),
        x_val=x_all[val_idx].contiguous(), y_val=y_all[val_idx].contiguous(),
        x_test=_to_nchw(raw.x_test),
        y_test=torch.as_tensor(np.asarray(raw.y_test), dtype=torch.int64).flatten(),
        classes=classes,
        mean=mean,
        std=std,
        source=raw.source,
    )


def _channel_mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Each channel's mean and (unbiased) standard deviation of uint8 ``images`` scaled to [0, 1], from the
    counts of its 256 values: exact, and a tenth of the time of converting every pixel to float64."""
    channels = images.transpose(0, 1).reshape(images.shape[1], -1)
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for channel in channels:
        counts = torch.bincount(channel, minlength=256).double()
        total = counts.sum()
        mean = (counts * values).sum() / total
        means.append(mean.item())
        stds.append(((counts * (values - mean) ** 2).sum() / (total - 1)).sqrt().item())
    return tuple(means), tuple(stds)


def _read_npz(path: Path) -> RawArrays:
    try:
        arrays = cached_arrays(path, _npz_arrays)
        return RawArrays(arrays["x_train"], arrays["y_train"], arrays["x_test"], arrays["y_test"], str(path))
    except ConfigError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise ConfigError(f"{path}: not a readable .npz file ({type(exc).__name__}: {exc}); expected numpy's "
                          "npz with uint8 x_train, x_test and integer y_train, y_test") from exc


def _npz_arrays(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as arrays:
        missing = set(ARRAY_KEYS) - set(arrays.files)
        if missing:
            raise ConfigError(f"{path}: missing keys {sorted(missing)}; expected {', '.join(ARRAY_KEYS)}")
        return {key: arrays[key] for key in ARRAY_KEYS}


def _read_idx(path: Path) -> np.ndarray:
    """Reads an idx file (MNIST format), plain or gzipped."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def _find_idx(raw_dir: Path, stem: str) -> Path | None:
    for candidate in (raw_dir / stem, raw_dir / f"{stem}.gz"):
        if candidate.exists():
            return candidate
    return None


def _read_mnist_layout(raw_dir: Path) -> RawArrays | None:
    stems = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
    paths = [_find_idx(raw_dir, stem) for stem in stems]
    if any(path is None for path in paths):
        return None
    return RawArrays(*(_read_idx(path) for path in paths), source=str(raw_dir))


def _read_cifar10_layout(batches_dir: Path) -> RawArrays | None:
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    if not all((batches_dir / name).exists() for name in names):
        return None
    images, labels = [], []
    for name in names:
        with open(batches_dir / name, "rb") as handle:
            batch = pickle.load(handle, encoding="latin1")
        images.append(np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
        labels.append(np.asarray(batch["labels"]))
    return RawArrays(np.concatenate(images[:5]), np.concatenate(labels[:5]), images[5], labels[5], str(batches_dir))


def _download(torchvision_class: str, directory: Path) -> None:
    import torchvision.datasets

    dataset_class = getattr(torchvision.datasets, torchvision_class)
    directory.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        dataset_class(root=str(directory), train=train, download=True)


def _load_real(name: str, directory: Path, download: bool, layout_dir: str, torchvision_class: str,
               read_layout: Callable[[Path], RawArrays | None]) -> RawArrays:
    npz, layout = directory / f"{name}.npz", directory / layout_dir
    if npz.exists():
        return _read_npz(npz)
    found = read_layout(layout)
    if found is not None:
        return found
    if download:
        _download(torchvision_class, directory)
        found = read_layout(layout)
        if found is not None:
            return found
    raise DataNotFoundError(
        f"dataset {name!r} not found. Looked for {npz} and torchvision's layout in {layout}"
        + ("" if download else " (downloading is off)")
        + f". Provide it with --data-dir DIR or {DATA_DIR_ENV}=DIR pointing at a folder holding {name}.npz"
        " (keys x_train, y_train, x_test, y_test), or allow downloading with --download."
    )


@register_dataset(MNIST_CLASSES, image_shape=(1, 28, 28))
def mnist(data_dir: Path, download: bool) -> RawArrays:
    return _load_real("mnist", data_dir, download, "MNIST/raw", "MNIST", _read_mnist_layout)


@register_dataset(FASHION_CLASSES, image_shape=(1, 28, 28))
def fashion_mnist(data_dir: Path, download: bool) -> RawArrays:
    return _load_real("fashion_mnist", data_dir, download, "FashionMNIST/raw", "FashionMNIST", _read_mnist_layout)


@register_dataset(CIFAR10_CLASSES, image_shape=(3, 32, 32))
def cifar10(data_dir: Path, download: bool) -> RawArrays:
    return _load_real("cifar10", data_dir, download, "cifar-10-batches-py", "CIFAR10", _read_cifar10_layout)


@register_dataset(tuple(str(c) for c in range(10)), real=False)
def synthetic(data_dir: Path, download: bool, image_shape: tuple[int, ...] = (1, 28, 28), num_classes: int = 10,
              train_size: int = 10000, test_size: int = 1000, noise: float = 60.0, seed: int = 0) -> RawArrays:
    """Random class prototypes plus Gaussian noise: learnable, so a short run shows accuracy rising."""
    rng = np.random.default_rng(seed)
    channels, height, width = image_shape
    prototypes = rng.uniform(0, 255, size=(num_classes, height, width, channels))

    def sample(count: int) -> tuple[np.ndarray, np.ndarray]:
        labels = rng.integers(0, num_classes, size=count)
        images = prototypes[labels] + rng.normal(0, noise, size=(count, height, width, channels))
        return np.clip(images, 0, 255).astype(np.uint8), labels

    x_train, y_train = sample(train_size)
    x_test, y_test = sample(test_size)
    return RawArrays(x_train, y_train, x_test, y_test, source=f"synthetic(seed={seed})",
                     classes=tuple(str(c) for c in range(num_classes)))


class PerSampleImageDataset(torch.utils.data.Dataset):
    """The reference input path: each sample becomes a PIL image and goes through ``transform`` on its own."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        hwc = images.permute(0, 2, 3, 1).numpy()
        self.images = hwc[..., 0] if hwc.shape[-1] == 1 else hwc
        self.labels = labels.tolist()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        from PIL import Image

        return self.transform(Image.fromarray(self.images[index])), self.labels[index]
