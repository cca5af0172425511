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
"""

from __future__ import annotations

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
        self.features = torch.empty((len(grid.groups) * batch_size, n_hidden, dim), dtype=grid.features.dtype,
                                    device=grid.features.device)
        self.projector_grad = None  # the largest gradient, written in place step after step
        self.grad_map_sum = None  # the folded map's gradient over the step's micro-batches (gradient_norms)

    def loss_and_gradients(self, positions, counts, accumulate: int):
        """The summed class-balanced loss of every run on its group's batch; adds the gradients to ``p.grad``.

        ``positions [G, B]`` / ``counts [G]``: each group's batch (:class:`s3prl_stimulus.cache.grid.BatchPlan`).
        """
        import torch

        grid, head = self.grid, self.head
        rows = grid.group_rows.gather(1, positions).flatten()
        features = torch.index_select(grid.features, 0, rows, out=self.features)
        with torch.no_grad():
            weights = head.layer_weights()[self.order] if head.weighted else None
            pooled = self._pooled(features, weights)
            folded, bias = head.output_map()
            folded_slots, bias_slots = folded.index_select(0, self.order), bias.index_select(0, self.order)
            logits = torch.baddbmm(bias_slots.unsqueeze(2), folded_slots, pooled.transpose(1, 2)).transpose(1, 2)
            loss, grad_logits = self._loss(logits, positions, counts, accumulate)
            self._backward(grad_logits, pooled, features, weights, folded_slots)
        return loss

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

    def _backward(self, grad_logits, pooled, features, weights, folded_slots) -> None:
        import torch

        head, to_runs = self.head, self.grid.run_slot
        grad_map = torch.bmm(grad_logits.transpose(1, 2), pooled).index_select(0, to_runs)  # dM [R, C, D]
        grad_bias = grad_logits.sum(dim=1).index_select(0, to_runs)  # dm [R, C]
        first = head.projector_weight.grad is None  # the step's first micro-batch
        self.grad_map_sum = grad_map if first else self.grad_map_sum + grad_map
        linear_t = head.linear_weight.transpose(1, 2).contiguous()  # a contiguous Lw^T: the K = C product's fast path
        self.projector_grad = _accumulate(head.projector_weight, torch.bmm, linear_t, grad_map, buffer=self.projector_grad)
        _accumulate(head.projector_bias, lambda: torch.bmm(linear_t, grad_bias.unsqueeze(2)).squeeze(2))
        outer = grad_bias.unsqueeze(2) * head.projector_bias.unsqueeze(1)
        _accumulate(head.linear_weight, lambda: torch.baddbmm(outer, grad_map, head.projector_weight.transpose(1, 2)))
        _accumulate(head.linear_bias, lambda: grad_bias)
        if weights is not None:
            grad_pooled = torch.bmm(grad_logits, folded_slots)  # dP [R, B, D] in slot order
            _accumulate(head.featurizer_weights, lambda: self._layer_weights_grad(grad_pooled, features, weights))

    def _layer_weights_grad(self, grad_pooled, features, weights):
        """d loss / d featurizer weights ``[R, L]`` (run order), through each group's batch and the softmax."""
        import torch

        n_groups, per_group = len(self.slots), self.slots[0][1]
        if self.equal_groups:  # [S, D] x [D, L] per clip, summed over each group's batch
            per_clip = grad_pooled.view(n_groups, per_group, self.batch, -1).transpose(1, 2).reshape(len(features), per_group, -1)
            grad = torch.bmm(per_clip, features.transpose(1, 2)).view(n_groups, self.batch, per_group, -1).sum(dim=1)
            grad = grad.reshape(len(weights), -1)
        else:
            batches = features.view(n_groups, self.batch, *features.shape[1:])
            grad = torch.cat([torch.matmul(grad_pooled[start:stop].transpose(0, 1), batches[g].transpose(1, 2)).sum(dim=0)
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
