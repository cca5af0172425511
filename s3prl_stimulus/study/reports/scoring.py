"""Scores of the pooled test predictions: bootstrap intervals, cells over seeds, paired tests.

Scoring follows the paper: for each (upstream, train stimulus, test stimulus) the five folds' test
predictions are pooled, so every clip is scored once. Corpus-level macro-F1, with a percentile-bootstrap
interval (clips resampled by default, as in ``score`` and the downstream's default ``evalrc``; or
speakers, then their clips), and per-class F1 come from :mod:`s3prl_stimulus.metrics` on the binarised
predictions (softmax > 1/C) against the run's own binary targets. The mean ± std of the five per-fold
scores is kept alongside. With several seeds, every seed is pooled and scored on its own, and a
:class:`Cell` holds the mean ± sample std over seeds.

A pooled score needs all five folds: a missing fold (or a predictions file without a test stimulus's
targets) leaves the cell *missing* -- never zero. A score built from any run on part of the corpus
(``Run.complete`` false) carries ``complete: false`` and its clip counts, so the tables can mark it.

Training label sets are compared on each test set with paired bootstrap tests
(:func:`s3prl_stimulus.metrics.paired_bootstrap`), p-values Holm-adjusted within each family (one
upstream, test set and seed).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import FOLDS
from s3prl_stimulus.study.reports.runs import Run, Study


@dataclass(frozen=True)
class ScoreSettings:
    num_bootstraps: int = 1000
    alpha: float = 5.0
    by_speaker: bool = False  # the toolkit's default; `score` and the downstream agree
    seed: int = 0


@dataclass(frozen=True)
class Pooled:
    """One (system, train, test, seed) scoring on the union of the five folds' test clips."""

    system: str
    train_stimulus: str
    test_stimulus: str
    seed: int
    y_true: np.ndarray
    y_pred: np.ndarray
    speakers: np.ndarray
    clips: pd.Index
    partition_clips: int  # test clips the five folds' splits hold in the full partition
    complete: bool  # every run scored its whole split (and trained on all its training clips)


def _stack(frames: list) -> pd.DataFrame:
    return pd.concat(frames).sort_index()


def _binary(run: Run) -> np.ndarray:
    from s3prl_stimulus.metrics import binarize

    return binarize(run.probs.to_numpy())


def pooled_predictions(runs: list, test: str) -> Optional[tuple]:
    """(y_true, y_pred, speakers, clips) over the runs' folds, or None when a fold lacks ``test``."""
    if any(test not in r.targets for r in runs):
        return None
    probs = _stack([r.probs for r in runs])
    if probs.index.duplicated().any():
        raise StimulusError(f"clip {probs.index[probs.index.duplicated()][0]!r} is in the test predictions of two folds "
                            f"of {runs[0].system} / {runs[0].train_stimulus}: check the runs' fold metadata")
    targets = _stack([r.targets[test] for r in runs]).loc[probs.index]
    speakers = _stack([r.speakers.to_frame() for r in runs]).loc[probs.index].iloc[:, 0]
    from s3prl_stimulus.metrics import binarize

    return targets.to_numpy(), binarize(probs.to_numpy()), speakers.to_numpy(), probs.index


def _groups(study: Study) -> dict:
    """(system, train, seed) -> its runs, by fold."""
    groups = {}
    for run in study.runs:
        groups.setdefault((run.system, run.train_stimulus, run.seed), []).append(run)
    return {k: sorted(v, key=lambda r: r.fold) for k, v in groups.items()}


def pool_all(study: Study) -> tuple[list, pd.DataFrame]:
    """Every complete-five-fold pooled scoring, and every per-fold macro-F1 (complete or not)."""
    from s3prl_stimulus.metrics import macro_f1

    pooled, per_fold = [], []
    for (system, train, seed), runs in _groups(study).items():
        complete = [r.fold for r in runs] == list(FOLDS)
        for test in study.test_stimuli:
            for run in runs:
                if test in run.targets:
                    f1 = macro_f1(run.targets[test].to_numpy(), _binary(run))
                    stored = (run.json_scores.get(test) or {}).get("macro_f1")
                    per_fold.append((system, train, test, seed, run.fold, f1, stored, len(run.probs),
                                     run.partition_clips, run.complete, str(run.results_file)))
            data = pooled_predictions(runs, test) if complete else None
            if data is not None:
                coverage = (sum(r.partition_clips for r in runs), all(r.complete for r in runs))
                pooled.append(Pooled(system, train, test, seed, *data, *coverage))
    per_fold = pd.DataFrame(per_fold, columns=["system", "train_stimulus", "test_stimulus", "seed", "fold",
                                               "macro_f1", "json_macro_f1", "n_clips", "partition_clips", "complete",
                                               "results_file"])
    return pooled, per_fold


