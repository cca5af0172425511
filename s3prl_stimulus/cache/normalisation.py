"""What the S3PRL path does to a waveform before the upstream, as ``datarc`` names it: normalisation and crop.

``datarc.normalisation`` is either the fold's training-set waveform mean/std (so every fold gets its
own cache) or none; ``datarc.max_seconds`` crops every clip. Both enter a cache's key.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from s3prl_stimulus.audio import SAMPLE_RATE, normalise_waveform
from s3prl_stimulus.errors import StimulusError

NORMALISATIONS = ("train_mean_std", "none")


@dataclass(frozen=True)
class Normalisation:
    """Waveform normalisation as ``datarc.normalisation`` names it: the fold's training mean/std, or none."""

    kind: str  # "train_mean_std" | "none"
    fold: Optional[int] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    train_clips_sha256: Optional[str] = None  # the training clips the statistics were computed on

    @property
    def tag(self) -> str:
        """Directory name: ``fold<k>`` or ``none``."""
        return f"fold{self.fold}" if self.kind == "train_mean_std" else "none"

    def apply(self, samples: np.ndarray) -> np.ndarray:
        """The S3PRL path's arithmetic (``ClipDataset``): ``(x - mean) / (std + 1e-6)`` in float32.

        NumPy 2 keeps float32 with Python-float operands, so both paths round identically (tested bitwise).
        """
        if self.kind == "none":
            return samples
        return normalise_waveform(samples, self.mean, self.std)


def fold_normalisation(audio_dir, clips: Sequence[str], fold: int) -> Normalisation:
    """The fold's training-set waveform statistics over ``clips``, as the S3PRL path computes them."""
    from s3prl_stimulus.audio import clip_path, clips_fingerprint, waveform_stats
    from s3prl_stimulus.partition import check_fold, split_clips

    fold = check_fold(fold)
    present = set(clips)
    train = [c for c in split_clips(fold, "train") if c in present]  # sorted, like datarc.clips filtering
    if not train:
        raise StimulusError(f"none of the {len(clips)} clips to extract is in fold {fold}'s training set: "
                            "extract a clip list that includes training clips, or use --normalisation none")
    stats = waveform_stats([clip_path(audio_dir, c) for c in train])
    return Normalisation("train_mean_std", fold, float(stats["mean"]), float(stats["std"]), clips_fingerprint(train))


def truncation(samples: Sequence[int], max_seconds) -> Optional[int]:
    """``datarc.max_seconds`` as samples, or None when it shortens none of these clips (no effect)."""
    if max_seconds in (None, "none", "None"):
        return None
    max_samples = int(float(max_seconds) * SAMPLE_RATE)
    if max_samples < 1:
        raise StimulusError(f"max_seconds={max_seconds} keeps no sample: use a positive number of seconds (paper: 10)")
    return max_samples if max(samples) > max_samples else None


def fold_entry(manifest: dict, fold: int):
    """The normalisation a cache holds for ``fold`` (dict), or None: its own, or one of ``shared_folds``."""
    norm = manifest["normalisation"]
    if norm["kind"] == "train_mean_std" and norm["fold"] == fold:
        return norm
    return next((n for n in manifest.get("shared_folds") or [] if n["fold"] == fold), None)


def shared_tag(folds) -> str:
    """Directory name of one cache serving several folds: ``folds12345``."""
    return "folds" + "".join(str(k) for k in sorted(folds))
