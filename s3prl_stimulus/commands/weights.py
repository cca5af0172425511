"""s3prl-stimulus weights: positives per class and class-balanced loss weights of a fold's training set."""

import pandas as pd

from s3prl_stimulus import CLASSES
from s3prl_stimulus.commands.common import add_format_argument, add_stimulus_argument, add_votes_arguments, votes_from_args
from s3prl_stimulus.labels import binary_labels
from s3prl_stimulus.loss import class_balanced_weights
from s3prl_stimulus.partition import split_clips
from s3prl_stimulus.tables import render


def add_arguments(parser):
    parser.add_argument("--fold", required=True, help="EMO-SUPERB fold, 1-5")
    add_stimulus_argument(parser, required=True, help="training label set")
    add_votes_arguments(parser)
    add_format_argument(parser)


def run(args) -> int:
    votes = votes_from_args(args).subset(split_clips(args.fold, "train"))
    positives = binary_labels(votes.counts(args.stimulus))
    weights = class_balanced_weights(positives)
    table = pd.DataFrame({"samples_per_class": positives.sum(axis=0), "weight": weights},
                         index=pd.Index(CLASSES, name="class"))
    json_obj = {
        "fold": int(args.fold), "stimulus": args.stimulus, "n_train_clips": len(votes),
        "samples_per_class": {c: int(n) for c, n in zip(CLASSES, table["samples_per_class"])},
        "weights": {c: float(w) for c, w in zip(CLASSES, weights)},
    }
    print(render(table, args.format, json_obj=json_obj))
    return 0
