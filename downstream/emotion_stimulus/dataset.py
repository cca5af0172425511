"""Data side of the ``emotion_stimulus`` downstream: datarc, clips, audio checks, normalisation, loaders.

Everything is validated when the expert is built, before S3PRL's first training step: the datarc
(unknown or missing keys, fold, stimuli, votes source), the corpus directory and every WAV file
of the fold (missing, unreadable, empty, stereo, wrong rate or format: listed with counts), and
the labels. Only then is anything written (the waveform statistics).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from s3prl_stimulus import STIMULI
from s3prl_stimulus import audio, labels
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import check_fold, split_clips

SPLITS = ("train", "dev", "test")
DATARC_KEYS = (
    "audio_dir", "votes", "fold", "train_stimulus", "test_stimuli", "smoothing", "normalisation",
    "max_seconds", "clips", "train_batch_size", "eval_batch_size", "num_workers",
)
OPTIONAL_DATARC_KEYS = ("upstream_label",)
"""May be absent: checkpoints saved before the key existed carry configs without it (it changes no number)."""
NORMALISATIONS = ("train_mean_std", "none")
STATS_FILE = "waveform_stats.json"
NOTE = "[emotion_stimulus]"


def _option(key: str) -> str:
    return f"config.downstream_expert.datarc.{key}"


# --- datarc -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DataConfig:
    """The validated ``downstream_expert.datarc`` (meaning of each key: docs/downstream.md)."""

    audio_dir: Path
    votes: str
    fold: int
    train_stimulus: str
    test_stimuli: tuple
    smoothing: float
    normalisation: str
    max_seconds: float | None
    clips: str
    train_batch_size: int
    eval_batch_size: int
    num_workers: int
    upstream_label: str | None = None

    @classmethod
    def parse(cls, datarc: dict) -> "DataConfig":
        _check_keys("datarc", datarc, DATARC_KEYS, OPTIONAL_DATARC_KEYS)
        test_stimuli = datarc["test_stimuli"]
        if isinstance(test_stimuli, str):
            test_stimuli = [s.strip() for s in test_stimuli.split(",") if s.strip()]
        if not test_stimuli:
            raise StimulusError(f"{_option('test_stimuli')} is empty: list some of {', '.join(STIMULI)}")
        normalisation = str(datarc["normalisation"])
        if normalisation not in NORMALISATIONS:
            raise StimulusError(f"unknown {_option('normalisation')}={normalisation!r}: use {' or '.join(NORMALISATIONS)}")
        return cls(
            audio_dir=audio.check_corpus_dir(datarc["audio_dir"], option=_option("audio_dir")),
            votes=str(datarc["votes"]),
            fold=check_fold(datarc["fold"]),
            train_stimulus=labels.check_stimulus(datarc["train_stimulus"]),
            test_stimuli=tuple(dict.fromkeys(labels.check_stimulus(s) for s in test_stimuli)),
            smoothing=labels.check_smoothing(datarc["smoothing"]),
            normalisation=normalisation,
            max_seconds=_max_seconds(datarc["max_seconds"]),
            clips=str(datarc["clips"]),
            train_batch_size=_positive(datarc, "train_batch_size"),
            eval_batch_size=_positive(datarc, "eval_batch_size"),
            num_workers=_positive(datarc, "num_workers", minimum=0),
            upstream_label=_label(datarc.get("upstream_label")),
        )


def _check_keys(section: str, given: dict, known: tuple, optional: tuple = ()) -> None:
    """Unknown keys (typos in -o) and missing ones are errors: nothing silently keeps a default."""
    unknown, missing = sorted(set(given) - set(known) - set(optional)), [k for k in known if k not in given]
    problems = ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"no {missing}"] if missing else [])
    if problems:
        raise StimulusError(f"downstream_expert.{section} has {' and '.join(problems)}: its keys are "
                            f"{', '.join(known + optional)} (see the packaged downstream/emotion_stimulus/config.yaml)")


def _label(value) -> str | None:
    """``upstream_label``: the name the report shows the runs under (null: the upstream's name)."""
    if value is None:
        return None
    if not isinstance(value, str) or not value.strip():
        raise StimulusError(f"{_option('upstream_label')}={value!r} must be a name such as 'mine', or null")
    return value.strip()


def _max_seconds(value) -> float | None:
    if value in (None, "none", "None"):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise StimulusError(f"{_option('max_seconds')}={value!r} must be a positive number of seconds, or null (no crop)")
    return float(value)


def _positive(datarc: dict, key: str, minimum: int = 1) -> int:
    value = datarc[key]
    if not isinstance(value, int) or value < minimum:
        raise StimulusError(f"{_option(key)}={value!r} must be an integer >= {minimum}")
    return value


EVALRC_KEYS = ("select_by", "bootstrap_samples", "bootstrap_by_speaker", "bootstrap_seed")
EVALRC_OPTIONAL = {"allow_unverified_upstream": False}
"""Keys a checkpoint's saved config may lack (added after it was written): their defaults."""
SELECT_BY = ("loss", "macro_f1")


def parse_evalrc(evalrc: dict) -> dict:
    """The validated ``downstream_expert.evalrc``: dev-best criterion, bootstrap settings, upstream checks."""
    evalrc = EVALRC_OPTIONAL | dict(evalrc or {})
    _check_keys("evalrc", evalrc, EVALRC_KEYS + tuple(EVALRC_OPTIONAL))
    if not isinstance(evalrc["allow_unverified_upstream"], bool):
        raise StimulusError(f"evalrc.allow_unverified_upstream={evalrc['allow_unverified_upstream']!r} must be True or False")
    if evalrc["select_by"] not in SELECT_BY:
        raise StimulusError(f"unknown config.downstream_expert.evalrc.select_by={evalrc['select_by']!r}: use loss (paper) or macro_f1")
    if not isinstance(evalrc["bootstrap_samples"], int) or evalrc["bootstrap_samples"] < 1:
        raise StimulusError(f"evalrc.bootstrap_samples={evalrc['bootstrap_samples']!r} must be an integer >= 1 (paper: 1000)")
    return evalrc


# --- clips --------------------------------------------------------------------------------------


def fold_clips(config: DataConfig) -> dict:
    """Clips of each split of the fold, restricted by ``datarc.clips`` with a loud count of what is left out."""
    full = {split: split_clips(config.fold, split) for split in SPLITS}
    if config.clips == "all":
        return full
    if config.clips == "present":
        keep = set(audio.present_clips(config.audio_dir, [c for clips in full.values() for c in clips]))
    else:
        keep = set(audio.read_clip_list(config.clips, option=_option("clips")))
    kept = {split: [c for c in clips if c in keep] for split, clips in full.items()}
    left_out = sum(len(full[s]) - len(kept[s]) for s in SPLITS)
    counts = ", ".join(f"{len(kept[s])} of {len(full[s])} {s}" for s in SPLITS)
    print(f"{NOTE} WARNING: datarc.clips={config.clips}: using {counts} clips of fold {config.fold}; "
          f"{left_out} clips LEFT OUT: results are not comparable with the full corpus", file=sys.stderr)
    empty = [s for s in SPLITS if not kept[s]]
    if empty:
        raise StimulusError(f"datarc.clips={config.clips} leaves no {'/'.join(empty)} clips in fold {config.fold}: "
                            "give clips of every split, or clips=all")
    return kept


def check_audio(config: DataConfig, clips: dict) -> None:
    """Every WAV of every split, headers only; all problems listed with counts in one error."""
    report = audio.scan_corpus(config.audio_dir, [c for s in SPLITS for c in clips[s]])
    report.raise_if_bad(missing_fix=f"{audio.GET_CREMA_D} (it resumes), or train on the clips you have with {_option('clips')}=present")


# --- waveform normalisation ---------------------------------------------------------------------


def normalisation_stats(config: DataConfig, train_clips: list, expdir) -> dict | None:
    """The paper's waveform mean/std over the fold's training clips, computed once into expdir.

    Reused on resume and evaluation (the file is checked to describe the same clips). Under DDP
    rank 0 computes while the other ranks wait at a barrier.
    """
    if config.normalisation == "none":
        return None
    path = Path(expdir) / STATS_FILE
    expect = {"fold": config.fold, "n_clips": len(train_clips), "clips_sha256": audio.clips_fingerprint(train_clips)}
    leader = not dist.is_initialized() or dist.get_rank() == 0
    if leader and not path.exists():
        print(f"{NOTE} waveform mean/std over {len(train_clips)} training clips -> {path}", file=sys.stderr)
        stats = audio.waveform_stats([audio.clip_path(config.audio_dir, c) for c in train_clips])
        audio.save_waveform_stats(path, {**stats, **expect})
    if dist.is_initialized():
        dist.barrier()
    return audio.load_waveform_stats(path, expect=expect)


# --- datasets and loaders -----------------------------------------------------------------------


class ClipDataset(Dataset):
    """Items ``(waveform float32 [T], soft target float32 [C], clip)``; waveforms read on demand."""

    def __init__(self, config: DataConfig, clips: list, targets: np.ndarray, stats: dict | None):
        self.paths = [audio.clip_path(config.audio_dir, c) for c in clips]
        self.clips, self.targets = list(clips), targets
        self.max_samples = None if config.max_seconds is None else int(config.max_seconds * audio.SAMPLE_RATE)
        self.stats = stats

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int):
        wav = audio.read_clip(self.paths[index])[: self.max_samples]
        if self.stats is not None:
            wav = audio.normalise_waveform(wav, self.stats["mean"], self.stats["std"])
        return wav, self.targets[index], self.clips[index]


