"""The paper's head for R runs at once: stacked parameters, initial values, S3PRL checkpoint names, optimizer.

R independent copies of the featurizer's layer weights and the paper's head share a leading run
axis: layer weights ``[R, L]``, projector ``[R, P, D]`` and ``[R, P]``, output layer ``[R, C, P]``
and ``[R, C]``. A run's slice converts to and from an S3PRL checkpoint's ``Featurizer`` and
``Downstream`` entries, and by default starts from the S3PRL downstream's own head class drawn under
``torch.manual_seed(seed)``.
"""

from __future__ import annotations

from s3prl_stimulus import CLASSES
from s3prl_stimulus.cache.sweep_config import S3PRL_PATH
from s3prl_stimulus.errors import StimulusError

HEAD_PARAMETERS = {
    "projector.weight": "projector_weight",
    "projector.bias": "projector_bias",
    "model.post_net.linear.weight": "linear_weight",
    "model.post_net.linear.bias": "linear_bias",
}
"""The paper's head (``StimulusHead`` of the S3PRL downstream) → this module's stacked parameters."""
HEAD_PREFIX = "head."  # the expert keeps its StimulusHead as ``self.head``
DOWNSTREAM = "emotion_stimulus"


def make_batched_head(n_runs: int, n_hidden: int, weighted: bool, dim: int, projector_dim: int, n_classes: int):
    import torch
    from torch import nn

    class BatchedHead(nn.Module):
        """R independent copies of featurizer weights + the paper's head, stacked on a leading run axis."""

        def __init__(self):
            super().__init__()
            self.weighted = weighted
            if weighted:
                self.featurizer_weights = nn.Parameter(torch.zeros(n_runs, n_hidden))
            self.projector_weight = nn.Parameter(torch.zeros(n_runs, projector_dim, dim))
            self.projector_bias = nn.Parameter(torch.zeros(n_runs, projector_dim))
            self.linear_weight = nn.Parameter(torch.zeros(n_runs, n_classes, projector_dim))
            self.linear_bias = nn.Parameter(torch.zeros(n_runs, n_classes))

        def layer_weights(self, runs=None):
            """The featurizer's weights of ``runs`` (default all) after S3PRL's softmax: ``[R', L]``."""
            weights = self.featurizer_weights if runs is None else self.featurizer_weights[runs]
            return torch.softmax(weights, dim=-1)

        def pooled(self, runs, means):
            """The weighted sum of ``runs`` over shared clips ``means [N, L, D]`` → ``[len(runs), N, D]``.

            One small product per clip, ``[R', L] x [L, D]``, every run at once: each clip is read once.
            """
            if not self.weighted:
                return means[:, 0].unsqueeze(0).expand(len(runs), -1, -1)
            return torch.matmul(self.layer_weights(runs), means).transpose(0, 1)

        def output_map(self, runs=None):
            """Projector and output layer folded into one affine map per run: ``[R', C, D]`` and ``[R', C]``.

            The head is linear after pooling: ``Lw (W x + b) + c = (Lw W) x + (Lw b + c)``. Folding costs
            one ``[C, P] x [P, D]`` product per run per step instead of a ``[P, D]`` product per clip;
            :mod:`s3prl_stimulus.cache.step` writes out the gradients of ``W``, ``b``, ``Lw``, ``c`` through it.
            """
            select = (lambda t: t) if runs is None else (lambda t: t[runs])
            return torch.bmm(select(self.linear_weight), select(self.projector_weight)), self.output_bias(runs)

        def output_bias(self, runs=None):
            """The folded map's bias ``Lw b + c``: ``[R', C]``."""
            select = (lambda t: t) if runs is None else (lambda t: t[runs])
            linear_weight, linear_bias = select(self.linear_weight), select(self.linear_bias)
            bias = torch.baddbmm(linear_bias.unsqueeze(2), linear_weight, select(self.projector_bias).unsqueeze(2))
            return bias.squeeze(2)

        def run_logits(self, runs, means, output_map=None):
            """Logits of ``runs`` (indices) on shared clips ``means [N, L, D]`` → ``[len(runs), N, C]``.

            ``output_map``: every run's :meth:`output_map`, when the caller scores many chunks with one.
            """
            weight, bias = self.output_map(runs) if output_map is None else (t[runs] for t in output_map)
            return torch.baddbmm(bias.unsqueeze(1), self.pooled(runs, means), weight.transpose(1, 2))

        def per_run_grad_norms(self):
            """Per run, ``clip_grad_norm_``'s total norm: the 2-norm of the per-tensor 2-norms of its gradients."""
            norms = [p.grad.flatten(1).norm(dim=1) for p in self.parameters() if p.grad is not None]
            return torch.stack(norms, dim=1).norm(dim=1)

        def clip_gradients(self, max_norm: float, total=None):
            """``torch.nn.utils.clip_grad_norm_`` applied to each run's slices separately.

            ``total``: the per-run norms when the caller has them (default: :meth:`per_run_grad_norms`).
            """
            total = self.per_run_grad_norms() if total is None else total
            coef = clip_coefficients(max_norm, total)
            if bool((coef == 1.0).all()):  # no run over the limit: scaling by 1 changes nothing, skip the pass
                return total
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
            return total

    return BatchedHead()


