"""Fused training against the real solo engine: every member of a pack must end where its own ``engine.train``
run ends, on real MNIST, whatever the other members do."""

import math

import pytest
import torch

from sweepbench.config import ConfigError, RunConfig, field_names
from sweepbench.engine import Callback, StopTraining, load_checkpoint, pack_groups, pack_key, train, train_fused
from sweepbench.engine.fused.pack import MEMBER_FIELDS, OTHER_FIELDS, SHARED_FIELDS
from tests.conftest import requires_cuda

# One member per row: different seeds, learning rates, weight decays and schedules.
MEMBER_SETTINGS = {
    "sgd": [dict(lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3), dict(lr=0.1, momentum=0.5),
            dict(lr=0.02, weight_decay=1e-2)],
    "adam": [dict(lr=1e-3), dict(lr=3e-3, weight_decay=1e-3), dict(lr=5e-4, weight_decay=1e-2)],
    "adamw": [dict(lr=1e-3), dict(lr=3e-3, weight_decay=1e-2), dict(lr=5e-4, weight_decay=0.1)],
    "rmsprop": [dict(lr=1e-3, momentum=0.9), dict(lr=5e-4), dict(lr=2e-3, momentum=0.5, weight_decay=1e-3)],
    "adadelta": [dict(lr=1.0), dict(lr=0.5, weight_decay=1e-3), dict(lr=2.0)],
}


def mnist_config(data_dir, **changes) -> RunConfig:
    """1500 training images: 24 steps of 64 per epoch, the last one of 28."""
    settings = dict(dataset="mnist", data_dir=str(data_dir), model_kwargs={"hidden_size": 32}, train_subset=1500,
                    val_size=500, batch_size=64, epochs=2, device="cpu")
    return RunConfig(**{**settings, **changes})


def members(data_dir, optimizer, **changes) -> list[RunConfig]:
    return [mnist_config(data_dir, optimizer=optimizer, seed=seed, lr_gamma=0.6 + 0.1 * seed, **{**settings, **changes})
            for seed, settings in enumerate(MEMBER_SETTINGS[optimizer])]


def assert_trains_like_solo(fused, solo, rtol=1e-4, atol=1e-4) -> None:
    """Same weights (to float rounding), the same epochs with the same learning rates and about the same losses,
    the same outcome."""
    assert (fused.status, fused.message) == (solo.status, solo.message)
    assert len(fused.history) == len(solo.history)
    if solo.status == "diverged":
        return
    torch.testing.assert_close(fused.model.state_dict(), solo.model.state_dict(), rtol=rtol, atol=atol)
    assert [r.epoch for r in fused.history] == [r.epoch for r in solo.history]
    assert [r.lr for r in fused.history] == [r.lr for r in solo.history]
    for ours, theirs in zip(fused.history, solo.history):
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=1e-4)
        assert ours.val_loss == pytest.approx(theirs.val_loss, rel=1e-4)
        assert abs(ours.val_accuracy - theirs.val_accuracy) <= 0.004  # at most 2 of 500 images on a tie
    assert fused.best_epoch == solo.best_epoch
    if solo.test_accuracy is None:
        assert fused.test_accuracy is None
    else:
        assert fused.test_accuracy == pytest.approx(solo.test_accuracy, abs=5e-4)
        assert sum(map(sum, fused.confusion_matrix)) == 10000 and len(fused.per_class_accuracy) == 10


@pytest.mark.parametrize("optimizer", list(MEMBER_SETTINGS))
def test_each_member_of_a_pack_trains_like_its_solo_run(data_dir, optimizer):
    configs = members(data_dir, optimizer)
    fused = train_fused(configs, [[] for _ in configs])
    for config, result in zip(configs, fused):
        assert result.config is config
        assert_trains_like_solo(result, train(config))


def test_a_few_steps_of_a_mixed_pack_match_the_solo_runs_closely(data_dir):
    """Five optimizer types in one pack, two adam members apart in the configs: each type steps its own rows.
    RMSprop's first steps move a weight by about 10 * lr * sign(grad), so a gradient's last bits show: the solo
    engine's own RMSprop weights differ by 3e-5 here between 1 and 2 threads."""
    configs = [mnist_config(data_dir, train_subset=256, epochs=1, optimizer=optimizer, seed=seed,
                            **MEMBER_SETTINGS[optimizer][seed % 3])
               for seed, optimizer in enumerate(["adam", "sgd", "adam", "rmsprop", "adadelta", "adamw"])]
    for config, result in zip(configs, train_fused(configs)):
        assert result.config.optimizer == config.optimizer
        assert_trains_like_solo(result, train(config), rtol=1e-5, atol=5e-5)


def test_dropout_masks_are_each_members_solo_masks(data_dir):
    configs = [config.replace(model_kwargs={"hidden_size": 32, "dropout": 0.2})
               for config in members(data_dir, "adadelta")]
    for config, result in zip(configs, train_fused(configs)):
        assert_trains_like_solo(result, train(config))