def collate(batch):
    wavs, targets, clips = zip(*batch)
    return list(wavs), torch.from_numpy(np.stack(targets)), list(clips)


def train_order(n_clips: int, seed: int, epoch: int) -> list:
    """This process's clip order in ``epoch``: torch's ``DistributedSampler`` permutation, seeded with
    ``seed + epoch`` (one replica without DDP). It depends on nothing else, unlike a shuffling DataLoader,
    which draws from the global RNG, so a resumed run rebuilds exactly the epoch it stopped in."""
    replicas, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    sampler = DistributedSampler(range(n_clips), num_replicas=replicas, rank=rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    return list(sampler)


def batches_per_epoch(n_clips: int, config: DataConfig) -> int:
    """Training batches each process takes per epoch (DistributedSampler pads to equal shares; last batch short)."""
    replicas = dist.get_world_size() if dist.is_initialized() else 1
    return math.ceil(math.ceil(n_clips / replicas) / config.train_batch_size)


def make_loader(dataset: ClipDataset, config: DataConfig, train: bool, epoch: int = 0, seed: int = 0,
                skip_batches: int = 0) -> DataLoader:
    """Train: :func:`train_order` of (seed, epoch) less its first ``skip_batches`` batches (those a resumed run
    already trained on); dev/test: in order, whole split."""
    if not train:
        return DataLoader(dataset, batch_size=config.eval_batch_size, shuffle=False, num_workers=config.num_workers,
                          collate_fn=collate)
    order = train_order(len(dataset), seed, epoch)[skip_batches * config.train_batch_size:]
    # Its own generator: the DataLoader would otherwise draw its workers' base seed from the global RNG, which
    # dropout also draws from, and a resumed run creates one DataLoader more than the run it continues.
    return DataLoader(dataset, batch_size=config.train_batch_size, sampler=order, num_workers=config.num_workers,
                      collate_fn=collate, generator=torch.Generator().manual_seed(seed + epoch))


# --- resuming mid-epoch -------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a checkpoint's run stopped: S3PRL restores its Step and Epoch but restarts that epoch at its
    first batch, so the expert leaves out the batches already trained on (each step is
    ``accumulate`` batches; an epoch's batches never change, see :func:`train_order`)."""

    step: int
    epoch: int
    accumulate: int
    checkpoint: str
    pending: bool = True

    def batches_done(self, epoch: int, per_epoch: int) -> int:
        """Batches of ``epoch`` to skip: nonzero only in the first epoch after resuming."""
        if not self.pending or epoch != self.epoch:
            return 0
        self.pending = False
        done = self.step * self.accumulate - self.epoch * per_epoch
        if not 0 < done <= per_epoch:
            raise StimulusError(
                f"cannot continue {self.checkpoint} exactly: its step {self.step} x {self.accumulate} accumulated "
                f"batches does not end in its epoch {self.epoch} of {per_epoch} batches, so the training batches "
                "changed since it was saved (train_batch_size, clips, gradient_accumulate_steps or the number of "
                "processes; or S3PRL skipped a batch after CUDA ran out of memory): resume with the settings it "
                "was saved with, or train in a new expdir")
        return done
