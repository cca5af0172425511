"""Finished runs, read and checked, and the study: which of them one report compares.

A run is found by its ``results-test-dev-best.json`` (schema 1, see docs/design.md). Its metadata (path,
upstream, train stimulus, fold, seed, votes) comes from that JSON, never from directory names; its
test-set predictions and targets from the sibling ``predictions-test-dev-best.csv``; its learned layer
weights, when it wrote them, from ``layer_weights.json``. A file that cannot be read or contradicts its
run stops the report with the file and the fix named; layer weights that disagree with their run are
only noted and left out.

The study keeps the runs of one votes source (optionally of one training path), names each system
after its upstream (with the checkpoint and path when one name is ambiguous), and lists every
(system, train stimulus, fold, seed, test stimulus) without a usable run. Those are shown as *missing*
-- never zero -- in ``missing_runs.csv`` and ``index.md``.
"""

from __future__ import annotations

import itertools
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import FOLDS, split_clips
from s3prl_stimulus.results import FINAL_PREDICTIONS as PREDICTIONS_FILE, FINAL_RESULTS as RESULTS_FILE

LAYER_WEIGHTS_FILE = "layer_weights.json"
SCHEMA = 1
REQUIRED_KEYS = ("schema", "path", "upstream", "fold", "train_stimulus", "votes", "seed", "split")


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
    partition_clips: int = 0  # test clips of this fold in the full EMO-SUPERB partition
    complete: bool = True  # scored all of them (and, by its JSON, trained on every training clip): see _coverage


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


def _coverage(path: Path, meta: dict, n_scored: int) -> tuple[int, bool]:
    """(partition_clips, complete) of a run. Its predictions decide (results written before these fields
    existed have nothing else); a JSON's ``complete: false`` (e.g. trained on part of the corpus) is kept."""
    partition = len(split_clips(meta["fold"], "test"))
    complete = meta.get("complete", True)
    if not isinstance(complete, bool):
        raise _fail(path, f"complete {complete!r} is not true or false", "fix the results file")
    return partition, complete and n_scored == partition


def read_run(results_file: str | os.PathLike, notes: Optional[list] = None) -> Run:
    """Load one run from its results JSON and the sibling predictions CSV (and layer weights)."""
    results_file = Path(results_file)
    notes = [] if notes is None else notes
    meta = _metadata(results_file, _read_json(results_file))
    probs, targets, speakers = _read_predictions(results_file.with_name(PREDICTIONS_FILE), meta["fold"])
    partition_clips, complete = _coverage(results_file, meta, len(probs))
    return Run(
        path=str(meta["path"]), upstream=str(meta["upstream"]),
        upstream_ckpt=None if meta.get("upstream_ckpt") is None else str(meta["upstream_ckpt"]),
        train_stimulus=meta["train_stimulus"],
        fold=int(meta["fold"]), seed=int(meta["seed"]), votes=str(meta["votes"]), results_file=results_file,
        json_scores=dict(meta.get("test_stimuli") or {}), probs=probs, targets=targets, speakers=speakers,
        layer_weights=_read_layer_weights(results_file, meta, notes),
        partition_clips=partition_clips, complete=complete,
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