def test_a_diverging_member_ends_diverged_and_the_others_train_on_undisturbed(data_dir):
    configs = members(data_dir, "sgd")
    configs[1] = configs[1].replace(lr=1e6)
    fused = train_fused(configs)
    assert fused[1].status == "diverged" and fused[1].message.startswith("diverged: loss is")
    assert len(fused[1].history) == 1 and not math.isfinite(fused[1].history[0].train_loss)
    assert fused[0].status == fused[2].status == "completed" and len(fused[0].history) == 2
    for config, result in zip(configs, fused):
        assert_trains_like_solo(result, train(config))


class Recorder(Callback):
    def __init__(self, stop_at=None, fail_at=None, interrupt_at=None):
        self.stop_at, self.fail_at, self.interrupt_at = stop_at, fail_at, interrupt_at
        self.events, self.contexts, self.records = [], [], []

    def on_train_start(self, context):
        self.events.append("start")
        self.contexts.append(context)

    def on_epoch_end(self, context, record):
        self.events.append(record.epoch)
        self.records.append(record)
        if record.epoch == self.stop_at:
            raise StopTraining("pruned by test", status="pruned")
        if record.epoch == self.fail_at:
            raise RuntimeError("callback failure")
        if record.epoch == self.interrupt_at:
            raise KeyboardInterrupt()

    def on_train_end(self, context, result):
        self.events.append(result.status)
        self.contexts.append(context)


def test_a_pruned_member_ends_alone_and_the_others_train_on_undisturbed(data_dir):
    configs = members(data_dir, "adam")
    recorders = [Recorder(stop_at=1 if index == 0 else None) for index in range(3)]
    fused = train_fused(configs, [[recorder] for recorder in recorders])
    assert recorders[0].events == ["start", 1, "pruned"] and recorders[1].events == ["start", 1, 2, "completed"]
    assert fused[0].status == "pruned" and fused[0].message == "pruned by test" and len(fused[0].history) == 1
    assert fused[0].test_accuracy is None
    solo_pruned = train(configs[0], [Recorder(stop_at=1)])
    assert_trains_like_solo(fused[0], solo_pruned)
    for config, result in zip(configs[1:], fused[1:]):
        assert_trains_like_solo(result, train(config))


def test_callbacks_see_their_own_member_and_the_pack_tags(data_dir):
    configs = members(data_dir, "sgd", epochs=1, target_accuracy=0.5)
    recorders = [Recorder() for _ in configs]
    fused = train_fused(configs, [[recorder] for recorder in recorders])
    pack_ids = set()
    for index, (config, recorder, result) in enumerate(zip(configs, recorders, fused)):
        start, end = recorder.contexts
        assert start is end and start.config is config and start.model is result.model
        assert start.history is result.history and recorder.records == result.history
        tags = start.pack
        assert tags["sweepbench.fused"] == "true" and tags["sweepbench.pack_size"] == "3"
        assert tags["sweepbench.pack_member"] == str(index) and tags["sweepbench.epoch_time"] == "pack"
        pack_ids.add(tags["sweepbench.pack_id"])
        assert result.time_to_target_seconds == result.history[0].epoch_seconds
        assert result.train_seconds == result.history[0].epoch_seconds and result.wall_seconds > 0
    assert len(pack_ids) == 1 and len(pack_ids.pop()) == 32
    assert len({result.history[0].epoch_seconds for result in fused}) == 1  # the pack's epoch time
    assert len({result.history[0].lr for result in fused}) == 3  # each member's own


@pytest.mark.parametrize("raised, status", [("fail_at", "failed"), ("interrupt_at", "killed")])
def test_an_exception_or_interrupt_ends_every_running_member_then_is_raised(data_dir, raised, status):
    configs = members(data_dir, "sgd", train_subset=256)
    recorders = [Recorder(stop_at=1) if index == 0 else Recorder() for index in range(3)]
    recorders[1] = Recorder(**{raised: 1})
    with pytest.raises(RuntimeError if status == "failed" else KeyboardInterrupt):
        train_fused(configs, [[recorder] for recorder in recorders])
    assert recorders[0].events == ["start", 1, "pruned"]
    assert recorders[1].events == ["start", 1, status] and recorders[2].events == ["start", status]


@pytest.mark.parametrize("field, value, message", [
    ("batch_size", 128, r"^batch_size: member 1 has 128 but member 0 has 64; a fused pack's members share"),
    ("model_kwargs", {"hidden_size": 64}, r"^model_kwargs: member 1 has"),
    ("compile", True, r"^compile: member 1 has True; fused training runs"),
    ("loader", "torchvision", r"^loader: member 1 has 'torchvision'"),
    ("precision", "fp16", r"^precision: member 1 has 'fp16'"),
    ("resume", "last.pt", r"^resume: member 1 has 'last.pt'"),
])
def test_members_that_cannot_share_a_pack_are_refused_in_one_line(data_dir, field, value, message):
    configs = [mnist_config(data_dir), mnist_config(data_dir, seed=1, **{field: value})]
    with pytest.raises(ConfigError, match=message) as refused:
        train_fused(configs)
    assert "\n" not in str(refused.value)


