"""CREMA-D emotion labels per annotation stimulus.

CREMA-D (Cao et al., 2014) has 7,442 clips from 91 actors. Crowd raters labelled each clip three
ways, shown only the voice (queryType 1), only the face (2), or the audio-visual clip (3), choosing
one of six emotions per response: Anger, Sadness, Disgust, Fear, Neutral, Happy. Each clip has
6-12 responses per stimulus.

*Stimulus Modality Matters* builds one label set per stimulus, plus an all-inclusive set:

- distribution ``p = counts / n`` per clip and stimulus; ``all`` pools the three stimuli's counts
  (it is **not** the mean of the three distributions);
- training target ``(1 - C*s) * p + s`` with smoothing ``s = 0.01`` (= ``0.94*p + 0.01``);
- test label: class positive iff ``p > 1/C`` strictly, evaluated exactly on integer counts
  (``C * count > n``), so a share of exactly 1/6 is negative with no float fuzz.

Vote sources:

- ``paper`` (default): counts that reproduce the authors' published label files exactly. They keep
  the "distracted" responses; for 125 clips several count vectors give the same distributions, and
  the smallest was chosen.
- ``crema-d``: CREMA-D's own ``tabulatedVotes.csv``, which drops responses whose first click came
  more than 10 s after the clip (CREMA-D's "distracted" rule).
- a file: CREMA-D's ``tabulatedVotes.csv``; its raw ``finishedResponses.csv`` (optionally with
  ``finishedEmoResponses.csv`` to drop distracted responses the way CREMA-D's tabulation does); or a
  CSV in the packaged layout (``clip`` + ``<stimulus>_<class>`` count columns).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.resources import packaged_file

RATED_STIMULI = ("voice", "face", "av")
"""Stimuli that raters actually saw; ``all`` is derived by pooling them."""

PACKAGED_SOURCES = {"paper": "votes_paper.csv.gz", "crema-d": "votes_crema_d.csv.gz"}
CREMA_D_LETTERS = ("A", "S", "D", "F", "N", "H")  # CREMA-D's response codes, in CLASSES order
QUERY_TYPES = {1: "voice", 2: "face", 3: "av"}
DISTRACTED_MS = 10000  # CREMA-D drops responses whose first click came later than this
DEFAULT_SMOOTHING = 0.01


@dataclass(frozen=True)
class Votes:
    """Vote counts per clip for the three rated stimuli, in :data:`CLASSES` order."""

    clips: np.ndarray  # clip names without ".wav", sorted
    rated: dict  # stimulus -> int64 array [n_clips, C]
    source: str

    def counts(self, stimulus: str) -> np.ndarray:
        """Counts for ``stimulus``; ``all`` pools the three rated stimuli."""
        check_stimulus(stimulus)
        if stimulus == "all":
            return sum(self.rated[s] for s in RATED_STIMULI)
        return self.rated[stimulus]

    def subset(self, clips) -> "Votes":
        """Votes restricted to ``clips`` (in the given order); unknown clips are an error."""
        index = pd.Index(self.clips)
        position = index.get_indexer(list(clips))
        if (position < 0).any():
            missing = [c for c, p in zip(clips, position) if p < 0]
            raise StimulusError(
                f"{len(missing)} clip(s) have no votes in source {self.source!r}, e.g. {missing[0]!r}: "
                "use CREMA-D clip names such as 1001_DFA_ANG_XX"
            )
        return Votes(np.asarray(list(clips)), {s: c[position] for s, c in self.rated.items()}, self.source)

    def __len__(self) -> int:
        return len(self.clips)


def check_stimulus(stimulus: str) -> str:
    if stimulus not in STIMULI:
        raise StimulusError(f"unknown stimulus {stimulus!r}: choose one of {', '.join(STIMULI)}")
    return stimulus


def check_smoothing(smoothing: float) -> float:
    smoothing = float(smoothing)
    if not 0.0 <= smoothing <= 1.0 / len(CLASSES):
        raise StimulusError(
            f"smoothing {smoothing} is out of range: use a value in [0, 1/{len(CLASSES)}] (paper: 0.01; none: 0)"
        )
    return smoothing


# --- label arithmetic -------------------------------------------------------------------------


def distribution(counts: np.ndarray) -> np.ndarray:
    """Share of votes per class, ``counts / n`` (float64)."""
    counts = np.asarray(counts, dtype=np.int64)
    return counts / counts.sum(axis=1, keepdims=True)


def soft_targets(counts: np.ndarray, smoothing: float = DEFAULT_SMOOTHING) -> np.ndarray:
    """Training targets ``(1 - C*s) * p + s``; the paper's ``s = 0.01`` gives ``0.94*p + 0.01``."""
    smoothing = check_smoothing(smoothing)
    return (1.0 - len(CLASSES) * smoothing) * distribution(counts) + smoothing


def binary_labels(counts: np.ndarray) -> np.ndarray:
    """Test labels: 1 iff the class's share of votes exceeds 1/C, computed exactly as ``C*count > n``."""
    counts = np.asarray(counts, dtype=np.int64)
    return (len(CLASSES) * counts > counts.sum(axis=1, keepdims=True)).astype(np.int64)


