"""Label files in EMO-SUPERB's CSV format, one per stimulus and fold.

Format (EMO-SUPERB / the paper's released files): first column the clip's ``.wav`` name (unnamed
header), then the six smoothed distributions ``angry,sad,disgust,fear,neutral,happy``, then
``SpkrID,Gender,Split_Set`` with Train/Development/Test for the fold.

Layouts:

- ``emo-superb``: ``labels_<stimulus>_fold<k>.csv``;
- ``authors``: the paper repository's numbering ``labels_consensus_<i>.csv``, i = 1-5 voice,
  6-10 audio-visual, 11-15 all, 16-20 face, file i on fold ((i-1) mod 5)+1, so their training code
  consumes these files unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_csv_atomic
from s3prl_stimulus.labels import DEFAULT_SMOOTHING, Votes, check_stimulus, label_frame
from s3prl_stimulus.partition import FOLDS, check_fold, fold_splits, load_partition

LAYOUTS = ("emo-superb", "authors")
AUTHORS_BLOCK = {"voice": 0, "av": 1, "all": 2, "face": 3}
"""Position of each stimulus's block of five files in the authors' numbering."""


def authors_file_number(stimulus: str, fold: int) -> int:
    return 5 * AUTHORS_BLOCK[check_stimulus(stimulus)] + check_fold(fold)


def label_file_name(stimulus: str, fold: int, layout: str = "emo-superb") -> str:
    if layout == "authors":
        return f"labels_consensus_{authors_file_number(stimulus, fold)}.csv"
    if layout == "emo-superb":
        return f"labels_{check_stimulus(stimulus)}_fold{check_fold(fold)}.csv"
    raise StimulusError(f"unknown layout {layout!r}: choose one of {', '.join(LAYOUTS)}")


def label_table(votes: Votes, stimulus: str, fold: int, smoothing: float = DEFAULT_SMOOTHING) -> pd.DataFrame:
    """One label file's contents: index = ``<clip>.wav``, classes, SpkrID, Gender, Split_Set."""
    partition = load_partition()
    soft = label_frame(votes, stimulus, smoothing)
    table = soft.join(partition[["SpkrID", "Gender"]], how="inner").join(fold_splits(fold), how="inner")
    table.index = table.index + ".wav"
    table.index.name = None
    return table[[*CLASSES, "SpkrID", "Gender", "Split_Set"]]


def write_label_files(out_dir: str | os.PathLike, votes: Votes, stimuli=STIMULI, folds=FOLDS,
                      layout: str = "emo-superb", smoothing: float = DEFAULT_SMOOTHING) -> list[Path]:
    """Write one label file per (stimulus, fold); all tables are built before any file is written."""
    out_dir = Path(out_dir)
    tables = {label_file_name(s, f, layout): label_table(votes, s, f, smoothing) for s in stimuli for f in folds}
    written = []
    for name, table in tables.items():
        write_csv_atomic(out_dir / name, table, index=True, float_format="%.17g")
        written.append(out_dir / name)
    return written
