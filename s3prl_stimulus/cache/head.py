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

        def pooled(self, means):
            """``means [R, B, L, D]`` → the featurizer's weighted sum ``[R, B, D]`` (S3PRL: softmax of weights)."""
            if not self.weighted:
                return means[:, :, 0]
            return torch.einsum("rl,rbld->rbd", torch.softmax(self.featurizer_weights, dim=-1), means)

        def forward(self, means):
            """Logits ``[R, B, C]``: Linear(mean) = mean(Linear) — the head is linear after pooling."""
            hidden = torch.baddbmm(self.projector_bias.unsqueeze(1), self.pooled(means), self.projector_weight.transpose(1, 2))
            return torch.baddbmm(self.linear_bias.unsqueeze(1), hidden, self.linear_weight.transpose(1, 2))

        def run_logits(self, runs, means):
            """Logits of ``runs`` (indices) on shared clips ``means [N, L, D]`` → ``[len(runs), N, C]``."""
            if not self.weighted:
                pooled = means[:, 0].unsqueeze(0).expand(len(runs), -1, -1)
            else:
                pooled = torch.einsum("rl,nld->rnd", torch.softmax(self.featurizer_weights[runs], dim=-1), means)
            hidden = torch.baddbmm(self.projector_bias[runs].unsqueeze(1), pooled, self.projector_weight[runs].transpose(1, 2))
            return torch.baddbmm(self.linear_bias[runs].unsqueeze(1), hidden, self.linear_weight[runs].transpose(1, 2))

        def per_run_grad_norms(self):
            """Per run, ``clip_grad_norm_``'s total norm: the 2-norm of the per-tensor 2-norms of its gradients."""
            norms = [p.grad.flatten(1).norm(dim=1) for p in self.parameters() if p.grad is not None]
            return torch.stack(norms, dim=1).norm(dim=1)

        def clip_gradients(self, max_norm: float):
            """``torch.nn.utils.clip_grad_norm_`` applied to each run's slices separately."""
            total = self.per_run_grad_norms()
            coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
            for p in self.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef.view(-1, *([1] * (p.dim() - 1))))
            return total

    return BatchedHead()


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
    scheduler = None
    if config.get("scheduler"):
        from s3prl.schedulers import get_scheduler

        scheduler = get_scheduler(optimizer, total_steps, config["scheduler"])
    return optimizer, scheduler
