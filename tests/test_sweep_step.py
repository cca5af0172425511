"""The restructured sweep step (issue 13) gives today's per-run formulation's results to float rounding.

The reference (``tests/reference_sweep_step.py``) gathers every run's batch, pools it with an einsum,
applies projector and output layer one after the other and steps S3PRL's unfused optimizer; the
package gathers each (fold, seed) group's batch once, folds the head into one map per run and uses
the fused Adam kernel. Both start from the same parameters and draw the same batches.
"""

import copy
import importlib.util

import pytest
import torch

import reference_sweep_step as reference
from s3prl_stimulus.cache import kernels, sweeping, training
from s3prl_stimulus.cache.grid import BatchPlan, Run, prepare_grid
from s3prl_stimulus.cache.head import build_optimizer, make_batched_head
from s3prl_stimulus.cache.step import GroupedStep
from s3prl_stimulus.cache.store import load_cache
from test_sweep import D, L, OVERRIDE, grid_data  # noqa: F401  (the synthetic caches fixture)

pytestmark = [pytest.mark.s3prl, pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]

STEPS = 40  # 24 training clips per fold, batch 7: several epochs, each ending in a short batch
TOLERANCE = dict(rtol=0, atol=1e-6)


@pytest.fixture(params=["kernels", "pytorch"])
def step_path(request, monkeypatch):
    """Both paths of the step: the CPU kernels (numba) and the PyTorch operations (GPU, or numba missing)."""
    if request.param == "kernels" and not kernels.available():
        pytest.skip("numba is not installed")
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "numba", None)
    return request.param


def side_by_side(prepared, head, accumulate: int):
    """Train ``head`` and a copy STEPS steps, new step vs reference; per-step losses of both, and the copy."""
    runner = dict(prepared.config["runner"], gradient_accumulate_steps=accumulate)
    twin = copy.deepcopy(head)
    optimizer, scheduler = build_optimizer(head, prepared.config, STEPS)
    twin_optimizer = reference.optimizer(twin, prepared.config, STEPS)
    batch = int(prepared.datarc["train_batch_size"])
    plan, twin_plan = BatchPlan(prepared.grid, batch), reference.PerRunPlan(prepared.grid, batch)
    grouped = GroupedStep(head, prepared.grid, batch)
    losses, twin_losses = [], []
    for step in range(1, STEPS + 1):
        losses.append(float(training.training_step(grouped, plan, optimizer, scheduler, runner, step)))
        twin_losses.append(float(reference.training_step(twin, prepared.grid, twin_plan, twin_optimizer, runner)))
    return losses, twin_losses, twin


def assert_same_training(prepared, head, twin, losses, twin_losses):
    assert len(set(losses)) > STEPS // 2  # the loss moves: batches and parameters change every step
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(twin_losses), rtol=1e-6, atol=1e-6)
    for (name, ours), theirs in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours.detach(), theirs.detach(), **TOLERANCE, msg=name)
    for split in ("dev", "test"):
        new = training.evaluate_split(head, prepared.grid, split).logits
        old = reference.evaluate(twin, prepared.grid, split)
        assert set(new) == set(old) == set(range(len(prepared.runs)))
        for r in new:
            torch.testing.assert_close(torch.softmax(new[r], -1), torch.softmax(old[r], -1), **TOLERANCE)
            torch.testing.assert_close(new[r], old[r], rtol=1e-5, atol=1e-5)


def three_stimuli_grid(grid_data, randomise: bool = False):
    """Voice, face and all x folds 1-2 x seeds 1-2 (4 groups of 3 runs); ``randomise``: head parameters ~ N(0, 0.3)."""
    root, _, _ = grid_data
    prepared = sweeping.prepare([root / "caches"], (["voice", "face", "all"], [1, 2], [1, 2]), None, OVERRIDE, None,
                                None, "cpu", False)
    sweeping.initialise(prepared, None)
    if randomise:
        with torch.no_grad():
            for p in prepared.head.parameters():
                p.normal_(0, 0.3)
    return prepared


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_grouped_step_trains_every_run_as_the_per_run_formulation(grid_data, accumulate, step_path):  # noqa: F811
    prepared = three_stimuli_grid(grid_data)
    assert len(prepared.grid.groups) == 4 and all(len(g.runs) == 3 for g in prepared.grid.groups)
    start = copy.deepcopy(prepared.head)
    losses, twin_losses, twin = side_by_side(prepared, prepared.head, accumulate)
    assert_same_training(prepared, prepared.head, twin, losses, twin_losses)
    changed = (prepared.head.projector_weight - start.projector_weight).abs().amax(dim=(1, 2))
    assert bool((changed > 1e-3).all())  # every run trained


