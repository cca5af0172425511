"""Bootstrap CI of macro-F1: s3prl_stimulus.metrics vs the `confidence-intervals` toolkit, side by side.

Data: all 7,442 CREMA-D clips with the packaged `paper` voice-only labels (6 classes) and a
simulated system that flips each label with probability 0.25 (random, fixed seed); speakers are
the real CREMA-D actors. Both implementations run 1000 bootstraps per mode (plain and by speaker);
the script prints both intervals, whether they are identical (==, not approximately), and the ratio
of wall-clock times (toolkit time / ours; ours is the best of --repeats runs).

    python benchmarks/bench_bootstrap.py [--bootstraps 1000] [--repeats 3] [--skip-speaker]

Needs the `test` extra (confidence-intervals==0.0.3).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from confidence_intervals import evaluate_with_conf_int
from sklearn.metrics import f1_score

from s3prl_stimulus.labels import binary_labels, load_votes
from s3prl_stimulus.metrics import bootstrap_ci, macro_f1
from s3prl_stimulus.partition import speakers_of


def toolkit_macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return f1_score(y_true, y_pred, average="macro", zero_division=0)


def realistic_data(flip: float, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    votes = load_votes("paper")
    y_true = binary_labels(votes.counts("voice"))
    flips = np.random.default_rng(seed).random(y_true.shape) < flip
    return y_true, np.where(flips, 1 - y_true, y_true), speakers_of(votes.clips)


def timed(fn, repeats: int):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def compare(name: str, y_true, y_pred, conditions, bootstraps: int, repeats: int) -> None:
    ours, t_ours = timed(lambda: bootstrap_ci(macro_f1, y_true, y_pred, conditions, num_bootstraps=bootstraps), repeats)
    theirs, t_theirs = timed(lambda: evaluate_with_conf_int(
        y_pred, toolkit_macro_f1, labels=y_true, conditions=conditions, num_bootstraps=bootstraps), 1)
    theirs = (float(theirs[0]), tuple(float(v) for v in theirs[1]))
    print(f"[{name}] {len(y_true)} clips x {y_true.shape[1]} classes x {bootstraps} bootstraps")
    print(f"  toolkit : macro-F1 {theirs[0]!r}  CI {theirs[1]!r}  {t_theirs:8.3f} s")
    print(f"  ours    : macro-F1 {ours[0]!r}  CI {ours[1]!r}  {t_ours:8.3f} s")
    print(f"  identical: {ours == theirs}   speed-up: {t_theirs / t_ours:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bootstraps", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3, help="runs of ours; the fastest counts")
    parser.add_argument("--flip", type=float, default=0.25, help="chance the simulated system flips a label")
    parser.add_argument("--seed", type=int, default=0, help="seed of the simulated predictions")
    parser.add_argument("--skip-speaker", action="store_true", help="only the plain (per-clip) bootstrap")
    args = parser.parse_args()
    y_true, y_pred, speakers = realistic_data(args.flip, args.seed)
    compare("plain", y_true, y_pred, None, args.bootstraps, args.repeats)
    if not args.skip_speaker:
        compare("by speaker", y_true, y_pred, speakers, args.bootstraps, args.repeats)


if __name__ == "__main__":
    main()
