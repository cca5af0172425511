"""Agreement between label sets (the paper's Table II): concordance correlation coefficient.

For two stimuli, Lin's CCC is computed per emotion class over all clips on the vote distributions
``p`` (population variance), then averaged over the six classes.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.labels import Votes, distribution
from s3prl_stimulus.metrics import ccc


def class_mean_ccc(p: np.ndarray, q: np.ndarray) -> float:
    """Mean over classes of the CCC between two [n_clips, C] distribution matrices."""
    return float(np.mean([ccc(p[:, c], q[:, c]) for c in range(len(CLASSES))]))


def agreement_matrix(votes: Votes, stimuli=STIMULI) -> pd.DataFrame:
    """Symmetric matrix of class-averaged CCC between the label sets of ``stimuli``."""
    dists = {s: distribution(votes.counts(s)) for s in stimuli}
    matrix = [[class_mean_ccc(dists[a], dists[b]) for b in stimuli] for a in stimuli]
    return pd.DataFrame(matrix, index=pd.Index(stimuli, name="stimulus"), columns=list(stimuli))
