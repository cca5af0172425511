"""The CPU kernels of the sweep's step (:mod:`s3prl_stimulus.cache.kernels`) compute the PyTorch formulas.

Each kernel is held against the same quantity written with torch operations (or torch's own AdamW),
on odd sizes and uneven groups; the fused update is checked to keep the optimizer's state as torch
keeps it; and the kernels' results do not depend on the number of threads.
"""

import copy
import importlib.util

import numpy as np
import pytest
import torch

from s3prl_stimulus.cache import kernels, training
from s3prl_stimulus.cache.grid import BatchPlan
from s3prl_stimulus.cache.head import build_optimizer, make_batched_head
from s3prl_stimulus.cache.step import GroupedStep
from test_sweep import grid_data  # noqa: F401  (the synthetic caches fixture)
from test_sweep_step import STEPS, three_stimuli_grid

pytestmark = pytest.mark.skipif(not kernels.available(), reason="numba is not installed")

N, L, D, B = 30, 5, 37, 7
STARTS = np.array([0, 1, 3, 6])  # three groups of 1, 2 and 3 runs
CLOSE = dict(rtol=1e-5, atol=1e-6)
needs_s3prl = pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")


def random_inputs(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    table = torch.randn(N, L, D, generator=generator)
    rows = torch.randint(0, N, (len(STARTS) - 1, B), generator=generator)
    weights = torch.softmax(torch.randn(STARTS[-1], L, generator=generator), dim=-1)
    return generator, table, rows, weights


def group_of_slots():
    return torch.from_numpy(np.repeat(np.arange(len(STARTS) - 1), np.diff(STARTS)))


@pytest.mark.parametrize("n_layers", [L, 1])
def test_pooled_from_table_is_each_runs_weighted_sum_of_its_groups_batch(n_layers):
    _, table, rows, weights = random_inputs()
    weights = weights[:, :n_layers].contiguous()
    out = torch.full((STARTS[-1], B, D), float("nan"))
    kernels.pooled_from_table(table.numpy(), rows.numpy(), weights.numpy(), STARTS, out.numpy())
    batches = table[rows[group_of_slots()]]  # [S, B, L, D]
    expected = torch.einsum("sl,sbld->sbd", weights, batches[:, :, :n_layers])
    torch.testing.assert_close(out, expected, **CLOSE)


def test_layer_weights_grad_from_table_sums_each_runs_batch():
    generator, table, rows, weights = random_inputs(1)
    grad_pooled = torch.randn(STARTS[-1], B, D, generator=generator)
    out = torch.full((STARTS[-1], L), float("nan"))
    kernels.layer_weights_grad_from_table(table.numpy(), rows.numpy(), grad_pooled.numpy(), STARTS, out.numpy())
    expected = torch.einsum("sbd,sbld->sl", grad_pooled, table[rows[group_of_slots()]])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("weighted", [True, False])
def test_logits_from_table_equal_the_heads_run_logits(weighted):
    torch.manual_seed(0)
    head = make_batched_head(4, L, weighted, D, 16, 6)
    with torch.no_grad():
        for p in head.parameters():
            p.normal_(0, 0.3)
        _, table, _, _ = random_inputs(2)
        runs, rows = torch.tensor([3, 0, 2]), np.array([5, 0, 29, 5, 17])
        expected = head.run_logits(runs, table[torch.from_numpy(rows)])
        out = training._logits_by_kernel(head, table, runs, rows, head.output_map())
    torch.testing.assert_close(out, expected, **CLOSE)


def test_the_kernels_use_torchs_thread_count():
    import numba

    head = make_batched_head(2, L, True, D, 16, 6)
    _, table, _, _ = random_inputs(5)
    before = torch.get_num_threads(), numba.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.no_grad():
            training._logits_by_kernel(head, table, torch.tensor([0, 1]), np.array([1, 2]), head.output_map())
        assert numba.get_num_threads() == 1  # a user's thread limit holds for the kernels too
    finally:
        torch.set_num_threads(before[0])
        numba.set_num_threads(before[1])


def test_projector_adamw_is_torchs_adamw_on_the_factored_gradient_and_folds_the_next_map():
    generator = torch.Generator().manual_seed(3)
    R, C, P = 3, 6, 11
    weight = torch.nn.Parameter(torch.randn(R, P, D, generator=generator) * 0.3)
    twin = torch.nn.Parameter(weight.detach().clone())
    reference = torch.optim.AdamW([twin], lr=1e-2, weight_decay=0.05, betas=(0.8, 0.95), eps=1e-6, foreach=False)
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    folded = torch.empty(R, C, D)
    for step in range(1, 5):
        linear_old, linear_new = torch.randn(R, C, P, generator=generator), torch.randn(R, C, P, generator=generator)
        grad_map = torch.randn(R, C, D, generator=generator)
        coef = torch.tensor([1.0, 0.25, 0.7])
        twin.grad = torch.bmm(linear_old.transpose(1, 2), grad_map) * coef.view(-1, 1, 1)
        reference.step()
        kernels.projector_adamw_(weight.detach().numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), linear_old.numpy(),
                                 grad_map.numpy(), coef.numpy(), linear_new.numpy(), folded.numpy(),
                                 *kernels.adamw_scalars(1e-2, 0.8, 0.95, 0.05, 1e-6, step))
        state = reference.state[twin]
        torch.testing.assert_close(weight.detach(), twin.detach(), **CLOSE)
        torch.testing.assert_close(exp_avg, state["exp_avg"], **CLOSE)
        torch.testing.assert_close(exp_avg_sq, state["exp_avg_sq"], **CLOSE)
        torch.testing.assert_close(folded, torch.bmm(linear_new, twin.detach()), rtol=1e-5, atol=1e-5)
    assert float((weight - twin).detach().abs().max()) < 1e-6 < float(weight.detach().abs().max())
    refolded = torch.empty_like(folded)
    kernels.fold_map(weight.detach().numpy(), linear_new.numpy(), refolded.numpy())
    assert torch.equal(refolded, folded)  # to the bit: what a resumed sweep's first step folds
    assert not torch.equal(torch.bmm(linear_new, weight.detach()), folded)  # BLAS adds in another order at this size


