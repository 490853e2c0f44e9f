"""Device x precision benchmark matrix: ``sweepbench bench FILE``.

A benchmark file (``benchmarks/*.toml``) declares models x precisions, where a precision is a device/precision
pair such as ``cuda/fp16``, and optionally x loaders, ``torch.compile`` and batch sizes. Each cell of that grid
is trained ``repeats`` times by the one engine, repeat ``r`` (from 0) with seed ``seed + r``. The repeats run in
rounds, repeat ``r`` of every cell before repeat ``r + 1`` of any, so that a slow phase of the machine falls on one
repeat of several cells (which a median of three or more repeats leaves out) rather than on every repeat of one.

Timing: the first ``warmup_epochs`` epochs of every repeat are left out (allocator, cuDNN autotuning, compile);
a repeat's figure is the median of its remaining epochs (training pass only, CUDA-synchronised by the engine),
and a cell reports the median, min and max of those over its repeats. ``train_s`` and ``time_to_target_s`` are
the engine's totals, first epoch included, because that is what a user waits for.

A cell that cannot run on this machine (no CUDA, no bf16 on the GPU) becomes a row ``skipped: <reason>``.
Each cell is compared with its baseline cell: the same model and settings with the axes named in
``baseline`` (default: precision ``cpu/fp32``) set to the baseline's values.

MLflow: one parent run per benchmark holding the table (csv, md, html), a speed-up chart and the spec; one
child run per cell with the cell's figures (a skipped cell's run is KILLED, tagged ``skipped=<reason>``); and
under each cell one run per repeat, logged by ``MlflowLogger``. A benchmark stopped before its end (Ctrl-C, an
error) ends every cell not done KILLED, with the figures of the repeats it finished.

The package keeps the spec apart from running it:

- ``spec``: the benchmark file, its validation and the grid it expands to (``Cell``, ``BenchSpec``);
- ``table``: what a cell measured (``CellOutcome``, ``cell_figures``), the table of comparisons and the chart;
- ``run``: running the cells on this machine and logging them to MLflow through the tracking layer, as an
  instance (``DeviceMatrix``) of
- ``harness``: the one benchmark mechanism (cells under one parent run, the table published on it), of which the
  sampler comparison (``compare``) is another instance.
"""

from .run import BenchReport, run_benchmark, run_cells, skip_reason
from .spec import (AXES, AXIS_CHECKS, BASELINE_KEYS, BENCHMARK_KEYS, DEFAULT_BASELINE, GRID_OWNED_FIELDS,
                   PRECISIONS, SECTIONS, UNSUPPORTED_FIELDS, BenchSpec, Cell, filter_devices, load_spec, parse_spec)
from .table import CellOutcome, add_comparisons, build_table, cell_figures, plot_speedups

__all__ = ["AXES", "AXIS_CHECKS", "BASELINE_KEYS", "BENCHMARK_KEYS", "DEFAULT_BASELINE", "GRID_OWNED_FIELDS",
           "PRECISIONS", "SECTIONS", "UNSUPPORTED_FIELDS", "BenchReport", "BenchSpec", "Cell", "CellOutcome",
           "add_comparisons", "build_table", "cell_figures", "filter_devices", "load_spec", "parse_spec",
           "plot_speedups", "run_benchmark", "run_cells", "skip_reason"]
