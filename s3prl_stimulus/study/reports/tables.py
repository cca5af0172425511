"""The report's tables, each as markdown, CSV (the numbers) and LaTeX (booktabs, written by hand).

Table II: agreement between the label sets of the runs' votes source. Table III: upstream x train
stimulus on the matched test set, best per row in bold, rows by best macro-F1 descending. Table IV:
train x test for one upstream, with CI, plus its per-class F1. The paired bootstrap tests between
training label sets on each test set, with Holm-adjusted p-values.

A number built from any run on part of the corpus carries a dagger (†), its table's title says so, and a
note gives the clips it was built from; the CSV has ``complete``, ``n_clips`` and ``partition_clips``.
"""

from __future__ import annotations

import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from s3prl_stimulus import CLASSES
from s3prl_stimulus.io import write_csv_atomic, write_text_atomic
from s3prl_stimulus.partition import FOLDS
from s3prl_stimulus.study.reports.build import Report
from s3prl_stimulus.study.reports.scoring import Cell


@dataclass(frozen=True)
class Table:
    """A table in display form (``cells``: strings for markdown, ``latex``: the same in LaTeX) and numbers."""

    stem: str
    title: str
    cells: pd.DataFrame
    latex: pd.DataFrame
    numbers: pd.DataFrame
    notes: tuple = ()


MARK, LATEX_MARK = " †", r"$^\dagger$"
"""Appended to every number built from a run on part of the corpus (``complete: false``)."""
TITLE_MARK = " († built from incomplete runs)"


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def _marked(text: str, complete: bool, latex: bool) -> str:
    return text if complete else text + (LATEX_MARK if latex else MARK)


def score_text(cell: Cell, decimals: int, latex: bool = False) -> str:
    """``0.652 [0.641, 0.663]`` (one seed) or ``0.652 ± 0.004 (3 seeds)``; ``missing`` when absent; † when incomplete."""
    if cell.missing:
        return "missing"
    pm = r"$\pm$" if latex else "±"
    if cell.n_seeds == 1:
        text = f"{_fmt(cell.value, decimals)} [{_fmt(cell.low, decimals)}, {_fmt(cell.high, decimals)}]"
    else:
        text = f"{_fmt(cell.value, decimals)} {pm} {_fmt(cell.seed_std, decimals)} ({cell.n_seeds} seeds)"
    return _marked(text, cell.complete, latex)


def folds_text(cell: Cell, decimals: int, latex: bool = False) -> str:
    if cell.n_folds == 0:
        return "missing"
    pm = r"$\pm$" if latex else "±"
    std = "n/a" if math.isnan(cell.fold_std) else _fmt(cell.fold_std, decimals)
    expected = len(FOLDS) * max(cell.n_seeds, 1)
    partial = "" if cell.n_folds >= expected and not cell.missing else f" ({cell.n_folds} folds)"
    return _marked(f"{_fmt(cell.fold_mean, decimals)} {pm} {std}{partial}", cell.complete, latex)


def _incomplete(cells) -> list:
    return [c for c in cells if c.n_folds and not c.complete]


def _title(title: str, cells) -> str:
    return title + (TITLE_MARK if _incomplete(cells) else "")


def _incomplete_note(cells) -> tuple:
    """The footnote of a table with † cells: the clips they were built from."""
    counts = sorted({(c.n_clips, c.partition_clips) for c in _incomplete(cells)})
    if not counts:
        return ()
    shown = "; ".join(f"{n:,} of {m:,}" for n, m in counts[:3]) + ("; …" if len(counts) > 3 else "")
    return (f"†: built from runs on part of the corpus ({shown} test clips of the folds run; per cell in the CSV's "
            "n_clips and partition_clips), or trained on part of it: not comparable with the full corpus.",)


def _bold(text: str, latex: bool) -> str:
    return rf"\textbf{{{text}}}" if latex else f"**{text}**"


def _cell_numbers(prefix: str, cell: Cell) -> dict:
    return {f"{prefix}macro_f1": cell.value, f"{prefix}ci_low": cell.low, f"{prefix}ci_high": cell.high,
            f"{prefix}seed_std": cell.seed_std, f"{prefix}n_seeds": cell.n_seeds, f"{prefix}fold_mean": cell.fold_mean,
            f"{prefix}fold_std": cell.fold_std, f"{prefix}n_folds": cell.n_folds, f"{prefix}complete": cell.complete,
            f"{prefix}n_clips": cell.n_clips, f"{prefix}partition_clips": cell.partition_clips}


def _best(values: dict) -> Optional[str]:
    present = {k: v for k, v in values.items() if not math.isnan(v)}
    return max(present, key=present.get) if present else None