def test_the_fused_projector_update_does_not_drift_from_torchs_fused_adamw_over_a_long_run():
    """The paper's settings over thousands of steps: a scalar rounded differently (``1 - beta2`` taken in float32 is
    1.3e-5 off) would pull the weights away step after step; torch's own rounding of them keeps the two together."""
    generator = torch.Generator().manual_seed(7)
    R, C, P, dim = 2, 6, 8, 64
    weight = torch.nn.Parameter(torch.randn(R, P, dim, generator=generator) * 0.05)
    twin, start = torch.nn.Parameter(weight.detach().clone()), weight.detach().clone()
    reference = torch.optim.AdamW([twin], lr=1e-4, fused=True)  # the paper's optimizer as the PyTorch path runs it
    exp_avg, exp_avg_sq = torch.zeros_like(weight), torch.zeros_like(weight)
    linear, coef, folded = torch.randn(R, C, P, generator=generator), torch.ones(R), torch.empty(R, C, dim)
    direction = torch.randn(R, C, dim, generator=generator)
    for step in range(1, 4001):  # a steady gradient direction with noise: Adam's moments settle, as in training
        grad_map = (direction + 0.5 * torch.randn(R, C, dim, generator=generator)) * 1e-3
        twin.grad = torch.bmm(linear.transpose(1, 2), grad_map)
        reference.step()
        kernels.projector_adamw_(weight.detach().numpy(), exp_avg.numpy(), exp_avg_sq.numpy(), linear.numpy(),
                                 grad_map.numpy(), coef.numpy(), linear.numpy(), folded.numpy(),
                                 *kernels.adamw_scalars(1e-4, 0.9, 0.999, 0.01, 1e-8, step))
    assert float((weight - twin).detach().abs().max()) < 1e-6  # 3.1e-6 with 1 - beta1, 1 - beta2 taken in float32
    assert float((weight.detach() - start).abs().max()) > 0.1  # the weights travelled far from where they started
    assert kernels.adamw_scalars(1e-4, 0.9, 0.999, 0.01, 1e-8, 1)[4] == np.float32(1 - 0.999) != np.float32(1) - np.float32(0.999)


def test_kernels_give_the_same_bits_on_one_thread_and_on_several():
    import numba

    generator, table, rows, weights = random_inputs(4)
    grad_pooled = torch.randn(STARTS[-1], B, D, generator=generator)
    outputs = []
    before = numba.get_num_threads()
    try:
        for threads in (1, before):
            numba.set_num_threads(threads)
            pooled, grad = torch.empty(STARTS[-1], B, D), torch.empty(STARTS[-1], L)
            kernels.pooled_from_table(table.numpy(), rows.numpy(), weights.numpy(), STARTS, pooled.numpy())
            kernels.layer_weights_grad_from_table(table.numpy(), rows.numpy(), grad_pooled.numpy(), STARTS, grad.numpy())
            outputs.append((pooled, grad))
    finally:
        numba.set_num_threads(before)
    for one, many in zip(*outputs):
        assert torch.equal(one, many)


