"""The S3PRL runner's training loop and the expert's evaluation, for every run of the grid at once.

The R runs are stacked into batched tensors (:mod:`s3prl_stimulus.cache.head`): layer weights
``[R, L]``, projector ``[R, P, D]`` and ``[R, P]``, output layer ``[R, C, P]`` and ``[R, C]``. One
step gathers each (fold, seed) group's batch ``[B, L, D]`` once (its runs share batches), forms every
run's weighted sum from it, applies each run's head folded into one ``[C, D]`` map (the head is
linear), sums the runs' losses, writes out their gradients (:mod:`s3prl_stimulus.cache.step`) and
steps one optimizer (fused Adam/AdamW kernel where torch has one) over the stacked tensors. These
restructurings change float rounding only: a test keeps the per-run formulation (autograd) and
checks losses, parameters and probabilities against it. Runs never interact:

- the loss is a sum of per-run losses, so each run's gradient is its own;
- gradient clipping is computed per run (the norm over that run's slices), as S3PRL's runner clips
  each run's parameters;
- the optimizer is S3PRL's ``get_optimizer`` with the config's ``optimizer`` section (the paper:
  ``torch.optim.AdamW``, lr 1e-4); only element-wise optimizers are accepted, for which updating a
  stacked tensor equals updating each run's slice alone.

Steps, clipping, accumulation and the evaluation schedule are the config's ``runner`` section; each
run keeps its dev-best parameters by the expert's rule (``evalrc.select_by``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import numpy as np

from s3prl_stimulus.cache import kernels
from s3prl_stimulus.cache.grid import BatchPlan, Grid
from s3prl_stimulus.cache.head import build_optimizer, clip_coefficients, use_fused_step
from s3prl_stimulus.cache.step import GroupedStep
from s3prl_stimulus.cache.sweep_config import S3PRL_PATH
from s3prl_stimulus.errors import StimulusError


# --- evaluation ---------------------------------------------------------------------------------


EVAL_CHUNK = 32  # clips gathered at a time when evaluating: small enough to stay in the CPU's cache while scored


@dataclass
class Evaluation:
    """Logits (float64, CPU) of every run on one split, in the fold's clip order."""

    split: str
    logits: dict  # run index -> torch.DoubleTensor [N, C]


def evaluate_split(head, grid: Grid, split: str) -> Evaluation:
    return evaluate_splits(head, grid, (split,))[split]


def evaluate_splits(head, grid: Grid, splits) -> dict:
    """Every run's logits on each of ``splits`` (split -> :class:`Evaluation`), in one pass over the clips.

    Each clip any run needs is read once. Clips are taken in blocks of those needed by the same folds
    (a clip is a dev clip of one fold and a test clip of another), so a chunk is scored only by the runs
    of the folds that need it.
    """
    import torch

    splits = tuple(splits)
    if splits not in grid.evaluation_plans:
        grid.evaluation_plans[splits] = _evaluation_plan(grid, splits)
    fold_runs, rows, blocks = grid.evaluation_plans[splits]
    device = grid.features.device
    logits = torch.zeros((len(grid.runs), len(rows), head.linear_bias.shape[1]), device=device)
    with torch.no_grad():
        output_map = head.output_map()
        for runs, where in blocks:
            runs = torch.tensor(runs, device=device)
            if kernels.serve(grid.features):  # each clip read once, scored by all the block's runs
                block = _logits_by_kernel(head, grid.features, runs, rows[where], output_map)
                logits[runs.unsqueeze(1), torch.from_numpy(where).unsqueeze(0)] = block
                continue
            for start in range(0, len(where), EVAL_CHUNK):
                positions = where[start:start + EVAL_CHUNK]
                chunk = grid.features.index_select(0, torch.from_numpy(rows[positions]).to(device))
                positions = torch.from_numpy(positions).to(device)
                logits[runs.unsqueeze(1), positions.unsqueeze(0)] = head.run_logits(runs, chunk, output_map)
    out = {}
    for split in splits:
        per_run = {}
        for fold, runs in fold_runs.items():
            where = torch.from_numpy(np.searchsorted(rows, grid.folds[fold].rows[split])).to(device)
            for r in runs:
                per_run[r] = logits[r].index_select(0, where).double().cpu()  # as the expert: float32 logits, scored in float64
        out[split] = Evaluation(split, per_run)
    return out


