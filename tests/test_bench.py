"""The device x precision matrix: spec validation, grid expansion, and real benchmarks on real MNIST with a real
SQLite MLflow store."""

import io
import math
import re

import pandas as pd
import pytest
import torch
from mlflow import MlflowClient

from sweepbench.bench import PRECISIONS, add_comparisons, load_spec, run_benchmark, skip_reason
from sweepbench.config import ConfigError
from sweepbench.precisions import cpu_support
from tests.conftest import PROJECT_ROOT, requires_cuda, run_cli

BENCHMARKS = PROJECT_ROOT / "benchmarks"
CUDA_PRECISIONS = [p for p in PRECISIONS if p.startswith("cuda/")]

SMALL_MNIST = """
[benchmark]
name = "small"
repeats = 2
{benchmark}

[grid]
precisions = {precisions}
{grid}

[defaults]
dataset = "mnist"
train_subset = 2000
val_size = 1000
epochs = 2
optimizer = "adadelta"
lr = 1.0
target_accuracy = 0.5

[[models]]
model = "mnist_mlp"
model_kwargs = {{ hidden_size = 32 }}
{model}
"""


def small_spec(tmp_path, data_dir, precisions=("cpu/fp32",), benchmark="", grid="", model="", extra=""):
    path = tmp_path / "small.toml"
    path.write_text(SMALL_MNIST.format(precisions=list(precisions), benchmark=benchmark, grid=grid, model=model)
                    + extra)
    return load_spec(path, data_dir=str(data_dir))


def sqlite_uri(tmp_path) -> str:
    return f"sqlite:///{tmp_path}/mlflow.db"


def children(client: MlflowClient, experiment_id: str, parent_run_id: str) -> list:
    return client.search_runs([experiment_id], f"tags.mlflow.parentRunId = '{parent_run_id}'", max_results=1000)


@pytest.mark.parametrize("name", ["quick", "devices", "gpu", "loaders", "compile"])
def test_shipped_benchmark_files_load_with_timed_epochs(name):
    spec = load_spec(BENCHMARKS / f"{name}.toml")
    assert spec.name == name and spec.repeats >= 2 and spec.warmup_epochs == 1
    assert all(cell.config.epochs > spec.warmup_epochs for cell in spec.cells)
    assert any(cell.device == "cuda" for cell in spec.cells)


def test_devices_file_covers_every_model_and_precision_and_gpu_file_the_targets():
    devices = load_spec(BENCHMARKS / "devices.toml")
    assert {(cell.model, cell.precision) for cell in devices.cells} == {
        (model, precision) for model in ("mnist_mlp", "cifar_lenet", "cifar_cnn") for precision in PRECISIONS}
    gpu = load_spec(BENCHMARKS / "gpu.toml")
    mnist = [cell.config for cell in gpu.cells if cell.model == "mnist_mlp"]
    assert all((c.epochs, c.batch_size, c.optimizer, c.lr, c.lr_gamma, c.train_subset) == (14, 64, "adadelta", 1.0,
                                                                                          0.7, None) for c in mnist)
    assert {cell.batch_size for cell in gpu.cells if cell.model == "cifar_cnn"} == {256, 512}
    assert {cell.step for cell in gpu.cells} == {"eager", "graph"}
    assert {cell.precision for cell in gpu.cells if cell.refused} == {"cuda/fp16"}
    loaders = load_spec(BENCHMARKS / "loaders.toml")
    assert loaders.baseline == {"loader": "torchvision"}
    assert {cell.loader for cell in loaders.cells} == {"torchvision", "device"}


def test_compile_file_compares_each_model_eager_and_compiled():
    compiled = load_spec(BENCHMARKS / "compile.toml")
    assert compiled.baseline == {"compile": False}
    assert {(cell.model, cell.compile) for cell in compiled.cells} == {
        (model, compile) for model in ("mnist_mlp", "cifar_cnn") for compile in (False, True)}


