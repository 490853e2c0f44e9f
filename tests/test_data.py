import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from sweepbench import data
from sweepbench.config import ConfigError
from sweepbench.data import DataNotFoundError, load_dataset, resolve_data_dir

FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def fresh_cache():
    data._load_cached.cache_clear()
    yield
    data._load_cached.cache_clear()


def test_mnist_loads_from_npz_with_a_fixed_validation_split(data_dir):
    mnist = load_dataset("mnist", data_dir)
    assert mnist.x_train.shape == (55000, 1, 28, 28) and mnist.x_train.dtype == torch.uint8
    assert mnist.x_val.shape == (5000, 1, 28, 28) and mnist.x_test.shape == (10000, 1, 28, 28)
    assert mnist.y_train.dtype == torch.int64 and set(mnist.y_test.unique().tolist()) == set(range(10))
    assert mnist.source.endswith("mnist.npz")
    assert 0.12 < mnist.mean[0] < 0.14 and 0.30 < mnist.std[0] < 0.32
    data._load_cached.cache_clear()
    again = load_dataset("mnist", data_dir)
    assert torch.equal(again.x_val, mnist.x_val) and again.fingerprint == mnist.fingerprint
    with np.load(data_dir / "mnist.npz") as raw:
        assert sorted(torch.cat([mnist.y_train, mnist.y_val]).tolist()) == sorted(raw["y_train"].tolist())


def test_cifar10_loads_from_npz_as_nchw(data_dir):
    cifar = load_dataset("cifar10", data_dir)
    assert cifar.x_train.shape == (45000, 3, 32, 32) and cifar.x_test.shape == (10000, 3, 32, 32)
    assert cifar.classes[0] == "airplane" and cifar.num_classes == 10
    with np.load(data_dir / "cifar10.npz") as raw:
        assert torch.equal(cifar.x_test, torch.from_numpy(raw["x_test"]).permute(0, 3, 1, 2))


def _unpack_mnist_layout(source: Path, root: Path, gunzip: bool) -> None:
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in source.glob("*-ubyte.gz"):
        if gunzip:
            with gzip.open(archive) as packed, open(raw / archive.stem, "wb") as plain:
                shutil.copyfileobj(packed, plain)
        else:
            shutil.copy(archive, raw / archive.name)


@pytest.mark.parametrize("gunzip", [True, False], ids=["idx", "idx.gz"])
def test_mnist_loads_from_torchvision_layout(data_dir, tmp_path, gunzip):
    _unpack_mnist_layout(data_dir / "MNIST" / "raw", tmp_path, gunzip)
    from_layout = load_dataset("mnist", tmp_path)
    from_npz = load_dataset("mnist", data_dir)
    assert from_layout.source == str(tmp_path / "MNIST" / "raw")
    assert torch.equal(from_layout.x_test, from_npz.x_test) and torch.equal(from_layout.y_test, from_npz.y_test)
    assert torch.equal(from_layout.y_train, from_npz.y_train)
    assert (from_layout.x_train.int() - from_npz.x_train.int()).abs().max() <= 1


def test_torchvision_reads_the_same_layout(data_dir, tmp_path):
    from torchvision.datasets import MNIST

    _unpack_mnist_layout(data_dir / "MNIST" / "raw", tmp_path, gunzip=True)
    reference = MNIST(str(tmp_path), train=False, download=False)
    ours = load_dataset("mnist", tmp_path)
    assert torch.equal(reference.data, ours.x_test[:, 0]) and torch.equal(reference.targets, ours.y_test)


@pytest.mark.skipif(not FASHION_DIR.exists(), reason="Debian package dataset-fashion-mnist is not installed")
def test_fashion_mnist_loads_from_its_official_files(tmp_path):
    raw = tmp_path / "FashionMNIST" / "raw"
    raw.mkdir(parents=True)
    for archive in FASHION_DIR.glob("*.gz"):
        (raw / archive.name).symlink_to(archive)
    fashion = load_dataset("fashion_mnist", tmp_path)
    assert fashion.x_train.shape == (55000, 1, 28, 28) and fashion.classes[-1] == "Ankle boot"


def test_missing_data_lists_every_path_and_never_falls_back(tmp_path):
    with pytest.raises(DataNotFoundError) as error:
        load_dataset("cifar10", tmp_path)
    message = str(error.value)
    assert str(tmp_path / "cifar10.npz") in message and str(tmp_path / "cifar-10-batches-py") in message
    assert "--data-dir" in message and "SWEEPBENCH_DATA_DIR" in message and "--download" in message


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPBENCH_DATA_DIR", str(tmp_path / "from-env"))
    assert resolve_data_dir(tmp_path / "explicit") == tmp_path / "explicit"
    assert resolve_data_dir() == tmp_path / "from-env"
    monkeypatch.delenv("SWEEPBENCH_DATA_DIR")
    assert "sweepbench" in str(resolve_data_dir())


def test_npz_with_missing_keys_is_rejected(tmp_path):
    np.savez(tmp_path / "mnist.npz", x_train=np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(ConfigError, match="missing keys"):
        load_dataset("mnist", tmp_path)


def test_synthetic_dataset_follows_its_arguments():
    synthetic = load_dataset("synthetic", val_size=100, image_shape=[3, 8, 8], num_classes=4, train_size=500)
    assert synthetic.x_train.shape == (400, 3, 8, 8) and synthetic.num_classes == 4
    assert synthetic.y_train.max() < 4
    with pytest.raises(ConfigError, match="dataset_kwargs"):
        load_dataset("synthetic", colour="red")


def test_an_npz_is_decompressed_once_then_read_from_the_cache_until_it_changes(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("SWEEPBENCH_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "data"
    folder.mkdir()
    shutil.copy(data_dir / "mnist.npz", folder / "mnist.npz")
    first = load_dataset("mnist", folder)
    cached = list((tmp_path / "cache").iterdir())
    assert len(cached) == 1 and sorted(p.name for p in cached[0].iterdir()) == [
        "x_test.npy", "x_train.npy", "y_test.npy", "y_train.npy"]
    data.forget_loaded_datasets()
    again = load_dataset("mnist", folder)
    assert again.fingerprint == first.fingerprint and (again.mean, again.std) == (first.mean, first.std)
    with np.load(folder / "mnist.npz") as real:  # a changed file is read anew, under another key
        np.savez(folder / "mnist.npz", **{**{key: real[key] for key in real.files}, "x_test": real["x_test"][:100],
                                          "y_test": real["y_test"][:100]})
    data.forget_loaded_datasets()
    assert len(load_dataset("mnist", folder).y_test) == 100 and len(list((tmp_path / "cache").iterdir())) == 2


def test_a_cache_that_cannot_be_written_is_passed_by(data_dir, tmp_path, monkeypatch):
    (tmp_path / "file").write_text("not a folder")
    monkeypatch.setenv("SWEEPBENCH_CACHE_DIR", str(tmp_path / "file" / "cache"))
    data.forget_loaded_datasets()
    assert len(load_dataset("mnist", data_dir).y_train) == 55000


def test_channel_statistics_from_value_counts_match_float64_over_every_pixel(data_dir):
    images = load_dataset("cifar10", data_dir).x_train[:5000]
    pixels = images.transpose(0, 1).reshape(3, -1).double() / 255
    mean, std = data._channel_mean_std(images)
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-12)
    assert std == pytest.approx(pixels.std(1).tolist(), abs=1e-12)
