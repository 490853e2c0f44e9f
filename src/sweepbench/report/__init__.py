"""Reports: runs read back from MLflow (``runs``), grouped comparisons (``compare``), export formats
(``export``) and charts (``plots``)."""

from .compare import (DEFAULT_METRICS, SPREADS, Comparison, add_comparisons, compact_view, compare_runs,
                      is_duration, is_throughput, parse_baseline)
from .export import EXPORT_FORMATS, export_table, format_for_path, html_page
from .plots import (plot_accuracy_vs_time, plot_confusion_matrix, plot_learning_curve, plot_speedups,
                    write_plots)
from .runs import RUN_STATUSES, load_runs, run_values

__all__ = ["DEFAULT_METRICS", "EXPORT_FORMATS", "RUN_STATUSES", "SPREADS", "Comparison", "add_comparisons",
           "compact_view", "compare_runs", "export_table", "format_for_path", "html_page", "is_duration",
           "is_throughput", "load_runs", "parse_baseline", "plot_accuracy_vs_time", "plot_confusion_matrix",
           "plot_learning_curve", "plot_speedups", "run_values", "write_plots"]
