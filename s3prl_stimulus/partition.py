"""EMO-SUPERB's five speaker-independent folds of CREMA-D.

Speakers (actors 1001-1091) are sorted by id and cut into five blocks, B1 = 1001-1018, B2 = 1019-1036,
B3 = 1037-1054, B4 = 1055-1072, B5 = 1073-1091. Fold k tests on B_k, develops on B_(k mod 5)+1 and
trains on the other three, so no speaker appears in two splits of a fold. The table ships with the
package (``data/folds.csv.gz``).
"""

from __future__ import annotations

import functools

import numpy as np
import pandas as pd

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.resources import packaged_file

FOLDS = (1, 2, 3, 4, 5)
SPLITS = {"train": "Train", "dev": "Development", "test": "Test"}
"""Short split names (S3PRL's) → EMO-SUPERB's names."""


def check_fold(fold) -> int:
    try:
        value = int(fold)
    except (TypeError, ValueError):
        value = None
    if value not in FOLDS or str(fold).strip() != str(value):
        raise StimulusError(f"unknown fold {fold!r}: EMO-SUPERB has folds 1-5")
    return value


def split_name(split: str) -> str:
    """EMO-SUPERB's name (Train/Development/Test) for ``train|dev|test`` or an EMO-SUPERB name."""
    if split in SPLITS:
        return SPLITS[split]
    if split in SPLITS.values():
        return split
    raise StimulusError(f"unknown split {split!r}: use train, dev or test")


@functools.lru_cache(maxsize=1)
def _partition() -> pd.DataFrame:
    frame = pd.read_csv(packaged_file("folds.csv.gz"), dtype={"clip": str, "Gender": str})
    return frame.set_index("clip")


def load_partition() -> pd.DataFrame:
    """Table indexed by clip: ``SpkrID`` (int), ``Gender``, ``fold1``..``fold5`` (Train/Development/Test)."""
    return _partition().copy()


def split_clips(fold, split: str) -> list[str]:
    """Sorted clip names of ``split`` (train|dev|test) in ``fold`` (1-5)."""
    column = f"fold{check_fold(fold)}"
    table = _partition()
    return sorted(table.index[table[column] == split_name(split)])


def fold_splits(fold) -> pd.Series:
    """Split name (Train/Development/Test) of every clip in ``fold``, indexed by clip."""
    return _partition()[f"fold{check_fold(fold)}"].rename("Split_Set")


def speakers_of(clips) -> np.ndarray:
    """Speaker (actor) id of each clip."""
    table = _partition()
    position = table.index.get_indexer(list(clips))
    if (position < 0).any():
        unknown = [c for c, p in zip(clips, position) if p < 0][0]
        raise StimulusError(f"clip {unknown!r} is not a CREMA-D clip: names look like 1001_DFA_ANG_XX")
    return table["SpkrID"].to_numpy()[position]
