"""s3prl-stimulus score: macro-F1 (bootstrap CI) and per-class F1 of any system's predictions.

The predictions CSV needs a ``clip`` column (CREMA-D names, with or without ``.wav``) and one
probability column per class (angry, sad, disgust, fear, neutral, happy); other columns are ignored,
so the package's own ``predictions-*.csv`` files score as they are. A prediction is positive iff its
probability -- the class's share of the row -- exceeds 1/C, so every row must sum to 1 (within
``results.SUM_TOLERANCE``); ``--normalise`` divides each row by its sum instead of refusing, and the output
says so. Clips are scored in sorted name order, so the bootstrap (and its interval) does not depend on the
file's row order.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES
from s3prl_stimulus.commands.common import add_format_argument, add_stimulus_argument, add_votes_arguments, votes_from_args
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import Votes, binary_frame
from s3prl_stimulus.metrics import binarize, summary
from s3prl_stimulus.partition import check_fold, split_clips, speakers_of
from s3prl_stimulus.results import SUM_TOLERANCE, checked_probabilities
from s3prl_stimulus.tables import render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("predictions", help="CSV with a 'clip' column and one probability column per class")
    add_stimulus_argument(parser, "--test-stimulus", required=True, help="label set to score against")
    add_votes_arguments(parser)
    parser.add_argument("--fold", default=None, help="EMO-SUPERB fold 1-5: score exactly its Test clips")
    parser.add_argument("--bootstraps", type=int, default=1000, help="bootstrap resamples for the CIs (0: none)")
    parser.add_argument("--by-speaker", action="store_true",
                        help="resample speakers, then their clips (speaker-conditioned bootstrap)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap i uses RandomState(seed + i); 0 = the toolkit's")
    parser.add_argument("--normalise", action="store_true",
                        help=f"divide each row by its sum instead of refusing rows that do not sum to 1 "
                             f"(within {SUM_TOLERANCE:g}); the output records it")
    add_format_argument(parser)


# --- reading and checking predictions -----------------------------------------------------------


def read_predictions(path: str | Path, normalise: bool = False) -> tuple[pd.DataFrame, int]:
    """Probabilities indexed by clip (no ``.wav``), one float column per class, sorted by clip; and how many
    rows did not sum to 1 (only ever non-zero with ``normalise``, which rescales every row to sum 1)."""
    path = Path(path)
    frame = _read_csv(path)
    missing = [c for c in ("clip", *CLASSES) if c not in frame.columns]
    if missing:
        raise StimulusError(f"predictions {path} lacks column(s) {', '.join(missing)}: "
                            f"give clip plus one probability column per class ({', '.join(CLASSES)})")
    clips = frame["clip"].astype(str).str.strip().str.replace(r"\.wav$", "", regex=True)
    _check_duplicates(clips, path)
    fix = "give each clip's softmax outputs (a row sums to 1)"
    if not normalise:
        fix += ", or pass --normalise to divide each row by its sum"

    def where(row: int) -> str:
        return f"predictions {path}, line {row + 2} (clip {clips.iloc[row]})"

    probs, off_sum = checked_probabilities(frame, where, fix, normalise)
    table = pd.DataFrame(probs, index=pd.Index(clips.to_numpy(), name="clip"), columns=CLASSES)
    return table.sort_index(), off_sum


def _read_csv(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise StimulusError(f"predictions file {path} does not exist: give the path of a predictions CSV")
    try:
        frame = pd.read_csv(path, dtype={"clip": str})
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise StimulusError(f"cannot read predictions {path} as CSV ({err}): write one row per clip") from None
    if frame.empty:
        raise StimulusError(f"predictions {path} has no rows: write one row per clip")
    return frame


def _check_duplicates(clips: pd.Series, path: Path) -> None:
    repeated = clips.duplicated(keep="first")
    if repeated.any():
        row = int(np.flatnonzero(repeated.to_numpy())[0])
        first = int(np.flatnonzero((clips == clips.iloc[row]).to_numpy())[0])
        raise StimulusError(f"predictions {path}, line {row + 2}: clip {clips.iloc[row]} already appears on line "
                            f"{first + 2}; keep one row per clip")


def _check_known(clips: pd.Index, votes: Votes, path: Path) -> None:
    unknown = ~clips.isin(votes.clips)
    if unknown.any():
        raise StimulusError(f"predictions {path}: clip {clips[unknown][0]!r} ({int(unknown.sum())} clip(s) in all) has no "
                            f"votes in source {votes.source!r}; use CREMA-D clip names such as 1001_DFA_ANG_XX")


def restrict_to_fold(predictions: pd.DataFrame, fold, path: Path) -> tuple[pd.DataFrame, int]:
    """The rows of fold ``fold``'s Test clips (all must be present) and how many other rows were dropped."""
    test = pd.Index(split_clips(check_fold(fold), "test"))
    absent = test[~test.isin(predictions.index)]
    if len(absent):
        raise StimulusError(f"predictions {path} lack {len(absent)} of fold {fold}'s {len(test)} Test clips, e.g. "
                            f"{absent[0]}; predict every Test clip of the fold (or drop --fold)")
    return predictions.loc[test], int(len(predictions) - len(test))