def test_uneven_groups_and_a_single_hidden_state(grid_data, step_path):  # noqa: F811
    """Groups of 1, 2 and 3 runs (as when only unfinished runs are trained), and a head without layer weights."""
    root, _, _ = grid_data
    prepared = sweeping.prepare([root / "caches"], (["voice", "face", "av"], [1, 2], [1, 2]), None, OVERRIDE, None,
                                None, "cpu", False)
    runs = [Run("voice", 1, 1), Run("face", 2, 2), Run("av", 1, 1), Run("av", 2, 1), Run("face", 1, 1), Run("voice", 2, 2)]
    caches = {k: load_cache(p) for k, p in prepared.chosen.items()}
    prepared.grid = prepare_grid(caches, runs, prepared.datarc, prepared.test_stimuli, False, "cpu")
    prepared.runs = runs
    assert sorted(len(g.runs) for g in prepared.grid.groups) == [1, 2, 3]
    for weighted in (True, False):
        torch.manual_seed(0)
        head = make_batched_head(len(runs), L, weighted, D, 16, 6)
        with torch.no_grad():
            for p in head.parameters():
                p.normal_(0, 0.3)
        losses, twin_losses, twin = side_by_side(prepared, head, 1)
        assert_same_training(prepared, head, twin, losses, twin_losses)


def test_the_optimizer_steps_with_the_fused_kernel(grid_data):  # noqa: F811
    root, _, _ = grid_data
    prepared = sweeping.prepare([root / "caches"], (["voice"], [1], [1]), None, OVERRIDE, None, None, "cpu", False)
    optimizer, _ = build_optimizer(prepared.head, prepared.config, STEPS)
    assert isinstance(optimizer, torch.optim.AdamW)
    assert all(group["fused"] for group in optimizer.param_groups)


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradient_norms_from_gram_matrices_equal_the_gradients_norms(grid_data, accumulate):  # noqa: F811
    """``GroupedStep.gradient_norms`` (no pass over the projector's gradient) equals the norms of the gradients."""
    prepared = three_stimuli_grid(grid_data, randomise=True)
    head, grid = prepared.head, prepared.grid
    batch = int(prepared.datarc["train_batch_size"])
    plan, grouped = BatchPlan(grid, batch), GroupedStep(head, grid, batch)
    for _ in range(accumulate):
        positions, counts = plan.next()
        grouped.loss_and_gradients(torch.from_numpy(positions), torch.from_numpy(counts), accumulate)
    norms = grouped.gradient_norms()
    expected = head.per_run_grad_norms()
    assert float(expected.min()) > 1e-2
    torch.testing.assert_close(norms, expected, rtol=1e-6, atol=0)


def test_both_splits_in_one_pass_equal_each_split_alone(grid_data, step_path):  # noqa: F811
    prepared = three_stimuli_grid(grid_data, randomise=True)
    both = training.evaluate_splits(prepared.head, prepared.grid, ("dev", "test"))
    for split in ("dev", "test"):
        alone = training.evaluate_split(prepared.head, prepared.grid, split).logits
        reference_logits = reference.evaluate(prepared.head, prepared.grid, split)
        assert set(both[split].logits) == set(alone) == set(range(len(prepared.runs)))
        for r, logits in alone.items():
            assert logits.shape == (len(prepared.grid.folds[prepared.runs[r].fold].clips[split]), 6)
            torch.testing.assert_close(both[split].logits[r], logits, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(logits, reference_logits[r], rtol=1e-5, atol=1e-5)
