"""s3prl-stimulus download: fetch CREMA-D's AudioWAV clips, each verified against the packaged manifest."""

from __future__ import annotations

import argparse
import json

from s3prl_stimulus.io import check_writable_dir
from s3prl_stimulus.study.corpus import DEFAULT_BASE_URL, download_corpus, parse_clip_list


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--to", required=True, metavar="DIR", help="directory that receives <clip>.wav files (created if needed)")
    parser.add_argument("--workers", type=int, default=8, help="parallel transfers (default: 8)")
    parser.add_argument("--clips", default=None, metavar="LIST",
                        help="only these clips: comma-separated names or a file with one per line (default: all 7,442)")
    parser.add_argument("--base-url", default=DEFAULT_BASE_URL, metavar="URL",
                        help="where <clip>.wav files are served (default: CREMA-D's Git LFS media address)")
    parser.add_argument("--retries", type=int, default=3, help="extra attempts per clip after a network error (default: 3)")
    parser.add_argument("--timeout", type=float, default=60.0, help="seconds before a stalled connection is retried (default: 60)")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="summary format (default: table)")
    parser.add_argument("--quiet", action="store_true", help="no progress bar (terminal) or progress lines (logs)")
    # A manifest other than the packaged one: for tests and private mirrors (clip,bytes,sha256 CSV).
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    check_writable_dir(args.to, "--to")
    clips = parse_clip_list(args.clips) if args.clips else None
    summary = download_corpus(
        args.to, clips, base_url=args.base_url, workers=args.workers, manifest=args.manifest,
        retries=args.retries, timeout=args.timeout, progress=False if args.quiet else None,
    )
    if args.format == "json":
        print(json.dumps(summary.as_dict(), indent=2))
    else:
        print(render_summary(summary))
    return 0 if summary.ok else 1


def render_summary(summary) -> str:
    lines = [
        f"CREMA-D AudioWAV: {len(summary.outcomes)} clip(s) in {summary.corpus}",
        f"  already present and verified: {summary.count('present')}",
        f"  downloaded and verified:      {summary.count('downloaded')}",
        f"  resumed partial transfers:    {summary.count('resumed')}",
        f"  replaced (were wrong):        {summary.count('replaced')}",
        f"  failed:                       {summary.count('failed')}",
    ]
    lines += [f"    {o.clip}: {o.detail}" for o in summary.failures]
    if summary.failures:
        lines.append("rerun the same command to retry: verified files are kept and partial transfers resume")
    return "\n".join(lines)
