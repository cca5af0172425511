"""The report's numbers beside the paper's (:mod:`s3prl_stimulus.paper`): did the runs reproduce Tables II-IV?

For every cell the paper prints and the report has: the report's value, the paper's, the difference
(ours − paper) and whether the paper's value lies inside the report's bootstrap CI (bounds included);
one summary line per table (Table IV: one per compared system). A cell the paper has and the report
lacks is shown as *missing*, never as zero, and is not counted; a cell the report has and the paper
lacks (the all-inclusive column of Table III, the all-inclusive test set of Table IV) is left out of
the comparison, and the table's notes say so. A cell built from runs on part of the corpus keeps its †.

Systems are matched to the paper's rows by the runs' ``upstream`` (S3PRL hub name,
:data:`s3prl_stimulus.integration.upstreams.PAPER_UPSTREAMS`). A local entry (``wavlm_local -k FILE``, whose
file could be any model of its family) is matched only when its label names the model (the recipe's
``wavlm_large:FILE`` is labelled ``wavlm_large``; "WavLM Large (authors)" names it too) and its layer
weights count that model's hidden states (:func:`paper_upstream_of`); the notes say it was matched by
label. Any other system is not compared, and the notes name it. Several systems with one upstream (your WavLM Large runs
and the authors' released models) are each compared. Table IV is the paper's WavLM Large: only systems
whose upstream is ``wavlm_large`` are compared with it. Table II compares the report's agreement matrix
(the CCC of the runs' votes source) without an interval (the paper gives none); so do the per-class F1
of Table IV (the report scores per-class F1 without a CI).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Optional

import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS
from s3prl_stimulus.paper import PaperNumbers, load_paper_numbers
from s3prl_stimulus.study.reports.build import Report
from s3prl_stimulus.study.reports.scoring import Cell
from s3prl_stimulus.study.reports.tables import LATEX_MARK, MARK, TITLE_MARK, Table, latex_escape, score_text

ARROW, LATEX_ARROW = "→", r"$\rightarrow$"


@dataclass
class Reproduction:
    """The comparison tables, one summary line per paper table, and what was left out and why."""

    tables: list = field(default_factory=list)
    summary: list = field(default_factory=list)
    notes: list = field(default_factory=list)


_LABEL_END = re.compile(r"$|[ (\-.+:]")


def _label_names(label: str, entry) -> int:
    """How long a prefix of ``label`` names the paper upstream (hub name or title, then a separator or the end); 0: none."""
    text = label.casefold()
    names = (entry.name.casefold(), entry.title.casefold())
    return max((len(n) for n in names if text.startswith(n) and _LABEL_END.match(text, len(n))), default=0)


def paper_upstream_of(upstream: str, label: str, n_layers: Optional[int] = None) -> Optional[str]:
    """The paper upstream (hub name) a system's runs are compared with, or None.

    A hub name is its own row. A local entry (``wavlm_local -k FILE``: how the recipe runs ``wavlm_large:FILE``, and
    how the authors' models are evaluated on local weights) names no model, so it is matched only when its label
    names a paper upstream that entry loads (``wavlm_large``, ``WavLM Large (authors)``; the longest name wins) and
    its learned layer weights, when present, count that upstream's hidden states.
    """
    if any(entry.name == upstream for entry in PAPER_UPSTREAMS):
        return upstream
    named = [(_label_names(label, e), e) for e in PAPER_UPSTREAMS if e.local == upstream]
    length, entry = max(named, key=lambda item: item[0], default=(0, None))
    if not length or (n_layers is not None and n_layers != entry.hidden_states):
        return None
    return entry.name


def _systems_by_upstream(report: Report) -> dict:
    """System -> the paper upstream (hub name) it is compared with, else the upstream its runs recorded."""
    found = {}
    for run in report.study.runs:
        layers = len(run.layer_weights) if run.layer_weights else None
        found[run.system] = paper_upstream_of(run.upstream, run.upstream_label, layers) or run.upstream
    return found


def _label_matches(report: Report, upstreams: dict, systems=None) -> list:
    """A note on the (given) systems compared through a local entry: matched by their label, the file not verified."""
    local = sorted({f"{run.system} ({run.upstream} -k {run.upstream_ckpt or 'FILE'})" for run in report.study.runs
                    if run.upstream != upstreams[run.system] and (systems is None or run.system in systems)})
    if not local:
        return []
    return [f"Matched by label (a local entry names no model; its weights are not verified as the paper's): "
            f"{', '.join(local)}."]


def _diff_text(value: float, digits: int) -> str:
    return "" if math.isnan(value) else f"{value:+.{digits}f}"


def _within(cell: Cell, paper_value: float) -> Optional[bool]:
    """Whether the paper's value lies in the cell's CI; None when the cell is missing or has no CI (seeds)."""
    if cell.missing or math.isnan(cell.low) or math.isnan(cell.high):
        return None
    return bool(cell.low <= paper_value <= cell.high)


def _within_text(cell: Cell, within: Optional[bool], latex: bool) -> str:
    if cell.missing:
        return "n/a (missing)"
    if within is None:
        return f"n/a (no CI: mean of {cell.n_seeds} seeds)"
    return "yes" if within else (r"\textbf{no}" if latex else "**no**")


def _compared(report: Report, system: str, upstream: str, train: str, test: str, paper_value: float) -> dict:
    cell = report.cell(system, train, test)
    within = _within(cell, paper_value)
    status = "missing" if cell.missing else ("compared" if within is not None else "no CI (several seeds)")
    return {"system": system, "upstream": upstream, "train_stimulus": train, "test_stimulus": test,
            "macro_f1": cell.value, "ci_low": cell.low, "ci_high": cell.high, "n_seeds": cell.n_seeds,
            "paper_macro_f1": paper_value, "difference": cell.value - paper_value,
            "paper_within_ci": "" if within is None else within, "status": status,
            "complete": cell.complete, "n_clips": cell.n_clips, "partition_clips": cell.partition_clips}


def _counts(rows: list) -> tuple:
    """(``9/12``, ``1 missing; max |ours - paper| 0.0123``): cells within CI of those with one, then the rest."""
    present = [r for r in rows if r["status"] != "missing"]
    judged = [r for r in present if r["status"] == "compared"]
    within = sum(bool(r["paper_within_ci"]) for r in judged)
    rest = []
    if len(rows) > len(present):
        rest.append(f"{len(rows) - len(present)} missing")
    if len(present) > len(judged):
        rest.append(f"{len(present) - len(judged)} without a CI (several seeds)")
    if present:
        rest.append(f"max |ours - paper| {max(abs(r['difference']) for r in present):.4f}")
    if any(not r["complete"] for r in present):
        rest.append("† built from incomplete runs")
    return f"{within}/{len(judged)}", "; ".join(rest)


def _line(title: str, rows: list, what: str, detail: str = "", extra: str = "") -> str:
    """``Table IV, X: 9/12 overall cells within CI (detail); 1 missing; max |ours - paper| 0.0123extra``."""
    head, tail = _counts(rows)
    return f"{title}: {head} {what} within CI{detail}" + (f"; {tail}" if tail else "") + extra


def _texts(report: Report, row: dict, digits: int, latex: bool, paper_ci: Optional[tuple] = None) -> list:
    cell = report.cell(row["system"], row["train_stimulus"], row["test_stimulus"])
    paper = f"{row['paper_macro_f1']:.{digits}f}"
    if paper_ci is not None:
        paper += f" [{paper_ci[0]:.{digits}f}, {paper_ci[1]:.{digits}f}]"
    difference = "" if cell.missing else _diff_text(row["difference"], digits)
    if difference and not cell.complete:
        difference += LATEX_MARK if latex else MARK
    within = None if row["paper_within_ci"] == "" else row["paper_within_ci"]
    return [score_text(cell, digits, latex), paper, difference, _within_text(cell, within, latex)]


def _table(stem: str, title: str, md_rows: list, tex_rows: list, columns: list, numbers: list, notes: tuple,
           incomplete: bool) -> Table:
    md = pd.DataFrame([r[1:] for r in md_rows], columns=columns, index=pd.Index([r[0] for r in md_rows], name="system"))
    tex = pd.DataFrame([r[1:] for r in tex_rows], columns=[latex_escape(c).replace("−", "$-$") for c in columns],
                       index=pd.Index([latex_escape(r[0]) for r in tex_rows], name="system"))
    return Table(stem, title + (TITLE_MARK if incomplete else ""), md, tex, pd.DataFrame(numbers), notes)


def _level(report: Report) -> str:
    return f"{100 - report.settings.alpha:g}%"


def _common_notes(report: Report, paper: PaperNumbers) -> tuple:
    return (f"ours: the report's cell ({_level(report)} bootstrap CI, as in its own tables); paper: as printed "
            f"({paper.f1_decimals} decimals, so within ±{paper.rounding:g} of its value); difference: ours − paper; "
            "'paper in our CI': the paper's value lies inside our interval (bounds included).",
            "'missing': the paper has this cell and the report does not (see missing_runs.csv); never counted as "
            "zero, and left out of the counts.")


# --- Table II --------------------------------------------------------------------------------------


def compare_table2(report: Report, paper: PaperNumbers, digits: int) -> tuple:
    votes = report.study.votes
    if report.agreement is None:
        return None, [f"Table II: not compared (the report has no agreement matrix for votes {votes!r}; see the notes)"], []
    rows, md, numbers = [], {}, []
    for a, b in ((a, b) for i, b in enumerate(STIMULI) for a in STIMULI[i + 1:]):  # the paper's order
        ours, theirs = float(report.agreement.loc[a, b]), paper.ccc(a, b)
        numbers.append({"a": a, "b": b, "ccc": ours, "paper_ccc": theirs, "difference": ours - theirs, "votes": votes})
        md[f"{a} – {b}"] = [f"{ours:.{digits}f}", f"{theirs:.{paper.agreement_decimals}f}", _diff_text(ours - theirs, digits)]
        rows.append(abs(ours - theirs))
    cells = pd.DataFrame.from_dict(md, orient="index", columns=["ours", "paper", "ours − paper"])
    cells.index.name = "label sets"
    latex = cells.rename(columns={"ours − paper": "ours $-$ paper"})
    notes = [f"ours: class-averaged CCC of the report's votes source ({votes!r}); paper: Table II as printed "
             f"({paper.agreement_decimals} decimals, ±{0.5 * 10 ** -paper.agreement_decimals:g}). No interval on "
             "either side: differences only."]
    if votes != "paper":
        notes.append(f"The paper's labels are those of votes 'paper'; with {votes!r} the label sets differ, and so may "
                     "their agreement.")
    summary = (f"Table II (CCC, votes {votes!r}): {len(rows)} pairs compared; max |ours - paper| {max(rows):.4f} "
               f"(the paper prints {paper.agreement_decimals} decimals)")
    table = Table("reproduction_table2", f"Table II reproduced: CCC between label sets, ours (votes {votes}) vs the paper",
                  cells, latex, pd.DataFrame(numbers), tuple(notes))
    return table, [summary], notes[1:]


# --- Table III -------------------------------------------------------------------------------------


def _local_hint(upstream: str) -> str:
    """Why a local entry of a paper upstream is not matched: the file it read could be any model of its family."""
    for entry in PAPER_UPSTREAMS:
        if entry.local == upstream:
            return (f": a local entry, e.g. {entry.name} from a file; the model it read is not known by name, so "
                    f"label it after the model to compare (recipe: {entry.name}:FILE)")
    return ""


def compare_table3(report: Report, paper: PaperNumbers, digits: int) -> tuple:
    upstreams = _systems_by_upstream(report)
    compared = [s for s in report.ranking() if upstreams[s] in paper.matched]
    skipped = [s for s in report.ranking() if upstreams[s] not in paper.matched]
    notes = ["Systems are matched to the paper's rows by their runs' upstream (S3PRL hub name); a local entry by its "
             "label.", *_label_matches(report, upstreams)]
    if skipped:
        notes.append("Not compared (upstream not one of the paper's): "
                     + ", ".join(f"{s} (upstream {upstreams[s]}{_local_hint(upstreams[s])})" for s in skipped) + ".")
    omitted = [s for s in report.study.train_stimuli if s not in paper.matched_stimuli]
    if omitted and compared:
        notes.append(f"The paper's Table III has no {', '.join(omitted)} (train = test) column: our {', '.join(omitted)} matched cells "
                     "are left out of the comparison.")
    if not compared:
        return None, [f"Table III: not compared (no system here has one of the paper's upstreams; found: "
                      f"{', '.join(sorted(set(upstreams.values())))})"], notes
    numbers, md, tex = [], [], []
    for system in compared:
        upstream = upstreams[system]
        for s in paper.matched_stimuli:
            row = _compared(report, system, upstream, s, s, paper.matched[upstream][s])
            numbers.append({**row, "paper_name": paper.matched_names[upstream]})
            name = paper.matched_names[upstream]
            md.append([system, name, s] + _texts(report, row, digits, False))
            tex.append([system, latex_escape(name), s] + _texts(report, row, digits, True))
    per_system = ", ".join(f"{s} {_counts([r for r in numbers if r['system'] == s])[0]}" for s in compared)
    summary = _line("Table III", numbers, "matched cells", f" ({per_system})",
                    f"; {len(skipped)} system(s) not compared (upstream not the paper's)" if skipped else "")
    level = _level(report)
    columns = ["paper row", "train = test", f"ours [{level} CI]", "paper", "ours − paper", "paper in our CI"]
    table = _table("reproduction_table3", "Table III reproduced: matched macro-F1, ours vs the paper", md, tex, columns,
                   numbers, tuple(notes) + _common_notes(report, paper), any(not r["complete"] for r in numbers))
    return table, [summary], notes


# --- Table IV --------------------------------------------------------------------------------------


def _cross_pairs(paper: PaperNumbers) -> list:
    return [(a, b) for a in STIMULI for b in STIMULI if (a, b) in paper.cross]


def compare_table4(report: Report, paper: PaperNumbers, digits: int) -> tuple:
    upstreams = _systems_by_upstream(report)
    upstream = paper.cross_upstream
    systems = [s for s in report.ranking() if upstreams[s] == upstream]
    notes = _label_matches(report, upstreams, systems)
    chosen_upstream = upstreams.get(report.chosen)
    if chosen_upstream != upstream:
        notes.append(f"The report's Table IV is of {report.chosen} (upstream {chosen_upstream}): the paper has no Table "
                     f"IV for that upstream (its Table IV is {paper.matched_names[upstream]}, {upstream}).")
    if not systems:
        return [], [f"Table IV: not compared (the paper's Table IV is {paper.matched_names[upstream]}; no system here "
                    f"has upstream {upstream})"], notes
    tests = {b for _, b in paper.cross}
    omitted = [t for t in report.study.test_stimuli if t not in tests]
    if omitted:
        notes.append(f"The paper's Table IV has no {', '.join(omitted)} test set: our cells tested on it are left out.")
    numbers, md, tex, per_class, summary = [], [], [], [], []
    for system in systems:
        rows = []
        for train, test in _cross_pairs(paper):
            theirs = paper.cross[(train, test)]
            row = _compared(report, system, upstream, train, test, theirs.macro_f1)
            row.update(paper_ci_low=theirs.ci_low, paper_ci_high=theirs.ci_high)
            rows.append(row)
            ci = (theirs.ci_low, theirs.ci_high)
            md.append([system, f"{train} {ARROW} {test}"] + _texts(report, row, digits, False, ci))
            tex.append([system, f"{train} {LATEX_ARROW} {test}"] + _texts(report, row, digits, True, ci))
            per_class += _per_class_rows(report, system, upstream, train, test, theirs)
        numbers += rows
        classes = [r for r in per_class if r["system"] == system and r["status"] == "compared"]
        worst = f"; per-class max |ours - paper| {max(abs(r['difference']) for r in classes):.4f}" if classes else ""
        summary.append(_line(f"Table IV, {system}", rows, "overall cells", extra=worst))
    level = _level(report)
    columns = ["train → test", f"ours [{level} CI]", "paper [95% CI]", "ours − paper", "paper in our CI"]
    incomplete = any(not r["complete"] for r in numbers)
    overall = _table("reproduction_table4", f"Table IV reproduced: {paper.matched_names[upstream]} cross-testing "
                     "macro-F1, ours vs the paper", md, tex, columns, numbers,
                     tuple(notes) + _common_notes(report, paper), incomplete)
    return [overall, _per_class_table(report, per_class, digits, paper, incomplete)], summary, notes


def _per_class_rows(report: Report, system: str, upstream: str, train: str, test: str, theirs) -> list:
    cell = report.cell(system, train, test)
    ours = dict(zip(CLASSES, cell.per_class)) if cell.per_class else {}
    return [{"system": system, "upstream": upstream, "train_stimulus": train, "test_stimulus": test, "class": c,
             "f1": ours.get(c, math.nan), "paper_f1": p, "difference": ours.get(c, math.nan) - p,
             "status": "compared" if c in ours else "missing", "n_seeds": cell.n_seeds, "complete": cell.complete}
            for c, p in zip(CLASSES, theirs.per_class_f1)]


def _per_class_table(report: Report, rows: list, digits: int, paper: PaperNumbers, incomplete: bool) -> Table:
    md, tex = [], []
    for key, group in pd.DataFrame(rows).groupby(["system", "train_stimulus", "test_stimulus"], sort=False):
        system, train, test = key
        for target, latex in ((md, False), (tex, True)):
            texts = []
            for r in group.itertuples():
                if r.status == "missing":
                    texts.append(f"missing vs {r.paper_f1:.{digits}f}")
                    continue
                mark = "" if r.complete else (LATEX_MARK if latex else MARK)
                texts.append(f"{r.f1:.{digits}f} vs {r.paper_f1:.{digits}f} ({r.difference:+.{digits}f}){mark}")
            target.append([system, f"{train} {LATEX_ARROW if latex else ARROW} {test}"] + texts)
    notes = ("Each cell: ours vs the paper (ours − paper). The report scores per-class F1 without an interval, and "
             "the paper prints none: differences only. Mean over seeds when several.",) + _common_notes(report, paper)[1:]
    return _table("reproduction_table4_per_class", f"Table IV reproduced: {paper.matched_names[paper.cross_upstream]} "
                  "per-class F1, ours vs the paper", md, tex, ["train → test", *CLASSES], rows, notes, incomplete)


# --- all -------------------------------------------------------------------------------------------


def compare_with_paper(report: Report, decimals: int = 3, paper: Optional[PaperNumbers] = None) -> Reproduction:
    """Every comparison of the report with the paper (the packaged numbers unless ``paper`` is given)."""
    paper = load_paper_numbers() if paper is None else paper
    digits = max(int(decimals), paper.f1_decimals)
    result = Reproduction()
    for compare in (compare_table2, compare_table3, compare_table4):
        tables, summary, notes = compare(report, paper, digits)
        result.tables += [t for t in (tables if isinstance(tables, list) else [tables]) if t is not None]
        result.summary += summary
        result.notes += notes
    return result