def _logits_by_kernel(head, table, runs, rows, output_map):
    """:meth:`head.run_logits` of ``runs`` on the table's ``rows``, by :func:`kernels.logits_from_table`: ``[R', n, C]``."""
    import torch

    kernels.use_threads(torch.get_num_threads())
    weights = head.layer_weights(runs) if head.weighted else torch.ones((len(runs), 1), dtype=table.dtype)
    folded, bias = (t.index_select(0, runs) for t in output_map)
    out = torch.empty((len(runs), len(rows), bias.shape[1]), dtype=table.dtype)
    kernels.logits_from_table(table.numpy(), np.ascontiguousarray(rows, dtype=np.int64), weights.contiguous().numpy(),
                              folded.contiguous().numpy(), bias.contiguous().numpy(), out.numpy())
    return out


def _evaluation_plan(grid: Grid, splits: tuple) -> tuple:
    """Runs per fold, the sorted rows ``splits`` need, and blocks of (runs, positions in rows) needed by the same folds."""
    fold_runs = {fold: [r for r, run in enumerate(grid.runs) if run.fold == fold] for fold in grid.folds}
    fold_runs = {fold: runs for fold, runs in fold_runs.items() if runs}
    needed = {fold: np.concatenate([grid.folds[fold].rows[s] for s in splits]) for fold in fold_runs}
    rows = np.unique(np.concatenate(list(needed.values())))
    need = np.stack([np.isin(rows, fold_rows) for fold_rows in needed.values()], axis=1)  # [rows, folds]
    blocks = [([r for k, runs in enumerate(fold_runs.values()) if pattern[k] for r in runs],
               np.flatnonzero((need == pattern).all(axis=1))) for pattern in np.unique(need, axis=0)]
    return fold_runs, rows, blocks


def split_loss(grid: Grid, run_index: int, logits, split: str, stimulus: str) -> float:
    """The expert's loss on a split: class-balanced soft CE against ``stimulus``'s targets, mean over clips."""
    import torch

    from s3prl_stimulus.loss import soft_cross_entropy

    run = grid.runs[run_index]
    data = grid.folds[run.fold]
    targets = torch.from_numpy(data.soft_targets(stimulus, split))
    return soft_cross_entropy(logits, targets, data.class_weights[run.train_stimulus].cpu()).item()


def dev_scores(grid: Grid, run_index: int, logits) -> tuple[float, float]:
    """Dev loss and dev macro-F1 on the run's training stimulus (the expert's dev-best criteria)."""
    import torch

    from s3prl_stimulus.metrics import binarize, macro_f1

    run = grid.runs[run_index]
    data = grid.folds[run.fold]
    loss = split_loss(grid, run_index, logits, "dev", run.train_stimulus)
    probs = torch.softmax(logits, dim=-1).numpy()
    return loss, macro_f1(data.binary_labels(run.train_stimulus, "dev"), binarize(probs))


# --- training -----------------------------------------------------------------------------------


@dataclass
class TrainResult:
    best_step: list  # per run: step of dev-best (0: never improved)
    best_state: object  # BatchedHead holding each run's dev-best parameters
    history: list  # rows: run, step, dev_loss, dev_macro_f1, test_loss, test_macro_f1
    best_loss: list  # per run: lowest dev loss so far (the expert's best_dev_loss buffer)
    best_f1: list  # per run: highest dev macro-F1 so far (best_dev_macro_f1)
    step_evaluations: list = field(default_factory=list)  # (step, dev, test Evaluations) when all steps are kept


