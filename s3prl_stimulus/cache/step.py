"""The grouped training step's loss and gradients, written out by hand for the stacked runs.

The head is linear after pooling, so its gradients have short closed forms. Written out, each
large tensor is touched once per use, in the layout its product wants, into buffers kept from step
to step; autograd only differentiates the loss with respect to the small ``[R, B, C]`` logits. The
arithmetic is that of autograd over the same formulas (only float rounding differs): ``tests/
test_sweep_step.py`` checks losses, parameters and probabilities against the per-run reference.

Per step, with the runs ordered group after group ("slots": the runs sharing a (fold, seed)
batch are adjacent), ``X [G*B, L, D]`` the groups' gathered batches, ``a`` the layer weights after
the softmax, ``Lw, c`` the output layer and ``W, b`` the projector:

- pooled ``P[r] = sum_l a[r, l] X_g[:, l]`` (one product per group, every run of the group at once);
- folded map ``M = Lw W``, ``m = Lw b + c``; logits ``z[r] = P[r] M[r]^T + m[r]``;
- from ``dz``: ``dM = dz^T P``, ``dm = sum_b dz``, ``dP = dz M``, ``da[r, l] = sum_b dP[r, b] . X_g[b, l]``;
- ``dW = Lw^T dM``, ``dLw = dM W^T + dm b^T``, ``db = Lw^T dm``, ``dc = dm``, and the softmax's
  backward for the layer weights.

On the CPU with numba (:mod:`s3prl_stimulus.cache.kernels`), the weighted sums and the layer weights'
gradient read the feature table directly (no gathered batch), and with torch's AdamW the projector is
updated by one kernel that forms its gradient on the fly and folds the next step's map (``dW`` is never
stored; :meth:`GroupedStep.optimizer_step`). Elsewhere (GPU, other optimizers) the PyTorch path runs.
"""

from __future__ import annotations

import numpy as np

from s3prl_stimulus.cache import kernels
from s3prl_stimulus.cache.grid import Grid