def test_members_writing_to_one_checkpoint_folder_are_refused(data_dir, tmp_path):
    configs = [mnist_config(data_dir, seed=seed, checkpoint_dir=str(tmp_path)) for seed in range(2)]
    with pytest.raises(ConfigError, match="^checkpoint_dir: .* more than one member"):
        train_fused(configs)
    assert list(tmp_path.iterdir()) == []


def test_pack_groups_group_runs_by_what_they_must_share(data_dir):
    configs = [mnist_config(data_dir, lr=0.1), mnist_config(data_dir, batch_size=128),
               mnist_config(data_dir, model_kwargs={"hidden_size": 32, "dropout": 0.0}, seed=3, optimizer="adam"),
               mnist_config(data_dir, batch_size=128, seed=1)]
    assert pack_key(configs[0]) == pack_key(configs[2])  # the model's default spelled out is the same model
    assert pack_groups(configs) == [[0, 2], [1, 3]]
    assert sorted(SHARED_FIELDS + MEMBER_FIELDS + OTHER_FIELDS) == sorted(field_names())


def test_a_members_checkpoint_is_its_solo_runs_and_resumes_like_an_uninterrupted_run(data_dir, tmp_path):
    optimizers = ["adadelta", "adam", "sgd", "rmsprop"]
    configs = [mnist_config(data_dir, optimizer=optimizer, seed=seed, epochs=1, lr_gamma=0.7,
                            model_kwargs={"hidden_size": 32, "dropout": 0.2}, checkpoint_dir=str(tmp_path / optimizer),
                            **MEMBER_SETTINGS[optimizer][0])
               for seed, optimizer in enumerate(optimizers)]
    fused = train_fused(configs)
    for config, result in zip(configs, fused):
        path = tmp_path / config.optimizer / "last.pt"
        assert result.checkpoints == {"last": str(path), "best": str(tmp_path / config.optimizer / "best.pt")}
        ours = load_checkpoint(path)
        theirs = load_checkpoint(_solo_checkpoint(config, tmp_path / "solo" / config.optimizer))
        _assert_same_checkpoint(ours, theirs)
        resumed = train(config.replace(resume=str(path), epochs=2, checkpoint_dir=None))
        uninterrupted = train(config.replace(epochs=2, checkpoint_dir=None))
        assert resumed.history[0] == result.history[0]
        torch.testing.assert_close(resumed.model.state_dict(), uninterrupted.model.state_dict(), rtol=1e-4,
                                   atol=1e-4)


def _solo_checkpoint(config, folder):
    train(config.replace(checkpoint_dir=str(folder)))
    return folder / "last.pt"


def _assert_same_checkpoint(ours, theirs):
    assert ours.keys() == theirs.keys()
    for key in ("format", "epoch", "scheduler", "scaler", "best_epoch", "tracking"):
        assert ours[key] == theirs[key], key
    assert {**ours["config"], "checkpoint_dir": None} == {**theirs["config"], "checkpoint_dir": None}
    assert torch.equal(ours["rng_cpu"], theirs["rng_cpu"])
    assert [record["lr"] for record in ours["history"]] == [record["lr"] for record in theirs["history"]]
    torch.testing.assert_close(ours["model"], theirs["model"], rtol=1e-4, atol=1e-4)
    assert ours["optimizer"]["param_groups"] == theirs["optimizer"]["param_groups"]
    assert ours["optimizer"]["state"].keys() == theirs["optimizer"]["state"].keys()
    for index, state in theirs["optimizer"]["state"].items():
        assert ours["optimizer"]["state"][index].keys() == state.keys()
        for name, expected in state.items():  # to its scale: RMSprop's momentum buffer holds grad / avg
            actual = ours["optimizer"]["state"][index][name]
            assert actual.dtype == expected.dtype and actual.device == expected.device, name
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item(),
                                       msg=name)


def test_bf16_autocast_trains_a_pack(data_dir):
    configs = members(data_dir, "adam", precision="bf16", epochs=1)
    for config, result in zip(configs, train_fused(configs)):
        solo = train(config)
        assert result.status == "completed" and abs(result.val_accuracy - solo.val_accuracy) < 0.03


@pytest.mark.slow
def test_augmented_cifar_members_get_their_solo_crops_and_flips(data_dir):
    configs = [RunConfig(model="cifar_lenet", dataset="cifar10", data_dir=str(data_dir), train_subset=512,
                         val_size=500, optimizer="sgd", lr=0.05, momentum=0.9, batch_size=128, epochs=1,
                         augment=True, device="cpu", seed=seed) for seed in range(2)]
    for config, result in zip(configs, train_fused(configs)):
        assert_trains_like_solo(result, train(config))


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("optimizer", ["adam", "adadelta"])
def test_a_pack_on_the_gpu_trains_like_its_solo_runs(data_dir, optimizer):
    """Not run in this project's CI (no GPU): the CUDA path of the stack, the stacked optimizers and the batches."""
    configs = members(data_dir, optimizer, device="cuda")
    for config, result in zip(configs, train_fused(configs, [[] for _ in configs])):
        assert result.device == "cuda"
        assert_trains_like_solo(result, train(config), rtol=1e-3, atol=1e-3)
