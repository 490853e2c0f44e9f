import math

import pytest
import torch

from sweepbench.config import ConfigError, RunConfig
from sweepbench.engine import (Callback, StopTraining, build_optimizer, contiguous_parameters, evaluate,
                               load_checkpoint, normalise, random_crop_flip, train, zero_gradients)
from sweepbench.models import create_model
from tests.conftest import requires_cuda


def mnist_config(data_dir, **changes) -> RunConfig:
    settings = dict(dataset="mnist", data_dir=str(data_dir), model_kwargs={"hidden_size": 32}, train_subset=5000,
                    optimizer="sgd", lr=0.05, batch_size=64, epochs=2, device="cpu")
    return RunConfig(**{**settings, **changes})


def weights(result) -> list[torch.Tensor]:
    return [tensor.detach().clone() for tensor in result.model.state_dict().values()]


def test_short_run_on_real_mnist_improves_validation_accuracy(data_dir):
    config = mnist_config(data_dir, epochs=3)
    from sweepbench.data import load_dataset

    mnist = load_dataset("mnist", data_dir)
    torch.manual_seed(config.seed)
    untrained = create_model("mnist_mlp", hidden_size=32)
    _, untrained_accuracy, _ = evaluate(untrained, normalise(mnist.x_val, mnist.mean, mnist.std), mnist.y_val,
                                        10, 1000, "fp32")
    result = train(config)
    accuracies = [record.val_accuracy for record in result.history]
    assert result.status == "completed" and len(result.history) == 3
    assert untrained_accuracy < 0.3 and accuracies[0] < accuracies[-1] and accuracies[-1] > 0.88
    assert result.test_accuracy > 0.85 and len(result.per_class_accuracy) == 10
    assert sum(map(sum, result.confusion_matrix)) == 10000
    assert all(record.epoch_seconds > 0 and record.samples_per_second > 0 for record in result.history)
    assert [record.epoch for record in result.history] == [1, 2, 3]


@pytest.mark.parametrize("optimizer", ["adadelta", "adam", "sgd", "rmsprop"])
def test_contiguous_parameters_train_like_separate_ones(optimizer):
    """Three steps over one buffer give the weights PyTorch's optimizer gives over the separate tensors."""
    torch.manual_seed(0)
    separate, contiguous = create_model("cifar_cnn", hidden_size=16), create_model("cifar_cnn", hidden_size=16)
    contiguous.load_state_dict(separate.state_dict())
    buffers = contiguous_parameters(contiguous)
    assert len(buffers) == 1 and buffers[0].numel() == sum(p.numel() for p in separate.parameters())
    assert all(p.untyped_storage().data_ptr() == buffers[0].untyped_storage().data_ptr()
               for p in contiguous.parameters())
    config = RunConfig(optimizer=optimizer, lr=0.01, momentum=0.9 if optimizer == "sgd" else 0.0, weight_decay=1e-4)
    reference = build_optimizer(config, list(separate.parameters()), torch.device("cpu"))
    flat = build_optimizer(config, buffers, torch.device("cpu"))
    images, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    for _ in range(3):
        reference.zero_grad()
        torch.nn.functional.cross_entropy(separate(images), labels).backward()
        reference.step()
        zero_gradients(buffers)
        torch.nn.functional.cross_entropy(contiguous(images), labels).backward()
        flat.step()
    for (name, expected), actual in zip(separate.state_dict().items(), contiguous.state_dict().values()):
        torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.slow
def test_a_compiled_model_trains_its_contiguous_parameters_like_the_eager_one(data_dir):
    eager, compiled = train(mnist_config(data_dir, epochs=1)), train(mnist_config(data_dir, epochs=1, compile=True))
    assert compiled.status == "completed" and compiled.val_accuracy > 0.8
    assert abs(compiled.val_accuracy - eager.val_accuracy) < 0.01
    torch.testing.assert_close(weights(compiled), weights(eager), rtol=1e-3, atol=1e-4)


def test_same_seed_gives_the_same_result_and_another_seed_does_not(data_dir):
    first, second = train(mnist_config(data_dir, seed=7)), train(mnist_config(data_dir, seed=7))
    other = train(mnist_config(data_dir, seed=8))
    assert [r.val_accuracy for r in first.history] == [r.val_accuracy for r in second.history]
    assert all(torch.equal(a, b) for a, b in zip(weights(first), weights(second)))
    assert not all(torch.equal(a, b) for a, b in zip(weights(first), weights(other)))


def test_resuming_a_checkpoint_ends_with_the_weights_of_an_uninterrupted_run(data_dir, tmp_path):
    settings = dict(optimizer="adadelta", lr=1.0, lr_gamma=0.7, model_kwargs={"hidden_size": 32, "dropout": 0.2},
                    target_accuracy=0.5)
    uninterrupted = train(mnist_config(data_dir, epochs=3, **settings))
    interrupted = train(mnist_config(data_dir, epochs=2, checkpoint_dir=str(tmp_path), **settings))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]
    checkpoint = load_checkpoint(tmp_path / "last.pt")
    assert checkpoint["epoch"] == 2 and checkpoint["config"]["epochs"] == 2
    resumed = train(mnist_config(data_dir, epochs=3, resume=str(tmp_path / "last.pt"), **settings))
    assert len(resumed.history) == 3 and resumed.history[:2] == interrupted.history
    assert all(torch.equal(a, b) for a, b in zip(weights(uninterrupted), weights(resumed)))
    assert resumed.test_accuracy == uninterrupted.test_accuracy