_PAIRS_PER_PASS = 32  # scorings bootstrapped together: bounds memory at 32 x clips x 18 float64


def bootstrap_all(pooled: list, settings: ScoreSettings) -> list:
    """Bootstrap macro-F1 values [num_bootstraps] of every scoring.

    A resample depends only on the clips (and speakers), the number of bootstraps and the seed, so
    scorings of the same clip set are resampled once and scored together
    (:func:`s3prl_stimulus.metrics.bootstrap_values`); each row equals what
    :func:`~s3prl_stimulus.metrics.bootstrap_ci` and :func:`~s3prl_stimulus.metrics.paired_bootstrap`
    compute for that scoring alone.
    """
    from s3prl_stimulus.metrics import bootstrap_values, macro_f1

    by_clips = {}
    for k, item in enumerate(pooled):
        by_clips.setdefault(tuple(item.clips), []).append(k)
    values = [None] * len(pooled)
    for members in by_clips.values():
        conditions = pooled[members[0]].speakers if settings.by_speaker else None
        for start in range(0, len(members), _PAIRS_PER_PASS):
            chunk = members[start:start + _PAIRS_PER_PASS]
            rows = bootstrap_values(macro_f1, [(pooled[k].y_true, pooled[k].y_pred) for k in chunk], conditions,
                                    settings.num_bootstraps, settings.seed)
            for k, row in zip(chunk, rows):
                values[k] = row
    return values


def score_table(pooled: list, values: list, settings: ScoreSettings) -> pd.DataFrame:
    """One row per pooled scoring: macro-F1, its percentile CI, clips and per-class F1."""
    from s3prl_stimulus.metrics import macro_f1, per_class_f1, percentile_interval

    rows = []
    for item, row in zip(pooled, values):
        low, high = percentile_interval(row, settings.alpha)
        rows.append((item.system, item.train_stimulus, item.test_stimulus, item.seed,
                     macro_f1(item.y_true, item.y_pred), low, high, len(item.clips), item.partition_clips,
                     item.complete, *per_class_f1(item.y_true, item.y_pred).values()))
    return pd.DataFrame(rows, columns=["system", "train_stimulus", "test_stimulus", "seed", "macro_f1",
                                       "ci_low", "ci_high", "n_clips", "partition_clips", "complete", *CLASSES])


@dataclass(frozen=True)
class Cell:
    """One (system, train, test) entry of a table, aggregated over seeds; ``value`` NaN when missing."""

    value: float = math.nan
    low: float = math.nan
    high: float = math.nan
    seed_std: float = math.nan
    n_seeds: int = 0
    fold_mean: float = math.nan
    fold_std: float = math.nan
    n_folds: int = 0
    per_class: tuple = ()
    complete: bool = True  # False: built from a run on part of the corpus (tables mark it)
    n_clips: int = 0  # test clips its runs scored (the seed with the fewest)
    partition_clips: int = 0  # test clips the same folds hold in the full partition

    @property
    def missing(self) -> bool:
        return self.n_seeds == 0


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


def _coverage(folds: Optional[pd.DataFrame]) -> dict:
    """A cell's completeness from its per-fold rows: clips of the seed that scored fewest, and its partition's."""
    if folds is None:
        return {}
    per_seed = folds.groupby("seed")[["n_clips", "partition_clips"]].sum().sort_values("n_clips")
    return dict(complete=bool(folds["complete"].all()), n_clips=int(per_seed["n_clips"].iloc[0]),
                partition_clips=int(per_seed["partition_clips"].iloc[0]))


