"""The utterance-level head: projector, then one of S3PRL's utterance-level models.

The paper's head (EMO-SUPERB's, which is S3PRL's emotion recipe's) is
``Linear(upstream_dim -> projector_dim=256)`` on every frame, then S3PRL's ``UtteranceLevel`` with
``MeanPooling`` (mean over each clip's own frames, padding excluded) and its default post-net, a
single ``Linear(256 -> 6)``. ``modelrc.select`` names the model class; its options are
``modelrc[<select>]``, exactly as in S3PRL's recipes. Classes are looked up in S3PRL's
``s3prl.downstream.model`` (``UtteranceLevel`` with ``MeanPooling`` or ``AttentivePooling``, any
``pre_net``/``post_net``) and in the emotion recipe's ``s3prl.downstream.emotion.model``
(``DeepModel`` with ``CNNSelfAttention``/``FCN``/``DeepNet``). Frame-level models are refused.

Pool first (``modelrc.pool_first``, on in the packaged config): with ``UtteranceLevel`` +
``MeanPooling`` and no ``pre_net``, the projector is linear and the mean over frames commutes with
it, ``mean_t(W x_t + b) = W mean_t(x_t) + b``, so the head averages each clip's frames first and
projects one vector per clip. Same function, same parameters and state dict, same gradients (up to
float rounding), but the projector's cost no longer scales with the number of frames: on CPU with
``fbank`` it was most of the step. ``pool_first: false`` runs S3PRL's order (project every frame).
"""

from __future__ import annotations

import argparse
import importlib

import torch
from torch import nn
from torch.nn.utils.rnn import pad_sequence

from s3prl_stimulus.errors import StimulusError

HEAD_MODULES = ("s3prl.downstream.model", "s3prl.downstream.emotion.model")
"""Where ``modelrc.select`` is looked up, in order."""

FRAME_LEVEL = ("FrameLevel",)


def resolve_head(name: str) -> type:
    """The S3PRL model class called ``name`` (an utterance-level one)."""
    if name in FRAME_LEVEL:
        raise StimulusError(f"modelrc.select={name} predicts per frame; choose an utterance-level head: UtteranceLevel or DeepModel")
    for module_name in HEAD_MODULES:
        cls = getattr(importlib.import_module(module_name), str(name), None)
        if isinstance(cls, type) and issubclass(cls, nn.Module):
            return cls
    raise StimulusError(
        f"unknown modelrc.select={name!r}: use UtteranceLevel (paper; pooling MeanPooling or AttentivePooling) "
        "or DeepModel, from S3PRL's downstream/model.py and downstream/emotion/model.py"
    )


class StimulusHead(nn.Module):
    """``features`` (list of unpadded ``[T_i, D]`` tensors) → logits ``[B, n_classes]``."""

    def __init__(self, upstream_dim: int, n_classes: int, modelrc: dict):
        super().__init__()
        select = modelrc.get("select")
        if "projector_dim" not in modelrc or select is None:
            raise StimulusError("modelrc needs projector_dim and select (paper: projector_dim=256, select=UtteranceLevel)")
        options = dict(modelrc.get(select) or {})
        self.pool_first = bool(modelrc.get("pool_first", False)) and select == "UtteranceLevel" \
            and options.get("pooling", "MeanPooling") == "MeanPooling" and not options.get("pre_net")
        self.projector = nn.Linear(upstream_dim, int(modelrc["projector_dim"]))
        try:
            self.model = resolve_head(select)(input_dim=int(modelrc["projector_dim"]), output_dim=n_classes, **options)
        except TypeError as error:
            raise StimulusError(f"modelrc.{select} options {options} do not fit {select}: {error}") from None
        self.n_classes = n_classes

    def forward(self, features: list) -> torch.Tensor:
        if self.pool_first:
            pooled = self.projector(torch.stack([f.mean(dim=0) for f in features]))
            logits, _ = self.model.post_net(pooled)
        else:
            lengths = torch.tensor([len(f) for f in features], device=features[0].device)
            logits, _ = self.model(self.projector(pad_sequence(features, batch_first=True)), lengths)
        if logits.dim() != 2 or logits.shape[1] != self.n_classes:
            raise StimulusError(f"the head returned logits of shape {tuple(logits.shape)}, not [batch, {self.n_classes}]: use an utterance-level head")
        return logits


# --- checkpoints written by S3PRL's runner ------------------------------------------------------


def load_checkpoint(path) -> dict:
    """A runner checkpoint, loaded with ``weights_only`` and only ``argparse.Namespace`` (S3PRL's
    ``Args``) allowed beyond tensors, scoped to this call (the launcher allows it process-wide)."""
    safe_globals = getattr(torch.serialization, "safe_globals", None)  # torch >= 2.5
    try:
        if safe_globals is None:
            return torch.load(path, map_location="cpu")
        with safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # unpickling, truncated file, not a checkpoint at all
        raise StimulusError(f"cannot load checkpoint {path} ({type(error).__name__}: {str(error)[:200]}): "
                            "pass a states-*.ckpt or dev-best.ckpt written by an emotion_stimulus run") from None


def check_checkpoint(checkpoint: dict, path, downstream: str, expected: dict) -> None:
    """A checkpoint from another task or another head is a clear error, not a state-dict traceback.

    ``expected``: this expert's state dict (names and shapes that the checkpoint must match).
    """
    task = getattr(checkpoint.get("Args"), "downstream", None)
    if task != downstream or "Downstream" not in checkpoint:
        raise StimulusError(f"checkpoint {path} was trained for downstream {task!r}, not {downstream}: "
                            f"pass a checkpoint from an {downstream} run (its expdir's dev-best.ckpt)")
    # Tensors only: the extra state (the upstream's identity) is checked by integration.identity.
    saved = {k: tuple(v.shape) for k, v in checkpoint["Downstream"].items() if hasattr(v, "shape")}
    wanted = {k: tuple(v.shape) for k, v in expected.items() if hasattr(v, "shape")}
    if saved != wanted:
        differ = sorted(set(saved.items()) ^ set(wanted.items()))[:2]
        raise StimulusError(f"checkpoint {path} holds a different head or upstream size than this config ({differ}): "
                            "evaluate it with `-e` alone so S3PRL restores the config it was trained with")


def layer_weights(checkpoint: dict) -> list | None:
    """Softmax of the featurizer's layer weights saved in a runner checkpoint, or None.

    The runner never hands its Featurizer to the expert, but saves its state (``Featurizer``) in
    every checkpoint; ``weights`` exists only when the upstream returns several hidden states.
    """
    weights = (checkpoint.get("Featurizer") or {}).get("weights")
    if weights is None or weights.numel() < 2:
        return None
    return torch.softmax(weights.double(), dim=-1).tolist()