def test_checkpoints_load_with_weights_only_and_reproduce_the_model(data_dir, tmp_path):
    result = train(mnist_config(data_dir, epochs=1, checkpoint_dir=str(tmp_path)))
    state = torch.load(tmp_path / "best.pt", weights_only=True)
    model = create_model("mnist_mlp", hidden_size=32)
    model.load_state_dict(state["model"])
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), weights(result)))
    assert {"optimizer", "scheduler", "scaler", "rng_cpu", "history", "epoch"} <= set(state)


def test_resume_rejects_a_file_that_is_no_checkpoint(data_dir, tmp_path):
    torch.save({"weights": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="not a sweepbench checkpoint"):
        train(mnist_config(data_dir, resume=str(tmp_path / "other.pt")))


def test_exploding_loss_stops_the_run_as_diverged(data_dir):
    result = train(mnist_config(data_dir, lr=1e6, epochs=3))
    assert result.status == "diverged" and "diverged" in result.message
    assert len(result.history) == 1 and not math.isfinite(result.history[0].train_loss)
    assert result.test_accuracy is None


class Recorder(Callback):
    def __init__(self, stop_at=None, fail_at=None):
        self.stop_at, self.fail_at, self.events = stop_at, fail_at, []

    def on_train_start(self, context):
        self.events.append("start")

    def on_epoch_end(self, context, record):
        self.events.append(record.epoch)
        if record.epoch == self.stop_at:
            raise StopTraining("pruned by test", status="pruned")
        if record.epoch == self.fail_at:
            raise RuntimeError("callback failure")

    def on_train_end(self, context, result):
        self.events.append(result.status)


def test_callbacks_see_every_epoch_and_can_stop_the_run(data_dir):
    recorder = Recorder(stop_at=2)
    result = train(mnist_config(data_dir, epochs=4), [recorder])
    assert recorder.events == ["start", 1, 2, "pruned"]
    assert result.status == "pruned" and result.message == "pruned by test" and len(result.history) == 2


def test_an_exception_reaches_on_train_end_as_failed_and_is_raised(data_dir):
    recorder = Recorder(fail_at=1)
    with pytest.raises(RuntimeError, match="callback failure"):
        train(mnist_config(data_dir, epochs=3), [recorder])
    assert recorder.events == ["start", 1, "failed"]


def test_torchvision_reference_loader_trains_like_the_device_loader(data_dir):
    device_run = train(mnist_config(data_dir, epochs=1))
    reference_run = train(mnist_config(data_dir, epochs=1, loader="torchvision"))
    assert reference_run.status == "completed"
    assert abs(reference_run.val_accuracy - device_run.val_accuracy) < 0.03


def test_bf16_autocast_runs_on_cpu(data_dir):
    result = train(mnist_config(data_dir, epochs=1, precision="bf16"))
    assert result.status == "completed" and result.val_accuracy > 0.8


def test_tf32_is_refused_on_cpu(data_dir):
    with pytest.raises(ConfigError, match="tf32"):
        train(mnist_config(data_dir, precision="tf32"))


def test_random_crop_flip_takes_crops_of_the_padded_images():
    images = torch.arange(2 * 3 * 6 * 6, dtype=torch.float32).view(2, 3, 6, 6)
    padded = torch.nn.functional.pad(images, (2, 2, 2, 2))
    crops = random_crop_flip(padded, 2, torch.Generator().manual_seed(0))
    assert crops.shape == images.shape
    for crop, source in zip(crops, padded):
        windows = [source[:, y:y + 6, x:x + 6] for y in range(5) for x in range(5)]
        assert any(torch.equal(crop, w) or torch.equal(crop, w.flip(2)) for w in windows)


@pytest.mark.slow
def test_cifar_cnn_trains_with_on_device_augmentation(data_dir):
    config = RunConfig(model="cifar_cnn", dataset="cifar10", data_dir=str(data_dir), train_subset=2000,
                       optimizer="adam", lr=1e-3, batch_size=128, epochs=1, augment=True, device="cpu",
                       val_size=5000)
    result = train(config)
    assert result.status == "completed" and result.val_accuracy > 0.15


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "tf32", "fp16", "bf16"])
def test_cuda_precisions_train_on_the_gpu(data_dir, precision):
    result = train(mnist_config(data_dir, device="cuda", precision=precision, epochs=2))
    assert result.status == "completed" and result.device == "cuda" and result.val_accuracy > 0.85
    assert result.peak_memory_mb > 0 and next(result.model.parameters()).is_cuda


@pytest.mark.cuda
@requires_cuda
def test_cuda_resume_matches_an_uninterrupted_run_closely(data_dir, tmp_path):
    uninterrupted = train(mnist_config(data_dir, device="cuda", epochs=2))
    train(mnist_config(data_dir, device="cuda", epochs=1, checkpoint_dir=str(tmp_path)))
    resumed = train(mnist_config(data_dir, device="cuda", epochs=2, resume=str(tmp_path / "last.pt")))
    assert abs(resumed.val_accuracy - uninterrupted.val_accuracy) < 0.01
