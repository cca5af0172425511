"""s3prl-stimulus stats: clips, votes per stimulus, positives per class, clips by number of positive classes."""

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.commands.common import add_format_argument, add_votes_arguments, votes_from_args
from s3prl_stimulus.labels import Votes, binary_labels
from s3prl_stimulus.tables import render


def add_arguments(parser):
    add_votes_arguments(parser)
    add_format_argument(parser)


def stimulus_stats(votes: Votes, stimulus: str) -> dict:
    counts = votes.counts(stimulus)
    per_clip = counts.sum(axis=1)
    positives = binary_labels(counts)
    n_positive = np.bincount(positives.sum(axis=1), minlength=len(CLASSES) + 1)
    row = {"clips": len(votes), "votes": int(per_clip.sum()), "votes_per_clip_min": int(per_clip.min()),
           "votes_per_clip_mean": round(float(per_clip.mean()), 2), "votes_per_clip_max": int(per_clip.max())}
    row.update({f"positive_{c}": int(n) for c, n in zip(CLASSES, positives.sum(axis=0))})
    row.update({f"clips_with_{k}_positive": int(n) for k, n in enumerate(n_positive)})
    return row


def run(args) -> int:
    votes = votes_from_args(args)
    table = pd.DataFrame({s: pd.Series(stimulus_stats(votes, s), dtype=object) for s in STIMULI})
    table.index.name = "statistic"
    json_obj = {s: table[s].to_dict() for s in STIMULI}
    print(render(table, args.format, json_obj=json_obj))
    return 0
