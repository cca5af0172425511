"""The paper-size sweep end to end on CPU: one ``s3prl-stimulus sweep`` over a random cache of the real shape.

Writes a cache of random means for all 7,442 CREMA-D clips (25 hidden states x 1024, a WavLM
Large's shape; one cache serving the five folds' normalisations, as a fold-invariant upstream's
shared cache does) with the cache module's own writer, then times
``s3prl-stimulus sweep`` as a user runs it, in its own process: start-up, loading and checking the
cache, the paper's 20 runs (4 train stimuli x 5 folds, seed 1337) x 15,510 steps with 110 dev+test
evaluations and their resume-state saves, and the result files with bootstrap CIs. Peak memory is
the sweep process's maximum RSS, against the feature table it trains from.

Target (issue 13): the whole sweep <= 5 min on the 2-core CPU, peak memory <= 2x the table.

Usage::

    python benchmarks/bench_paper_sweep.py                     # the paper's schedule (about 4 minutes)
    python benchmarks/bench_paper_sweep.py --steps 1410        # a tenth of it (10 evaluations), for a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PAPER_STEPS, PAPER_EVAL_STEP = 15510, 141


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=PAPER_STEPS, help="training steps (default: the paper's)")
    parser.add_argument("--eval-step", type=int, default=PAPER_EVAL_STEP)
    parser.add_argument("--hidden", type=int, default=25)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--save-every", type=float, help="the sweep's --save-every (default: the sweep's)")
    parser.add_argument("--workdir", help="where the cache and results go (default: a temporary directory, removed)")
    parser.add_argument("--json", help="also write the measurements here")
    return parser.parse_args()


def write_random_cache(root: Path, n_hidden: int, dim: int) -> tuple[Path, int]:
    import numpy as np

    from s3prl_stimulus.partition import load_partition
    from s3prl_stimulus.testing import write_feature_cache

    clips = sorted(load_partition().index)
    means = np.random.default_rng(0).standard_normal((len(clips), n_hidden, dim), dtype=np.float32)
    cache = write_feature_cache(root / "caches" / "random-large" / "folds12345", clips, means, [250] * len(clips),
                                fold=(1, 2, 3, 4, 5), name="random-large", chunk_clips=256)
    return cache, means.nbytes


TRAINING_DONE = re.compile(r"^sweep \d+ runs: (\d+)/\d+ steps, ([\d.]+) steps/s, done in", re.MULTILINE)
"""The training loop's last heartbeat line (:mod:`s3prl_stimulus.progress`): steps and steps per second."""


def training_seconds(log: str) -> float:
    """Seconds of the training loop (steps, evaluations, state saves), from its steps and rate."""
    done = TRAINING_DONE.findall(log)
    if not done:
        sys.exit("the sweep's log has no final training progress line: has its format changed?")
    steps, rate = done[-1]
    return int(steps) / float(rate)


def run_sweep(cache: Path, out: Path, steps: int, eval_step: int, save_every) -> tuple[float, str]:
    override = f"config.runner.total_steps={steps},,config.runner.eval_step={eval_step}"
    command = [sys.executable, "-m", "s3prl_stimulus", "sweep", "--cache", str(cache), "--out", str(out),
               "-o", override, "--device", "cpu"]  # stderr is a pipe: progress is heartbeat lines, the last one timed
    if save_every is not None:
        command += ["--save-every", str(save_every)]
    started = time.perf_counter()
    run = subprocess.run(command, capture_output=True, text=True, env=dict(os.environ, PYTHONUNBUFFERED="1"))
    seconds = time.perf_counter() - started
    if run.returncode:
        sys.exit(f"sweep failed ({run.returncode}):\n{run.stdout[-3000:]}\n{run.stderr[-3000:]}")
    return seconds, run.stderr


def main() -> int:
    import torch

    from s3prl_stimulus.cache import kernels
    from s3prl_stimulus.cache.resume import SAVE_EVERY

    args = parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_paper_sweep_") as tmp:
        root = Path(args.workdir or tmp)
        started = time.perf_counter()
        cache, table_bytes = write_random_cache(root, args.hidden, args.dim)
        write_seconds = time.perf_counter() - started
        seconds, log = run_sweep(cache, root / "results", args.steps, args.eval_step, args.save_every)
        training = training_seconds(log)
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        n_results = len(list((root / "results").glob("*/*/fold*/seed*/results-test-dev-best.json")))
    evaluations = args.steps // args.eval_step
    rows = [
        ("cache: clips / hidden states x dim / size", f"7442 / {args.hidden} x {args.dim} / {table_bytes / 2**30:.2f} GiB "
                                                       f"(written in {write_seconds:.0f} s, not part of the sweep)"),
        ("sweep: runs with results / steps / evaluations / --save-every",
         f"{n_results} / {args.steps} / {evaluations} / {args.save_every if args.save_every is not None else SAVE_EVERY} s"),
        ("training: steps, evaluations, state saves" + (" (target <= 5 min)" if args.steps == PAPER_STEPS else ""),
         f"{training:.1f} s = {training / 60:.2f} min"),
        ("sweep process, start to exit (adds start-up, loading the cache, result files)",
         f"{seconds:.1f} s = {seconds / 60:.2f} min"),
        ("peak memory of the sweep / feature table (target <= 2x)",
         f"{peak / 2**30:.2f} GiB / {table_bytes / 2**30:.2f} GiB = {peak / table_bytes:.2f}x"),
    ]
    info = {"torch": torch.__version__, "cpu_kernels": kernels.available(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "date": time.strftime("%Y-%m-%d"), "load_average_1_5_15": [round(x, 2) for x in os.getloadavg()]}
    width = max(len(k) for k, _ in rows)
    print(f"bench_paper_sweep ({info})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({"sweep_seconds": seconds, "training_seconds": training, "steps": args.steps, "evaluations": evaluations,
                                               "save_every": args.save_every,
                                               "runs_with_results": n_results, "peak_bytes": peak,
                                               "table_bytes": table_bytes, **info}, indent=2) + "\n")
    return 0 if n_results == 20 else 1


if __name__ == "__main__":
    sys.exit(main())
