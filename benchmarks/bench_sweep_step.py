"""The paper-size sweep on CPU: the per-run step (before issue 13), the grouped step's PyTorch path and its CPU kernels.

Random features of the real shape (one Large upstream: 25 hidden states x 1024, all 7,442 clips, one
table serving the five folds), the real folds, votes and class weights, the paper's 20 runs (4 train
stimuli x 5 folds, seed 1337), batch 32, AdamW lr 1e-4, clipping 1. Each formulation trains
``--steps`` steps after ``--warmup`` and evaluates dev + test ``--evals`` times; the totals are
projected to the paper's 15,510 steps and 110 evaluations. The per-run formulation is the
reference kept in ``tests/reference_sweep_step.py`` (every run gathers its own ``[B, L, D]`` batch,
einsum pooling, projector then output layer, S3PRL's unfused AdamW). The grouped step runs twice:
with PyTorch operations only (its path on a GPU or without numba) and with the CPU kernels of
:mod:`s3prl_stimulus.cache.kernels` (the default on a CPU).

Target (issue 13): grouped step's projected total <= 5 min on the 2-core CPU, peak memory <= 2x
the feature table.

Usage::

    python benchmarks/bench_sweep_step.py                  # 200 steps + 2 evaluations of each
    python benchmarks/bench_sweep_step.py --steps 500 --json out.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # the reference formulation lives with the tests, not in the package

PAPER_STEPS, PAPER_EVAL_STEP = 15510, 141
STIMULI, FOLDS, SEED = ("voice", "face", "av", "all"), (1, 2, 3, 4, 5), 1337


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=200, help="timed training steps of each formulation")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps before")
    parser.add_argument("--evals", type=int, default=2, help="timed dev+test evaluations of each formulation")
    parser.add_argument("--hidden", type=int, default=25)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. the cores)")
    parser.add_argument("--json", help="also write the measurements here")
    return parser.parse_args()


def random_cache(n_hidden: int, dim: int):
    """An in-memory cache of random means over every CREMA-D clip (normalisation none: serves every fold)."""
    import numpy as np

    from s3prl_stimulus.cache.store import FeatureCache
    from s3prl_stimulus.partition import load_partition

    clips = np.asarray(sorted(load_partition().index))
    rng = np.random.default_rng(0)
    means = rng.standard_normal((len(clips), n_hidden, dim), dtype=np.float32)  # [N, L, D], as load_cache
    manifest = {"normalisation": {"kind": "none"}, "samples": [80000] * len(clips), "max_samples": None,
                "upstream": {"name": "random-large", "n_hidden": n_hidden, "dim": dim, "weighted_sum": True}}
    return FeatureCache(Path("random-large"), manifest, clips, np.full(len(clips), 250), means, None)


def build(n_hidden: int, dim: int):
    import torch

    from s3prl_stimulus import CLASSES
    from s3prl_stimulus.cache.grid import make_runs, prepare_grid
    from s3prl_stimulus.cache.head import initial_head_state, load_run_state, make_batched_head
    from s3prl_stimulus.cache.sweep_config import load_config

    config = load_config()
    datarc = dict(config["downstream_expert"]["datarc"], max_seconds=None)
    cache = random_cache(n_hidden, dim)
    runs = make_runs(STIMULI, FOLDS, [SEED])
    grid = prepare_grid({k: cache for k in FOLDS}, runs, datarc, STIMULI, False, torch.device("cpu"))
    head = make_batched_head(len(runs), n_hidden, True, dim, 256, len(CLASSES))
    initial = initial_head_state(SEED, dim, config["downstream_expert"]["modelrc"])
    for r in range(len(runs)):
        load_run_state(head, r, {"weights": torch.zeros(n_hidden)}, initial)
    return config, grid, head, cache.means.nbytes


def time_steps(step, n: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    started = time.perf_counter()
    for _ in range(n):
        step()
    return (time.perf_counter() - started) / n


def time_evals(evaluate, n: int) -> float:
    """Seconds per dev + test evaluation: ``evaluate()`` scores both."""
    started = time.perf_counter()
    for _ in range(n):
        evaluate()
    return (time.perf_counter() - started) / n


def measure(config, grid, head, args) -> dict:
    import copy

    import torch

    import reference_sweep_step as reference
    from s3prl_stimulus.cache import training
    from s3prl_stimulus.cache.grid import BatchPlan
    from s3prl_stimulus.cache.head import build_optimizer
    from s3prl_stimulus.cache.step import GroupedStep

    runner, batch = config["runner"], int(config["downstream_expert"]["datarc"]["train_batch_size"])
    old_head, torch_head, new_head = copy.deepcopy(head), copy.deepcopy(head), copy.deepcopy(head)

    def grouped_timings(head):
        optimizer, scheduler = build_optimizer(head, config, PAPER_STEPS)
        plan, grouped = BatchPlan(grid, batch), GroupedStep(head, grid, batch)
        step = time_steps(lambda: training.training_step(grouped, plan, optimizer, scheduler, runner, 0), args.steps,
                          args.warmup)
        return step, time_evals(lambda: training.evaluate_splits(head, grid, ("dev", "test")), args.evals), grouped.use_kernels

    new_step, new_eval, uses_kernels = grouped_timings(new_head)
    if not uses_kernels:
        sys.exit("the CPU kernels did not run (is numba installed?): nothing to compare")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # before the other formulations' copies
    with without_kernels():
        torch_step, torch_eval, _ = grouped_timings(torch_head)
    old_opt = reference.optimizer(old_head, config, PAPER_STEPS)
    old_plan = reference.PerRunPlan(grid, batch)  # the reference reads the same clip-major table
    old_step = time_steps(lambda: reference.training_step(old_head, grid, old_plan, old_opt, runner), args.steps,
                          args.warmup)
    old_eval = time_evals(lambda: [reference.evaluate(old_head, grid, split) for split in ("dev", "test")], args.evals)
    with torch.no_grad():
        drift = max(float((a - b).abs().max()) for a, b in zip(old_head.parameters(), new_head.parameters()))
        kernel_drift = max(float((a - b).abs().max()) for a, b in zip(torch_head.parameters(), new_head.parameters()))
    new_logits = training.evaluate_splits(new_head, grid, ("dev", "test"))
    old_logits = {split: reference.evaluate(old_head, grid, split) for split in ("dev", "test")}
    probability_drift = max(float((torch.softmax(new_logits[split].logits[r], -1) - torch.softmax(old[r], -1)).abs().max())
                            for split, old in old_logits.items() for r in old)
    total = args.warmup + args.steps
    evaluations = PAPER_STEPS // PAPER_EVAL_STEP
    old_total = PAPER_STEPS * old_step + evaluations * old_eval
    torch_total = PAPER_STEPS * torch_step + evaluations * torch_eval
    new_total = PAPER_STEPS * new_step + evaluations * new_eval
    return {"steps_timed": args.steps, "steps_trained": total, "old_step_s": old_step, "torch_step_s": torch_step,
            "new_step_s": new_step, "old_eval_s": old_eval, "torch_eval_s": torch_eval, "new_eval_s": new_eval,
            "old_total_s": old_total, "torch_total_s": torch_total, "new_total_s": new_total,
            "max_parameter_difference": drift, "max_parameter_difference_kernels_vs_pytorch": kernel_drift,
            "max_probability_difference": probability_drift, "evaluations": evaluations, "peak_bytes": peak}


@contextlib.contextmanager
def without_kernels():
    """The grouped step's PyTorch path (as on a GPU, or without numba): the kernels switched off for the block."""
    from s3prl_stimulus.cache import kernels

    saved, kernels.numba = kernels.numba, None
    try:
        yield
    finally:
        kernels.numba = saved