def table3(report: Report, decimals: int) -> Table:
    trains = report.study.train_stimuli
    shown = [report.cell(u, s, s) for u in report.study.systems for s in trains]
    md, tex, numbers = {}, {}, []
    for system in report.ranking():
        cells = {s: report.cell(system, s, s) for s in trains}
        best = _best({s: c.value for s, c in cells.items()})
        md[system], tex[system] = {}, {}
        row = {"upstream": system, "best_train_stimulus": best or ""}
        for s, cell in cells.items():
            for target, latex in ((md[system], False), (tex[system], True)):
                text = score_text(cell, decimals, latex)
                target[s] = _bold(text, latex) if s == best else text
                target[f"{s} (folds)"] = folds_text(cell, decimals, latex)
            row.update(_cell_numbers(f"{s}_", cell))
        numbers.append(row)
    return Table(
        "table3_matched", _title("Table III: macro-F1 on the matched test set (train S, test S), union of the five folds",
                                 shown),
        _frame(md, "upstream"), _escaped_index(_frame(tex, "upstream")), pd.DataFrame(numbers),
        ("Bold: best training label set per row. Rows: best macro-F1, descending.",) + _cell_legend(report)
        + _incomplete_note(shown),
    )


def _escaped_index(frame: pd.DataFrame) -> pd.DataFrame:
    frame = frame.rename(index=latex_escape)
    frame.index.name = latex_escape(frame.index.name or "")
    return frame


def _frame(rows: dict, index_name: str) -> pd.DataFrame:
    frame = pd.DataFrame.from_dict(rows, orient="index")
    frame.index.name = index_name
    return frame


def _cell_legend(report: Report) -> tuple:
    settings = report.settings
    unit = "speakers, then clips within them" if settings.by_speaker else "clips"
    seeds = sorted({len(v) for v in report.study.seeds.values()})
    lines = [f"Cells: macro-F1 on the pooled test predictions of folds 1-5 [{100 - settings.alpha:g}% bootstrap CI, "
             f"{settings.num_bootstraps} resamples of {unit}]; '(folds)': mean ± std of the five per-fold macro-F1."]
    if seeds != [1]:
        lines.append("Several seeds: each seed is pooled and scored on its own; cells show mean ± sample std over "
                     "seeds (per-seed values and intervals in scores.csv).")
    lines.append("'missing': a fold or test label set is absent (see missing_runs.csv); never counted as zero.")
    return tuple(lines)


def table4(report: Report, decimals: int) -> Table:
    system, trains, tests = report.chosen, report.study.train_stimuli, report.study.test_stimuli
    best = {t: _best({s: report.cell(system, s, t).value for s in trains}) for t in tests}
    shown = [report.cell(system, s, t) for s in trains for t in tests]
    md, tex, numbers = {}, {}, []
    for s in trains:
        md[s], tex[s] = {}, {}
        row = {"train_stimulus": s}
        for t in tests:
            cell = report.cell(system, s, t)
            for target, latex in ((md[s], False), (tex[s], True)):
                text = score_text(cell, decimals, latex)
                target[t] = _bold(text, latex) if best[t] == s else text
            row.update(_cell_numbers(f"{t}_", cell))
        numbers.append(row)
    return Table(
        f"table4_cross_{slug(system)}", _title(f"Table IV: cross-testing macro-F1 of {system} (rows: train, columns: test)",
                                               shown),
        _frame(md, "train / test"), _frame(tex, "train / test"), pd.DataFrame(numbers),
        ("Bold: best training label set for each test set.",) + _cell_legend(report) + _incomplete_note(shown),
    )


def table4_per_class(report: Report, decimals: int) -> Table:
    system = report.chosen
    md, numbers, shown = {}, [], []
    for s, t in itertools.product(report.study.train_stimuli, report.study.test_stimuli):
        cell = report.cell(system, s, t)
        shown.append(cell)
        label = _marked(f"{s} → {t}", cell.complete or cell.missing, latex=False)  # the whole row is from these runs
        values = dict(zip(CLASSES, cell.per_class)) if cell.per_class else {}
        md[label] = {c: _fmt(values[c], decimals) if c in values else "missing" for c in CLASSES}
        md[label]["macro-F1"] = "missing" if cell.missing else _fmt(cell.value, decimals)
        numbers.append({"train_stimulus": s, "test_stimulus": t, "n_seeds": cell.n_seeds, "macro_f1": cell.value,
                        **{c: values.get(c, math.nan) for c in CLASSES}, "complete": cell.complete,
                        "n_clips": cell.n_clips, "partition_clips": cell.partition_clips})
    cells = _frame(md, "train → test")
    latex = cells.rename(index=lambda x: x.replace("→", r"$\rightarrow$").replace(MARK, LATEX_MARK))
    latex.index.name = r"train $\rightarrow$ test"
    return Table(f"table4_per_class_{slug(system)}", _title(f"Per-class F1 of {system} (pooled test predictions)", shown),
                 cells, latex, pd.DataFrame(numbers), ("Mean over seeds when several.",) + _incomplete_note(shown))