def label_frame(votes: Votes, stimulus: str, smoothing: float = DEFAULT_SMOOTHING) -> pd.DataFrame:
    """Soft training targets of ``stimulus``, indexed by clip, one column per class."""
    return pd.DataFrame(soft_targets(votes.counts(stimulus), smoothing), index=_clip_index(votes), columns=CLASSES)


def binary_frame(votes: Votes, stimulus: str) -> pd.DataFrame:
    """Binary test labels of ``stimulus``, indexed by clip, one 0/1 column per class."""
    return pd.DataFrame(binary_labels(votes.counts(stimulus)), index=_clip_index(votes), columns=CLASSES)


def _clip_index(votes: Votes) -> pd.Index:
    return pd.Index(votes.clips, name="clip")


# --- loading ----------------------------------------------------------------------------------


def load_votes(source: str | os.PathLike = "paper", distracted: str | os.PathLike | None = None) -> Votes:
    """Load vote counts from a packaged source (``paper``, ``crema-d``) or a file (see module doc).

    ``distracted``: CREMA-D's ``finishedEmoResponses.csv``; only meaningful with a
    ``finishedResponses.csv`` source, whose responses with a first click over 10 s are then dropped.
    """
    if str(source) in PACKAGED_SOURCES:
        if distracted is not None:
            raise StimulusError("--distracted only applies to a finishedResponses.csv votes file, not to a packaged source")
        frame = pd.read_csv(packaged_file(PACKAGED_SOURCES[str(source)]))
        return _votes_from_layout(frame, str(source), where=f"packaged votes {source!r}")
    path = Path(source)
    if not path.is_file():
        raise StimulusError(
            f"votes source {str(source)!r} is neither a packaged source ({', '.join(PACKAGED_SOURCES)}) nor an existing file"
        )
    return _votes_from_file(path, distracted)


def _votes_from_file(path: Path, distracted) -> Votes:
    try:
        frame = pd.read_csv(path)
    except (pd.errors.ParserError, UnicodeDecodeError, pd.errors.EmptyDataError) as err:
        raise StimulusError(f"cannot read votes file {path}: {err}; give a CSV file") from None
    columns = set(frame.columns)
    if {"respEmo", "clipName", "queryType"} <= columns:
        counts = _tabulate_responses(frame, path, distracted)
        return _votes_from_layout(counts, str(path), where=str(path))
    if distracted is not None:
        raise StimulusError(f"--distracted only applies to a finishedResponses.csv votes file; {path} is not one")
    if {"fileName", *CREMA_D_LETTERS} <= columns:
        return _votes_from_layout(_layout_from_tabulated(frame, path), str(path), where=str(path))
    if "clip" in columns:
        return _votes_from_layout(frame, str(path), where=str(path))
    raise StimulusError(
        f"votes file {path} has none of the known layouts: expected CREMA-D's tabulatedVotes.csv "
        "(fileName, A, D, F, H, N, S), finishedResponses.csv (clipName, queryType, respEmo), "
        "or clip + voice_angry..av_happy count columns"
    )


def _layout_from_tabulated(frame: pd.DataFrame, path: Path) -> pd.DataFrame:
    """CREMA-D's tabulatedVotes.csv: one row per (clip, stimulus); row id = 100000*queryType + clipNum."""
    row_id = pd.to_numeric(frame.iloc[:, 0], errors="coerce")
    query_type = row_id // 100000
    bad = ~query_type.isin(list(QUERY_TYPES))
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0]) + 2
        raise StimulusError(
            f"{path}, line {row}: first column must be the row id 100000*queryType+clipNum with queryType 1-3; "
            "pass CREMA-D's processedResults/tabulatedVotes.csv unchanged"
        )
    parts = []
    for qt, stimulus in QUERY_TYPES.items():
        rows = frame[query_type == qt]
        _check_unique(rows["fileName"], path, f"queryType {qt}")
        part = rows.set_index("fileName")[list(CREMA_D_LETTERS)]
        parts.append(part.set_axis([f"{stimulus}_{c}" for c in CLASSES], axis=1))
    return pd.concat(parts, axis=1).rename_axis("clip").reset_index()


def _tabulate_responses(frame: pd.DataFrame, path: Path, distracted) -> pd.DataFrame:
    """Count ``respEmo`` per clip and stimulus in CREMA-D's finishedResponses.csv."""
    if distracted is not None:
        frame = _drop_distracted(frame, Path(distracted))
    letters = frame["respEmo"].astype(str).str.strip()
    unknown = ~letters.isin(CREMA_D_LETTERS)
    if unknown.any():
        row = int(np.flatnonzero(unknown.to_numpy())[0])
        raise StimulusError(
            f"{path}: response row {row + 2} has respEmo {letters.iloc[row]!r}; expected one of {', '.join(CREMA_D_LETTERS)}"
        )
    stimulus = pd.to_numeric(frame["queryType"], errors="coerce").map(QUERY_TYPES)
    if stimulus.isna().any():
        row = int(np.flatnonzero(stimulus.isna().to_numpy())[0])
        raise StimulusError(f"{path}: response row {row + 2} has queryType {frame['queryType'].iloc[row]!r}; expected 1, 2 or 3")
    column = stimulus + "_" + letters.map(dict(zip(CREMA_D_LETTERS, CLASSES)))
    table = pd.crosstab(frame["clipName"].astype(str).str.strip(), column)
    wanted = [f"{s}_{c}" for s in RATED_STIMULI for c in CLASSES]
    table = table.reindex(columns=wanted, fill_value=0)
    return table.rename_axis("clip").reset_index()


