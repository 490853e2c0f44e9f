import pytest
import torch

from sweepbench.config import ConfigError
from sweepbench.models import create_model, get_model_entry, list_models


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_runs_forward_and_backward(name):
    entry = get_model_entry(name)
    model = create_model(name)
    images = torch.randn(4, *entry.input_shape)
    logits = model(images)
    assert logits.shape == (4, 10)
    logits.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_model_kwargs_shape_the_model():
    small, large = create_model("mnist_mlp", hidden_size=16), create_model("mnist_mlp", hidden_size=256)
    assert sum(p.numel() for p in small.parameters()) == 784 * 16 + 16 + 16 * 10 + 10
    assert sum(p.numel() for p in large.parameters()) == 784 * 256 + 256 + 256 * 10 + 10


def test_cifar_architectures_match_their_descriptions():
    lenet = create_model("cifar_lenet")
    assert [tuple(m.weight.shape) for m in lenet.modules() if isinstance(m, torch.nn.Linear)] == [
        (120, 400), (84, 120), (10, 84)]
    cnn = create_model("cifar_cnn", hidden_size=100)
    convs = [m for m in cnn.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == [
        (3, 32, (5, 5), (2, 2)), (32, 32, (5, 5), (2, 2)), (32, 64, (5, 5), (2, 2))]
    assert [tuple(m.weight.shape) for m in cnn.modules() if isinstance(m, torch.nn.Linear)] == [
        (100, 1024), (10, 100)]


def test_unknown_model_and_unknown_kwargs_name_the_allowed_values():
    with pytest.raises(ConfigError, match="registered models: cifar_cnn, cifar_lenet, mnist_mlp"):
        create_model("resnet9000")
    with pytest.raises(ConfigError, match="allowed: hidden_size, dropout, num_classes"):
        create_model("mnist_mlp", width=3)