class GroupedStep:
    """Loss and gradients of one accumulated batch for every run; keeps its large buffers between steps."""

    def __init__(self, head, grid: Grid, batch_size: int):
        import torch

        self.head, self.grid, self.batch = head, grid, batch_size
        self.order = torch.cat([group.runs for group in grid.groups])  # slot -> run
        bounds = torch.tensor([0] + [len(group.runs) for group in grid.groups]).cumsum(0).tolist()
        self.slots = list(zip(bounds[:-1], bounds[1:]))  # group g's runs are slots [start, stop)
        self.equal_groups = len({len(group.runs) for group in grid.groups}) == 1
        self.run_group = grid.run_group.index_select(0, self.order)  # each slot's group
        self.offsets = grid.offsets.index_select(0, self.order)
        self.class_weights = grid.class_weights.index_select(0, self.order)
        n_hidden, dim = grid.features.shape[1:]
        self.use_kernels = kernels.serve(grid.features)
        if self.use_kernels:  # the kernels read the table itself: no gathered copy
            kernels.use_threads(torch.get_num_threads())
            self.table, self.starts = grid.features.numpy(), np.asarray(bounds, dtype=np.int64)
            self.pooled_buffer = torch.empty((len(self.order), batch_size, dim), dtype=grid.features.dtype)
            self.first_hidden_only = torch.ones((len(self.order), 1), dtype=grid.features.dtype)  # head without layer weights
        else:
            self.features = torch.empty((len(grid.groups) * batch_size, n_hidden, dim), dtype=grid.features.dtype,
                                        device=grid.features.device)
        self.projector_grad = None  # the largest gradient, written in place step after step
        self.grad_map_sum = None  # the folded map's gradient over the step's micro-batches (gradient_norms)
        self.next_map, self.next_map_key = None, None  # the folded map left by the fused update, and for which parameters

    def loss_and_gradients(self, positions, counts, accumulate: int, projector_grad: bool = True):
        """The summed class-balanced loss of every run on its group's batch; adds the gradients to ``p.grad``.

        ``positions [G, B]`` / ``counts [G]``: each group's batch (:class:`s3prl_stimulus.cache.grid.BatchPlan`).
        ``projector_grad=False``: leave the projector's gradient factored (``Lw^T dM``, dM summed in
        ``grad_map_sum``) for :meth:`optimizer_step`'s fused update.
        """
        import torch

        grid, head = self.grid, self.head
        rows = grid.group_rows.gather(1, positions)
        with torch.no_grad():
            weights = head.layer_weights()[self.order] if head.weighted else None
            if self.use_kernels:  # the batches stay in the table: the kernels read them by row
                batches = rows.numpy()
                pooled = self._pooled_by_kernel(batches, weights)
            else:
                batches = torch.index_select(grid.features, 0, rows.flatten(), out=self.features)
                pooled = self._pooled(batches, weights)
            folded, bias = self._output_map()
            folded_slots, bias_slots = folded.index_select(0, self.order), bias.index_select(0, self.order)
            logits = torch.baddbmm(bias_slots.unsqueeze(2), folded_slots, pooled.transpose(1, 2)).transpose(1, 2)
            loss, grad_logits = self._loss(logits, positions, counts, accumulate)
            self._backward(grad_logits, pooled, batches, weights, folded_slots, projector_grad)
        return loss

    def _pooled_by_kernel(self, rows, weights):
        """:meth:`_pooled` read from the table's ``rows [G, B]`` (:func:`kernels.pooled_from_table`), into a kept buffer."""
        weights = self.first_hidden_only if weights is None else weights
        kernels.pooled_from_table(self.table, rows, weights.numpy(), self.starts, self.pooled_buffer.numpy())
        return self.pooled_buffer

    def _output_map(self):
        """:meth:`head.output_map`; with the kernels, the folded weight the fused update left (when the parameters are
        still those) or :func:`kernels.fold_map`'s, which adds in the same order (a resumed sweep gets the same bits)."""
        import torch

        head = self.head
        if not self.use_kernels:
            return head.output_map()
        if self.next_map is None or self.next_map_key != self._parameters_key():
            weight = head.projector_weight
            if self.next_map is None:  # kept from step to step, as the fused update writes into it
                self.next_map = torch.empty(head.linear_weight.shape[:2] + weight.shape[2:], dtype=weight.dtype)
            kernels.fold_map(weight.detach().numpy(), head.linear_weight.detach().numpy(), self.next_map.numpy())
            self.next_map_key = self._parameters_key()
        return self.next_map, head.output_bias()

    def _parameters_key(self):
        """Changes whenever the projector or output layer is modified in place by torch (or replaced)."""
        head = self.head
        return tuple((p.data_ptr(), p._version) for p in (head.projector_weight, head.linear_weight))

    def _pooled(self, features, weights):
        """``[R, B, D]`` in slot order: each group's batch pooled by its runs' layer weights."""
        import torch

        n_groups, per_group = len(self.slots), self.slots[0][1]
        batches = features.view(n_groups, self.batch, *features.shape[1:])
        if weights is None:
            return torch.cat([batches[g, :, 0].expand(stop - start, -1, -1) for g, (start, stop) in enumerate(self.slots)])
        if self.equal_groups:  # one product per clip for all groups: [S, L] x [L, D], its group's runs' weights
            per_clip = weights.view(n_groups, 1, per_group, -1).expand(-1, self.batch, -1, -1)
            pooled = torch.bmm(per_clip.reshape(len(features), per_group, -1), features).view(n_groups, self.batch, per_group, -1)
            return pooled.transpose(1, 2).reshape(len(weights), self.batch, -1)
        parts = [torch.matmul(weights[start:stop], batches[g]).transpose(0, 1) for g, (start, stop) in enumerate(self.slots)]
        return torch.cat(parts)  # matmul broadcasts the [S, L] weights over the batch: [B, S, D] per group

    def _loss(self, logits, positions, counts, accumulate: int):
        """:func:`s3prl_stimulus.loss.soft_cross_entropy` over the stacked batch, scaled to the sum of per-run
        means, and its gradient ``[R, B, C]``.

        Its per-clip scaling is linear in the class weights, so run r's rows get ``w_r * R*B / (n_r * accumulate)``;
        padding rows (zero targets) add nothing.
        """
        import torch

        from s3prl_stimulus.loss import soft_cross_entropy_and_gradient

        n_runs, batch, n_classes = logits.shape
        run_positions, run_counts = positions[self.run_group], counts[self.run_group]
        mask = torch.arange(batch, device=positions.device).unsqueeze(0) < run_counts.unsqueeze(1)
        targets = self.grid.train_targets[self.offsets.unsqueeze(1) + run_positions] * mask.unsqueeze(-1)
        scale = (n_runs * batch) / (run_counts.to(torch.float32) * accumulate)
        weights = (self.class_weights * scale.unsqueeze(1)).unsqueeze(1).expand(-1, batch, -1)
        loss, grad = soft_cross_entropy_and_gradient(logits.reshape(-1, n_classes), targets.reshape(-1, n_classes),
                                                     weights.reshape(-1, n_classes))
        return loss, grad.view(n_runs, batch, n_classes)

    def _backward(self, grad_logits, pooled, batches, weights, folded_slots, projector_grad: bool) -> None:
        """Every parameter's gradient from ``dz``; ``batches``: the gathered ``[G*B, L, D]`` or, with the kernels, rows ``[G, B]``."""
        import torch

        head, to_runs = self.head, self.grid.run_slot
        grad_map = torch.bmm(grad_logits.transpose(1, 2), pooled).index_select(0, to_runs)  # dM [R, C, D]
        grad_bias = grad_logits.sum(dim=1).index_select(0, to_runs)  # dm [R, C]
        first = head.linear_bias.grad is None  # the step's first micro-batch
        self.grad_map_sum = grad_map if first else self.grad_map_sum + grad_map
        linear_t = head.linear_weight.transpose(1, 2).contiguous()  # a contiguous Lw^T: the K = C product's fast path
        if projector_grad:
            self.projector_grad = _accumulate(head.projector_weight, torch.bmm, linear_t, grad_map, buffer=self.projector_grad)
        _accumulate(head.projector_bias, lambda: torch.bmm(linear_t, grad_bias.unsqueeze(2)).squeeze(2))
        outer = grad_bias.unsqueeze(2) * head.projector_bias.unsqueeze(1)
        _accumulate(head.linear_weight, lambda: torch.baddbmm(outer, grad_map, head.projector_weight.transpose(1, 2)))
        _accumulate(head.linear_bias, lambda: grad_bias)
        if weights is not None:
            grad_pooled = torch.bmm(grad_logits, folded_slots)  # dP [R, B, D] in slot order
            _accumulate(head.featurizer_weights, lambda: self._layer_weights_grad(grad_pooled, batches, weights))

    def _layer_weights_grad(self, grad_pooled, batches, weights):
        """d loss / d featurizer weights ``[R, L]`` (run order), through each group's batch and the softmax."""
        import torch

        n_groups, per_group = len(self.slots), self.slots[0][1]
        if self.use_kernels:  # ``batches``: table rows
            grad = torch.empty_like(weights)
            kernels.layer_weights_grad_from_table(self.table, batches, grad_pooled.contiguous().numpy(), self.starts, grad.numpy())
        elif self.equal_groups:  # [S, D] x [D, L] per clip, summed over each group's batch
            per_clip = grad_pooled.view(n_groups, per_group, self.batch, -1).transpose(1, 2).reshape(len(batches), per_group, -1)
            grad = torch.bmm(per_clip, batches.transpose(1, 2)).view(n_groups, self.batch, per_group, -1).sum(dim=1)
            grad = grad.reshape(len(weights), -1)
        else:
            by_group = batches.view(n_groups, self.batch, *batches.shape[1:])
            grad = torch.cat([torch.matmul(grad_pooled[start:stop].transpose(0, 1), by_group[g].transpose(1, 2)).sum(dim=0)
                              for g, (start, stop) in enumerate(self.slots)])
        grad = weights * (grad - (grad * weights).sum(dim=1, keepdim=True))  # the softmax's backward
        return grad.index_select(0, self.grid.run_slot)

    def gradient_norms(self):
        """Per run, ``clip_grad_norm_``'s total norm of its gradients ``[R]``, without a pass over the projector's.

        The projector's gradient is ``Lw^T dM`` (``dM``: the folded map's gradient summed over the step's
        micro-batches; ``Lw`` does not change within a step), so its squared norm is
        ``sum((Lw Lw^T) * (dM dM^T))``: two ``[C, C]`` Gram matrices per run instead of reading ``[P, D]``.
        Computed in float64; it agrees with the float32 norms to float rounding.
        """
        import torch

        head = self.head
        linear, grad_map = head.linear_weight.detach().double(), self.grad_map_sum.double()
        squares = (torch.bmm(linear, linear.transpose(1, 2)) * torch.bmm(grad_map, grad_map.transpose(1, 2))).sum(dim=(1, 2))
        squares = squares.clamp(min=0)
        for parameter in head.parameters():
            if parameter is not head.projector_weight and parameter.grad is not None:
                squares = squares + parameter.grad.flatten(1).double().pow(2).sum(dim=1)
        return squares.sqrt().to(head.projector_weight.dtype)

    def fuses_projector_update(self, optimizer) -> bool:
        """Whether :meth:`optimizer_step` updates the projector with the fused CPU kernel: torch's AdamW, plain settings."""
        import torch

        weight = self.head.projector_weight
        if not self.use_kernels or type(optimizer) is not torch.optim.AdamW or not weight.is_contiguous():
            return False
        group = self._projector_group(optimizer)
        return not any(group.get(flag) for flag in ("amsgrad", "maximize", "capturable", "differentiable"))

    def _projector_group(self, optimizer) -> dict:
        """The optimizer's parameter group holding the projector."""
        weight = self.head.projector_weight
        return next(g for g in optimizer.param_groups if any(p is weight for p in g["params"]))

    def optimizer_step(self, optimizer, coefficients=None) -> None:
        """``optimizer.step()``; with ``coefficients`` (the per-run clipping factors), the fused projector update.

        Then the projector has no ``.grad``: ``optimizer.step()`` updates every other parameter, and
        :func:`kernels.projector_adamw_` updates the projector and its AdamW state in ``optimizer.state``
        (the same tensors torch keeps: a saved state resumes either way), and leaves the next folded map.
        """
        import torch

        if coefficients is None:
            optimizer.step()
            return
        head = self.head
        weight = head.projector_weight
        linear_old = head.linear_weight.detach().clone()  # the gradient's Lw; the step updates it
        optimizer.step()
        group = self._projector_group(optimizer)
        state = optimizer.state[weight]
        if not state:  # as torch initialises a fused AdamW's state
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            state["exp_avg"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(weight, memory_format=torch.preserve_format)
        state["step"].add_(1)
        beta1, beta2 = (float(beta) for beta in group["betas"])
        scalars = kernels.adamw_scalars(float(group["lr"]), beta1, beta2, float(group["weight_decay"]), float(group["eps"]),
                                        int(state["step"]))
        kernels.projector_adamw_(weight.detach().numpy(), state["exp_avg"].numpy(), state["exp_avg_sq"].numpy(),
                                 linear_old.numpy(), self.grad_map_sum.numpy(), coefficients.detach().contiguous().numpy(),
                                 head.linear_weight.detach().numpy(), self.next_map.numpy(), *scalars)
        self.next_map_key = self._parameters_key()


def _accumulate(parameter, compute, *args, buffer=None):
    """Add a gradient to ``parameter.grad`` (set it when there is none): ``compute(*args)``, into ``buffer`` if given.

    With a buffer (a tensor of the parameter's shape kept by the caller), the first micro-batch writes the
    product straight into it (``out=``): the largest gradient is not allocated afresh every step.
    """
    if parameter.grad is not None:
        parameter.grad.add_(compute(*args))
        return buffer
    if buffer is not None and buffer.shape == parameter.shape:
        compute(*args, out=buffer)
    else:
        buffer = compute(*args)
    parameter.grad = buffer
    return buffer
