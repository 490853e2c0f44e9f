"""Devices, precisions and run statuses each have one home: the settings, the benchmark matrix, the pack rules and
the tracking layer read those entries, so what they accept and say cannot drift apart."""

from __future__ import annotations

import optuna
import pytest
import torch

from sweepbench.bench.run import skip_reason
from sweepbench.bench.spec import PRECISIONS as BENCH_PRECISIONS
from sweepbench.config import DEVICES, PRECISIONS, ConfigError, RunConfig, SettingWarning, advice
from sweepbench.devices import DEVICES as DEVICE_REGISTRY
from sweepbench.devices import resolve_device
from sweepbench.engine import EpochRecord, best_record, train
from sweepbench.engine.fused.pack import pack_refusals
from sweepbench.hardware import autocast, environment_tags, set_precision_flags
from sweepbench.precisions import PRECISIONS as PRECISION_REGISTRY
from sweepbench.precisions import cpu_support, trap
from sweepbench.status import STATUS_TABLE, MlflowStatus, RunStatus, mlflow_status, status_of_trial
from tests.conftest import SHARED_DATA


def test_the_settings_offer_exactly_the_registered_devices_and_precisions() -> None:
    assert DEVICES == ("auto", *DEVICE_REGISTRY.in_order())
    assert PRECISIONS == tuple(PRECISION_REGISTRY.in_order())
    with pytest.raises(ConfigError, match="precision: 'fp64' is not allowed; choose one of: fp32, tf32, bf16, fp16"):
        RunConfig(precision="fp64")


def test_the_benchmark_matrix_is_each_benchmarked_device_with_the_precisions_advised_there() -> None:
    assert BENCH_PRECISIONS == ("cpu/fp32", "cpu/bf16", "cuda/fp32", "cuda/tf32", "cuda/bf16", "cuda/fp16")
    assert "cpu/fp16" not in BENCH_PRECISIONS  # legal on a CPU, but a trap there (emulated)
    assert not any(pair.startswith("mps/") for pair in BENCH_PRECISIONS)