def clip_coefficients(max_norm: float, total):
    """Per run, the factor ``clip_grad_norm_`` scales its gradients by: ``min(max_norm / (norm + 1e-6), 1)``."""
    import torch

    return torch.clamp(max_norm / (total + 1e-6), max=1.0)


def initial_head_state(seed: int, dim: int, modelrc: dict) -> dict:
    """The S3PRL downstream's own head class, built under ``torch.manual_seed(seed)``: ``{name: tensor}``."""
    import torch

    from s3prl_stimulus.downstream.emotion_stimulus.model import StimulusHead

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        state = StimulusHead(dim, len(CLASSES), modelrc).state_dict()
    if set(state) != set(HEAD_PARAMETERS):
        raise StimulusError(f"the downstream's head has parameters {sorted(state)}, expected {sorted(HEAD_PARAMETERS)}: "
                            f"this head is not the paper's linear one; {S3PRL_PATH}")
    return state


def load_run_state(head, run: int, featurizer: dict, downstream: dict) -> None:
    """Put one run's parameters, named as in an S3PRL checkpoint (``Featurizer``, ``Downstream``), into slot ``run``."""
    import torch

    with torch.no_grad():
        for name, attribute in HEAD_PARAMETERS.items():
            key = HEAD_PREFIX + name if HEAD_PREFIX + name in downstream else name
            if key not in downstream:
                raise StimulusError(f"checkpoint lacks the head parameter {HEAD_PREFIX + name}: it is not a checkpoint of "
                                    f"the paper's head ({DOWNSTREAM} with modelrc.select=UtteranceLevel)")
            target = getattr(head, attribute)
            value = downstream[key]
            if tuple(value.shape) != tuple(target.shape[1:]):
                raise StimulusError(f"checkpoint parameter {key} has shape {tuple(value.shape)}, the cache needs "
                                    f"{tuple(target.shape[1:])}: was it trained on another upstream?")
            target[run].copy_(value)
        weights = (featurizer or {}).get("weights")
        if head.weighted:
            if weights is None or weights.numel() != head.featurizer_weights.shape[1]:
                raise StimulusError(f"checkpoint has featurizer weights {None if weights is None else weights.numel()}, the "
                                    f"cache has {head.featurizer_weights.shape[1]} hidden states: another upstream?")
            head.featurizer_weights[run].copy_(weights)
        elif weights is not None and weights.numel() > 1:
            raise StimulusError("checkpoint has featurizer weights but the cache holds one hidden state: another upstream?")


def run_state(head, run: int) -> tuple[dict, dict]:
    """One run's (Featurizer, head) state dicts, named as in an S3PRL checkpoint."""
    featurizer = {"weights": head.featurizer_weights[run].detach().cpu().clone()} if head.weighted else {}
    downstream = {HEAD_PREFIX + name: getattr(head, attr)[run].detach().cpu().clone() for name, attr in HEAD_PARAMETERS.items()}
    return featurizer, downstream


def build_optimizer(head, config: dict, total_steps: int):
    """S3PRL's ``get_optimizer`` (and scheduler) over the stacked parameters, exactly as the runner calls them."""
    from s3prl.optimizers import get_optimizer

    optimizer = get_optimizer([head], total_steps, config["optimizer"])
    use_fused_step(optimizer)
    scheduler = None
    if config.get("scheduler"):
        from s3prl.schedulers import get_scheduler

        scheduler = get_scheduler(optimizer, total_steps, config["scheduler"])
    return optimizer, scheduler


FUSED_OPTIMIZERS = ("Adam", "AdamW")
FUSED_DEVICES = ("cpu", "cuda")


def use_fused_step(optimizer) -> None:
    """Step Adam/AdamW with torch's fused kernel: the same update, one pass over each stacked tensor.

    The per-tensor loop (torch's default on CPU) makes several passes; the fused kernel computes the
    same arithmetic element-wise. Left alone: other optimizers, devices without the kernel, and a
    config that chose ``foreach``/``fused`` itself. Called again after a resumed state is loaded,
    since ``load_state_dict`` brings back the saved group settings.
    """
    if type(optimizer).__name__ not in FUSED_OPTIMIZERS or type(optimizer).__module__.split(".")[0] != "torch":
        return
    for group in optimizer.param_groups:
        devices = {p.device.type for p in group["params"]}
        chosen = group.get("fused") is not None or group.get("foreach") is not None
        if chosen or group.get("differentiable") or not devices <= set(FUSED_DEVICES):
            continue
        group["fused"], group["foreach"] = True, False
