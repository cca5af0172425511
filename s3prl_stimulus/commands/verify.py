"""s3prl-stimulus verify: is a CREMA-D AudioWAV directory complete, intact and in the expected format?"""

from __future__ import annotations

import argparse
import json
import os

from s3prl_stimulus.study.corpus import SAMPLE_RATE, SILENCE_DBFS, parse_clip_list, verify_corpus


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--corpus", required=True, metavar="DIR", help="directory holding <clip>.wav files")
    parser.add_argument("--clips", default=None, metavar="LIST",
                        help="only these clips: comma-separated names or a file with one per line (default: all 7,442)")
    parser.add_argument("--no-checksum", action="store_true", help="skip SHA-256 (size and format are still checked)")
    parser.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="parallel checks")
    parser.add_argument("--format", choices=("table", "json"), default="table", help="output format (default: table)")
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)


def run(args: argparse.Namespace) -> int:
    clips = parse_clip_list(args.clips) if args.clips else None
    report = verify_corpus(args.corpus, clips, manifest=args.manifest, checksum=not args.no_checksum, workers=args.workers)
    print(json.dumps(report.as_dict(), indent=2) if args.format == "json" else render_report(report))
    return 0 if report.usable else 1


def render_report(report) -> str:
    counts = report.counts()
    checked = "size, SHA-256 and format" if report.checksum else "size and format (no checksum)"
    lines = [f"CREMA-D AudioWAV in {report.corpus}: {len(report.checks)} clip(s), {checked} checked",
             f"  ok: {counts['ok']}"]
    lines += [f"  {status}: {n}" for status, n in counts.items() if status != "ok" and n]
    if report.problems:
        lines.append("problems:")
        lines += [f"  {c.clip}: {c.status}: {c.detail}" for c in report.problems]
    if report.flagged:
        lines.append(f"flagged (kept; silence threshold {SILENCE_DBFS:.0f} dBFS RMS):")
        lines += [f"  {c.clip}: {'; '.join(c.flags)}" for c in report.flagged]
    if report.partial_files:
        lines.append(f"partial downloads present ({len(report.partial_files)}): rerun `s3prl-stimulus download` to finish them")
    if report.extra_files:
        lines.append(f"files not in the manifest (ignored): {len(report.extra_files)}, e.g. {report.extra_files[0]}")
    verdict = "usable" if report.usable else (
        f"NOT usable: fix the problems above (s3prl-stimulus download --to {report.corpus} refetches missing or wrong "
        f"clips; every clip must be WAV {SAMPLE_RATE} Hz mono 16-bit)")
    lines.append(f"corpus is {verdict}")
    return "\n".join(lines)
