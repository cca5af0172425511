"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse

from s3prl_stimulus import STIMULI
from s3prl_stimulus.labels import Votes, load_votes
from s3prl_stimulus.tables import FORMATS


def add_votes_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--votes", default="paper", metavar="paper|crema-d|FILE",
                        help="vote counts: 'paper' (reproduces the paper's labels; default), 'crema-d' "
                             "(CREMA-D's tabulatedVotes.csv, distracted responses dropped), or a file")
    parser.add_argument("--distracted", default=None, metavar="FILE",
                        help="with a finishedResponses.csv votes file: CREMA-D's finishedEmoResponses.csv, "
                             "to drop responses whose first click took over 10 s")


def votes_from_args(args: argparse.Namespace) -> Votes:
    return load_votes(args.votes, distracted=args.distracted)


def add_format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", choices=FORMATS, default="table", help="output format (default: table)")


def add_stimulus_argument(parser: argparse.ArgumentParser, flag: str = "--stimulus", **kwargs) -> None:
    parser.add_argument(flag, choices=STIMULI, **kwargs)
