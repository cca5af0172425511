"""Finished runs, read and checked, and the study: which of them one report compares.

A run is found by its ``results-test-dev-best.json`` (schema 1, see docs/design.md). Its metadata (path,
upstream, label, train stimulus, fold, seed, votes) comes from that JSON, never from directory names; its
test-set predictions and targets from the sibling ``predictions-test-dev-best.csv``; its learned layer
weights, when it wrote them, from ``layer_weights.json``. A file that cannot be read or contradicts its
run stops the report with the file and the fix named: among others, predictions that are not
distributions, that do not hold exactly the run's clips (:func:`_check_clips`), or whose macro-F1 is not
the one the JSON stores (:func:`_check_stored_scores`). Layer weights that disagree with their run are
only noted and left out.

The study keeps the runs of one votes source (optionally of one training path), names each system
after its label (``upstream_label``: the recipe's ``LABEL=``; else its upstream), with the checkpoint and
path when one label is ambiguous, and lists every (system, train stimulus, fold, seed, test stimulus)
without a usable run. Those are shown as *missing* -- never zero -- in ``missing_runs.csv`` and ``index.md``.
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
from s3prl_stimulus.metrics import binarize, macro_f1
from s3prl_stimulus.partition import FOLDS, split_clips
from s3prl_stimulus.results import FINAL_PREDICTIONS as PREDICTIONS_FILE, FINAL_RESULTS as RESULTS_FILE
from s3prl_stimulus.results import FINAL_LAYER_WEIGHTS, checked_probabilities

LAYER_WEIGHTS_FILE = FINAL_LAYER_WEIGHTS
SCHEMA = 1
REQUIRED_KEYS = ("schema", "path", "upstream", "fold", "train_stimulus", "votes", "seed", "split", "n_clips")
STORED_F1_TOLERANCE = 1e-6
"""How far a results JSON's macro-F1 may be from the one recomputed from its predictions CSV. Both come from
the same float64 probabilities (the CSV round-trips them), so they agree to rounding (~1e-16); one changed
prediction moves a fold's macro-F1 by far more (~1e-4 for a fold's ~1,500 clips)."""
RERUN = "rerun that run's evaluation (it writes both files)"


@dataclass(frozen=True)
class Run:
    """One finished (upstream, train stimulus, fold, seed) run and its test-set predictions."""

    path: str
    upstream: str
    upstream_label: str  # the recipe's LABEL (results JSON "upstream_label"); the upstream when absent
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
    system: str = ""  # display name, set once every run is known (label, plus checkpoint/path when ambiguous)
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
    _check_optional_fields(path, obj)
    return obj


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_optional_fields(path: Path, obj: dict) -> None:
    """Types of the fields whose meaning the report relies on (older results lack the last three)."""
    if not _is_count(obj["n_clips"]):
        raise _fail(path, f"n_clips {obj['n_clips']!r} is not a positive integer", RERUN)
    if not isinstance(obj.get("test_stimuli", {}), dict):
        raise _fail(path, "test_stimuli is not an object", RERUN)
    label = obj.get("upstream_label")
    if label is not None and (not isinstance(label, str) or not label.strip()):
        raise _fail(path, f"upstream_label {label!r} is not a name", "fix the results file or rerun that run")
    if "complete" in obj and not isinstance(obj["complete"], bool):
        raise _fail(path, f"complete {obj['complete']!r} is not true or false", RERUN)
    if "partition_clips" in obj and not _is_count(obj["partition_clips"]):
        raise _fail(path, f"partition_clips {obj['partition_clips']!r} is not a positive integer", RERUN)


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
    values, _ = checked_probabilities(frame, lambda row: f"{path}, line {row + 2} (clip {frame.index[row]})", RERUN)
    probs = pd.DataFrame(values, index=frame.index, columns=list(CLASSES))
    targets = {}
    for stimulus in STIMULI:
        columns = [f"{stimulus}_{c}" for c in CLASSES]
        if all(c in frame.columns for c in columns):
            block = frame[columns]
            if not block.isin((0, 1)).all().all():
                raise _fail(path, f"{stimulus} targets are not all 0/1", "rerun evaluation")
            targets[stimulus] = block.set_axis(list(CLASSES), axis=1).astype(np.int64)
    return probs, targets, frame["speaker"]


def _check_clips(path: Path, clips: pd.Index, results_file: Path, meta: dict) -> None:
    """The predictions hold exactly the run's clips: its results JSON's ``n_clips`` of them, all in its fold's
    test split (checked on reading), and all of that split unless the JSON says ``"complete": false`` (a run
    on part of the corpus, ``datarc.clips``). Results written before that field existed count as complete."""
    fold = meta["fold"]
    split = pd.Index(split_clips(fold, "test"))
    if len(clips) != meta["n_clips"]:
        raise _fail(path, f"holds {len(clips)} clip(s) but its results JSON says n_clips {meta['n_clips']}", RERUN)
    if meta.get("partition_clips", len(split)) != len(split):
        raise _fail(results_file, f"partition_clips {meta['partition_clips']}, but fold {fold}'s test split has "
                                  f"{len(split)} clips in this package's partition", f"{RERUN} with this version")
    if meta.get("complete", True) and len(clips) != len(split):
        said = "says complete" if "complete" in meta else "does not say the run used part of the corpus"
        raise _fail(path, f"holds {len(clips)} of fold {fold}'s {len(split)} test clips (e.g. not "
                          f"{split.difference(clips)[0]}) but its results JSON {said}", f"{RERUN} on the whole corpus")


def _check_stored_scores(results_file: Path, stored: dict, probs: pd.DataFrame, targets: dict) -> None:
    """Every macro-F1 the results JSON stores equals the one recomputed from the predictions CSV."""
    predicted = binarize(probs.to_numpy())
    for stimulus, truth in targets.items():
        score = stored.get(stimulus)
        if score is None:
            continue
        value = score.get("macro_f1") if isinstance(score, dict) else None
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise _fail(results_file, f"test_stimuli.{stimulus}.macro_f1 is {value!r}, not a number", RERUN)
        recomputed = macro_f1(truth.to_numpy(), predicted)
        if abs(recomputed - value) > STORED_F1_TOLERANCE:
            raise _fail(results_file, f"stored {stimulus} macro-F1 {value:.6f} differs from {recomputed:.6f}, "
                                      f"recomputed from {PREDICTIONS_FILE} (tolerance {STORED_F1_TOLERANCE:g})",
                        f"the two files are not from one evaluation; {RERUN}")


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


def _check_speakers(path: Path, clips, speakers) -> None:
    """The ``speaker`` column drives the by-speaker bootstrap: it must be each clip's actor."""
    from s3prl_stimulus.partition import speakers_of

    expected = speakers_of(list(clips))
    wrong = np.flatnonzero(np.asarray(speakers) != expected)
    if len(wrong):
        i = int(wrong[0])
        raise _fail(path, f"clip {clips[i]} has speaker {np.asarray(speakers)[i]}, its actor is {expected[i]} "
                          f"({len(wrong)} row(s) in all)", "write each clip's CREMA-D actor id (the predictions "
                    "files this package writes do)")


