"""s3prl-stimulus doctor: whether this machine's stack runs the study, one line per check (s3prl_stimulus.doctor)."""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-u", "--upstream", default="fbank",
                        help="upstream to build and smoke-run, as run_downstream.py spells it (default: fbank)")
    parser.add_argument("-k", "--upstream_ckpt", metavar="PATH", help="checkpoint for a *_local upstream")
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: cuda when available)")
    parser.add_argument("--download", action="store_true",
                        help="let S3PRL download the upstream's weights when they are not cached (default: never)")
    parser.add_argument("--no-smoke", dest="smoke", action="store_false",
                        help="skip the ~30 s smoke run (training, evaluation, cache path on generated audio)")


def run(args: argparse.Namespace) -> int:
    from s3prl_stimulus.doctor import Request
    from s3prl_stimulus.doctor import run as run_doctor

    request = Request(args.upstream, args.upstream_ckpt, args.device, args.download, args.smoke)
    return run_doctor(request, report=lambda line: print(line, flush=True))