@pytest.mark.parametrize("changes, message", [
    (dict(precisions=["cpu/fp16"]), r"grid.precisions: 'cpu/fp16' is not allowed; choose one of: cpu/fp32, cpu/bf16"),
    (dict(grid='loaders = ["gpu"]'), r"grid.loaders: 'gpu' is not allowed; choose one of: device, torchvision"),
    (dict(grid="compile = [1]"), r"grid.compile: 1 is not allowed; choose one of: false, true"),
    (dict(grid="batch_sizes = [64, 64]"), r"grid.batch_sizes: \[64, 64\] lists a value twice"),
    (dict(grid="threads = [1]"), r"grid: unknown key\(s\) \['threads'\]; allowed: precisions, loaders"),
    (dict(model='device = "cuda"'), r"models\[0\].device: set it through grid.precisions"),
    (dict(model="epochs = 1"), r"models\[0\].epochs: 1 leaves no timed epoch; .* must be >= 2"),
    (dict(model="learning_rate = 0.1"), r"models\[0\]: unknown config field\(s\) \['learning_rate'\]"),
    (dict(extra='[[models]]\nmodel = "cifar_lenet"\nmodel_kwargs = { width = 3 }\n'),
     r"models\[1\].model_kwargs: \['width'\] not accepted by model 'cifar_lenet'"),
    (dict(model='precisions = ["cuda/fp16"]'), r"benchmark.baseline: .* has no cell to compare"),
    (dict(benchmark="accuracy_tolerance = 2"), r"benchmark.accuracy_tolerance: 2 is out of range"),
    (dict(benchmark="baseline = { device = 'cpu' }"), r"benchmark.baseline: unknown key\(s\) \['device'\]"),
    (dict(benchmark="warmup = 1"), r"benchmark: unknown key\(s\) \['warmup'\]; allowed: name, description"),
    (dict(extra="[extras]\n"), r"benchmark file: unknown key\(s\) \['extras'\]"),
])
def test_bad_spec_errors_name_the_field_and_the_allowed_values(tmp_path, data_dir, changes, message):
    with pytest.raises(ConfigError, match=message) as error:
        small_spec(tmp_path, data_dir, **changes)
    assert str(tmp_path / "small.toml") in str(error.value)


