"""Writing a report: every table, figure and data file, then the ``index.md`` that links them.

The data files are ``scores.csv`` (every pooled scoring: per seed, with its interval), ``fold_scores.csv``
(the per-fold macro-F1, beside the one stored in each results JSON), ``missing_runs.csv`` and
``incomplete_runs.csv`` (runs on part of the corpus); ``index.md`` also states the scoring settings, how many
runs were incomplete (every number built from them carries †), the comparison with the paper's numbers
(:mod:`.reproduction`: one summary line per table, and its tables), and lists the missing runs and the notes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_csv_atomic, write_text_atomic
from s3prl_stimulus.study.reports.build import Report, build_report
from s3prl_stimulus.study.reports.figures import figure_heatmap, figure_layer_weights, figure_per_class
from s3prl_stimulus.study.reports.reproduction import Reproduction, compare_with_paper
from s3prl_stimulus.study.reports.tables import (
    table2, table3, table4, table4_per_class, table_paired, write_table,
)


def _link(path: Path, out: Path) -> str:
    return f"[{path.name}]({path.relative_to(out).as_posix()})"


def _reproduction_section(reproduction: Reproduction, written: list, out: Path) -> list:
    lines = ["", "## Reproduction: the paper's numbers", "",
             "Each cell the paper prints beside ours: the difference (ours − paper) and whether the paper's value lies "
             "inside our CI. Systems are matched to the paper's rows by their runs' upstream (S3PRL hub name).", ""]
    lines += [f"- {line}" for line in reproduction.summary] + [""]
    lines += [f"- {table.title}: " + " · ".join(_link(p, out) for p in paths) for table, paths in written]
    if reproduction.notes:
        lines += [""] + [f"- {note}" for note in reproduction.notes]
    return lines


def _index(report: Report, out: Path, tables: list, figures: dict, extra: list, reproduction: list) -> str:
    study, settings = report.study, report.settings
    n_seeds = {s: len(v) for s, v in study.seeds.items()}
    lines = [
        "# Stimulus Modality Matters: report", "",
        f"- results: `{report.results_dir}` ({len(study.runs)} runs; paths: "
        f"{', '.join(sorted({r.path for r in study.runs}))}; votes: `{study.votes}`)",
        f"- upstreams: {', '.join(report.ranking())}; Table IV and single-upstream figures: **{report.chosen}**",
        f"- train stimuli: {', '.join(study.train_stimuli)}; test stimuli: {', '.join(study.test_stimuli)}",
        f"- scoring: the five folds' test predictions pooled (every clip once); macro-F1 and per-class F1 on "
        f"predictions binarised at softmax > 1/6; {100 - settings.alpha:g}% percentile bootstrap, "
        f"{settings.num_bootstraps} resamples of {'speakers' if settings.by_speaker else 'clips'}, seed {settings.seed}",
    ]
    incomplete = report.incomplete_runs()
    if incomplete:
        first = incomplete[0]
        lines.append(f"- **† incomplete runs: {len(incomplete)} of {len(study.runs)}** used part of the corpus (e.g. "
                     f"{first.system} / {first.train_stimulus} / fold {first.fold}: {len(first.probs):,} of the "
                     f"{first.partition_clips:,} test clips scored, or part of a training split): every number, table "
                     "and figure built from them is marked †; not comparable with the full corpus (all listed in "
                     "incomplete_runs.csv)")
    if any(n > 1 for n in n_seeds.values()):
        lines.append("- several seeds: " + ", ".join(f"{s}: {n}" for s, n in n_seeds.items())
                     + "; each seed is scored on its own and tables show mean ± sample std over seeds")
    lines += ["", "## Tables", ""]
    for table, paths in tables:
        lines.append(f"- {table.title}: " + " · ".join(_link(p, out) for p in paths))
    lines += reproduction
    lines += ["", "## Figures", ""]
    for title, paths in figures.items():
        png = next(p for p in paths if p.suffix == ".png")
        lines += [f"### {title}", "", f"![{title}]({png.relative_to(out).as_posix()})", "",
                  " · ".join(_link(p, out) for p in paths), ""]
    lines += ["## Data", ""] + [f"- {_link(p, out)}" for p in extra]
    lines += ["", "## Missing runs", ""]
    if study.missing.empty:
        lines.append("None: every upstream has every train stimulus, fold, seed and test label set.")
    else:
        from s3prl_stimulus.tables import render

        lines += [f"{len(study.missing)} missing (shown as 'missing' in the tables, never as zero):", "",
                  render(study.missing.set_index("system"), "markdown")]
    if report.notes:
        lines += ["", "## Notes", ""] + [f"- {n}" for n in report.notes]
    return "\n".join(lines) + "\n"


def write_report(report: Report, out_dir: str | os.PathLike, decimals: int = 3) -> Path:
    """Write every table, figure and data file, then ``index.md``; returns the index path."""
    if not 0 <= int(decimals) <= 10:
        raise StimulusError(f"--decimals must be between 0 and 10, got {decimals}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise StimulusError(f"--out {out} exists and is not a directory: choose a directory for the report")
    out.mkdir(parents=True, exist_ok=True)
    tables = [t for t in (table2(report, decimals), table3(report, decimals), table4(report, decimals),
                          table4_per_class(report, decimals), table_paired(report, decimals)) if t is not None]
    written = [(t, write_table(t, out)) for t in tables]
    reproduction = compare_with_paper(report, decimals)
    compared = [(t, write_table(t, out)) for t in reproduction.tables]
    figures = {}
    for system in report.ranking():
        caption, paths = figure_layer_weights(report, system, out)
        if paths:
            figures[caption] = paths
    for caption, paths in (figure_heatmap(report, out), figure_per_class(report, out)):
        figures[caption] = paths
    extra = []
    for name, frame in (("scores.csv", report.pooled), ("fold_scores.csv", report.per_fold),
                        ("missing_runs.csv", report.study.missing), ("incomplete_runs.csv", _incomplete_frame(report))):
        write_csv_atomic(out / name, frame, float_format="%.6f")
        extra.append(out / name)
    index = out / "index.md"
    write_text_atomic(index, _index(report, out, written, figures, extra,
                                    _reproduction_section(reproduction, compared, out)))
    return index


def _incomplete_frame(report: Report) -> pd.DataFrame:
    rows = [(r.system, r.train_stimulus, r.fold, r.seed, len(r.probs), r.partition_clips, str(r.results_file))
            for r in report.incomplete_runs()]
    return pd.DataFrame(rows, columns=["system", "train_stimulus", "fold", "seed", "n_clips", "partition_clips",
                                       "results_file"])


def make_report(results_dir, out_dir, *, decimals: int = 3, **kwargs) -> Report:
    """:func:`build_report` then :func:`write_report`."""
    report = build_report(results_dir, **kwargs)
    write_report(report, out_dir, decimals)
    return report
