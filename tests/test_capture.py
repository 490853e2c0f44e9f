"""The captured step (``step = "compiled"`` / ``"graph"``) trains the run the eager step trains: the same weights,
losses and accuracies within float tolerance, on real MNIST, for every optimizer, with and without dropout, fp32
and bf16, across epochs of a learning-rate schedule and a last partial batch; its compile time is apart from
every epoch. CUDA cases are marked and skip without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient

from sweepbench.config import OPTIMIZERS, RunConfig
from sweepbench.engine import Callback, RunResult, StopTraining, train, train_fused
from sweepbench.engine.checkpoint import load_checkpoint
from sweepbench.status import RunStatus
from sweepbench.tracking import MlflowLogger
from tests.conftest import SHARED_DATA, requires_cuda

# 2,000 images at batch 64: 31 full batches and a partial one of 16, so both shapes are compiled.
SMALL = dict(data_dir=str(SHARED_DATA), train_subset=2000, val_size=1000, batch_size=64, epochs=2, lr_gamma=0.7,
             seed=3, weight_decay=1e-2)
OPTIMIZER_SETTINGS = {"sgd": dict(lr=0.05, momentum=0.9, nesterov=True), "adam": dict(lr=1e-3),
                      "adamw": dict(lr=1e-3), "rmsprop": dict(lr=1e-3, momentum=0.5), "adadelta": dict(lr=1.0)}
# Weights, losses (relative) and validation accuracy. Measured on real MNIST (2 epochs, 2,000 images; 3 epochs
# resumed): fp32 losses agree to 1e-5, weights to 7e-4 (Adam's update of a weight whose gradient is near zero,
# about the sign of that gradient, magnifies rounding). bf16 losses to 4e-3, weights to 1.2e-2 (Adadelta, lr 1.0):
# the compiled kernels round bfloat16 activations at other places; bf16 against fp32, both eager, differ by 4e-2.
# A bf16 pack's weights are compared by each tensor's relative norm: RMSprop (lr 1e-3) magnifies bf16 rounding
# into some weights, 11% of the norm apart compiled against eager, 19% between the eager pack and its solo runs;
# its validation loss then differs by up to 1.2% (an Intel Xeon that emulates bf16; train losses agree to 3e-4).
TOLERANCE = {"fp32": dict(weights=dict(rtol=1e-3, atol=1.5e-3), loss=1e-4, accuracy=0.002),
             "bf16": dict(weights=dict(rtol=5e-2, atol=2.5e-2), loss=1e-2, accuracy=0.005),
             "bf16 pack": dict(weights_norm=0.15, loss=2e-2, accuracy=0.01)}


def config(optimizer: str, precision: str, dropout: float, step: str, device: str = "cpu", **changes) -> RunConfig:
    return RunConfig(optimizer=optimizer, precision=precision, device=device, step=step,
                     model_kwargs={"hidden_size": 64, "dropout": dropout}, **OPTIMIZER_SETTINGS[optimizer],
                     **{**SMALL, **changes})


def assert_same_run(captured: RunResult, eager: RunResult, precision: str,
                    status: RunStatus = RunStatus.COMPLETED) -> None:
    """``precision`` names the TOLERANCE."""
    assert captured.status == eager.status == status, captured.message
    tolerance = TOLERANCE[precision]
    for name, weights in eager.model.state_dict().items():
        ours = captured.model.state_dict()[name]
        if "weights_norm" in tolerance:
            assert (ours - weights).norm() <= tolerance["weights_norm"] * weights.norm(), name
        else:
            torch.testing.assert_close(ours, weights, **tolerance["weights"], msg=name)
    for ours, theirs in zip(captured.history, eager.history, strict=True):
        assert ours.lr == pytest.approx(theirs.lr, rel=1e-6)
        assert ours.train_loss == pytest.approx(theirs.train_loss, rel=tolerance["loss"])
        assert ours.val_loss == pytest.approx(theirs.val_loss, rel=tolerance["loss"])
        assert abs(ours.val_accuracy - theirs.val_accuracy) <= tolerance["accuracy"]


CASES = [*[(optimizer, "fp32", 0.2) for optimizer in OPTIMIZERS],
         *[(optimizer, "bf16", 0.0) for optimizer in OPTIMIZERS],
         ("adadelta", "fp32", 0.0), ("adam", "bf16", 0.2)]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer, precision, dropout", CASES)
def test_a_compiled_step_trains_the_run_the_eager_step_trains(optimizer: str, precision: str,
                                                               dropout: float) -> None:
    eager = train(config(optimizer, precision, dropout, "eager"))
    compiled = train(config(optimizer, precision, dropout, "compiled"))
    assert_same_run(compiled, eager, precision)
    assert eager.compile_seconds == 0 and compiled.compile_seconds > 0


@pytest.mark.slow
def test_a_compiled_run_resumes_an_eager_checkpoint_and_an_eager_run_resumes_a_compiled_one(tmp_path: Path) -> None:
    straight = train(config("adam", "fp32", 0.2, "eager", epochs=3))
    for first, then in [("eager", "compiled"), ("compiled", "eager")]:
        folder = tmp_path / f"{first}-{then}"
        train(config("adam", "fp32", 0.2, first, epochs=1, checkpoint_dir=str(folder)))
        assert isinstance(load_checkpoint(folder / "last.pt")["optimizer"]["param_groups"][0]["lr"], float)
        resumed = train(config("adam", "fp32", 0.2, then, epochs=3, resume=str(folder / "last.pt")))
        assert [record.epoch for record in resumed.history] == [1, 2, 3]
        assert_same_run(resumed, straight, "fp32")


@pytest.mark.slow
def test_compile_seconds_are_logged_apart_from_the_epochs(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = train(config("sgd", "fp32", 0.0, "compiled", epochs=1), [MlflowLogger("capture", uri, log_model=False)])
    run = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("capture").experiment_id])[0]
    assert run.data.params["step"] == "compiled"
    assert run.data.metrics["compile_seconds"] == pytest.approx(result.compile_seconds)
    assert run.data.metrics["train_seconds"] == pytest.approx(sum(r.epoch_seconds for r in result.history))
    assert result.wall_seconds > result.compile_seconds + result.train_seconds


def pack(precision: str, dropout: float, step: str, device: str = "cpu") -> list[RunConfig]:
    """A pack of every optimizer, each with its own seed, learning rate and schedule."""
    return [config(optimizer, precision, dropout, step, device, seed=seed, lr_gamma=0.6 + 0.05 * seed)
            for seed, optimizer in enumerate(OPTIMIZERS)]


@pytest.mark.slow
@pytest.mark.parametrize("precision, dropout", [("fp32", 0.2), ("bf16", 0.0)])
def test_a_compiled_pack_trains_each_member_as_the_eager_pack_does(precision: str, dropout: float) -> None:
    """One compiled call a batch for the whole pack: every member ends where the eager pack's (itself its solo
    run's, test_fused) ends; one ended member's rows stay put while the others train on."""
    members = pack(precision, dropout, "eager")
    eager = train_fused(members, pruning_the_second(members))
    compiled = train_fused([member.replace(step="compiled") for member in members], pruning_the_second(members))
    tolerance = precision if precision == "fp32" else f"{precision} pack"
    for index, (ours, theirs) in enumerate(zip(compiled, eager, strict=True)):
        assert_same_run(ours, theirs, tolerance, RunStatus.PRUNED if index == 1 else RunStatus.COMPLETED)
        assert ours.compile_seconds > 0 and ours.compile_seconds == compiled[0].compile_seconds
        assert theirs.compile_seconds == 0
    assert len(compiled[1].history) == 1


class PruneAfterFirstEpoch(Callback):
    def on_epoch_end(self, context, record) -> None:
        raise StopTraining("pruned by test", status="pruned")


def pruning_the_second(members: list[RunConfig]) -> list[list[Callback]]:
    return [[PruneAfterFirstEpoch()] if index == 1 else [] for index in range(len(members))]


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("step", ["compiled", "graph"])
def test_on_cuda_a_compiled_or_graph_pack_trains_each_member_as_the_eager_pack_does(step: str) -> None:
    eager = train_fused(pack("fp32", 0.2, "eager", device="cuda"))
    for ours, theirs in zip(train_fused(pack("fp32", 0.2, step, device="cuda")), eager, strict=True):
        assert_same_run(ours, theirs, "fp32")


@pytest.mark.cuda
@requires_cuda
@pytest.mark.parametrize("step", ["compiled", "graph"])
@pytest.mark.parametrize("optimizer, precision", [("adam", "fp32"), ("sgd", "bf16"), ("adadelta", "fp32"),
                                                  ("rmsprop", "fp32"), ("adamw", "bf16")])
def test_on_cuda_a_compiled_or_graph_step_trains_the_run_the_eager_step_trains(step: str, optimizer: str,
                                                                                precision: str) -> None:
    eager = train(config(optimizer, precision, 0.0, "eager", device="cuda"))
    captured = train(config(optimizer, precision, 0.0, step, device="cuda"))
    assert_same_run(captured, eager, precision)
    assert captured.compile_seconds > 0


@pytest.mark.slow
def test_a_batch_of_a_shape_not_prepared_fails_in_one_line_and_prepare_leaves_the_run_as_it_was() -> None:
    from sweepbench.data import load_dataset
    from sweepbench.engine.solo import SoloStep

    run = config("adam", "fp32", 0.2, "compiled", epochs=1)
    dataset = load_dataset("mnist", run.data_dir, False, run.val_size)
    images, labels = dataset.x_train[:run.train_subset], dataset.y_train[:run.train_subset]
    step = SoloStep([run], dataset, images, labels, torch.device("cpu"), None)
    before = {name: tensor.clone() for name, tensor in step.module.state_dict().items()}
    random_state = torch.get_rng_state()
    assert step.prepare() > 0
    assert all(torch.equal(tensor, before[name]) for name, tensor in step.module.state_dict().items())
    assert torch.equal(torch.get_rng_state(), random_state)
    assert all(torch.count_nonzero(value) == 0 for state in step.optimizer.state.values() for value in state.values())
    batch_images, batch_labels = next(iter(step.batches(1)))
    with pytest.raises(RuntimeError, match=r"^step: a batch of 7 samples was not prepared; prepared: 64, 16$"):
        step(batch_images[:7], batch_labels[:7])