def read_run(results_file: str | os.PathLike, notes: Optional[list] = None) -> Run:
    """Load one run from its results JSON and the sibling predictions CSV (and layer weights)."""
    results_file = Path(results_file)
    notes = [] if notes is None else notes
    meta = _metadata(results_file, _read_json(results_file))
    predictions = results_file.with_name(PREDICTIONS_FILE)
    probs, targets, speakers = _read_predictions(predictions, meta["fold"])
    _check_clips(predictions, probs.index, results_file, meta)
    json_scores = dict(meta.get("test_stimuli") or {})
    _check_stored_scores(results_file, json_scores, probs, targets)
    partition_clips, complete = _coverage(results_file, meta, len(probs))
    _check_speakers(predictions, probs.index, speakers)
    identity = meta.get("upstream_identity") or {}
    if identity.get("verified") is False:  # accepted on request: every reader of the report must see it
        notes.append(f"{results_file}: {identity.get('reason') or 'upstream unverified'}; its numbers are reported, "
                     "but the upstream its head was scored on could not be checked")
    return Run(
        path=str(meta["path"]), upstream=str(meta["upstream"]),
        upstream_label=str(meta.get("upstream_label") or meta["upstream"]),
        upstream_ckpt=None if meta.get("upstream_ckpt") is None else str(meta["upstream_ckpt"]),
        train_stimulus=meta["train_stimulus"],
        fold=int(meta["fold"]), seed=int(meta["seed"]), votes=str(meta["votes"]), results_file=results_file,
        json_scores=json_scores, probs=probs, targets=targets, speakers=speakers,
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
    runs = [read_run(f, notes) for f in files]
    _note_partial_runs(runs, notes)
    return runs


def _note_partial_runs(runs: list, notes: list) -> None:
    partial = [r for r in runs if not r.complete]
    if partial:
        first = partial[0]
        notes.append(f"{len(partial)} run(s) used part of the corpus (\"complete\": false in their results JSON) "
                     f"and are scored on the clips they predict, e.g. {first.results_file}: {len(first.probs)} of fold "
                     f"{first.fold}'s {len(split_clips(first.fold, 'test'))} test clips")


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
    """Name each run's system by its label (``upstream_label``, else its upstream), adding the checkpoint
    when one label was run with several checkpoints (e.g. ``wavlm_local -k`` without labels) and the path
    when both paths ran it. One checkpoint run under two labels is two systems."""
    groups = {}
    for run in runs:
        groups.setdefault(run.upstream_label, []).append(run)
    for label, group in groups.items():
        _check_one_upstream(label, group)
    named = []
    for run in runs:
        group = groups[run.upstream_label]
        name = run.upstream_label
        checkpoints = {r.upstream_ckpt for r in group}
        if len(checkpoints) > 1:
            name += f"[{_checkpoint_name(run.upstream_ckpt, checkpoints)}]"
        if len({r.path for r in group}) > 1:
            name += f" ({run.path})"
        named.append(replace(run, system=name))
    return named


def _check_one_upstream(label: str, group: list) -> None:
    """Runs of two different upstreams under one label would be pooled as one system: refused."""
    first = {}
    for run in group:
        first.setdefault(run.upstream, run.results_file)
    if len(first) > 1:
        (a, file_a), (b, file_b) = list(first.items())[:2]
        raise StimulusError(f"label {label!r} names runs of upstream {a} ({file_a}) and of {b} ({file_b}): "
                            "give each upstream its own label (LABEL=NAME:CKPT in the recipe's upstream list)")


def _checkpoint_name(checkpoint: Optional[str], checkpoints: set) -> str:
    """The checkpoint's file stem, or its whole path when two checkpoints of the label share a stem."""
    if checkpoint is None:
        return "default"
    stems = [Path(c).stem for c in checkpoints if c is not None]
    return Path(checkpoint).stem if stems.count(Path(checkpoint).stem) == 1 else checkpoint


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
