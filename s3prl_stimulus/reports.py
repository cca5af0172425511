"""The paper's tables and figures from a tree of finished runs (either training path).

A run is found by its ``results-test-dev-best.json`` (schema 1, see docs/design.md); its metadata
(path, upstream, train stimulus, fold, seed, votes) is read from that JSON, never from directory
names, and its predictions from the sibling ``predictions-test-dev-best.csv``. Scoring follows the
paper: for each (upstream, train stimulus, test stimulus) the five folds' test predictions are
pooled, so every clip is scored once, and corpus-level macro-F1 (with a percentile-bootstrap 95 %
interval; speakers resampled, then their clips, like the downstream's default ``evalrc``) and
per-class F1 come from :mod:`s3prl_stimulus.metrics` on the binarised predictions (softmax > 1/C)
against the run's own binary targets. The mean ± std of the five per-fold scores
is shown alongside. With several seeds, every seed is pooled and scored on its own, and tables show
the mean ± sample std over seeds (the per-seed numbers and intervals are in ``scores.csv``).

A pooled score needs all five folds: a missing fold (or a predictions file without a test
stimulus's targets) makes the cell *missing* -- never zero -- and the run is listed in
``missing_runs.csv`` and ``index.md``.

Outputs (:func:`write_report`): Table II (agreement, from :mod:`s3prl_stimulus.agreement` for the
runs' votes source), Table III (upstream x train stimulus on the matched test set, best per row in
bold, rows by best macro-F1 descending), Table IV (train x test for one upstream, with CI, plus its
per-class F1), paired bootstrap tests between training label sets on each test set
(:func:`s3prl_stimulus.metrics.paired_bootstrap`, with Holm-adjusted p-values per family), each as
markdown, CSV and LaTeX (booktabs); Fig. 2 (layer weights per train stimulus, averaged over folds),
a cross-testing heatmap and per-class F1 bars as PNG and PDF; ``index.md`` linking everything.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import atomic_path, write_csv_atomic, write_text_atomic
from s3prl_stimulus.partition import FOLDS, split_clips
from s3prl_stimulus.results import FINAL_PREDICTIONS as PREDICTIONS_FILE, FINAL_RESULTS as RESULTS_FILE

LAYER_WEIGHTS_FILE = "layer_weights.json"
SCHEMA = 1
REQUIRED_KEYS = ("schema", "path", "upstream", "fold", "train_stimulus", "votes", "seed", "split")
FIGURE_INCHES = (6.4, 4.8)
FIGURE_DPI = 100
FIGURE_PIXELS = (640, 480)  # width, height: FIGURE_INCHES x FIGURE_DPI, saved without tight cropping
JSON_TOLERANCE = 1e-6


# --- runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    """One finished (upstream, train stimulus, fold, seed) run and its test-set predictions."""

    path: str
    upstream: str
    upstream_ckpt: Optional[str]
    train_stimulus: str
    fold: int
    seed: int
    votes: str
    results_file: Path
    json_scores: dict  # test stimulus -> {"macro_f1": ..., ...} as written by the run
    probs: pd.DataFrame  # index clip, CLASSES columns
    targets: dict  # test stimulus -> DataFrame index clip, CLASSES columns, 0/1
    speakers: pd.Series  # index clip
    layer_weights: Optional[tuple] = None
    system: str = ""  # display name, set once every run is known (upstream, plus path when ambiguous)


def _fail(where: Path, what: str, fix: str) -> StimulusError:
    return StimulusError(f"{where}: {what}; {fix}")


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise _fail(path, f"unreadable JSON ({err})", "delete it and rerun that run's evaluation") from None
    if not isinstance(obj, dict):
        raise _fail(path, "not a JSON object", "delete it and rerun that run's evaluation")
    return obj


def _metadata(path: Path, obj: dict) -> dict:
    missing = [k for k in REQUIRED_KEYS if k not in obj]
    if missing:
        raise _fail(path, f"lacks key(s) {', '.join(missing)}", f"write results in schema {SCHEMA} (docs/design.md)")
    if obj["schema"] != SCHEMA:
        raise _fail(path, f"schema {obj['schema']!r}, this version reads schema {SCHEMA}", "upgrade s3prl-stimulus")
    if obj["split"] != "test":
        raise _fail(path, f"split {obj['split']!r}, expected 'test'", "point the report at test-set results")
    if obj["train_stimulus"] not in STIMULI:
        raise _fail(path, f"unknown train_stimulus {obj['train_stimulus']!r}", f"use one of {', '.join(STIMULI)}")
    if obj["fold"] not in FOLDS or isinstance(obj["fold"], bool):
        raise _fail(path, f"fold {obj['fold']!r} is not one of 1-5", "fix the results file")
    if not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool):
        raise _fail(path, f"seed {obj['seed']!r} is not an integer", "fix the results file")
    return obj


def _read_predictions(path: Path, fold: int) -> tuple[pd.DataFrame, dict, pd.Series]:
    if not path.is_file():
        raise _fail(path, "missing beside its results JSON", "rerun that run's evaluation (it writes both files)")
    try:
        frame = pd.read_csv(path, dtype={"clip": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise _fail(path, f"unreadable CSV ({err})", "rerun that run's evaluation") from None
    missing = [c for c in ("clip", "speaker", *CLASSES) if c not in frame.columns]
    if missing:
        raise _fail(path, f"lacks column(s) {', '.join(missing)}", "write predictions in the schema of docs/design.md")
    if frame["clip"].duplicated().any():
        raise _fail(path, f"clip {frame['clip'][frame['clip'].duplicated()].iloc[0]!r} appears twice", "rerun evaluation")
    frame = frame.set_index("clip")
    outside = frame.index.difference(split_clips(fold, "test"))
    if len(outside):
        raise _fail(path, f"{len(outside)} clip(s) such as {outside[0]!r} are not in fold {fold}'s test split",
                    "the JSON's fold does not match these predictions; rerun evaluation for that fold")
    probs = frame[list(CLASSES)].astype(np.float64)
    if not np.isfinite(probs.to_numpy()).all():
        raise _fail(path, "non-finite probabilities", "rerun evaluation")
    targets = {}
    for stimulus in STIMULI:
        columns = [f"{stimulus}_{c}" for c in CLASSES]
        if all(c in frame.columns for c in columns):
            block = frame[columns]
            if not block.isin((0, 1)).all().all():
                raise _fail(path, f"{stimulus} targets are not all 0/1", "rerun evaluation")
            targets[stimulus] = block.set_axis(list(CLASSES), axis=1).astype(np.int64)
    return probs, targets, frame["speaker"]


def _read_layer_weights(results_file: Path, meta: dict, notes: list) -> Optional[tuple]:
    path = results_file.with_name(LAYER_WEIGHTS_FILE)
    if not path.is_file():
        return None
    obj = _read_json(path)
    for key in ("upstream", "fold", "train_stimulus"):
        if obj.get(key) != meta[key]:
            notes.append(f"{path}: {key} {obj.get(key)!r} differs from its results JSON ({meta[key]!r}); ignored")
            return None
    weights = obj.get("weights")
    if not isinstance(weights, list) or not weights or not all(isinstance(w, (int, float)) for w in weights):
        notes.append(f"{path}: 'weights' is not a list of numbers; ignored")
        return None
    if abs(sum(weights) - 1.0) > 1e-3:
        notes.append(f"{path}: weights sum to {sum(weights):.4f}, not 1; ignored")
        return None
    return tuple(float(w) for w in weights)


def read_run(results_file: str | os.PathLike, notes: Optional[list] = None) -> Run:
    """Load one run from its results JSON and the sibling predictions CSV (and layer weights)."""
    results_file = Path(results_file)
    notes = [] if notes is None else notes
    meta = _metadata(results_file, _read_json(results_file))
    probs, targets, speakers = _read_predictions(results_file.with_name(PREDICTIONS_FILE), meta["fold"])
    return Run(
        path=str(meta["path"]), upstream=str(meta["upstream"]),
        upstream_ckpt=None if meta.get("upstream_ckpt") is None else str(meta["upstream_ckpt"]),
        train_stimulus=meta["train_stimulus"],
        fold=int(meta["fold"]), seed=int(meta["seed"]), votes=str(meta["votes"]), results_file=results_file,
        json_scores=dict(meta.get("test_stimuli") or {}), probs=probs, targets=targets, speakers=speakers,
        layer_weights=_read_layer_weights(results_file, meta, notes),
    )


def find_runs(root: str | os.PathLike, notes: Optional[list] = None) -> list[Run]:
    """Every run under ``root`` (found by walking for ``results-test-dev-best.json``)."""
    root = Path(root)
    if not root.is_dir():
        raise StimulusError(f"results directory {root} does not exist: pass the expdir root holding the runs")
    files = sorted(root.rglob(RESULTS_FILE))
    if not files:
        raise StimulusError(f"no {RESULTS_FILE} under {root}: evaluate the dev-best checkpoints first (-m evaluate)")
    return [read_run(f, notes) for f in files]


# --- study: which runs are compared -------------------------------------------------------------


@dataclass
class Study:
    runs: list
    systems: list  # display names, first-seen order (tables re-sort)
    train_stimuli: list
    test_stimuli: list
    seeds: dict  # system -> sorted seeds
    votes: str
    missing: pd.DataFrame  # system, train_stimulus, fold, seed, test_stimulus, reason


def _select(runs: list, votes: Optional[str], path: Optional[str]) -> list:
    if path is not None:
        runs = [r for r in runs if r.path == path]
        if not runs:
            raise StimulusError(f"no runs from the {path!r} training path: drop --path or choose another")
    sources = sorted({r.votes for r in runs})
    if votes is not None:
        runs = [r for r in runs if r.votes == votes]
        if not runs:
            raise StimulusError(f"no runs with votes {votes!r}; found: {', '.join(sources)}")
    elif len(sources) > 1:
        raise StimulusError(f"runs use several vote sources ({', '.join(sources)}): choose one with --votes")
    return runs


def _name_systems(runs: list) -> list:
    """Name each run's system by its upstream, adding the checkpoint's stem when one upstream name was run
    with several checkpoints (e.g. ``wavlm_local -k``) and the path when both paths ran it."""
    paths, ckpts = {}, {}
    for run in runs:
        paths.setdefault(run.upstream, set()).add(run.path)
        ckpts.setdefault(run.upstream, set()).add(run.upstream_ckpt)
    named = []
    for run in runs:
        name = run.upstream
        if len(ckpts[run.upstream]) > 1:
            name += f"[{Path(run.upstream_ckpt).stem if run.upstream_ckpt else 'default'}]"
        if len(paths[run.upstream]) > 1:
            name += f" ({run.path})"
        named.append(replace(run, system=name))
    return named


def _check_duplicates(runs: list) -> None:
    seen = {}
    for run in runs:
        key = (run.system, run.train_stimulus, run.fold, run.seed)
        if key in seen:
            raise StimulusError(
                f"two results for {run.system} / train {run.train_stimulus} / fold {run.fold} / seed {run.seed}: "
                f"{seen[key]} and {run.results_file}; remove one or point the report at a narrower directory"
            )
        seen[key] = run.results_file


def _ordered(stimuli) -> list:
    present = set(stimuli)
    return [s for s in STIMULI if s in present]


def _missing_runs(runs: list, systems: list, trains: list, tests: list, seeds: dict) -> pd.DataFrame:
    have = {(r.system, r.train_stimulus, r.fold, r.seed): r for r in runs}
    rows = []
    for system in systems:
        for train, seed, fold in itertools.product(trains, seeds[system], FOLDS):
            run = have.get((system, train, fold, seed))
            if run is None:
                rows.append((system, train, fold, seed, "", f"no {RESULTS_FILE}"))
                continue
            for test in tests:
                if test not in run.targets:
                    rows.append((system, train, fold, seed, test, f"predictions lack {test} targets (not cross-tested)"))
    return pd.DataFrame(rows, columns=["system", "train_stimulus", "fold", "seed", "test_stimulus", "reason"])


def build_study(runs: list, votes: Optional[str] = None, path: Optional[str] = None) -> Study:
    """Select runs (one votes source; optionally one path), name systems, list missing runs."""
    runs = _name_systems(_select(runs, votes, path))
    _check_duplicates(runs)
    systems = list(dict.fromkeys(r.system for r in runs))
    trains = _ordered(r.train_stimulus for r in runs)
    tests = _ordered(s for r in runs for s in r.targets)
    seeds = {s: sorted({r.seed for r in runs if r.system == s}) for s in systems}
    missing = _missing_runs(runs, systems, trains, tests, seeds)
    return Study(runs, systems, trains, tests, seeds, runs[0].votes, missing)


# --- scoring ------------------------------------------------------------------------------------


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
                    per_fold.append((system, train, test, seed, run.fold, f1, stored, str(run.results_file)))
            data = pooled_predictions(runs, test) if complete else None
            if data is not None:
                pooled.append(Pooled(system, train, test, seed, *data))
    per_fold = pd.DataFrame(per_fold, columns=["system", "train_stimulus", "test_stimulus", "seed", "fold",
                                               "macro_f1", "json_macro_f1", "results_file"])
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
                     macro_f1(item.y_true, item.y_pred), low, high, len(item.clips),
                     *per_class_f1(item.y_true, item.y_pred).values()))
    return pd.DataFrame(rows, columns=["system", "train_stimulus", "test_stimulus", "seed", "macro_f1",
                                       "ci_low", "ci_high", "n_clips", *CLASSES])


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

    @property
    def missing(self) -> bool:
        return self.n_seeds == 0


def _std(values: np.ndarray) -> float:
    return float(np.std(values, ddof=1)) if len(values) > 1 else math.nan


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
                         fold_std=_std(fold_values), n_folds=len(fold_values))
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
            rows.append((system, test, a, b, seed, f1_a, f1_b, difference, ci[0], ci[1], p, n))
    frame = pd.DataFrame(rows, columns=["system", "test_stimulus", "train_a", "train_b", "seed", "macro_f1_a",
                                        "macro_f1_b", "difference", "ci_low", "ci_high", "p_value", "n_clips"])
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


# --- the report ---------------------------------------------------------------------------------


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
        raise StimulusError(f"upstream {upstream!r} has runs from several paths ({', '.join(matches)}): "
                            "pass one of these names to --upstream, or select a path with --path")
    raise StimulusError(f"no runs for upstream {upstream!r}; found: {', '.join(study.systems)}")


def _json_disagreements(per_fold: pd.DataFrame, notes: list) -> None:
    stored = per_fold.dropna(subset=["json_macro_f1"])
    off = stored[(stored["macro_f1"] - stored["json_macro_f1"]).abs() > JSON_TOLERANCE]
    for row in off.itertuples():
        notes.append(f"{row.results_file}: stored {row.test_stimulus} macro-F1 {row.json_macro_f1:.6f} differs from "
                     f"its predictions CSV ({row.macro_f1:.6f}); the report uses the CSV")


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
    _json_disagreements(per_fold, notes)
    values = bootstrap_all(pooled, settings)
    scores = score_table(pooled, values, settings)
    report = Report(Path(results_dir), study, settings, scores, per_fold, aggregate(scores, per_fold),
                    paired_tests(pooled, values, settings), _agreement(study.votes, notes), "", notes)
    report.chosen = _choose(study, upstream, report.ranking())
    return report


# --- tables: cells and renderers ----------------------------------------------------------------


@dataclass(frozen=True)
class Table:
    """A table in display form (``cells``: strings for markdown, ``latex``: the same in LaTeX) and numbers."""

    stem: str
    title: str
    cells: pd.DataFrame
    latex: pd.DataFrame
    numbers: pd.DataFrame
    notes: tuple = ()


def _fmt(value: float, decimals: int) -> str:
    return f"{value:.{decimals}f}"


def score_text(cell: Cell, decimals: int, latex: bool = False) -> str:
    """``0.652 [0.641, 0.663]`` (one seed) or ``0.652 ± 0.004 (3 seeds)``; ``missing`` when absent."""
    if cell.missing:
        return "missing"
    pm = r"$\pm$" if latex else "±"
    if cell.n_seeds == 1:
        return f"{_fmt(cell.value, decimals)} [{_fmt(cell.low, decimals)}, {_fmt(cell.high, decimals)}]"
    return f"{_fmt(cell.value, decimals)} {pm} {_fmt(cell.seed_std, decimals)} ({cell.n_seeds} seeds)"


def folds_text(cell: Cell, decimals: int, latex: bool = False) -> str:
    if cell.n_folds == 0:
        return "missing"
    pm = r"$\pm$" if latex else "±"
    std = "n/a" if math.isnan(cell.fold_std) else _fmt(cell.fold_std, decimals)
    expected = len(FOLDS) * max(cell.n_seeds, 1)
    partial = "" if cell.n_folds >= expected and not cell.missing else f" ({cell.n_folds} folds)"
    return f"{_fmt(cell.fold_mean, decimals)} {pm} {std}{partial}"


def _bold(text: str, latex: bool) -> str:
    return rf"\textbf{{{text}}}" if latex else f"**{text}**"


def _cell_numbers(prefix: str, cell: Cell) -> dict:
    return {f"{prefix}macro_f1": cell.value, f"{prefix}ci_low": cell.low, f"{prefix}ci_high": cell.high,
            f"{prefix}seed_std": cell.seed_std, f"{prefix}n_seeds": cell.n_seeds, f"{prefix}fold_mean": cell.fold_mean,
            f"{prefix}fold_std": cell.fold_std, f"{prefix}n_folds": cell.n_folds}


def _best(values: dict) -> Optional[str]:
    present = {k: v for k, v in values.items() if not math.isnan(v)}
    return max(present, key=present.get) if present else None


def table3(report: Report, decimals: int) -> Table:
    trains = report.study.train_stimuli
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
        "table3_matched", "Table III: macro-F1 on the matched test set (train S, test S), union of the five folds",
        _frame(md, "upstream"), _escaped_index(_frame(tex, "upstream")), pd.DataFrame(numbers),
        ("Bold: best training label set per row. Rows: best macro-F1, descending.",) + _cell_legend(report),
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
        f"table4_cross_{slug(system)}", f"Table IV: cross-testing macro-F1 of {system} (rows: train, columns: test)",
        _frame(md, "train / test"), _frame(tex, "train / test"), pd.DataFrame(numbers),
        ("Bold: best training label set for each test set.",) + _cell_legend(report),
    )


def table4_per_class(report: Report, decimals: int) -> Table:
    system = report.chosen
    md, numbers = {}, []
    for s, t in itertools.product(report.study.train_stimuli, report.study.test_stimuli):
        cell = report.cell(system, s, t)
        label = f"{s} → {t}"
        values = dict(zip(CLASSES, cell.per_class)) if cell.per_class else {}
        md[label] = {c: _fmt(values[c], decimals) if c in values else "missing" for c in CLASSES}
        md[label]["macro-F1"] = "missing" if cell.missing else _fmt(cell.value, decimals)
        numbers.append({"train_stimulus": s, "test_stimulus": t, "n_seeds": cell.n_seeds, "macro_f1": cell.value,
                        **{c: values.get(c, math.nan) for c in CLASSES}})
    cells = _frame(md, "train → test")
    latex = cells.rename(index=lambda x: x.replace("→", r"$\rightarrow$"))
    latex.index.name = r"train $\rightarrow$ test"
    return Table(f"table4_per_class_{slug(system)}", f"Per-class F1 of {system} (pooled test predictions)",
                 cells, latex, pd.DataFrame(numbers), ("Mean over seeds when several.",))


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
        common = [row.system, row.test_stimulus, f"{row.train_a} − {row.train_b}", str(row.seed),
                  _fmt(row.macro_f1_a, decimals), _fmt(row.macro_f1_b, decimals), f"{row.difference:+.{decimals}f}",
                  f"[{row.ci_low:+.{decimals}f}, {row.ci_high:+.{decimals}f}]", f"{row.p_value:.3f}", f"{row.p_holm:.3f}"]
        md.append(common)
        tex.append(common[:2] + [f"{row.train_a} $-$ {row.train_b}"] + common[3:])
    columns = ["upstream", "test", "train A − train B", "seed", "F1 A", "F1 B", "difference", "CI", "p", "p (Holm)"]
    cells = pd.DataFrame(md, columns=columns).set_index("upstream")
    latex = _escaped_index(pd.DataFrame(tex, columns=columns).set_index("upstream"))
    latex.columns = [c.replace("−", "$-$") for c in latex.columns]
    unit = "speakers" if report.settings.by_speaker else "clips"
    return Table("paired_tests", "Paired bootstrap tests between training label sets on each test set", cells, latex,
                 frame, (f"difference = macro-F1(A) − macro-F1(B) on the clips both score, {report.settings.num_bootstraps} "
                         f"paired resamples of {unit}; p two-sided; Holm adjusts over the pairs of one upstream, "
                         "test set and seed.",))


# --- writers ------------------------------------------------------------------------------------

_LATEX_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "#": r"\#", "_": r"\_", "{": r"\{", "}": r"\}",
                  "~": r"\textasciitilde{}", "^": r"\textasciicircum{}", "$": r"\$"}


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


# --- figures ------------------------------------------------------------------------------------


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.figure(figsize=FIGURE_INCHES, dpi=FIGURE_DPI, layout="constrained")


def save_figure(fig, stem: Path) -> list:
    """PNG and PDF at the fixed size (no tight bbox: the PNG is exactly FIGURE_PIXELS)."""
    import matplotlib.pyplot as plt

    paths = []
    for ext in ("png", "pdf"):
        target = stem.with_suffix(f".{ext}")
        with atomic_path(target) as tmp:
            fig.savefig(tmp, format=ext, dpi=FIGURE_DPI)
        paths.append(target)
    plt.close(fig)
    return paths


def layer_weight_means(report: Report, system: str) -> dict:
    """train stimulus -> (mean, std, n) over folds (and seeds) of the learned layer weights."""
    result = {}
    for train in report.study.train_stimuli:
        weights = [r.layer_weights for r in report.study.runs
                   if r.system == system and r.train_stimulus == train and r.layer_weights is not None]
        if not weights:
            continue
        if len({len(w) for w in weights}) > 1:
            report.notes.append(f"{system} / {train}: layer weights of different lengths; not plotted")
            continue
        array = np.array(weights)
        result[train] = (array.mean(axis=0), array.std(axis=0), len(weights))
    return result


def figure_layer_weights(report: Report, system: str, out: Path) -> list:
    means = layer_weight_means(report, system)
    if not means:
        return []
    if all(len(m[0]) < 2 for m in means.values()):
        report.notes.append(f"Fig. 2 not drawn for {system}: its featurizer has a single layer")
        return []
    from matplotlib.ticker import MaxNLocator

    fig = _figure()
    ax = fig.add_subplot()
    for train, (mean, std, n) in means.items():
        layers = np.arange(len(mean))
        ax.plot(layers, mean, marker="o", markersize=3, label=f"{train} ({n} runs)")
        ax.fill_between(layers, mean - std, mean + std, alpha=0.1)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layer (0 = CNN / input features)")
    ax.set_ylabel("softmax weight (mean ± std over folds)")
    ax.set_title(f"Fig. 2: learned layer weights, {system}")
    fig.legend(title="train stimulus", loc="outside right upper", fontsize="small")
    return save_figure(fig, out / f"fig2_layer_weights_{slug(system)}")


def figure_heatmap(report: Report, out: Path) -> list:
    system, trains, tests = report.chosen, report.study.train_stimuli, report.study.test_stimuli
    values = np.array([[report.cell(system, s, t).value for t in tests] for s in trains])
    fig = _figure()
    ax = fig.add_subplot()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto")
    ax.set_facecolor("0.85")  # missing cells show as grey, labelled below
    for (i, j), v in np.ndenumerate(values):
        text = "missing" if math.isnan(v) else f"{v:.3f}"
        ax.text(j, i, text, ha="center", va="center", color="black" if math.isnan(v) else "white")
    ax.set_xticks(range(len(tests)), tests)
    ax.set_yticks(range(len(trains)), trains)
    ax.set_xlabel("test label set")
    ax.set_ylabel("train label set")
    ax.set_title(f"Cross-testing macro-F1, {system}")
    fig.colorbar(image, ax=ax, label="macro-F1")
    return save_figure(fig, out / f"cross_test_heatmap_{slug(system)}")


def figure_per_class(report: Report, out: Path) -> list:
    system, trains = report.chosen, report.study.train_stimuli
    fig = _figure()
    ax = fig.add_subplot()
    width = 0.8 / max(len(trains), 1)
    positions = np.arange(len(CLASSES))
    for k, train in enumerate(trains):
        cell = report.cell(system, train, train)
        label = f"train {train} / test {train}" + (" (missing)" if cell.missing else "")
        if cell.missing:  # no bar at all (a zero-height bar would read as F1 = 0); the legend says missing
            ax.bar([], [], width, label=label)
            continue
        ax.bar(positions + (k - (len(trains) - 1) / 2) * width, np.array(cell.per_class), width, label=label)
    ax.set_xticks(positions, CLASSES)
    ax.set_ylim(0, 1)
    ax.set_ylabel("F1 (pooled test predictions)")
    ax.set_title(f"Per-class F1 on the matched test set, {system}")
    fig.legend(loc="outside lower center", ncols=2, fontsize="small")
    return save_figure(fig, out / f"per_class_f1_{slug(system)}")


# --- index and driver ---------------------------------------------------------------------------


def _link(path: Path, out: Path) -> str:
    return f"[{path.name}]({path.relative_to(out).as_posix()})"


def _index(report: Report, out: Path, tables: list, figures: dict, extra: list) -> str:
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
    if any(n > 1 for n in n_seeds.values()):
        lines.append("- several seeds: " + ", ".join(f"{s}: {n}" for s, n in n_seeds.items())
                     + "; each seed is scored on its own and tables show mean ± sample std over seeds")
    lines += ["", "## Tables", ""]
    for table, paths in tables:
        lines.append(f"- {table.title}: " + " · ".join(_link(p, out) for p in paths))
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
    figures = {}
    for system in report.ranking():
        paths = figure_layer_weights(report, system, out)
        if paths:
            figures[f"Fig. 2: layer weights, {system}"] = paths
    figures[f"Cross-testing heatmap, {report.chosen}"] = figure_heatmap(report, out)
    figures[f"Per-class F1, {report.chosen}"] = figure_per_class(report, out)
    extra = []
    for name, frame in (("scores.csv", report.pooled), ("fold_scores.csv", report.per_fold),
                        ("missing_runs.csv", report.study.missing)):
        write_csv_atomic(out / name, frame, float_format="%.6f")
        extra.append(out / name)
    index = out / "index.md"
    write_text_atomic(index, _index(report, out, written, figures, extra))
    return index


def make_report(results_dir, out_dir, *, decimals: int = 3, **kwargs) -> Report:
    """:func:`build_report` then :func:`write_report`."""
    report = build_report(results_dir, **kwargs)
    write_report(report, out_dir, decimals)
    return report