def table2(report: Report, decimals: int) -> Optional[Table]:
    if report.agreement is None:
        return None
    matrix = report.agreement
    cells = matrix.map(lambda v: _fmt(v, decimals))
    numbers = matrix.reset_index()
    return Table("table2_agreement", f"Table II: CCC agreement between label sets (votes: {report.study.votes})",
                 cells, cells, numbers, ("Lin's CCC per class on the vote distributions, averaged over the six classes.",))


def table_paired(report: Report, decimals: int) -> Table:
    frame = report.paired
    md, tex = [], []
    for row in frame.itertuples():
        difference = f"{row.difference:+.{decimals}f}"
        common = [row.system, row.test_stimulus, f"{row.train_a} − {row.train_b}", str(row.seed),
                  _fmt(row.macro_f1_a, decimals), _fmt(row.macro_f1_b, decimals), _marked(difference, row.complete, False),
                  f"[{row.ci_low:+.{decimals}f}, {row.ci_high:+.{decimals}f}]", f"{row.p_value:.3f}", f"{row.p_holm:.3f}"]
        md.append(common)
        tex.append(common[:2] + [f"{row.train_a} $-$ {row.train_b}"] + common[3:6]
                   + [_marked(difference, row.complete, True)] + common[7:])
    columns = ["upstream", "test", "train A − train B", "seed", "F1 A", "F1 B", "difference", "CI", "p", "p (Holm)"]
    cells = pd.DataFrame(md, columns=columns).set_index("upstream")
    latex = _escaped_index(pd.DataFrame(tex, columns=columns).set_index("upstream"))
    latex.columns = [c.replace("−", "$-$") for c in latex.columns]
    unit = "speakers" if report.settings.by_speaker else "clips"
    title = "Paired bootstrap tests between training label sets on each test set"
    partial = ("†: either side was built from runs on part of the corpus (see the cells of Tables III-IV): "
               "not comparable with the full corpus.",) if not frame["complete"].all() else ()
    return Table("paired_tests", title + (TITLE_MARK if partial else ""), cells, latex,
                 frame, (f"difference = macro-F1(A) − macro-F1(B) on the clips both score, {report.settings.num_bootstraps} "
                         f"paired resamples of {unit}; p two-sided; Holm adjusts over the pairs of one upstream, "
                         "test set and seed.",) + partial)


# --- writers ------------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "$": r"\$", "†": LATEX_MARK}


def latex_escape(text: str) -> str:
    """Plain text -> LaTeX (specials escaped). Table builders escape free text (upstream names) with it."""
    return "".join(_LATEX_SPECIAL.get(ch, ch) for ch in str(text))


def to_latex(table: Table) -> str:
    """A booktabs ``table`` environment written by hand (no pandas Styler / jinja2 needed).

    ``table.latex`` (cells, row labels, column labels) is LaTeX already; only the caption is escaped here.
    """
    frame = table.latex
    header = [str(frame.index.name or "")] + [str(c) for c in frame.columns]
    lines = [
        "% written by s3prl-stimulus report; needs \\usepackage{booktabs}",
        r"\begin{table}[t]",
        r"\centering",
        rf"\caption{{{latex_escape(table.title)}}}",
        rf"\label{{tab:{table.stem.replace('_', '-')}}}",
        r"\resizebox{\linewidth}{!}{%" if len(frame.columns) > 6 else "",
        rf"\begin{{tabular}}{{l{'c' * len(frame.columns)}}}",
        r"\toprule",
        " & ".join(header) + r" \\",
        r"\midrule",
    ]
    for label, row in zip(frame.index, frame.itertuples(index=False)):
        lines.append(" & ".join([str(label)] + [str(v) for v in row]) + r" \\")
    lines += [r"\bottomrule", r"\end{tabular}", "}" if len(frame.columns) > 6 else "", r"\end{table}"]
    return "\n".join(line for line in lines if line) + "\n"


def to_markdown(table: Table) -> str:
    from s3prl_stimulus.tables import render

    notes = "\n".join(f"- {n}" for n in table.notes)
    return f"## {table.title}\n\n{render(table.cells, 'markdown')}\n\n{notes}\n"


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "upstream"


def write_table(table: Table, out: Path) -> list:
    paths = [out / f"{table.stem}.{ext}" for ext in ("md", "csv", "tex")]
    write_text_atomic(paths[0], to_markdown(table))
    write_csv_atomic(paths[1], table.numbers, float_format="%.6f")
    write_text_atomic(paths[2], to_latex(table))
    return paths
