"""Tables as text: markdown, CSV, JSON, a styled HTML page, LaTeX. Missing figures are blank, never ``NaN``."""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any, Sequence

import pandas as pd

from ..paths import create_parents
from ..validators import choice

EXPORT_FORMATS = ("md", "csv", "json", "html", "latex")
FORMAT_SUFFIXES = {"tex": "latex", "markdown": "md", "htm": "html"}
HTML_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
h1 { font-size: 1.3em; }
ul.notes { color: #555; font-size: 0.9em; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { padding: 0.3em 0.7em; border-bottom: 1px solid #ddd; }
th { background: #f3f3f3; text-align: left; position: sticky; top: 0; }
tr:hover td { background: #f7fbff; }
div.scroll { max-width: 100%; overflow-x: auto; }
figure { margin: 1.5em 0; } figure img { max-width: 100%; }
"""


def format_for_path(path: str) -> str | None:
    """The export format a file name asks for (``.md``, ``.csv``, ``.json``, ``.html``, ``.tex``)."""
    suffix = str(path).rsplit(".", 1)[-1].lower() if "." in str(path) else ""
    return FORMAT_SUFFIXES.get(suffix, suffix if suffix in EXPORT_FORMATS else None)


def _json_value(value: Any) -> Any:
    """Timestamps as ISO 8601; numpy scalars as numbers."""
    if hasattr(value, "isoformat"):
        return value.isoformat()
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _blank_missing(table: pd.DataFrame) -> pd.DataFrame:
    return table.astype(object).where(table.notna(), None)


def _number(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def styled_table(table: pd.DataFrame) -> str:
    """The table as HTML by pandas' Styler: numbers to 4 significant digits and right-aligned, text escaped,
    missing figures blank, no index; a fixed id, so the same table is the same page on every rerun."""
    numeric = [column for column in table.columns
               if pd.api.types.is_numeric_dtype(table[column]) and not pd.api.types.is_bool_dtype(table[column])]
    styler = (table.reset_index(drop=True).style.hide(axis="index").set_uuid("sweepbench")
              .format(_number, na_rep="", escape="html")
              .set_table_styles({column: [{"selector": "td", "props": "text-align: right; "
                                           "font-variant-numeric: tabular-nums"}] for column in numeric}))
    return styler.to_html()


def _embedded_image(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return f'<figure><img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).stem)}"></figure>'


def html_page(table: pd.DataFrame, title: str = "sweepbench comparison", notes: Sequence[str] = (),
              images: Sequence[str | os.PathLike] = ()) -> str:
    """A self-contained page: the title, the notes, the table with numbers to 4 significant digits, and
    ``images`` (PNG charts) embedded, so that the one file can be sent or opened anywhere."""
    note_items = "".join(f"<li>{html.escape(note)}</li>" for note in notes)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{HTML_STYLE}</style></head>\n<body><h1>{html.escape(title)}</h1>\n"
            + (f'<ul class="notes">{note_items}</ul>\n' if notes else "")
            + f'<div class="scroll">{styled_table(table)}</div>\n'
            + "".join(_embedded_image(path) for path in images) + "</body></html>")


def export_table(table: pd.DataFrame, fmt: str, notes: Sequence[str] = (), title: str = "sweepbench comparison",
                 images: Sequence[str | os.PathLike] = ()) -> str:
    """Renders a table as text in one of ``EXPORT_FORMATS``; csv and json parse back to the same numbers.
    ``notes`` and ``images`` go into the HTML page (other formats stay plain tables: print the notes beside
    them)."""
    choice("format", fmt, EXPORT_FORMATS)
    if fmt == "md":
        return _blank_missing(table).to_markdown(index=False, floatfmt=".4g")
    if fmt == "csv":
        return table.to_csv(index=False)
    if fmt == "json":
        return json.dumps(_blank_missing(table).to_dict(orient="records"), indent=2, default=_json_value)
    if fmt == "html":
        return html_page(table, title, notes, images)
    return table.to_latex(index=False, float_format="%.4g", na_rep="")


def write_export(path: str | os.PathLike, text: str) -> Path | None:
    """Writes ``text`` (a final newline added) to ``path`` (checked beforehand with ``paths.output_file``), making
    its missing folders; returns the folder it made, if any, so the caller can say so."""
    made = create_parents(path)
    Path(path).write_text(text if text.endswith("\n") else text + "\n")
    return made