def train_steps(prepared, head, use_kernels: bool, monkeypatch):
    """STEPS steps of the grid's step on ``head``, with or without the kernels; the optimizer after."""
    with monkeypatch.context() as patch:
        if not use_kernels:
            patch.setattr(kernels, "numba", None)
        runner = prepared.config["runner"]
        optimizer, scheduler = build_optimizer(head, prepared.config, STEPS)
        batch = int(prepared.datarc["train_batch_size"])
        plan, grouped = BatchPlan(prepared.grid, batch), GroupedStep(head, prepared.grid, batch)
        assert grouped.use_kernels is use_kernels and grouped.fuses_projector_update(optimizer) is use_kernels
        for step in range(1, STEPS + 1):
            training.training_step(grouped, plan, optimizer, scheduler, runner, step)
    return optimizer


@pytest.mark.s3prl
@needs_s3prl
def test_the_fused_update_keeps_the_optimizer_state_torch_keeps(grid_data, monkeypatch):  # noqa: F811
    """Kernels on and off train the same parameters and leave the same AdamW state (a saved state resumes either way)."""
    prepared = three_stimuli_grid(grid_data)
    head, twin = prepared.head, copy.deepcopy(prepared.head)
    fused = train_steps(prepared, head, True, monkeypatch)
    plain = train_steps(prepared, twin, False, monkeypatch)
    for (name, ours), theirs in zip(head.named_parameters(), twin.parameters()):
        torch.testing.assert_close(ours.detach(), theirs.detach(), rtol=0, atol=1e-6, msg=name)
        mine, torchs = fused.state[ours], plain.state[theirs]
        assert set(mine) == set(torchs) and float(mine["step"]) == float(torchs["step"]) == STEPS
        assert mine["step"].dtype == torchs["step"].dtype
        torch.testing.assert_close(mine["exp_avg"], torchs["exp_avg"], rtol=1e-4, atol=1e-8, msg=name)
        torch.testing.assert_close(mine["exp_avg_sq"], torchs["exp_avg_sq"], rtol=1e-4, atol=1e-10, msg=name)
    assert head.projector_weight.grad is None  # the fused update never stores the projector's gradient


@pytest.mark.s3prl
@needs_s3prl
def test_only_plain_adamw_gets_the_fused_projector_update(grid_data):  # noqa: F811
    prepared = three_stimuli_grid(grid_data)
    head, grid = prepared.head, prepared.grid
    grouped = GroupedStep(head, grid, int(prepared.datarc["train_batch_size"]))
    assert grouped.fuses_projector_update(torch.optim.AdamW(head.parameters()))
    for other in (torch.optim.Adam(head.parameters()), torch.optim.SGD(head.parameters(), lr=0.1),
                  torch.optim.AdamW(head.parameters(), amsgrad=True), torch.optim.AdamW(head.parameters(), maximize=True)):
        assert not grouped.fuses_projector_update(other)


@pytest.mark.s3prl
@needs_s3prl
def test_a_new_step_over_the_same_parameters_continues_with_the_same_bits(grid_data):  # noqa: F811
    """A resumed sweep builds its step afresh over the restored parameters: its first folded map must be, to the bit,
    the one the fused update left, or a killed and rerun sweep would drift from an uninterrupted one."""
    prepared = three_stimuli_grid(grid_data, randomise=True)
    runner, batch = prepared.config["runner"], int(prepared.datarc["train_batch_size"])
    heads = [prepared.head, copy.deepcopy(prepared.head)]
    optimizers = [build_optimizer(head, prepared.config, STEPS)[0] for head in heads]
    plans = [BatchPlan(prepared.grid, batch) for _ in heads]
    steps = [GroupedStep(head, prepared.grid, batch) for head in heads]
    for step in range(1, 7):
        if step == 4:  # the second one "resumes": a new step object, no folded map kept
            steps[1] = GroupedStep(heads[1], prepared.grid, batch)
        for grouped, plan, optimizer in zip(steps, plans, optimizers):
            training.training_step(grouped, plan, optimizer, None, runner, step)
    for (name, ours), theirs in zip(heads[0].named_parameters(), heads[1].parameters()):
        assert torch.equal(ours, theirs), name


def test_without_a_writable_cache_folder_the_kernels_compile_in_the_process(monkeypatch):
    """numba refuses ``cache=True`` at import when no folder is writable (read-only install and home)."""
    import importlib

    from numba.core import caching

    with monkeypatch.context() as patch:
        patch.setattr(caching.CacheImpl, "_locator_classes", [])
        with pytest.raises(RuntimeError, match="no locator"):
            caching.FunctionCache(random_inputs)  # what numba does for cache=True with nowhere to write
        importlib.reload(kernels)
        _, table, rows, weights = random_inputs(6)
        out = torch.empty(STARTS[-1], B, D)
        kernels.pooled_from_table(table.numpy(), rows.numpy(), weights.numpy(), STARTS, out.numpy())
        torch.testing.assert_close(out, torch.einsum("sl,sbld->sbd", weights, table[rows[group_of_slots()]]), **CLOSE)
    importlib.reload(kernels)  # cached kernels again for the other tests
