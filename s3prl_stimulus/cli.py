"""``s3prl-stimulus`` command line: a thin shell over the package's modules.

Each subcommand lives in ``s3prl_stimulus/commands/<name>.py`` and defines ``add_arguments(parser)``
and ``run(args) -> int``; its one-line help is in :data:`COMMANDS` here. Commands are imported only
when invoked, so ``s3prl-stimulus --help`` or ``agreement`` never pays for importing torch or S3PRL.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from s3prl_stimulus import __version__
from s3prl_stimulus.errors import StimulusError

COMMANDS = {
    "agreement": "CCC agreement between the label sets of the four stimuli (Table II)",
    "labels": "write label files per stimulus and fold (EMO-SUPERB or the authors' layout)",
    "stats": "clips, votes and positives per class for each stimulus",
    "weights": "positives per class and class-balanced loss weights for a fold's training set",
    "score": "score a predictions CSV against a label set (macro-F1 with bootstrap CI)",
    "register": "link the emotion_stimulus downstream into an S3PRL checkout or install",
    "unregister": "remove the link made by `register`",
    "extract": "feature cache: encode every clip once with a frozen upstream",
    "sweep": "feature cache: train and cross-test the stimulus x fold x seed grid from a cache",
    "download": "download CREMA-D's AudioWAV clips, verified against the packaged manifest",
    "verify": "check a CREMA-D AudioWAV directory (presence, size, checksum, WAV format)",
    "import-authors": "rewrite the paper authors' released checkpoints as this package's, for both evaluation paths",
    "report": "tables and figures from a results directory (Tables II-IV, Fig. 2)",
    "doctor": "check this machine's stack, the paper's upstreams and a 30 s smoke run, one line per check",
}


def _load(name: str):
    return importlib.import_module(f"s3prl_stimulus.commands.{name.replace('-', '_')}")


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="s3prl-stimulus",
        description="Stimulus Modality Matters (ICASSP 2025): CREMA-D labels per annotation stimulus for S3PRL.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, help_text in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == only:
            _load(name).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    parser = build_parser(only=command if command in COMMANDS else None)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(_load(args.command).run(args) or 0)
    except StimulusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except OSError as err:
        if err.filename is None or isinstance(err, BrokenPipeError):
            raise
        # A file-system failure the checks up front could not foresee (disk full, quota, a file removed
        # under us): one line naming the file, as for any bad input.
        print(f"error: {err.filename}: {err.strerror or err}; free space or choose another location, then rerun "
              "(finished outputs are kept)", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # Output piped into e.g. `head`, which closed early: not an error.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