def train(head, grid: Grid, config: dict, progress: bool = True, keep_steps: bool = False, state=None) -> TrainResult:
    """The S3PRL runner's training loop, for every run at once (see the module docstring).

    ``state`` (:class:`s3prl_stimulus.cache.resume.TrainingState`): continue from its saved step, and save the
    whole training state at evaluation steps (when ``state.due()``), so a killed sweep resumes from there.
    """
    from s3prl_stimulus.progress import track

    runner = config["runner"]
    total, eval_step = runner["total_steps"], runner["eval_step"]
    select_by = config["downstream_expert"]["evalrc"]["select_by"]
    optimizer, scheduler = build_optimizer(head, config, total)
    batch_size = int(config["downstream_expert"]["datarc"]["train_batch_size"])
    plan, grouped = BatchPlan(grid, batch_size), GroupedStep(head, grid, batch_size)
    best = copy.deepcopy(head)
    result = TrainResult([0] * len(grid.runs), best, [], [math.inf] * len(grid.runs), [-math.inf] * len(grid.runs))
    start = state.restore(grid.runs, head, optimizer, scheduler, plan, result) if state else 0
    use_fused_step(optimizer)  # a restored state brings back its saved optimizer settings
    head.train()
    desc = f"sweep {len(grid.runs)} runs" + (f" (resumed after step {start})" if start else "")
    for step in track(range(start + 1, total + 1), total, desc, "step", progress, initial=start):
        training_step(grouped, plan, optimizer, scheduler, runner, step)
        if step % eval_step == 0:
            _evaluate_step(head, grid, step, select_by, result, keep_steps)
            if state and state.due():
                state.save(step, grid.runs, head, optimizer, scheduler, plan, result)
    return result


def training_step(grouped: GroupedStep, plan: BatchPlan, optimizer, scheduler, runner: dict, step: int):
    """One runner step for every run: accumulated batches, per-run clipping, optimizer and scheduler steps.

    Returns the summed loss of the step's batches (detached), for tests and logs.
    """
    import torch

    head, grid = grouped.head, grouped.grid
    accumulate, max_norm = runner["gradient_accumulate_steps"], float(runner["gradient_clipping"])
    device = grid.features.device
    fused = grouped.fuses_projector_update(optimizer)
    total = 0.0
    for _ in range(accumulate):
        positions, counts = plan.next()
        positions, counts = torch.from_numpy(positions).to(device), torch.from_numpy(counts).to(device)
        total = total + grouped.loss_and_gradients(positions, counts, accumulate, projector_grad=not fused)
    norms = head.clip_gradients(max_norm, grouped.gradient_norms())
    if torch.isnan(norms).any():
        bad = grid.runs[int(torch.nonzero(torch.isnan(norms))[0])]
        raise StimulusError(f"run {bad.name}: gradient norm is NaN at step {step} (S3PRL would skip that step, which "
                            f"stacked runs cannot): check the cache for non-finite features, or {S3PRL_PATH}")
    grouped.optimizer_step(optimizer, clip_coefficients(max_norm, norms) if fused else None)
    optimizer.zero_grad()
    if scheduler:
        scheduler.step()
    return total


def _evaluate_step(head, grid, step, select_by, result: TrainResult, keep_steps: bool) -> None:
    """Dev (and test) evaluation at an eval step; dev-best snapshots per run (strict improvement, as the expert)."""
    import torch

    from s3prl_stimulus.metrics import binarize, macro_f1

    head.eval()
    evaluations = evaluate_splits(head, grid, ("dev", "test"))
    dev, test = evaluations["dev"], evaluations["test"]
    improved = []
    for r, run in enumerate(grid.runs):
        loss, f1 = dev_scores(grid, r, dev.logits[r])
        better = loss < result.best_loss[r] if select_by == "loss" else f1 > result.best_f1[r]
        result.best_loss[r], result.best_f1[r] = min(loss, result.best_loss[r]), max(f1, result.best_f1[r])
        if better:
            improved.append(r)
            result.best_step[r] = step
        data = grid.folds[run.fold]
        test_probs = torch.softmax(test.logits[r], dim=-1).numpy()
        result.history.append({
            "run": r, "step": step, "dev_loss": loss, "dev_macro_f1": f1,
            "test_loss": split_loss(grid, r, test.logits[r], "test", run.train_stimulus),
            "test_macro_f1": macro_f1(data.binary_labels(run.train_stimulus, "test"), binarize(test_probs)),
        })
    if improved:
        index = torch.tensor(improved, device=grid.features.device)
        with torch.no_grad():
            for target, source in zip(result.best_state.parameters(), head.parameters()):
                target[index] = source[index]
    if keep_steps:
        result.step_evaluations.append((step, dev, test))
    head.train()
