"""Which upstream a number came from: one fingerprint of its weights, recorded and checked by both paths.

A head trained on one upstream loads without complaint into another of the same shape (two
checkpoints of one architecture) and then scores garbage, so shapes prove nothing. Both training
paths therefore name the upstream by :func:`weights_sha256` (SHA-256 over every parameter and
buffer of S3PRL's hub upstream, as built), record an :class:`UpstreamIdentity` in every checkpoint
(under ``Downstream["_extra_state"]``, where ``nn.Module.get_extra_state`` puts it: plain strings
and booleans, so ``torch.load(weights_only=True)`` reads it) and every results JSON
(``"upstream_identity"``), and :func:`verify_checkpoint` refuses to put a checkpoint's head on an
upstream with another fingerprint.

``verified`` is true when the fingerprint of the upstream that computed the features is known and
every checkpoint the head came through recorded the same one. A checkpoint that records none
(older versions, other code) is accepted only with an explicit option, and everything computed
from it says ``"upstream unverified"``. An imported checkpoint (``import-authors``: the paper's authors'
released models) records the upstream the user named at import, unfingerprinted, and the file it came from
(:data:`IMPORT_KEY`); naming the upstream at import is the explicit acceptance, so it is taken without the
option, on that upstream only, and everything computed from it is unverified.

The S3PRL path learns the upstream from S3PRL's ``Runner``, which builds the upstream before the
expert but never hands it over: :func:`runner_upstream` finds the Runner on the call stack.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from typing import Optional

from s3prl_stimulus.errors import StimulusError

EXTRA_STATE_KEY = "_extra_state"
"""The state-dict key torch gives ``nn.Module.get_extra_state`` (``Downstream["_extra_state"]``)."""
IDENTITY_KEY = "upstream_identity"
UNVERIFIED = "upstream unverified"
IMPORT_KEY = "imported_from"
"""Beside the identity in an imported checkpoint's extra state: the source file, its SHA-256 and format."""


def weights_sha256(module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): identifies the weights."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()


@dataclass(frozen=True)
class UpstreamIdentity:
    """The upstream behind a head or a number: hub name, ``-k`` file, weights fingerprint, whether verified."""

    upstream: Optional[str]
    upstream_ckpt: Optional[str]
    weights_sha256: Optional[str]
    verified: bool
    reason: Optional[str] = None  # "upstream unverified: why", when not verified

    @classmethod
    def of(cls, upstream: str, upstream_ckpt: Optional[str], weights_sha256: Optional[str]) -> "UpstreamIdentity":
        """An upstream whose fingerprint is known (verified) or unknown (not)."""
        if weights_sha256 is None:
            return cls(upstream, upstream_ckpt, None, False, f"{UNVERIFIED}: the upstream's weights were not seen "
                                                            "(the expert was built outside S3PRL's Runner)")
        return cls(upstream, upstream_ckpt, weights_sha256, True)

    def record(self) -> dict:
        return dataclasses.asdict(self)

    def unverified(self, why: str) -> "UpstreamIdentity":
        return dataclasses.replace(self, verified=False, reason=f"{UNVERIFIED}: {why}")

    def command(self) -> str:
        """As ``-u``/``-k`` would name it."""
        return f"{self.upstream} -k {self.upstream_ckpt}" if self.upstream_ckpt else str(self.upstream)

    def describe(self) -> str:
        return f"{self.command()} (weights sha256 {(self.weights_sha256 or 'unknown')[:12]})"


def checkpoint_state(identity: UpstreamIdentity) -> dict:
    """What a checkpoint stores under ``Downstream["_extra_state"]``."""
    return {IDENTITY_KEY: identity.record()}


