"""The sweep's step as it was before issue 13, kept as the reference the restructured step is checked against.

Every run gathers its own batch ``[R, B, L, D]``; its weighted sum is an einsum over that copy; the
projector and output layer are applied one after the other; the optimizer is S3PRL's, unfused. It
works on the same stacked parameters as :func:`s3prl_stimulus.cache.head.make_batched_head`, so both
formulations can be run side by side (``tests/test_sweep_step.py``, ``benchmarks/bench_sweep_step.py``).
Not part of the package: only tests and benchmarks import it.
"""

from __future__ import annotations

import numpy as np
import torch

from s3prl_stimulus.cache.grid import EpochShuffler
from s3prl_stimulus.loss import soft_cross_entropy


def clip_major(grid):
    """The feature table, ``[N, L, D]``, as it was stored then and is again (layer-major in between)."""
    return grid.features


class PerRunPlan:
    """Every run's batch positions ``[R, B]``: each run reads its (fold, seed) shuffler's batch."""

    def __init__(self, grid, batch_size: int):
        self.batch_size = batch_size
        self.groups: dict = {}
        self.members = []
        for r, run in enumerate(grid.runs):
            key = (run.fold, run.seed)
            if key not in self.groups:
                self.groups[key] = EpochShuffler(grid.train_sizes[r], batch_size, run.seed, run.fold)
            self.members.append(key)

    def next(self):
        batches = {key: shuffler.next_batch() for key, shuffler in self.groups.items()}
        positions = np.zeros((len(self.members), self.batch_size), dtype=np.int64)
        counts = np.zeros(len(self.members), dtype=np.int64)
        for r, key in enumerate(self.members):
            positions[r, :len(batches[key])] = batches[key]
            counts[r] = len(batches[key])
        return positions, counts


def pooled(head, means):
    """``means [R, B, L, D]`` → ``[R, B, D]``: each run's softmax-weighted sum over its own copy."""
    if not head.weighted:
        return means[:, :, 0]
    return torch.einsum("rl,rbld->rbd", torch.softmax(head.featurizer_weights, dim=-1), means)


def logits(head, means):
    hidden = torch.baddbmm(head.projector_bias.unsqueeze(1), pooled(head, means), head.projector_weight.transpose(1, 2))
    return torch.baddbmm(head.linear_bias.unsqueeze(1), hidden, head.linear_weight.transpose(1, 2))


def run_logits(head, runs, means):
    """Logits of ``runs`` on a whole split's ``means [N, L, D]`` (gathered in one piece)."""
    if not head.weighted:
        pooled_runs = means[:, 0].unsqueeze(0).expand(len(runs), -1, -1)
    else:
        pooled_runs = torch.einsum("rl,nld->rnd", torch.softmax(head.featurizer_weights[runs], dim=-1), means)
    hidden = torch.baddbmm(head.projector_bias[runs].unsqueeze(1), pooled_runs, head.projector_weight[runs].transpose(1, 2))
    return torch.baddbmm(head.linear_bias[runs].unsqueeze(1), hidden, head.linear_weight[runs].transpose(1, 2))


def batched_loss(head, grid, positions, counts, accumulate: int):
    n_runs, batch = positions.shape
    mask = torch.arange(batch).unsqueeze(0) < counts.unsqueeze(1)
    flat = grid.offsets.unsqueeze(1) + positions
    out = logits(head, clip_major(grid)[grid.train_rows[flat]])
    targets = grid.train_targets[flat] * mask.unsqueeze(-1)
    scale = (n_runs * batch) / (counts.to(torch.float32) * accumulate)
    weights = (grid.class_weights * scale.unsqueeze(1)).unsqueeze(1).expand(-1, batch, -1)
    n_classes = out.shape[-1]
    return soft_cross_entropy(out.reshape(-1, n_classes), targets.reshape(-1, n_classes), weights.reshape(-1, n_classes))


def optimizer(head, config: dict, total_steps: int):
    """S3PRL's ``get_optimizer`` as the runner calls it (no fused kernel)."""
    from s3prl.optimizers import get_optimizer

    return get_optimizer([head], total_steps, config["optimizer"])


def clip_gradients(head, max_norm: float) -> None:
    """``clip_grad_norm_`` on each run's slices: the 2-norm of its per-tensor gradient 2-norms."""
    params = [p for p in head.parameters() if p.grad is not None]
    total = torch.stack([p.grad.flatten(1).norm(dim=1) for p in params], dim=1).norm(dim=1)
    coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
    for p in params:
        p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))


def training_step(head, grid, plan: PerRunPlan, opt, runner: dict) -> torch.Tensor:
    accumulate = runner["gradient_accumulate_steps"]
    total = 0.0
    for _ in range(accumulate):
        positions, counts = plan.next()
        loss = batched_loss(head, grid, torch.from_numpy(positions), torch.from_numpy(counts), accumulate)
        loss.backward()
        total = total + loss.detach()
    clip_gradients(head, float(runner["gradient_clipping"]))
    opt.step()
    opt.zero_grad()
    return total


def evaluate(head, grid, split: str) -> dict:
    """Run index → float64 logits on ``split``, as the evaluation computed them."""
    out = {}
    with torch.no_grad():
        for fold, data in grid.folds.items():
            runs = [r for r, run in enumerate(grid.runs) if run.fold == fold]
            if not runs:
                continue
            means = clip_major(grid)[torch.from_numpy(data.rows[split])]
            values = run_logits(head, torch.tensor(runs), means)
            for i, r in enumerate(runs):
                out[r] = values[i].double()
    return out
