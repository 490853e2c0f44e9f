"""Comparison tables from MLflow runs, their export formats, and plots."""

from __future__ import annotations

import pandas as pd

from .config import ConfigError

EXPORT_FORMATS = ("md", "csv", "json", "html", "latex")


def export_table(table: pd.DataFrame, fmt: str) -> str:
    """Renders a table as text in one of ``EXPORT_FORMATS``; csv and json parse back to the same numbers."""
    if fmt == "md":
        return table.to_markdown(index=False, floatfmt=".4g")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return table.to_json(orient="records", indent=2, double_precision=15)
    if fmt == "html":
        return table.to_html(index=False, float_format=lambda value: f"{value:.4g}")
    if fmt == "latex":
        return table.to_latex(index=False, float_format="%.4g")
    raise ConfigError(f"format: {fmt!r} is not allowed; choose one of: {', '.join(EXPORT_FORMATS)}")
