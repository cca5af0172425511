"""The frozen upstream: built through S3PRL's hub and ``Featurizer``, identified by its weights, run on batches.

``encode_batch`` turns a batch of equally long clips into each clip's time-mean of every selected
hidden state over exactly the frames S3PRL keeps (``Featurizer.tolist``): what the cache stores.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.hub_entries import fetch_failure
from s3prl_stimulus.integration.identity import weights_sha256
from s3prl_stimulus.io import sha256_file

DTYPES = ("fp32", "bf16")


@dataclass(frozen=True)
class UpstreamSpec:
    """An upstream as run_downstream names it: ``-u``, ``-k``, ``-g``, ``-s``, ``-l``, ``-r``."""

    name: str
    ckpt: Optional[str] = None
    model_config: Optional[str] = None
    feature_selection: str = "hidden_states"
    layer_selection: Optional[int] = None
    refresh: bool = False


# --- building -----------------------------------------------------------------------------------


def import_hub():
    """``s3prl.hub``, after making the current torch/torchaudio stack able to import it."""
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    import s3prl.hub as hub

    return hub


def check_upstream_name(hub, name: str) -> None:
    known = [a for a in dir(hub) if not a.startswith("_")]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise StimulusError(f"unknown upstream {name!r}{hint}: use a name S3PRL's hub knows, e.g. fbank, wavlm_large, wavlm_local -k FILE")


def build_upstream(spec: UpstreamSpec, device: str):
    """(upstream, featurizer) built the way S3PRL's runner builds them, frozen, in eval mode."""
    hub = import_hub()
    check_upstream_name(hub, spec.name)
    if spec.name.endswith("_local") and (spec.ckpt is None or not Path(spec.ckpt).is_file()):
        raise StimulusError(f"upstream {spec.name} needs a local checkpoint: pass -k FILE (got {spec.ckpt!r})")
    from s3prl.upstream.interfaces import Featurizer

    try:
        upstream = getattr(hub, spec.name)(ckpt=spec.ckpt, model_config=spec.model_config, refresh=spec.refresh)
    except Exception as error:
        message = fetch_failure(error, spec.name)
        if message is None:
            raise
        raise StimulusError(message) from None
    upstream = upstream.to(device).eval()
    for parameter in upstream.parameters():
        parameter.requires_grad_(False)
    featurizer = Featurizer(upstream, feature_selection=spec.feature_selection, upstream_device=device,
                            layer_selection=spec.layer_selection, normalize=False).to(device)
    return upstream, featurizer


def _file_hash_or_none(path) -> Optional[str]:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def upstream_fields(spec: UpstreamSpec, upstream, featurizer) -> dict:
    """The manifest's description of the upstream (part of the key)."""
    return {
        "name": spec.name,
        "weights_sha256": weights_sha256(upstream),
        "model_config_sha256": _file_hash_or_none(spec.model_config),
        "feature_selection": featurizer.feature_selection,
        "layer_selection": spec.layer_selection,
        "n_hidden": int(getattr(featurizer, "layer_num", 1)) if hasattr(featurizer, "weights") else 1,
        "weighted_sum": hasattr(featurizer, "weights"),
        "dim": int(featurizer.output_dim),
        "downsample_rate": int(featurizer.downsample_rate),
    }


# --- encoding -----------------------------------------------------------------------------------


def kept_frames(n_samples: int, n_output_frames: int, downsample_rate: int) -> int:
    """Frames S3PRL's ``Featurizer.tolist`` keeps for a clip: ``f[:round(samples / rate)]``."""
    return min(round(n_samples / downsample_rate), n_output_frames)


def hidden_states(upstream, featurizer, wavs) -> list:
    """The featurizer's selected hidden states, each ``[B, T, D]`` (one entry when no weighted sum)."""
    selected = featurizer._select_feature(upstream(wavs))
    return list(selected) if isinstance(selected, (list, tuple)) else [selected]


def encode_batch(upstream, featurizer, wavs, feature_normalize: bool, dtype: str) -> dict:
    """Per-clip means of every hidden state over the frames S3PRL keeps (float32, on the CPU).

    ``wavs`` all have the same length, so no clip sees padding: each result is the clip's own.
    """
    import torch
    import torch.nn.functional as F

    device = wavs[0].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        states = hidden_states(upstream, featurizer, wavs)
    frames = kept_frames(len(wavs[0]), states[0].shape[1], featurizer.downsample_rate)
    if frames < 1:
        raise StimulusError(f"a clip of {len(wavs[0])} samples gives no feature frame with this upstream: "
                            "leave such clips out with a clip list")
    stacked = torch.stack([s[:, :frames].float() for s in states], dim=1)  # [B, L, T, D]
    out = {"frames": np.full(len(wavs), frames, dtype=np.int64),
           "means": stacked.mean(dim=2).cpu().numpy()}
    if feature_normalize:
        normalised = F.layer_norm(stacked, (stacked.shape[-1],))
        out["ln_means"] = normalised.mean(dim=2).cpu().numpy()
    return out


# --- device -------------------------------------------------------------------------------------


def check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise StimulusError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise StimulusError(f"device {device} requested but torch sees no CUDA GPU: pass --device cpu")
    return device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"