@pytest.mark.parametrize("precision, dtype", [("fp32", None), ("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_autocast_uses_the_entrys_dtype(precision: str, dtype: torch.dtype | None) -> None:
    layer = torch.nn.Linear(4, 4)
    with autocast(torch.device("cpu"), precision):
        output = layer(torch.ones(2, 4))
    assert output.dtype == (dtype or torch.float32)


def test_a_precision_refused_on_a_device_names_what_runs_there() -> None:
    with pytest.raises(ConfigError) as refused:
        set_precision_flags(torch.device("cpu"), "tf32")
    assert str(refused.value) == "precision: 'tf32' needs device cuda, got cpu; on cpu use fp32, bf16"


def test_a_trap_is_warned_about_from_the_entry() -> None:
    notes = advice(RunConfig(precision="fp16"), "cpu", 60000)
    assert notes == [f"precision: {PRECISION_REGISTRY.get('fp16').traps['cpu']}"]
    assert advice(RunConfig(precision="fp16"), "cuda", 60000) == []


def test_the_pack_rules_refuse_every_precision_with_a_grad_scaler() -> None:
    scaled = [name for name in PRECISIONS if PRECISION_REGISTRY.get(name).grad_scaler]
    assert scaled == ["fp16"]
    for name in PRECISIONS:
        refused = [field for field, _, _ in pack_refusals(RunConfig(precision=name))]
        assert refused == (["precision"] if name in scaled else [])


def test_a_device_that_is_not_here_is_refused_and_skipped_by_the_benchmark() -> None:
    if any(DEVICE_REGISTRY.get(name).available() for name in DEVICE_REGISTRY.in_order() if name != "cpu"):
        pytest.skip("this machine has a device other than the CPU")
    with pytest.raises(ConfigError, match=r"device: 'cuda' requested but not available on this machine; "
                                          r"available: cpu \(or auto\)"):
        resolve_device("cuda")
    assert resolve_device("auto") == torch.device("cpu")
    assert skip_reason("cuda/fp32") == "CUDA not available"
    assert skip_reason("cpu/bf16") is None


def test_every_run_status_has_one_mlflow_status_and_a_real_optuna_state() -> None:
    assert set(STATUS_TABLE) == set(RunStatus)
    for mapping in STATUS_TABLE.values():
        assert mapping.mlflow in MlflowStatus
        assert mapping.trial_state is None or mapping.trial_state in optuna.trial.TrialState.__members__
    assert [mlflow_status(s) for s in ("completed", "pruned", "diverged", "failed", "killed", "stopped")] == \
        ["FINISHED", "FINISHED", "FAILED", "FAILED", "KILLED", "KILLED"]
    assert mlflow_status("no such status") == MlflowStatus.FAILED


def test_a_finished_trial_maps_back_to_one_run_status() -> None:
    assert status_of_trial("COMPLETE") == RunStatus.COMPLETED
    assert status_of_trial("PRUNED") == RunStatus.PRUNED
    assert status_of_trial("FAIL") == RunStatus.FAILED
    assert status_of_trial("RUNNING") is None
    assert RunStatus.PRUNED == "pruned" and f"{RunStatus.KILLED}" == "killed"  # logs and compares as its value


def record(epoch: int, val_accuracy: float, train_loss: float = 0.5) -> EpochRecord:
    return EpochRecord(epoch, train_loss, 0.4, val_accuracy, 1.0, 100.0, 0.1, 0.1)


def test_the_best_epoch_is_the_first_of_equals_and_never_a_diverged_one() -> None:
    assert best_record([]) is None
    history = [record(1, 0.90), record(2, 0.95), record(3, 0.95), record(4, 0.99, train_loss=float("nan"))]
    assert best_record(history).epoch == 2
    assert best_record(history[3:]) is None


@pytest.mark.parametrize("flags, support", [({"sse2", "avx2"}, "emulated"),
                                            ({"sse2", "avx2", "avx512f", "avx512_bf16"}, "native"),
                                            ({"sse2", "avx2", "amx_bf16", "amx_tile"}, "native"),
                                            (set(), "unknown"), ({"fp", "asimd", "bf16"}, "unknown")])
def test_bf16_on_a_cpu_without_its_instructions_is_emulated_and_warned_about(monkeypatch, flags, support) -> None:
    monkeypatch.setattr("sweepbench.precisions.cpu_flags", lambda: frozenset(flags))
    assert cpu_support("bf16") == support and cpu_support("fp32") == "native"
    notes = advice(RunConfig(precision="bf16"), "cpu", 60000)
    if support != "emulated":  # nothing to warn of where the CPU has it, or its flags say nothing
        assert notes == []
    else:
        assert notes == [f"precision: bf16 is emulated on this CPU ({torch.backends.cpu.get_cpu_capability()}, none "
                         f"of avx512_bf16, amx_bf16): 17x slower than fp32 for cifar_cnn on an AVX2-only AMD EPYC; "
                         f"use fp32 here"]
    assert advice(RunConfig(precision="bf16"), "cuda", 60000) == []


def test_an_emulated_precision_warns_once_when_the_run_starts_and_every_run_records_the_cpus_support(
        monkeypatch) -> None:
    monkeypatch.setattr("sweepbench.precisions.cpu_flags", lambda: frozenset({"sse2", "avx2"}))
    config = RunConfig(precision="bf16", device="cpu", train_subset=500, val_size=500, data_dir=str(SHARED_DATA))
    with pytest.warns(SettingWarning) as warned:
        train(config)
    assert [str(w.message) for w in warned if w.category is SettingWarning] == [trap("bf16", "cpu")]
    tags = environment_tags(torch.device("cpu"))
    assert tags["cpu_bf16"] == "emulated" and tags["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert set(tags) >= {"cpu_bf16", "cpu_fp16"}