def test_unreadable_or_missing_files_are_config_errors(tmp_path):
    (tmp_path / "broken.toml").write_text("[benchmark\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_spec(tmp_path / "broken.toml")
    with pytest.raises(ConfigError, match="not found"):
        load_spec(tmp_path / "absent.toml")


def test_grid_expands_every_axis_and_a_model_can_override_one(tmp_path, data_dir):
    spec = small_spec(tmp_path, data_dir, precisions=("cpu/fp32", "cuda/fp16"),
                      grid='loaders = ["device", "torchvision"]\ncompile = [false, true]',
                      extra='\n[[models]]\nmodel = "cifar_lenet"\ndataset = "cifar10"\nbatch_sizes = [128, 256]\n')
    mnist = [cell for cell in spec.cells if cell.model == "mnist_mlp"]
    lenet = [cell for cell in spec.cells if cell.model == "cifar_lenet"]
    assert len(mnist) == 2 * 2 * 2 and len(lenet) == 2 * 2 * 2 * 2
    assert {cell.batch_size for cell in lenet} == {128, 256} and {cell.batch_size for cell in mnist} == {64}
    for cell in spec.cells:
        device, precision = cell.precision.split("/")
        assert (cell.config.device, cell.config.precision) == (device, precision)
        assert (cell.config.loader, cell.config.compile, cell.config.batch_size) == (cell.loader, cell.compile,
                                                                                   cell.batch_size)
    assert len({cell.key for cell in spec.cells}) == len(spec.cells)


def test_overrides_and_the_device_filter_keep_the_baselines(tmp_path, data_dir):
    path = tmp_path / "small.toml"
    small_spec(tmp_path, data_dir, precisions=PRECISIONS)
    spec = load_spec(path, repeats=5, devices=["cuda"], epochs=3, data_dir=str(data_dir))
    assert spec.repeats == 5 and all(cell.config.epochs == 3 for cell in spec.cells)
    assert [cell.precision for cell in spec.cells] == ["cpu/fp32", *CUDA_PRECISIONS]


def test_a_device_without_hardware_is_a_skip_reason():
    assert skip_reason("cpu/fp32") is None and skip_reason("cpu/bf16") is None
    if not torch.cuda.is_available():
        assert all(skip_reason(precision) == "CUDA not available" for precision in CUDA_PRECISIONS)


def test_speed_up_and_accuracy_flags_follow_the_baseline_and_tolerance(tmp_path, data_dir):
    spec = small_spec(tmp_path, data_dir, precisions=("cpu/fp32", "cpu/bf16", "cuda/fp16"),
                      grid="batch_sizes = [64, 128]", benchmark="accuracy_tolerance = 0.01")
    measured = {("cpu/fp32", 64): (2.0, 0.90), ("cpu/bf16", 64): (4.0, 0.895), ("cpu/fp32", 128): (1.0, 0.95),
                ("cpu/bf16", 128): (0.5, 0.93)}
    rows = [{"model": cell.model, **cell.axes,
             **dict(zip(("epoch_s_median", "test_accuracy"), measured.get((cell.precision, cell.batch_size),
                                                                       (math.nan, math.nan))))}
            for cell in spec.cells]
    table = add_comparisons(pd.DataFrame(rows), spec.baseline, spec.accuracy_tolerance)
    by_cell = {(cell.precision, cell.batch_size): row for cell, (_, row) in zip(spec.cells, table.iterrows())}
    assert by_cell["cpu/fp32", 64].speedup == 1 and by_cell["cpu/fp32", 64].accuracy_flag is False
    assert by_cell["cpu/bf16", 64].speedup == 0.5 and by_cell["cpu/bf16", 64].accuracy_flag is False
    assert by_cell["cpu/bf16", 128].speedup == 2 and by_cell["cpu/bf16", 128].accuracy_flag is True
    assert by_cell["cpu/bf16", 128].accuracy_delta == pytest.approx(-0.02)
    assert math.isnan(by_cell["cuda/fp16", 64].speedup) and by_cell["cuda/fp16", 64].accuracy_flag is None


def _parent_run_id(stderr: str) -> str:
    return re.search(r"mlflow parent run (\w+)", stderr).group(1)


@pytest.mark.slow
def test_quick_grid_on_cpu_fills_the_cpu_rows_and_skips_cuda_with_mlflow_runs(tmp_path, data_dir):
    output = tmp_path / "quick.csv"
    completed = run_cli("bench", str(BENCHMARKS / "quick.toml"), "--data-dir", str(data_dir), "--repeats", "2",
                        "--epochs", "2", "--set", "val_size=1000",
                        "--tracking-uri", sqlite_uri(tmp_path), "--format", "csv", "--output", str(output),
                        cwd=tmp_path, check=True)
    table = pd.read_csv(output)
    assert table.equals(pd.read_csv(io.StringIO(completed.stdout)))
    assert list(table.model.unique()) == ["mnist_mlp", "cifar_lenet", "cifar_cnn"] and len(table) == 18
    cpu, cuda = table[table.precision.str.startswith("cpu/")], table[table.precision.str.startswith("cuda/")]
    # the file's cell budget cuts only what is many times slower on this CPU: bf16 where it is emulated
    ran, cut = cpu[cpu.status == "ok"], cpu[cpu.status.str.startswith("cut: projected ")]
    assert set(cpu.precision) == {"cpu/fp32", "cpu/bf16"} and len(ran) + len(cut) == len(cpu) == 6
    assert set(cut.precision) <= ({"cpu/bf16"} if cpu_support("bf16") == "emulated" else set())
    assert (cut.projected_s > 45).all() if len(cut) else True
    if not torch.cuda.is_available():  # the CUDA cells are skipped before the first round, a cut cell after it
        assert [line for line in completed.stderr.splitlines() if line.startswith("round ")] == [
            "round 1/2: repeat 1 of 6 cell(s)", f"round 2/2: repeat 2 of {6 - len(cut)} cell(s)"]
    assert (ran.repeats == 2).all() and (ran.test_accuracy > 0.2).all() and (ran.peak_memory_mb > 0).all()
    assert (cpu.samples_per_s > 0).all() and (ran.train_s > 0).all() and (cpu.load_1m_max >= 0).all()
    assert (ran.epoch_s_min <= ran.epoch_s_median).all() and (ran.epoch_s_median <= ran.epoch_s_max).all()
    assert (ran.epoch_s_min < ran.epoch_s_max).all(), "two repeats never time exactly alike"
    if not torch.cuda.is_available():
        assert len(cuda) == 12 and (cuda.status == "skipped: CUDA not available").all()
        assert cuda[["epoch_s_median", "test_accuracy", "speedup"]].isna().all().all()
    for model, rows in cpu.groupby("model"):
        base = rows[rows.precision == "cpu/fp32"].iloc[0]
        bf16 = rows[rows.precision == "cpu/bf16"].iloc[0]
        assert base.speedup == 1 and base.accuracy_delta == 0 and not base.accuracy_flag
        assert bf16.speedup == pytest.approx(base.epoch_s_median / bf16.epoch_s_median)
        if bf16.status == "ok":
            assert bf16.accuracy_flag == (bf16.test_accuracy - base.test_accuracy < -0.02)
        assert base.precision_support == "native" and bf16.precision_support == cpu_support("bf16")

    client = MlflowClient(sqlite_uri(tmp_path))
    parent = client.get_run(_parent_run_id(completed.stderr))
    assert parent.info.status == "FINISHED" and parent.data.tags["device_name"]
    cells = children(client, parent.info.experiment_id, parent.info.run_id)
    assert len(cells) == 18 and client.get_experiment(parent.info.experiment_id).name == "bench-quick"
    for run in cells:
        tags = run.data.tags
        skipped, was_cut = tags["status"].startswith("skipped"), tags["status"].startswith("cut")
        assert run.info.status == ("KILLED" if skipped or was_cut else "FINISHED")
        assert tags.get("skipped") == (tags["status"].removeprefix("skipped: ") if skipped else None)
        repeats = children(client, parent.info.experiment_id, run.info.run_id)
        assert len(repeats) == (0 if skipped else 1 if was_cut else 2)
        if not skipped and not was_cut:
            assert run.data.metrics["speedup"] > 0 and {r.info.status for r in repeats} == {"FINISHED"}
    artifacts = {item.path for item in client.list_artifacts(parent.info.run_id)}
    assert {"table.csv", "table.md", "table.html", "speedup.png", "quick.toml"} <= artifacts
    (tmp_path / "downloads").mkdir()
    markdown = open(client.download_artifacts(parent.info.run_id, "table.md", str(tmp_path / "downloads"))).read()
    assert "| ok " in markdown and "nan" not in markdown


def run_axis(tmp_path, data_dir, precisions, axis: str, values: list, baseline: str):
    """A small benchmark over ``precisions`` x one more axis (``loaders``, ``steps``) against ``baseline``, run
    here; its report, and its table indexed by precision and that axis's column."""
    spec = small_spec(tmp_path, data_dir, precisions=precisions, grid=f"{axis} = {values!r}",
                      benchmark=f"baseline = {{ {axis.removesuffix('s')} = {baseline!r} }}")
    report = run_benchmark(spec, sqlite_uri(tmp_path))
    return report, report.table.set_index(["precision", axis.removesuffix("s")])


@pytest.mark.slow
def test_loader_axis_compares_with_the_torchvision_reference(tmp_path, data_dir):
    _, table = run_axis(tmp_path, data_dir, ("cpu/fp32", "cuda/fp32"), "loaders", ["torchvision", "device"],
                        "torchvision")
    reference, device = table.loc[("cpu/fp32", "torchvision")], table.loc[("cpu/fp32", "device")]
    assert reference.speedup == 1 and device.speedup == pytest.approx(reference.epoch_s_median /
                                                                      device.epoch_s_median)
    assert abs(device.test_accuracy - reference.test_accuracy) < 0.05
    if not torch.cuda.is_available():
        assert table.loc[("cuda/fp32", "device")].status == "skipped: CUDA not available"


def repeat_runs(client: MlflowClient, experiment_id: str) -> list:
    """The benchmark's repeat runs in the order they started."""
    runs = client.search_runs([experiment_id], "tags.sweepbench.kind = 'repeat'", max_results=1000)
    return sorted(runs, key=lambda run: run.info.start_time)


def test_repeats_run_in_rounds_across_the_cells(tmp_path, data_dir):
    spec = small_spec(tmp_path, data_dir, grid="batch_sizes = [64, 128]")
    report = run_benchmark(spec, sqlite_uri(tmp_path))
    client = MlflowClient(sqlite_uri(tmp_path))
    order = [(run.data.tags["repeat"], run.data.tags["benchmark_cell"])
             for run in repeat_runs(client, report.experiment_id)]
    first, second = "mnist_mlp cpu/fp32 device bs64", "mnist_mlp cpu/fp32 device bs128"
    assert order == [("1", first), ("1", second), ("2", first), ("2", second)]
    assert (report.table.status == "ok").all() and (report.table.repeats == 2).all()
    assert (report.table.peak_memory_mb > 0).all()
    cells = client.search_runs([report.experiment_id], "tags.sweepbench.kind = 'cell'")
    assert [run.info.status for run in cells] == ["FINISHED", "FINISHED"]
    assert all(run.data.tags["sweepbench.pid"].isdigit() for run in cells)  # `runs reconcile` can end them


@pytest.mark.parametrize("stop, cell_statuses, parent_status", [
    (KeyboardInterrupt, {"KILLED": "killed: interrupted after 1/2 repeat(s)"}, "KILLED"),
    (lambda: ConfigError("a mistake found by the third repeat"),
     {"FAILED": "failed: ConfigError: a mistake found by the third repeat",
      "KILLED": "killed: the benchmark stopped (ConfigError) after 1/2 repeat(s)"}, "FAILED"),
], ids=["interrupt", "error"])
def test_a_benchmark_stopped_between_rounds_ends_every_cell_and_keeps_what_finished(
        tmp_path, data_dir, monkeypatch, stop, cell_statuses, parent_status):
    """Stopped as the second round starts, when both cells have a finished repeat and neither is done: the
    stopped cells end KILLED with the figures of their finished repeat, nothing stays RUNNING."""
    import sweepbench.bench.run as bench_run

    calls, train = [], bench_run.train

    def stopped_on_the_third_repeat(config, callbacks):
        calls.append(config.batch_size)
        if len(calls) == 3:
            raise stop()
        return train(config, callbacks)

    monkeypatch.setattr(bench_run, "train", stopped_on_the_third_repeat)
    spec = small_spec(tmp_path, data_dir, grid="batch_sizes = [64, 128]")
    with pytest.raises((KeyboardInterrupt, ConfigError)):
        run_benchmark(spec, sqlite_uri(tmp_path), experiment="stopped")
    client = MlflowClient(sqlite_uri(tmp_path))
    runs = client.search_runs([client.get_experiment_by_name("stopped").experiment_id], max_results=1000)
    kinds = {kind: [run for run in runs if run.data.tags["sweepbench.kind"] == kind]
             for kind in ("bench", "cell", "repeat")}
    assert calls == [64, 128, 64] and [run.info.status for run in kinds["bench"]] == [parent_status]
    assert {run.info.status: run.data.tags["status"] for run in kinds["cell"]} == cell_statuses
    killed = [run for run in kinds["cell"] if run.info.status == "KILLED"]
    assert all(run.data.metrics["epoch_s_median"] > 0 and run.data.metrics["repeats"] == 1 for run in killed)
    assert sorted(run.info.status for run in kinds["repeat"]) == ["FINISHED", "FINISHED"]  # kept, not lost


def test_a_cell_projected_past_its_budget_is_cut_after_its_first_timed_epoch_and_reported(tmp_path, data_dir):
    spec = small_spec(tmp_path, data_dir, benchmark="cell_budget_seconds = 0.01", model="epochs = 4")
    report = run_benchmark(spec, sqlite_uri(tmp_path))
    cell = report.table.iloc[0]
    assert re.fullmatch(r"cut: projected [\d.]+ s for 2 repeat\(s\) of 4 epochs, past the cell budget of 0.01 s",
                        cell.status), cell.status
    assert cell.projected_s > 0.01 and cell.repeats == 0 and math.isnan(cell.test_accuracy)
    assert report.failed == []  # cut by design: the command's exit status stays 0
    assert cell.epoch_s_median > 0 and cell.samples_per_s > 0  # its one timed epoch
    line = report.outcomes[0].describe()  # the progress line of a cell with an epoch time and no test accuracy
    assert line.startswith(f"{report.outcomes[0].cell.label}: cut: projected") and "test accuracy" not in line
    client = MlflowClient(sqlite_uri(tmp_path))
    cell_run = client.search_runs([report.experiment_id], "tags.sweepbench.kind = 'cell'")[0]
    repeats = children(client, report.experiment_id, cell_run.info.run_id)
    assert len(repeats) == 1 and repeats[0].info.status == "KILLED"
    assert [metric.step for metric in client.get_metric_history(repeats[0].info.run_id, "val_accuracy")] == [1, 2]
    assert cell_run.data.tags["status"] == cell.status and cell_run.data.metrics["projected_s"] == cell.projected_s
    within = small_spec(tmp_path, data_dir, benchmark="cell_budget_seconds = 600")
    assert run_benchmark(within, sqlite_uri(tmp_path)).table.iloc[0].status == "ok"


@pytest.mark.slow
def test_step_axis_compares_compiled_with_eager_and_skips_what_cannot_run_with_the_refusal(tmp_path, data_dir):
    report, table = run_axis(tmp_path, data_dir, ("cpu/fp32", "cuda/fp16"), "steps",
                             ["eager", "compiled", "graph"], "eager")
    eager, compiled = table.loc[("cpu/fp32", "eager")], table.loc[("cpu/fp32", "compiled")]
    assert eager.status == compiled.status == "ok"
    assert compiled.speedup == pytest.approx(eager.epoch_s_median / compiled.epoch_s_median)
    assert compiled.compile_s > 0 and eager.compile_s == 0
    assert abs(compiled.test_accuracy - eager.test_accuracy) < 0.01
    assert table.loc[("cpu/fp32", "graph")].status == ("skipped: step: 'graph' needs device cuda, got cpu; on cpu "
                                                       "use eager, compiled")
    assert table.loc[("cuda/fp16", "compiled")].status.startswith(
        "skipped: " + ("step: 'compiled' cannot train precision 'fp16'" if torch.cuda.is_available() else "CUDA"))
    runs = {run.data.tags["benchmark_cell"]: run for run in MlflowClient(sqlite_uri(tmp_path)).search_runs(
        [report.experiment_id], "tags.sweepbench.kind = 'cell'")}
    assert runs["mnist_mlp cpu/fp32 device bs64 step=compiled"].data.params["step"] == "compiled"
    assert runs["mnist_mlp cuda/fp16 device bs64 step=graph"].info.status == "KILLED"


@pytest.mark.slow
def test_a_worse_cell_is_flagged_and_a_diverging_cell_is_recorded_not_raised(tmp_path, data_dir):
    diverging = ('[[models]]\nlabel = "diverging"\nmodel = "mnist_mlp"\noptimizer = "sgd"\nlr = 1e6\n'
                 'batch_sizes = [64]\n')
    spec = small_spec(tmp_path, data_dir, grid="batch_sizes = [64, 2000]",
                      benchmark="baseline = { batch_size = 64 }\naccuracy_tolerance = 0.05", extra=diverging)
    report = run_benchmark(spec, sqlite_uri(tmp_path), experiment="flags")
    table = report.table.set_index(["model", "batch_size"])
    assert table.loc[("mnist_mlp", 64)].accuracy_flag is False
    one_step_per_epoch = table.loc[("mnist_mlp", 2000)]
    assert one_step_per_epoch.accuracy_delta < -0.05 and one_step_per_epoch.accuracy_flag is True
    assert table.loc[("diverging", 64)].status.startswith("diverged: ")
    assert [outcome.cell.label for outcome in report.failed] == ["diverging cpu/fp32 device bs64"]
    client = MlflowClient(sqlite_uri(tmp_path))
    statuses = {run.data.tags["benchmark_cell"]: run.info.status
                for run in children(client, client.get_run(report.parent_run_id).info.experiment_id,
                                    report.parent_run_id)}
    assert statuses == {"mnist_mlp cpu/fp32 device bs64": "FINISHED", "mnist_mlp cpu/fp32 device bs2000": "FINISHED",
                        "diverging cpu/fp32 device bs64": "FAILED"}


@pytest.mark.cuda
@requires_cuda
def test_cuda_cells_run_every_precision_against_cpu(tmp_path, data_dir):
    spec = small_spec(tmp_path, data_dir, precisions=PRECISIONS,
                      extra='\n[[models]]\nmodel = "cifar_cnn"\ndataset = "cifar10"\nbatch_sizes = [256]\n')
    report = run_benchmark(spec, sqlite_uri(tmp_path))
    for _, row in report.table.iterrows():
        if row.precision == "cuda/bf16" and row.status.startswith("skipped"):
            assert row.status.startswith("skipped: bf16 not supported by ")
            continue
        assert row.status == "ok" and row.repeats == 2 and row.peak_memory_mb > 0
        assert row.speedup > 0 and row.epoch_s_min <= row.epoch_s_median <= row.epoch_s_max
        assert row.model != "mnist_mlp" or row.test_accuracy > 0.5
    assert {row.precision for _, row in report.table.iterrows() if row.status == "ok"} >= set(PRECISIONS) - {
        "cuda/bf16"}


def test_the_parent_run_samples_system_metrics_in_warm_up_epochs_and_never_in_a_timed_one(tmp_path, data_dir,
                                                                                         monkeypatch):
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # MLflow's own knob; a point per 0.05 s
    spec = small_spec(tmp_path, data_dir, benchmark="warmup_epochs = 1", model="epochs = 4\ntrain_subset = 40000")
    report = run_benchmark(spec, sqlite_uri(tmp_path))
    client = MlflowClient(sqlite_uri(tmp_path))
    sampled = [m.timestamp for m in client.get_metric_history(report.parent_run_id,
                                                              "system/cpu_utilization_percentage")]
    repeats = client.search_runs([report.experiment_id], "tags.sweepbench.kind = 'repeat'")
    assert len(repeats) == 2 and sampled
    in_warm_up = 0
    for repeat in repeats:
        ends = {m.step: m.timestamp for m in client.get_metric_history(repeat.info.run_id, "val_accuracy")}
        timed_from, timed_to = ends[1], ends[4]  # the warm-up epoch's record, then the last timed epoch's
        assert timed_to - timed_from > 500, "timed epochs long enough for ten samples, had the monitor run"
        assert not [t for t in sampled if timed_from < t < timed_to], "a point sampled while an epoch was timed"
        in_warm_up += sum(repeat.info.start_time <= t <= timed_from for t in sampled)
    assert in_warm_up >= 2, "each repeat's warm-up epoch has its points"