def saved_identity(checkpoint: dict, path) -> Optional[UpstreamIdentity]:
    """The identity a runner-layout checkpoint records, or None (older checkpoints, other code)."""
    state = (checkpoint.get("Downstream") or {}).get(EXTRA_STATE_KEY)
    record = state.get(IDENTITY_KEY) if hasattr(state, "get") else None
    if record is None:
        return None
    try:
        return UpstreamIdentity(**record)
    except TypeError:
        raise StimulusError(f"checkpoint {path} holds a malformed upstream identity ({record!r}): "
                            "pass a checkpoint written by s3prl-stimulus, unedited") from None


def verify_checkpoint(current: UpstreamIdentity, checkpoint: dict, path, allow_unverified: bool, option: str,
                      fix: str) -> UpstreamIdentity:
    """The identity of numbers computed by ``checkpoint``'s head on ``current``'s features.

    A checkpoint of other weights is refused (``fix`` says how to get the right upstream); one whose
    upstream cannot be compared is refused unless ``allow_unverified`` (set by ``option``).
    """
    saved = saved_identity(checkpoint, path)
    if saved is not None and saved.weights_sha256 is None and _imported(checkpoint):
        return _accept_imported(current, saved, path, fix)
    if saved is None or saved.weights_sha256 is None or current.weights_sha256 is None:
        return _accept_unverifiable(current, saved, path, allow_unverified, option)
    if (saved.upstream, saved.weights_sha256) != (current.upstream, current.weights_sha256):
        raise StimulusError(f"checkpoint {path} was trained on upstream {saved.describe()}, but the upstream here is "
                            f"{current.describe()}: {fix}")
    if saved.verified:
        return current
    return current.unverified(f"checkpoint {path} descends from an unverified one "
                              f"({(saved.reason or '').removeprefix(UNVERIFIED + ': ')})")


def _imported(checkpoint: dict) -> bool:
    state = (checkpoint.get("Downstream") or {}).get(EXTRA_STATE_KEY)
    return hasattr(state, "get") and isinstance(state.get(IMPORT_KEY), dict)


def _accept_imported(current: UpstreamIdentity, saved: UpstreamIdentity, path, fix: str) -> UpstreamIdentity:
    """An imported head on the upstream named at import: scored, unverified; on another upstream: refused."""
    if (saved.upstream, _resolved(saved.upstream_ckpt)) != (current.upstream, _resolved(current.upstream_ckpt)):
        raise StimulusError(f"checkpoint {path} was imported for upstream {saved.command()}, but the upstream here is "
                            f"{current.command()}: {fix}, or import it again naming this upstream")
    return current.unverified((saved.reason or "").removeprefix(f"{UNVERIFIED}: ") or f"checkpoint {path} was imported")


def _resolved(path: Optional[str]) -> Optional[str]:
    from pathlib import Path

    return path if path is None or "://" in path else str(Path(path).resolve())


def _accept_unverifiable(current: UpstreamIdentity, saved: Optional[UpstreamIdentity], path, allow_unverified: bool,
                         option: str) -> UpstreamIdentity:
    if saved is None or saved.weights_sha256 is None:
        why = f"checkpoint {path} records no upstream identity (written by an older version or other code)"
    else:
        why = current.reason.removeprefix(f"{UNVERIFIED}: ")
    if not allow_unverified:
        raise StimulusError(f"cannot verify which upstream {path} was trained on: {why}; if you know it is this one "
                            f"({current.command()}), accept it unverified with {option}")
    return current.unverified(why)


def runner_upstream():
    """The upstream module of the S3PRL ``Runner`` on the call stack (building the caller), or None.

    S3PRL's ``Runner._get_downstream`` builds the expert after the upstream but passes only its
    output size and rate; the Runner is the ``self`` of a calling frame. Found the same way under the
    launcher and under S3PRL's plain ``run_downstream.py``.
    """
    runner_module = sys.modules.get("s3prl.downstream.runner")
    frame = sys._getframe(1)
    while runner_module is not None and frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, runner_module.Runner) and hasattr(candidate, "upstream"):
            return unwrap(candidate.upstream.model)
        frame = frame.f_back
    return None


def unwrap(model):
    """The module itself: DistributedDataParallel wraps a trainable upstream (and its state-dict names)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model
