"""The report in memory: :func:`build_report` reads and scores every run; nothing is written.

Besides the scores it loads Table II's agreement (:mod:`s3prl_stimulus.agreement`, for the runs' votes
source; noted and left out when that source cannot be loaded) and chooses the upstream of Table IV and
the single-upstream figures (``--upstream``, else the best in Table III). Every run was checked when it
was read (:mod:`.runs`): a results JSON whose stored macro-F1 differs from its predictions CSV stops the
report there.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import pandas as pd

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.study.reports.runs import Study, build_study, find_runs
from s3prl_stimulus.study.reports.scoring import (
    Cell, ScoreSettings, aggregate, bootstrap_all, paired_tests, pool_all, score_table,
)


@dataclass
class Report:
    results_dir: Path
    study: Study
    settings: ScoreSettings
    pooled: pd.DataFrame  # one row per (system, train, test, seed) with all five folds
    per_fold: pd.DataFrame
    cells: dict
    paired: pd.DataFrame
    agreement: Optional[pd.DataFrame]
    chosen: str  # system of Table IV and the single-system figures
    notes: list = field(default_factory=list)

    def cell(self, system: str, train: str, test: str) -> Cell:
        return self.cells.get((system, train, test), Cell())

    def incomplete_runs(self) -> list:
        """Runs on part of the corpus: every number built from them is marked †."""
        return [r for r in self.study.runs if not r.complete]

    def ranking(self) -> list:
        """Systems by their best matched-test macro-F1, descending (missing last)."""
        def best(system):
            values = [self.cell(system, s, s).value for s in self.study.train_stimuli]
            values = [v for v in values if not math.isnan(v)]
            return max(values) if values else -math.inf
        return sorted(self.study.systems, key=lambda s: (-best(s), s))


def _agreement(votes: str, notes: list) -> Optional[pd.DataFrame]:
    from s3prl_stimulus.agreement import agreement_matrix
    from s3prl_stimulus.labels import load_votes

    try:
        return agreement_matrix(load_votes(votes))
    except (StimulusError, OSError) as err:
        notes.append(f"Table II not written: votes source {votes!r} could not be loaded ({err})")
        return None


def _choose(study: Study, upstream: Optional[str], ranking: list) -> str:
    if upstream is None:
        return ranking[0]
    if upstream in study.systems:
        return upstream
    matches = [s for s in study.systems if s.split(" (")[0] == upstream]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise StimulusError(f"upstream {upstream!r} names several systems ({', '.join(matches)}): "
                            "pass one of these names to --upstream, or select a path with --path")
    raise StimulusError(f"no runs for upstream {upstream!r}; found: {', '.join(study.systems)}")


def build_report(
    results_dir: str | os.PathLike,
    *,
    upstream: Optional[str] = None,
    votes: Optional[str] = None,
    path: Optional[str] = None,
    settings: ScoreSettings = ScoreSettings(),
) -> Report:
    """Read every run under ``results_dir`` and compute all scores (nothing is written)."""
    if int(settings.num_bootstraps) < 1:
        raise StimulusError(f"--bootstraps must be at least 1, got {settings.num_bootstraps}")
    if not 0 < settings.alpha < 100:
        raise StimulusError(f"--alpha must be in (0, 100) percent, got {settings.alpha} (95% intervals: 5)")
    notes: list = []
    study = build_study(find_runs(results_dir, notes), votes=votes, path=path)
    pooled, per_fold = pool_all(study)
    values = bootstrap_all(pooled, settings)
    scores = score_table(pooled, values, settings)
    report = Report(Path(results_dir), study, settings, scores, per_fold, aggregate(scores, per_fold),
                    paired_tests(pooled, values, settings), _agreement(study.votes, notes), "", notes)
    report.chosen = _choose(study, upstream, report.ranking())
    return report