def _drop_distracted(responses: pd.DataFrame, emo_path: Path) -> pd.DataFrame:
    """CREMA-D's rule: drop responses whose first emotion click (finishedEmoResponses.csv) took over 10 s."""
    key = ["sessionNums", "queryType", "questNum"]
    try:
        first_clicks = pd.read_csv(emo_path)
    except (OSError, pd.errors.ParserError) as err:
        raise StimulusError(f"cannot read distracted-responses file {emo_path}: {err}") from None
    missing = [c for c in key + ["ttr"] if c not in first_clicks.columns]
    if missing:
        raise StimulusError(f"{emo_path} lacks column(s) {', '.join(missing)}: pass CREMA-D's finishedEmoResponses.csv")
    slow = first_clicks[pd.to_numeric(first_clicks["ttr"], errors="coerce") > DISTRACTED_MS][key].drop_duplicates()
    marked = responses[key].merge(slow.assign(_distracted=True), on=key, how="left")["_distracted"]
    return responses[marked.isna().to_numpy()]


def _votes_from_layout(frame: pd.DataFrame, source: str, where: str) -> Votes:
    """Validate a table with ``clip`` + ``<stimulus>_<class>`` count columns and build :class:`Votes`."""
    wanted = [f"{s}_{c}" for s in RATED_STIMULI for c in CLASSES]
    missing = [c for c in ["clip", *wanted] if c not in frame.columns]
    if missing:
        raise StimulusError(f"votes {where} lacks column(s) {', '.join(missing[:4])}{'…' if len(missing) > 4 else ''}: "
                            "give clip plus voice_angry..av_happy vote counts")
    clips = frame["clip"].astype(str).str.strip().str.replace(r"\.wav$", "", regex=True)
    _check_unique(clips, where, "clip column")
    values = frame[wanted].apply(pd.to_numeric, errors="coerce").to_numpy(dtype=float)
    _check_counts(values, clips, where)
    order = np.argsort(clips.to_numpy(), kind="stable")
    counts = values.astype(np.int64)[order]
    rated = {s: counts[:, i * len(CLASSES):(i + 1) * len(CLASSES)] for i, s in enumerate(RATED_STIMULI)}
    for stimulus, block in rated.items():
        empty = np.flatnonzero(block.sum(axis=1) == 0)
        if len(empty):
            raise StimulusError(
                f"votes {where}: clip {clips.to_numpy()[order][empty[0]]} has zero {stimulus} votes "
                f"({len(empty)} clip(s) in all); every clip needs at least one vote per stimulus"
            )
    return Votes(clips.to_numpy()[order], rated, source)


def _check_counts(values: np.ndarray, clips: pd.Series, where: str) -> None:
    bad = ~np.isfinite(values) | (values < 0) | (values != np.round(values))
    if bad.any():
        row, _ = np.argwhere(bad)[0]
        raise StimulusError(
            f"votes {where}: clip {clips.iloc[row]} (row {row + 2}) has a negative, missing or non-integer count; "
            "vote counts must be whole numbers >= 0"
        )


def _check_unique(clips: pd.Series, where, what: str) -> None:
    duplicated = clips[clips.duplicated()]
    if len(duplicated):
        raise StimulusError(f"votes {where}: clip {duplicated.iloc[0]} appears more than once in the {what}; keep one row per clip")


class FoldLabels:
    """Soft targets (float32) and binary labels of several stimuli for a fixed set of clips.

    ``clips``: clip names, or a dict of split -> clip names (every split's clips are loaded).
    """

    def __init__(self, source: str | os.PathLike, smoothing: float, stimuli, clips):
        every = [c for split in clips.values() for c in split] if isinstance(clips, dict) else list(clips)
        votes = load_votes(source).subset(every)
        wanted = dict.fromkeys(check_stimulus(s) for s in stimuli)
        self.soft = {s: label_frame(votes, s, smoothing).astype(np.float32) for s in wanted}
        self.binary = {s: binary_frame(votes, s) for s in wanted}

    def soft_targets(self, stimulus: str, clips) -> np.ndarray:
        return self.soft[stimulus].loc[list(clips)].to_numpy(copy=True)

    def binary_labels(self, stimulus: str, clips) -> np.ndarray:
        return self.binary[stimulus].loc[list(clips)].to_numpy(copy=True)