# --- scoring ------------------------------------------------------------------------------------


def score_predictions(
    predictions: pd.DataFrame, votes: Votes, stimulus: str, bootstraps: int = 1000,
    by_speaker: bool = False, seed: int = 0,
) -> dict:
    """:func:`metrics.summary` of binarised ``predictions`` (indexed by clip) against ``stimulus``'s labels."""
    labels = binary_frame(votes, stimulus).loc[predictions.index, list(CLASSES)]
    speakers: Optional[np.ndarray] = speakers_of(predictions.index) if by_speaker else None
    y_pred = binarize(predictions[list(CLASSES)].to_numpy())
    return summary(labels.to_numpy(), y_pred, speakers, num_bootstraps=bootstraps, seed=seed)


def _table(result: dict) -> pd.DataFrame:
    rows = {c: (result["per_class_f1"][c], *(result["per_class_ci95"][c] or (np.nan, np.nan))) for c in CLASSES}
    rows["macro"] = (result["macro_f1"], *(result["ci95"] or (np.nan, np.nan)))
    frame = pd.DataFrame.from_dict(rows, orient="index", columns=["f1", "ci95_low", "ci95_high"])
    return frame.rename_axis("class")


def run(args: argparse.Namespace) -> int:
    if args.bootstraps < 0:
        raise StimulusError(f"--bootstraps {args.bootstraps}: give a number of resamples >= 0 (0 skips the CIs)")
    path = Path(args.predictions)
    predictions, off_sum = read_predictions(path, args.normalise)
    votes = votes_from_args(args)
    _check_known(predictions.index, votes, path)
    dropped = 0
    if args.fold is not None:
        predictions, dropped = restrict_to_fold(predictions, args.fold, path)
    result = score_predictions(predictions, votes, args.test_stimulus, args.bootstraps, args.by_speaker, args.seed)
    if dropped:
        print(f"note: scored fold {args.fold}'s {result['n_clips']} Test clips; ignored {dropped} other rows", file=sys.stderr)
    meta = {"predictions": str(path), "test_stimulus": args.test_stimulus, "votes": str(args.votes),
            "fold": None if args.fold is None else check_fold(args.fold), "bootstraps": args.bootstraps,
            "by_speaker": bool(args.by_speaker), "seed": args.seed, "normalise": bool(args.normalise),
            "sum_tolerance": SUM_TOLERANCE, "rows_off_sum": off_sum}
    if args.format == "table":
        scope = f"fold {meta['fold']} Test, " if args.fold is not None else ""
        mode = "by speaker" if args.by_speaker else "by clip"
        rows = f"; rows normalised to sum 1, {off_sum} of them off by > {SUM_TOLERANCE:g}" if args.normalise else ""
        print(f"{path.name} vs {args.test_stimulus} labels ({args.votes} votes; {scope}{result['n_clips']} clips; "
              f"{args.bootstraps} bootstraps {mode}, seed {args.seed}{rows})")
    print(render(_table(result), args.format, json_obj={**meta, **result}))
    return 0
