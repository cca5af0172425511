"""Extraction of five folds' caches: one per fold (``--per-fold``) vs one shared cache (the invariance shortcut).

A tiny random-weight WavLM in the Large models' layout (layer-norm extractor, ``normalize: true``) on a
generated corpus with CREMA-D's clip names and lengths. Both commands run as a user runs them, each in
its own process (start-up, the five folds' waveform statistics and hashing included): ``s3prl-stimulus
extract --folds 1 2 3 4 5 --per-fold`` and the same without ``--per-fold``, which first measures the
fold-normalisation invariance on a sample of clips and, when it holds, encodes every clip once.
Printed side by side: clip-forwards (encoded clips + the test's sample forwards), seconds, disk.

Usage::

    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py                   # 300 clips (60 per speaker block)
    OMP_NUM_THREADS=1 python benchmarks/bench_extract.py --clips-per-block 20 --dtype bf16
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_grid import make_corpus, make_wavlm, timed  # noqa: E402  (same corpus and upstream as the grid benchmark)

FOLDS = ["1", "2", "3", "4", "5"]


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clips-per-block", type=int, default=60, help="clips per speaker block (5 blocks)")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=32)
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--work", help="working directory (default: a temporary one, deleted)")
    parser.add_argument("--json", help="also write the measurements here")
    return parser.parse_args()


def extract(work: Path, ckpt: Path, out: str, args, *extra) -> tuple[float, dict]:
    seconds = timed(["-m", "s3prl_stimulus", "extract", "--corpus", work / "AudioWAV", "-u", "wavlm_local", "-k", ckpt,
                     "--out", work / out, "--clips", "present", "--device", args.device, "--dtype", args.dtype,
                     "--no-progress", "--folds", *FOLDS, *extra], work)
    caches = sorted(p.parent for p in (work / out).glob("*/*/manifest.json"))
    forwards = sum(json.loads((c / "complete.json").read_text())["encoded_clips"] for c in caches)
    record = json.loads((caches[0] / "manifest.json").read_text()).get("invariance") or {}
    forwards += record.get("clip_forwards", 0)
    disk = sum(p.stat().st_size for c in caches for p in (c / "chunks").glob("*.npz"))
    return seconds, {"caches": [c.name for c in caches], "clip_forwards": forwards, "disk_bytes": disk,
                     "deviation": record.get("max_relative_deviation"), "holds": record.get("holds")}


def main() -> int:
    import torch

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_extract_") as scratch:
        work = Path(args.work or scratch)
        work.mkdir(parents=True, exist_ok=True)
        clips = make_corpus(work, args.clips_per_block)
        ckpt = make_wavlm(work / "wavlm.pt", layers=args.layers, dim=args.dim, conv_channels=32, heads=2)
        t_per_fold, per_fold = extract(work, ckpt, "per-fold", args, "--per-fold")
        t_shared, shared = extract(work, ckpt, "shared", args)
    rows = [
        ("clips / upstream / dtype", f"{len(clips)} / WavLM {args.layers} layers, dim {args.dim}, normalize: true / {args.dtype}"),
        ("invariance test: max relative deviation (tolerance 1e-5)",
         f"{shared['deviation']:.1e} -> {'one cache' if shared['holds'] else 'one cache per fold'}"),
        ("caches written, --per-fold / default", f"{', '.join(per_fold['caches'])} / {', '.join(shared['caches'])}"),
        ("clip-forwards, --per-fold / default (incl. the test's sample)", f"{per_fold['clip_forwards']} / {shared['clip_forwards']}"),
        ("seconds (one process each), --per-fold / default", f"{t_per_fold:.1f} / {t_shared:.1f}"),
        ("disk, --per-fold / default", f"{per_fold['disk_bytes'] / 1e6:.2f} / {shared['disk_bytes'] / 1e6:.2f} MB"),
        ("ratios: clip-forwards / seconds / disk",
         f"{per_fold['clip_forwards'] / shared['clip_forwards']:.2f}x / {t_per_fold / t_shared:.2f}x / "
         f"{per_fold['disk_bytes'] / shared['disk_bytes']:.2f}x"),
    ]
    info = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d"), "threads": os.environ.get("OMP_NUM_THREADS"),
            "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    width = max(len(k) for k, _ in rows)
    print(f"\nbench_extract ({info})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"per_fold": {**per_fold, "seconds": t_per_fold},
                                               "shared": {**shared, "seconds": t_shared}, **info}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
