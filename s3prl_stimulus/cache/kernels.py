"""CPU kernels for the sweep's step and evaluation: passes that PyTorch can only make as several operations.

On a CPU the stacked step is bound by memory traffic and by matrix products too thin for BLAS to
run fast (6 output classes, 25 hidden states). These passes are written as loops that numba
compiles, each reading its large operands once:

- :func:`pooled_from_table`: each run's weighted sum of its group's batch, read straight from the
  feature table (no gathered copy, output already in slot order);
- :func:`layer_weights_grad_from_table`: the layer weights' gradient, ``sum_b dP[r, b] . X[b, l]``,
  again from the table;
- :func:`projector_adamw_`: the projector's gradient ``coef * Lw^T dM`` (never stored), torch's AdamW
  update of the projector, and the next step's folded map ``Lw' W'``, in one pass over the projector
  and its two AdamW moments (:func:`fold_map` folds it alone, adding in the same order, when the
  parameters come from elsewhere: a resumed sweep continues with the same bits);
- :func:`logits_from_table`: evaluation, each clip read once and scored by every run that needs it.

They compute the same formulas as the PyTorch path of :mod:`s3prl_stimulus.cache.step`; only the
order of float additions differs (``tests/test_sweep_kernels.py`` checks them against it and against
torch's AdamW). Each output element is written by one thread, so results do not depend on the
thread count. numba is optional at run time: without it (or off the CPU) the PyTorch path runs.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
    UNAVAILABLE = ""
except (ImportError, OSError) as error:  # not installed, or its LLVM does not load: the PyTorch path runs instead
    numba, UNAVAILABLE = None, f"{type(error).__name__}: {error}"


def available() -> bool:
    return numba is not None


def serve(table) -> bool:
    """Whether the kernels run on this feature table (a torch tensor): numba is installed, float32 on the CPU."""
    return numba is not None and table.device.type == "cpu" and str(table.dtype) == "torch.float32"


def describe(table) -> str:
    """Which implementation the sweep's step and evaluation use on ``table``, for the sweep's record."""
    if serve(table):
        return f"CPU kernels (numba {numba.__version__})"
    if numba is None:
        return f"PyTorch operations (numba unavailable: {UNAVAILABLE or 'switched off'})"
    return f"PyTorch operations ({table.device.type}, {table.dtype})"


def use_threads(n: int) -> None:
    """Run the kernels on ``n`` threads (torch's count), within numba's pool."""
    numba.set_num_threads(max(1, min(int(n), numba.config.NUMBA_NUM_THREADS)))


def _jit(**options):
    """numba's ``njit`` (compiled on first call, cached on disk); without numba, the plain function (never called).

    Where numba finds no writable cache folder (a read-only install and home; ``NUMBA_CACHE_DIR`` names one),
    each process compiles the kernels again instead of failing at import.
    """
    if numba is None:
        return lambda function: function

    def compile_lazily(function):
        try:
            return numba.njit(cache=True, boundscheck=False, nogil=True, **options)(function)
        except RuntimeError:  # "cannot cache function ...: no locator available"
            return numba.njit(cache=False, boundscheck=False, nogil=True, **options)(function)
    return compile_lazily


prange = numba.prange if numba is not None else range  # numba parallelises loops over prange


@_jit(parallel=True)
def pooled_from_table(table, rows, weights, starts, out):
    """``out[s, b] = sum_l weights[s, l] * table[rows[g, b], l]`` for the slots ``s`` of each group ``g``.

    ``table [N, L, D]``, ``rows [G, B]`` (table rows of each group's batch), ``weights [S, L']`` (slot order;
    ``L' <= L``: only the first ``L'`` hidden states are used), ``starts [G + 1]`` (group g's slots are
    ``starts[g]:starts[g + 1]``), ``out [S, B, D]``.
    """
    n_groups, batch = rows.shape
    for item in prange(n_groups * batch):
        g = item // batch
        b = item - g * batch
        clip = table[rows[g, b]]
        for s in range(starts[g], starts[g + 1]):
            _pool(out[s, b], clip, weights[s])


@_jit()
def _pool(target, clip, weights):
    """``target = sum_l weights[l] * clip[l]`` over the first ``len(weights)`` hidden states of one clip ``[L, D]``."""
    first, hidden = weights[0], clip[0]
    for d in range(target.shape[0]):
        target[d] = first * hidden[d]
    for layer in range(1, weights.shape[0]):
        weight, hidden = weights[layer], clip[layer]
        for d in range(target.shape[0]):
            target[d] += weight * hidden[d]


@_jit(parallel=True, fastmath=True)  # fastmath: the dot products' sums may be reordered (vectorised)
def layer_weights_grad_from_table(table, rows, grad_pooled, starts, out):
    """``out[s, l] = sum_b grad_pooled[s, b] . table[rows[g, b], l]`` for the slots ``s`` of each group ``g``.

    Shapes as :func:`pooled_from_table`; ``grad_pooled [S, B, D]``, ``out [S, L]``.
    """
    n_groups, batch = rows.shape
    n_layers, dim = out.shape[1], table.shape[2]
    for item in prange(n_groups * n_layers):
        g = item // n_layers
        layer = item - g * n_layers
        for s in range(starts[g], starts[g + 1]):
            out[s, layer] = 0.0
        for b in range(batch):
            hidden = table[rows[g, b], layer]
            for s in range(starts[g], starts[g + 1]):
                grad = grad_pooled[s, b]
                total = np.float32(0.0)
                for d in range(dim):
                    total += grad[d] * hidden[d]
                out[s, layer] += total


def adamw_scalars(lr: float, beta1: float, beta2: float, weight_decay: float, eps: float, step: int) -> tuple:
    """The scalars of torch's fused AdamW step, computed in double and rounded to float32 as its CPU kernel does:
    ``(decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, step_size, sqrt(bias_correction2))`` for :func:`projector_adamw_`.

    (``1 - beta2`` taken in float32 would be off by 1.3e-5 relative for beta2 = 0.999: hence double, then float32.)
    """
    bias_correction1, bias_correction2 = 1 - beta1 ** step, 1 - beta2 ** step
    values = (1 - lr * weight_decay, beta1, 1 - beta1, beta2, 1 - beta2, eps, lr / bias_correction1,
              math.sqrt(bias_correction2))
    return tuple(np.float32(value) for value in values)


@_jit(parallel=True)
def projector_adamw_(weight, exp_avg, exp_avg_sq, linear_old, grad_map, coef, linear_new, folded_out,
                     decay, beta1, keep1, beta2, keep2, eps, step_size, bias_correction2_sqrt):
    """AdamW on the projector ``weight [R, P, D]`` with gradient ``coef[r] * linear_old[r]^T grad_map[r]``; then
    ``folded_out[r] = linear_new[r] weight[r]`` (the next step's folded map).

    The update is torch's AdamW (decoupled weight decay, no amsgrad), with :func:`adamw_scalars`:
    ``w *= decay``; ``m = m b1 + g (1 - b1)``; ``v = v b2 + g^2 (1 - b2)``; ``w -= step_size m / (sqrt(v) / sqrt(bc2) + eps)``.
    """
    n_runs, rows, dim = weight.shape
    n_classes = grad_map.shape[1]
    for r in prange(n_runs):
        grad = np.empty(dim, dtype=np.float32)
        folded = np.zeros((n_classes, dim), dtype=np.float32)
        for p in range(rows):
            w, m, v = weight[r, p], exp_avg[r, p], exp_avg_sq[r, p]
            scale = linear_old[r, 0, p] * coef[r]
            source = grad_map[r, 0]
            for d in range(dim):
                grad[d] = scale * source[d]
            for c in range(1, n_classes):
                scale = linear_old[r, c, p] * coef[r]
                source = grad_map[r, c]
                for d in range(dim):
                    grad[d] += scale * source[d]
            for d in range(dim):
                g = grad[d]
                moment = m[d] * beta1 + g * keep1
                second = v[d] * beta2 + g * g * keep2
                w[d] = w[d] * decay - step_size * moment / (math.sqrt(second) / bias_correction2_sqrt + eps)
                m[d] = moment
                v[d] = second
            _fold_row(folded, linear_new[r, :, p], w)
        folded_out[r] = folded


@_jit()
def _fold_row(folded, linear_column, row):
    """``folded += outer(linear_column, row)``: one projector row's share of ``Lw W``, in the one order both folds use."""
    for c in range(folded.shape[0]):
        scale = linear_column[c]
        target = folded[c]
        for d in range(row.shape[0]):
            target[d] += scale * row[d]


@_jit(parallel=True)
def fold_map(weight, linear, out):
    """``out[r] = linear[r] weight[r]`` (``[R, C, P] x [R, P, D]``), summed over ``p`` in order as
    :func:`projector_adamw_` folds it: a resumed sweep's first step gets the very bits an uninterrupted one had."""
    n_runs, rows, dim = weight.shape
    for r in prange(n_runs):
        folded = np.zeros((linear.shape[1], dim), dtype=np.float32)
        for p in range(rows):
            _fold_row(folded, linear[r, :, p], weight[r, p])
        out[r] = folded


@_jit(parallel=True, fastmath=True)  # fastmath: the logits' dot products may be reordered (vectorised)
def logits_from_table(table, rows, weights, folded, bias, out):
    """``out[s, i] = folded[s] (sum_l weights[s, l] * table[rows[i], l]) + bias[s]``: every run ``s`` on every clip ``i``.

    ``table [N, L, D]``, ``rows [n]``, ``weights [S, L']`` (first ``L'`` hidden states), ``folded [S, C, D]``,
    ``bias [S, C]``, ``out [S, n, C]``. Each clip is read once for all runs; nothing of size ``[n, D]`` is stored.
    """
    n_runs, n_classes, dim = folded.shape
    for i in prange(rows.shape[0]):
        clip = table[rows[i]]
        pooled = np.empty(dim, dtype=np.float32)
        for s in range(n_runs):
            _pool(pooled, clip, weights[s])
            for c in range(n_classes):
                row = folded[s, c]
                total = np.float32(0.0)
                for d in range(dim):
                    total += row[d] * pooled[d]
                out[s, i, c] = total + bias[s, c]
