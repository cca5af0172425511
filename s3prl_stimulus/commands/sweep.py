"""s3prl-stimulus sweep: train and cross-test the stimulus x fold x seed grid from feature caches."""

from __future__ import annotations

import argparse
import sys

from s3prl_stimulus import STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.partition import FOLDS
from s3prl_stimulus.tables import FORMATS, render


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache", required=True, nargs="+", metavar="DIR",
                        help="extract's --out (or its <upstream> directory, or single caches)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="results root: runs go to DIR/<upstream>/<train_stimulus>/fold<k>/seed<s>/")
    parser.add_argument("--train-stimuli", nargs="+", choices=STIMULI, default=list(STIMULI), metavar="S",
                        help="label sets to train on (default: voice face av all)")
    parser.add_argument("--test-stimuli", nargs="+", choices=STIMULI, metavar="S",
                        help="label sets every run is scored against (default: the config's datarc.test_stimuli)")
    parser.add_argument("--folds", nargs="+", default=list(FOLDS), metavar="K", help="folds (default: 1 2 3 4 5)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[1337], metavar="N",
                        help="seeds per run (default: 1337, S3PRL's); several give mean ± std over seeds")
    parser.add_argument("-c", "--config", metavar="YAML", help="the S3PRL path's config (default: the packaged config.yaml)")
    parser.add_argument("-o", "--override", metavar="OPTS",
                        help="S3PRL-style config overrides, e.g. \"config.runner.total_steps=2000,,config.optimizer.lr=1e-3\"")
    parser.add_argument("--votes", help="votes source (default: the config's datarc.votes)")
    parser.add_argument("--upstream_feature_normalize", action="store_true",
                        help="layer-normalise hidden states before the weighted sum (needs a cache extracted with it)")
    parser.add_argument("--init", metavar="CKPT", help="start every run from this checkpoint's head (like run_downstream -i)")
    parser.add_argument("--evaluate", metavar="CKPT",
                        help="instead of training: score an S3PRL-path checkpoint from the cache (like -m evaluate -e)")
    parser.add_argument("--split", choices=("dev", "test"), default="test", help="split for --evaluate (default test)")
    parser.add_argument("--allow-unverified-upstream", action="store_true",
                        help="accept an --evaluate/--init checkpoint that records no upstream identity (older versions, "
                             "other code); its results say \"upstream unverified\". A checkpoint of other upstream "
                             "weights is refused regardless")
    parser.add_argument("--overwrite", action="store_true",
                        help="train runs that already have results under --out again (default: keep them; a killed "
                             "sweep resumes from its last saved evaluation step either way)")
    parser.add_argument("--save-every", type=float, metavar="SECONDS",
                        help="save the training state (for resuming a killed sweep) at the first evaluation step, then "
                             "at the first one at least SECONDS after the last save (default 60; 0: every evaluation step)")
    parser.add_argument("--all-steps", action="store_true",
                        help="also write predictions/results for every evaluation step (slow: bootstrap CIs each time)")
    parser.add_argument("--name", help="directory name for the upstream under --out, also the label its results carry "
                                       "(upstream_label; default: extract's --name, else the upstream)")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--format", choices=FORMATS, default="table", help="summary table format (default: table)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    if args.save_every is not None and not 0 <= args.save_every < float("inf"):
        raise StimulusError(f"--save-every {args.save_every}: give the seconds between saves of the training state, "
                            "0 or more (0: save at every evaluation step)")
    from s3prl_stimulus.cache.sweep_outputs import grid_table
    from s3prl_stimulus.cache.sweeping import evaluate_checkpoint, sweep

    if args.evaluate:
        _, result = evaluate_checkpoint(args.cache, args.evaluate, split=args.split, out=args.out, device=args.device,
                                        test_stimuli=args.test_stimuli,
                                        allow_unverified_upstream=args.allow_unverified_upstream)
        scores = {s: v["macro_f1"] for s, v in result["test_stimuli"].items()}
        partial = "" if result["complete"] else (f" († scored {result['n_clips']} of the split's {result['partition_clips']} "
                                                 "clips: not comparable with the full corpus)")
        print(f"{args.evaluate} ({result['split']}, from the cache): macro-F1 " +
              ", ".join(f"{s} {f:.4f}" for s, f in scores.items()) + partial + _unverified_note(result))
        return 0
    long, grid = sweep(args.cache, args.out, train_stimuli=args.train_stimuli, folds=args.folds, seeds=args.seeds,
                       test_stimuli=args.test_stimuli, config=args.config, override=args.override, device=args.device,
                       feature_normalize=args.upstream_feature_normalize, votes=args.votes, all_steps=args.all_steps,
                       name=args.name, init=args.init, progress=not args.no_progress,
                       allow_unverified_upstream=args.allow_unverified_upstream, overwrite=args.overwrite,
                       save_every=args.save_every)
    n_runs = len(long[["train_stimulus", "fold", "seed"]].drop_duplicates())
    print(f"{n_runs} runs written under {args.out}; macro-F1 (test, dev-best), mean over folds, ± std over seeds:")
    print(render(grid_table(grid), args.format, json_obj=grid.to_dict(orient="records")))
    if not long["complete"].all():
        print("†: built from runs on part of the corpus (n_clips of partition_clips per run in summary.csv): "
              "not comparable with the full corpus", file=sys.stderr)
    return 0


def _unverified_note(result: dict) -> str:
    identity = result["upstream_identity"]
    return "" if identity["verified"] else f" ({identity['reason']})"