def main() -> int:
    import os

    import torch

    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import reference_sweep_step  # noqa: F401  (imports S3PRL's optimizers: part of the baseline)
    from s3prl_stimulus.cache import training  # noqa: F401
    from s3prl_stimulus.labels import load_votes

    load_votes("paper")
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # interpreter, torch, pandas, S3PRL
    config, grid, head, table_bytes = build(args.hidden, args.dim)
    m = measure(config, grid, head, args)
    peak = m["peak_bytes"]
    load = os.getloadavg()
    rows = [
        ("runs / features / clips", f"{len(grid.runs)} / {args.hidden} x {args.dim} / {grid.features.shape[0]}"),
        ("step: per-run gathers (before) / grouped, PyTorch ops / grouped, CPU kernels (now)",
         f"{m['old_step_s'] * 1e3:.1f} / {m['torch_step_s'] * 1e3:.1f} / {m['new_step_s'] * 1e3:.1f} ms "
         f"({1 / m['old_step_s']:.1f} / {1 / m['torch_step_s']:.1f} / {1 / m['new_step_s']:.1f} steps/s)"),
        ("step speed-up over before / over PyTorch ops", f"{m['old_step_s'] / m['new_step_s']:.1f}x / "
                                                          f"{m['torch_step_s'] / m['new_step_s']:.2f}x"),
        ("dev+test evaluation, same three", f"{m['old_eval_s']:.2f} / {m['torch_eval_s']:.2f} / {m['new_eval_s']:.2f} s"),
        (f"projected {PAPER_STEPS} steps + {m['evaluations']} evaluations, same three",
         f"{m['old_total_s'] / 60:.1f} / {m['torch_total_s'] / 60:.1f} / {m['new_total_s'] / 60:.1f} min (target <= 5 min)"),
        ("total speed-up over before / over PyTorch ops", f"{m['old_total_s'] / m['new_total_s']:.1f}x / "
                                                           f"{m['torch_total_s'] / m['new_total_s']:.2f}x"),
        (f"max parameter difference after {m['steps_trained']} steps, kernels vs before / vs PyTorch ops",
         f"{m['max_parameter_difference']:.1e} / {m['max_parameter_difference_kernels_vs_pytorch']:.1e}"),
        ("max dev/test probability difference then, kernels vs before (target <= 1e-6)", f"{m['max_probability_difference']:.1e}"),
        ("peak memory of the grouped sweep (kernels) / feature table (target <= 2x)", f"{peak / 2**30:.2f} GiB / {table_bytes / 2**30:.2f} GiB = "
                                                       f"{peak / table_bytes:.2f}x"),
        ("  the same without the interpreter's baseline (imports, votes)",
         f"{(peak - baseline) / 2**30:.2f} GiB = {(peak - baseline) / table_bytes:.2f}x (baseline {baseline / 2**30:.2f} GiB)"),
    ]
    info = {"torch": torch.__version__, "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
            "load_average_1_5_15": [round(x, 2) for x in load]}
    width = max(len(k) for k, _ in rows)
    print(f"bench_sweep_step ({info})")
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    if args.json:
        Path(args.json).write_text(json.dumps({**m, "table_bytes": table_bytes, "baseline_bytes": baseline, **info},
                                              indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
