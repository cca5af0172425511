"""s3prl-stimulus report: the paper's Tables II-IV, paired tests and figures from a results tree, compared with the
paper's published numbers (one summary line per table printed)."""

from __future__ import annotations

import argparse

from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.study.reports import ScoreSettings, compare_with_paper, make_report


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("results_dir", metavar="RESULTS_DIR",
                        help="directory walked for results-test-dev-best.json files (either training path)")
    parser.add_argument("--out", required=True, metavar="DIR", help="report directory (index.md, tables, figures)")
    parser.add_argument("--upstream", default=None,
                        help="system (label) of Table IV and the single-upstream figures (default: the best in Table III)")
    parser.add_argument("--votes", default=None, metavar="SOURCE",
                        help="only runs trained with this votes source (required when the tree mixes sources)")
    parser.add_argument("--path", default=None, choices=("s3prl", "cache"), help="only runs of this training path")
    parser.add_argument("--bootstraps", type=int, default=1000, help="bootstrap resamples (default: 1000)")
    parser.add_argument("--alpha", type=float, default=5.0, help="CI level is 100 - alpha percent (default: 5)")
    parser.add_argument("--bootstrap-unit", choices=("speaker", "clip"), default="clip",
                        help="resample clips (default; the toolkit's default, as in `score` and the downstream's "
                             "evalrc), or speakers then clips within them")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default: 0)")
    parser.add_argument("--decimals", type=int, default=3, help="decimals in markdown/LaTeX tables (default: 3)")


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.out, "--out")
    settings = ScoreSettings(args.bootstraps, args.alpha, args.bootstrap_unit == "speaker", args.seed)
    report = make_report(args.results_dir, args.out, decimals=args.decimals, upstream=args.upstream,
                         votes=args.votes, path=args.path, settings=settings)
    study = report.study
    print(f"report: {len(study.runs)} runs, {len(study.systems)} upstream(s), votes {study.votes!r} -> {args.out}/index.md")
    if not study.missing.empty:
        print(f"missing: {len(study.missing)} run(s) or test label sets, listed in {args.out}/missing_runs.csv")
    for line in compare_with_paper(report, args.decimals).summary:
        print(f"paper: {line}")
    for note in report.notes:
        print(f"note: {note}")
    return 0
