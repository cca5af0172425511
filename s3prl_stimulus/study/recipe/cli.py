"""The paper's study as one resumable recipe: train every (upstream, train stimulus, fold, seed), cross-test it.

Its command line, ``python -m s3prl_stimulus.study.recipe train|evaluate|status|preflight|task``. The first
paragraph above is the ``--help`` description (``build_parser`` reads it from this docstring): keep it the
package's first line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from s3prl_stimulus import STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import FOLDS
from s3prl_stimulus.study.recipe.driver import run_stage
from s3prl_stimulus.study.recipe.local import parse_gpus
from s3prl_stimulus.study.recipe.plan import status_table
from s3prl_stimulus.study.recipe.settings import DEFAULT_SEEDS, PAPER_UPSTREAMS, PATHS, make_settings
from s3prl_stimulus.study.recipe.slurm import SlurmOptions, run_task
from s3prl_stimulus.study.recipe.stages import STAGES
from s3prl_stimulus.study.recipe.weights import preflight


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    def option(*names, **kwargs):
        # Both spellings: --gpu_ids (run_paper.sh, ESPnet style) and --gpu-ids.
        spelled = [n for name in names for n in dict.fromkeys((name, name.replace("_", "-")))]
        parser.add_argument(*spelled, **kwargs)

    option("--path", default="s3prl", choices=PATHS,
           help="s3prl: one run_downstream per run; cache: extract + sweep per upstream; authors: the paper "
                "authors' released models, imported (train, with --authors) and evaluated through S3PRL")
    option("--authors", default=None, metavar="SRC",
           help="--path authors: their results tree (folders <upstream>_<corpus>_fold<N>_multimodal) to import "
                "into ROOT/authors; the one entry of --upstreams, if only one is given, is the upstream they are "
                "evaluated on (e.g. wavlm_large:/models/WavLM-Large.pt)")
    option("--root", default="exp/stimulus", help="expdir root: runs go to ROOT/PATH/UPSTREAM/STIMULUS/foldK/seedS")
    option("--corpus", default="data/CREMA-D/AudioWAV", help="CREMA-D AudioWAV directory")
    option("--upstreams", default=",".join(PAPER_UPSTREAMS),
           help="list file (one NAME, NAME:CKPT or LABEL=NAME:CKPT per line) or comma-separated names "
                "(default: the paper's 15)")
    option("--stimuli", default=" ".join(STIMULI), help="training label sets (default: voice face av all)")
    option("--folds", default=" ".join(map(str, FOLDS)), help="folds (default: 1 2 3 4 5)")
    option("--seeds", default=" ".join(map(str, DEFAULT_SEEDS)), help="seeds (default: 1337, S3PRL's)")
    option("--votes", default="paper", help="votes source: paper | crema-d | FILE (default: paper)")
    option("--clips", default="all", help="all | present | FILE listing clips (datarc.clips; default: all)")
    option("--override", default="",
           help="extra S3PRL -o options, e.g. config.runner.total_steps=2000,,config.optimizer.lr=1e-3")
    option("--features", default=None, help="feature caches of the cache path (default: ROOT/features)")
    option("--device", default=None, help="cpu | cuda (default: cuda when available)")
    option("--python", default=sys.executable, help="Python that runs the commands (default: this one)")


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", default="local", choices=("local", "slurm"))
    parser.add_argument("--ngpu", type=int, default=0, help="local: run one job per GPU over GPUs 0..N-1; "
                                                            "slurm: ask each task for a GPU when N > 0")
    parser.add_argument("--gpu_ids", "--gpu-ids", default=None, help="local: these GPU indices instead (e.g. 0,2,3)")
    parser.add_argument("--slurm_args", "--slurm-args", default="",
                        help="extra #SBATCH options, e.g. \"--partition=gpu --time=24:00:00 --mem=32G\"")
    parser.add_argument("--slurm_max_parallel", "--slurm-max-parallel", type=int, default=None,
                        help="at most this many array tasks at once")
    parser.add_argument("--submit", default="true", choices=("true", "false"),
                        help="slurm: submit with sbatch --wait (true) or only write the script (false)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print every command, run nothing")
    parser.add_argument("--preflight", default="true", choices=("true", "false"),
                        help="check that upstream weights are available before starting (default: true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s3prl_stimulus.study.recipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("train", "stage 2: train every run of the grid"),
                         ("evaluate", "stage 3: cross-test every dev-best checkpoint on every label set"),
                         ("status", "print every run of the grid with its state"),
                         ("preflight", "check that every upstream can be built here")):
        sp = sub.add_parser(action, help=text, description=text)
        _add_grid_arguments(sp)
        if action in STAGES:
            _add_launch_arguments(sp)
    task = sub.add_parser("task", help="run one unit of a written plan (a SLURM array task)")
    task.add_argument("--plan", required=True)
    task.add_argument("--index", required=True, type=int)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "task":
            return run_task(Path(args.plan), args.index)
        settings = make_settings(args)
        if args.action == "status":
            for name, state in status_table(settings):
                print(f"{state:12s} {name}")
            return 0
        if args.action == "preflight":
            checks = preflight(settings.upstreams)
            for check in checks:
                label = f"{check.upstream.label}: "
                message = check.message if check.message.startswith(label) else label + check.message
                print(f"{'ok' if check.ok else 'NOT AVAILABLE':14s} {message}")
            return 0 if all(c.ok for c in checks) else 1
        slurm = SlurmOptions(1 if args.ngpu > 0 else 0, args.slurm_max_parallel, args.slurm_args, args.submit == "true")
        return run_stage(settings, args.action, args.launcher, parse_gpus(args.ngpu, args.gpu_ids), slurm,
                         args.dry_run, args.preflight == "true")
    except StimulusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