def aggregate(scores: pd.DataFrame, per_fold: pd.DataFrame) -> dict:
    """(system, train, test) -> :class:`Cell`: mean ± sample std over seeds; CI when one seed."""
    cells = {}
    keys = ["system", "train_stimulus", "test_stimulus"]
    fold_groups = dict(list(per_fold.groupby(keys)))
    seed_groups = dict(list(scores.groupby(keys)))
    for key in set(fold_groups) | set(seed_groups):
        folds = fold_groups.get(key)
        fold_values = folds["macro_f1"].to_numpy() if folds is not None else np.array([])
        fold_part = dict(fold_mean=float(fold_values.mean()) if len(fold_values) else math.nan,
                         fold_std=_std(fold_values), n_folds=len(fold_values), **_coverage(folds))
        seeds = seed_groups.get(key)
        if seeds is None:
            cells[key] = Cell(**fold_part)
            continue
        values = seeds["macro_f1"].to_numpy()
        single = len(seeds) == 1
        cells[key] = Cell(
            value=float(values.mean()), low=float(seeds["ci_low"].iloc[0]) if single else math.nan,
            high=float(seeds["ci_high"].iloc[0]) if single else math.nan, seed_std=_std(values),
            n_seeds=len(seeds), per_class=tuple(float(seeds[c].mean()) for c in CLASSES), **fold_part,
        )
    return cells


def _compare(a: Pooled, b: Pooled, values_a, values_b, settings: ScoreSettings) -> tuple:
    """(F1 A, F1 B, difference, CI, p, clips) of metrics.paired_bootstrap for A vs B."""
    from s3prl_stimulus.metrics import bootstrap_p_value, macro_f1, paired_bootstrap, percentile_interval

    if a.clips.equals(b.clips):  # same clips: reuse the shared resamples (identical to paired_bootstrap)
        if not np.array_equal(a.y_true, b.y_true):
            raise StimulusError(f"{a.system}: the {a.test_stimulus} targets of the runs trained on {a.train_stimulus} "
                                f"and {b.train_stimulus} differ for the same clips; were they built from different votes?")
        f1_a, f1_b = macro_f1(a.y_true, a.y_pred), macro_f1(b.y_true, b.y_pred)
        differences = values_a - values_b
        return f1_a, f1_b, f1_a - f1_b, percentile_interval(differences, settings.alpha), \
            bootstrap_p_value(differences), len(a.clips)
    common = a.clips.intersection(b.clips)  # runs that scored different clips: compare on the shared ones
    ia, ib = a.clips.get_indexer(common), b.clips.get_indexer(common)
    result = paired_bootstrap(macro_f1, a.y_true[ia], a.y_pred[ia], b.y_pred[ib],
                              conditions=a.speakers[ia] if settings.by_speaker else None,
                              num_bootstraps=settings.num_bootstraps, alpha=settings.alpha, seed=settings.seed)
    return result.value_a, result.value_b, result.difference, result.ci, result.p_value, len(common)


def paired_tests(pooled: list, values: list, settings: ScoreSettings) -> pd.DataFrame:
    """Training label sets compared on each test set: macro-F1(A) − macro-F1(B), CI, p, Holm p."""
    index = {(p.system, p.test_stimulus, p.seed, p.train_stimulus): k for k, p in enumerate(pooled)}
    families = sorted({(p.system, p.test_stimulus, p.seed) for p in pooled},
                      key=lambda f: (f[0], STIMULI.index(f[1]), f[2]))
    rows = []
    for system, test, seed in families:
        trains = [t for t in STIMULI if (system, test, seed, t) in index]
        for a, b in itertools.combinations(trains, 2):
            ka, kb = index[(system, test, seed, a)], index[(system, test, seed, b)]
            f1_a, f1_b, difference, ci, p, n = _compare(pooled[ka], pooled[kb], values[ka], values[kb], settings)
            complete = pooled[ka].complete and pooled[kb].complete
            rows.append((system, test, a, b, seed, f1_a, f1_b, difference, ci[0], ci[1], p, n, complete))
    frame = pd.DataFrame(rows, columns=["system", "test_stimulus", "train_a", "train_b", "seed", "macro_f1_a",
                                        "macro_f1_b", "difference", "ci_low", "ci_high", "p_value", "n_clips", "complete"])
    frame["p_holm"] = (frame.groupby(["system", "test_stimulus", "seed"])["p_value"].transform(holm)
                       if len(frame) else pd.Series(dtype=np.float64))
    return frame


def holm(p_values: pd.Series) -> pd.Series:
    """Holm–Bonferroni adjusted p-values of one family of tests."""
    p = p_values.to_numpy(dtype=np.float64)
    order = np.argsort(p, kind="stable")
    m = len(p)
    adjusted = np.minimum(1.0, np.maximum.accumulate((m - np.arange(m)) * p[order]))
    result = np.empty(m)
    result[order] = adjusted
    return pd.Series(result, index=p_values.index)
