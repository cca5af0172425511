"""Evaluation outputs shared by both training paths (schema: docs/design.md).

``predictions-<split>-<tag>.csv`` holds ``clip, speaker``, the six softmax probabilities and, for each
test stimulus, its binary labels; ``results-<split>-<tag>.json`` holds, per test stimulus, corpus-level
macro-F1 with its bootstrap interval, per-class F1, loss and clip count, and (:func:`coverage`) whether the
run used the whole EMO-SUPERB partition. The S3PRL downstream and the feature-cache sweep both build them
here, so their files are identical in form.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, metrics
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_csv_atomic, write_json_atomic
from s3prl_stimulus.labels import FoldLabels
from s3prl_stimulus.partition import speakers_of, split_clips

FINAL_TAG = "dev-best"
"""A run's reportable evaluation: its dev-best checkpoint on the test split."""


def predictions_name(split: str, tag: str) -> str:
    return f"predictions-{split}-{tag}.csv"


def results_name(split: str, tag: str) -> str:
    return f"results-{split}-{tag}.json"


def layer_weights_name(tag: str) -> str:
    """``layer_weights.json`` for dev-best (what the report's Fig. 2 reads), a tagged name for other checkpoints."""
    return "layer_weights.json" if tag == FINAL_TAG else f"layer_weights-{tag}.json"


FINAL_RESULTS = results_name("test", FINAL_TAG)
FINAL_PREDICTIONS = predictions_name("test", FINAL_TAG)
FINAL_LAYER_WEIGHTS = layer_weights_name(FINAL_TAG)


def write_layer_weights(expdir: str | Path, tag: str, metadata: dict, weights: list) -> None:
    """The softmax of a checkpoint's featurizer weights with the run's metadata (upstream, fold, train stimulus,
    checkpoint, step), written atomically; both training paths call it."""
    keys = ("upstream", "fold", "train_stimulus", "checkpoint", "step")
    write_json_atomic(Path(expdir) / layer_weights_name(tag), {k: metadata[k] for k in keys} | {"weights": weights})


def write_evaluation(expdir: str | Path, split: str, tag: str, frame: pd.DataFrame, result: dict) -> None:
    """Both files of one evaluation, each written atomically."""
    write_csv_atomic(Path(expdir) / predictions_name(split, tag), frame)
    write_json_atomic(Path(expdir) / results_name(split, tag), result)


def coverage(fold: int, split: str, scored, trained) -> dict:
    """``partition_clips``: how many clips ``split`` has in the fold's full EMO-SUPERB partition;
    ``complete``: whether this run scored every one of them and trained on every training clip of the fold.

    A run on part of the corpus (``datarc.clips``, ``--clips``) gets ``complete: false``, so a score that
    is not comparable with the full corpus says so wherever it is read.
    """
    partition = split_clips(fold, split)
    complete = set(scored) >= set(partition) and set(trained) >= set(split_clips(fold, "train"))
    return {"partition_clips": len(partition), "complete": bool(complete)}


SUM_TOLERANCE = 1e-3
"""How far from 1 the six probabilities of a predictions row may sum.

The paper's rule is a class's *share* of the prediction exceeding 1/C, so a row must be a distribution.
Both training paths write float64 softmax outputs (sums off by ~1e-16, and the CSV round-trips them);
float32 softmax outputs are off by ~1e-6, and rows rounded to 4 or more decimals by at most
6 x 0.5e-4 = 3e-4. Anything further off (e.g. probabilities scaled x3 and capped at 1) is refused."""


def checked_probabilities(frame: pd.DataFrame, where: Callable[[int], str], fix: str,
                          normalise: bool = False) -> tuple[np.ndarray, int]:
    """The class columns of ``frame`` as float64 rows that are each a distribution over the classes,
    and how many rows were further than :data:`SUM_TOLERANCE` from summing to 1.

    Refuses (``StimulusError("<where(row)>: <what>; <fix>")``) a value that is not a number in [0, 1] and,
    unless ``normalise``, a row that does not sum to 1. With ``normalise`` every row is divided by its sum
    (a row of zeros is refused). ``score`` and ``report`` both read predictions through here.
    """
    probs = frame[list(CLASSES)].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(probs) | (probs < 0) | (probs > 1)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        value = frame[CLASSES[col]].iloc[row]
        raise StimulusError(f"{where(row)}: {CLASSES[col]} = {value} is not a probability in [0, 1]; {fix}")
    sums = probs.sum(axis=1)
    off = np.abs(sums - 1.0) > SUM_TOLERANCE
    if normalise:
        if (sums == 0).any():
            row = int(np.flatnonzero(sums == 0)[0])
            raise StimulusError(f"{where(row)}: every probability is 0, so the row cannot be normalised; {fix}")
        return probs / sums[:, None], int(off.sum())
    if off.any():
        row = int(np.flatnonzero(off)[0])
        raise StimulusError(f"{where(row)}: the probabilities sum to {sums[row]:.6g}, not 1 (tolerance "
                            f"{SUM_TOLERANCE:g}; {int(off.sum())} row(s) in all); {fix}")
    return probs, 0


def predictions_frame(clips: list, probs: np.ndarray, fold_labels: FoldLabels, test_stimuli) -> pd.DataFrame:
    """``clip, speaker``, the six probabilities, then ``<stimulus>_<class>`` binary targets per test stimulus."""
    frame = pd.DataFrame(probs, columns=CLASSES)
    frame.insert(0, "clip", clips)
    frame.insert(1, "speaker", speakers_of(clips))
    for stimulus in test_stimuli:
        binary = fold_labels.binary_labels(stimulus, clips)
        frame = frame.assign(**{f"{stimulus}_{c}": binary[:, i] for i, c in enumerate(CLASSES)})
    return frame


def score_stimuli(frame: pd.DataFrame, losses: dict, evalrc: dict) -> dict:
    """Per test stimulus: corpus-level macro-F1 with its bootstrap CI, per-class F1, loss, n clips.

    Every label set is scored on the same bootstrap resamples (speaker-conditioned if configured).
    """
    predicted = metrics.binarize(frame[list(CLASSES)].to_numpy())
    truths = {s: frame[[f"{s}_{c}" for c in CLASSES]].to_numpy() for s in losses}
    conditions = frame["speaker"].to_numpy() if evalrc["bootstrap_by_speaker"] else None
    values = metrics.bootstrap_values(metrics.macro_f1, [(t, predicted) for t in truths.values()],
                                      conditions, evalrc["bootstrap_samples"], evalrc["bootstrap_seed"])
    scores = {}
    for (stimulus, truth), bootstraps in zip(truths.items(), values):
        scores[stimulus] = {
            "macro_f1": metrics.macro_f1(truth, predicted),
            "ci95": list(metrics.percentile_interval(bootstraps, alpha=5)),
            "per_class_f1": metrics.per_class_f1(truth, predicted),
            "loss": float(losses[stimulus]),
            "n_clips": int(len(frame)),
        }
    return scores
