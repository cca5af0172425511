"""Render CLI tables as readable text, JSON, CSV or markdown."""

from __future__ import annotations

import json

import pandas as pd

FORMATS = ("table", "json", "csv", "markdown")


def _markdown(frame: pd.DataFrame, floatfmt: str) -> str:
    header = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    rows = [[str(i)] + [_cell(v, floatfmt) for v in row] for i, row in zip(frame.index, frame.values)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def _cell(value, floatfmt: str) -> str:
    if isinstance(value, float):
        return format(value, floatfmt)
    return str(value)


def render(frame: pd.DataFrame, fmt: str = "table", floatfmt: str = ".4f", json_obj=None) -> str:
    """Render ``frame``. ``json_obj`` overrides the JSON form (default: ``{row: {column: value}}``)."""
    if fmt == "json":
        obj = json_obj if json_obj is not None else json.loads(frame.to_json(orient="index"))
        return json.dumps(obj, indent=2)
    if fmt == "csv":
        return frame.to_csv(float_format="%.6g").rstrip("\n")
    if fmt == "markdown":
        return _markdown(frame, floatfmt)
    if fmt == "table":
        return frame.to_string(float_format=lambda v: format(v, floatfmt))
    raise ValueError(f"unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
