"""S3PRL downstream expert of *Stimulus Modality Matters*: train on one stimulus' labels, score against all.

A thin adapter: data, labels and outputs live in :mod:`.dataset`, the head in :mod:`.model`, the
loss and metrics in the core modules (:mod:`s3prl_stimulus.loss`, :mod:`s3prl_stimulus.metrics`).
Each dev/test evaluation runs on rank 0 over the whole split (S3PRL's runner does that), keeps the
logits of every clip, and scores them once at corpus level against every label set of
``datarc.test_stimuli``, writing ``predictions-<split>-<tag>.csv`` and ``results-<split>-<tag>.json``
(``<tag>`` = ``step-<N>`` while training, the checkpoint's stem under ``-m evaluate -e X.ckpt``).

The upstream's identity (:mod:`s3prl_stimulus.integration.identity`) is saved in every checkpoint
as the expert's extra state and in every results JSON; a ``-e``/``-i`` checkpoint of other upstream
weights is refused before anything is written.

Resuming (``-a``, ``-e``; ``-i`` in training) continues exactly where the checkpoint's run was: the
training batches of an epoch depend only on (seed, epoch), the batches of the checkpoint's epoch already
trained on are skipped (S3PRL restarts the epoch at its first batch), and the Python, numpy and torch
random-number states saved with the checkpoint are put back (S3PRL saves none), so dropout continues
its stream. Under DDP only rank 0's states are saved: see :meth:`DownstreamExpert._warn_ddp_randomness`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import torch
from torch import nn

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import (EXTRA_STATE_KEY, UpstreamIdentity, checkpoint_state, runner_upstream,
                                                 verify_checkpoint, weights_sha256)
from s3prl_stimulus.loss import ClassBalancedSoftCrossEntropy, soft_cross_entropy
from s3prl_stimulus.metrics import binarize, macro_f1
from s3prl_stimulus.seeds import restore_rng_states, rng_states

from s3prl_stimulus.labels import FoldLabels
from s3prl_stimulus.results import coverage, predictions_frame, score_stimuli, write_evaluation, write_layer_weights

from .dataset import (
    NOTE, SPLITS, ClipDataset, DataConfig, ResumePoint, batches_per_epoch, check_audio, fold_clips, make_loader,
    normalisation_stats, parse_evalrc,
)
from .model import StimulusHead, check_checkpoint, layer_weights, load_checkpoint

DOWNSTREAM = "emotion_stimulus"
ALLOW_UNVERIFIED = "-o config.downstream_expert.evalrc.allow_unverified_upstream=True"
RNG_KEY = "rng_states"
"""Where the expert's extra state keeps the process's random-number states (beside the upstream identity)."""


class DownstreamExpert(nn.Module):
    def __init__(self, upstream_dim: int, upstream_rate: int, downstream_expert: dict, expdir: str, **kwargs):
        super().__init__()
        self.expdir = Path(expdir)
        self.args = {k: kwargs.get(k) for k in ("upstream", "upstream_ckpt", "seed", "mode", "init_ckpt", "past_exp",
                                                "upstream_trainable", "specaug")}
        self.config = DataConfig.parse(downstream_expert["datarc"])
        self.evalrc = parse_evalrc(downstream_expert.get("evalrc"))
        self.clips = fold_clips(self.config)
        check_audio(self.config, self.clips)
        stimuli = (self.config.train_stimulus, *self.config.test_stimuli)
        self.labels = FoldLabels(self.config.votes, self.config.smoothing, stimuli, self.clips)
        # Class-balanced weights from the binarised training labels of the training stimulus.
        train_binary = self.labels.binary_labels(self.config.train_stimulus, self.clips["train"])
        self.objective = ClassBalancedSoftCrossEntropy.from_labels(train_binary)
        self.head = StimulusHead(upstream_dim, len(CLASSES), downstream_expert["modelrc"])
        # Buffers, so they are saved in checkpoints and dev-best tracking survives -a resume.
        self.register_buffer("best_dev_loss", torch.tensor(math.inf, dtype=torch.float64))
        self.register_buffer("best_dev_macro_f1", torch.tensor(-math.inf, dtype=torch.float64))
        self.identity = self._upstream_identity()
        self.checkpoint = None  # what the outputs need of -e/-i's checkpoint: its step and layer weights
        if self.args["init_ckpt"]:
            self._check_init_checkpoint(self.args["init_ckpt"])
        self.resume = self._resume_point(kwargs.get("runner") or {})
        if not self.identity.verified:
            print(f"{NOTE} WARNING: {self.identity.reason}", file=sys.stderr)
        stats = normalisation_stats(self.config, self.clips["train"], self.expdir)
        train_targets = {s: self.labels.soft_targets(self.config.train_stimulus, self.clips[s]) for s in SPLITS}
        self.datasets = {s: ClipDataset(self.config, self.clips[s], train_targets[s], stats) for s in SPLITS}

    # --- upstream identity and the -e/-i checkpoint ----------------------------------------------

    def _upstream_identity(self) -> UpstreamIdentity:
        # S3PRL's Runner built the upstream but does not pass it: found on the call stack. Kept as a function,
        # not the module: a module attribute would make the upstream's weights part of the head.
        upstream = runner_upstream()
        self._fingerprint_upstream = None if upstream is None else functools.partial(weights_sha256, upstream)
        sha = None if upstream is None else self._fingerprint_upstream()
        # Older checkpoints have no extra state; _check_init_checkpoint decides whether they may load at all.
        self._register_load_state_dict_pre_hook(_tolerate_missing_extra_state)
        return UpstreamIdentity.of(self.args["upstream"], self.args["upstream_ckpt"], sha)

    def _check_init_checkpoint(self, path) -> None:
        """Refuse a checkpoint of another task, head or upstream, before S3PRL's runner loads it."""
        checkpoint = load_checkpoint(path)
        check_checkpoint(checkpoint, path, DOWNSTREAM, self.state_dict())
        self.identity = verify_checkpoint(self.identity, checkpoint, path, self.evalrc["allow_unverified_upstream"],
                                          ALLOW_UNVERIFIED, "run it with the upstream it was trained on (-u/-k; "
                                          "with -e they come from the checkpoint: restore that -k file)")
        self.checkpoint = {"step": int(checkpoint.get("Step", 0)), "epoch": int(checkpoint.get("Epoch", 0)),
                           "layer_weights": layer_weights(checkpoint)}

    # --- resuming a run exactly -------------------------------------------------------------------

    def _resume_point(self, runner: dict) -> ResumePoint | None:
        """In training, S3PRL continues from the checkpoint's Step, Epoch and optimizer (``-a``, ``-e`` and ``-i``)."""
        if self.args["mode"] != "train" or self.checkpoint is None or not self.checkpoint["step"]:
            return None
        self._warn_ddp_randomness()
        return ResumePoint(self.checkpoint["step"], self.checkpoint["epoch"],
                           int(runner.get("gradient_accumulate_steps") or 1), str(self.args["init_ckpt"]))

    def _warn_ddp_randomness(self) -> None:
        """Each DDP process has its own random stream and only rank 0's is saved: with dropout, SpecAugment or
        a trainable upstream the resumed run draws other random numbers than the uninterrupted one would."""
        dropout = any(isinstance(m, nn.Dropout) and m.p > 0 for m in self.head.modules())
        if torch.distributed.is_initialized() and (dropout or self.args["upstream_trainable"] or self.args["specaug"]):
            if torch.distributed.get_rank() == 0:
                print(f"{NOTE} WARNING: resuming under DDP with dropout, specaug or -f: the processes' random-number "
                      "states are not all in the checkpoint, so from here the run is not identical to an "
                      "uninterrupted one (batches and parameters at the resume point are)", file=sys.stderr)

    def _train_batches_to_skip(self, epoch: int) -> int:
        if self.resume is None:
            return 0
        per_epoch = batches_per_epoch(len(self.datasets["train"]), self.config)
        try:
            skip = self.resume.batches_done(epoch, per_epoch)
        except StimulusError as error:
            if self.args["past_exp"]:  # -a / -e: a resume that cannot be exact is refused
                raise
            print(f"{NOTE} WARNING: -i {error}; continuing from the epoch's first batch", file=sys.stderr)
            return 0
        if skip and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
            print(f"{NOTE} resuming at step {self.resume.step} in epoch {epoch}: skipping its first {skip} of "
                  f"{per_epoch} training batches (trained on before {Path(self.resume.checkpoint).name})", file=sys.stderr)
        return skip

    def identity_now(self) -> UpstreamIdentity:
        """A trainable upstream (``-f``) changes as it trains, and S3PRL saves it with the head: fingerprint
        it at each save and evaluation. A frozen one's fingerprint was taken once, in ``__init__``."""
        if not self.args["upstream_trainable"] or self._fingerprint_upstream is None:
            return self.identity
        return dataclasses.replace(self.identity, weights_sha256=self._fingerprint_upstream())

    def get_extra_state(self) -> dict:
        """Saved under ``Downstream`` in every checkpoint S3PRL writes, after that step's evaluation: the
        upstream's identity and the random-number states the next step starts from."""
        return checkpoint_state(self.identity_now()) | {RNG_KEY: rng_states()}

    def set_extra_state(self, state) -> None:
        """``__init__`` checked this checkpoint's identity (the runner loads the same ``init_ckpt``). When
        training resumes, the random-number states go back: S3PRL loads the downstream last, and nothing
        draws random numbers between here and the first resumed step."""
        saved = state.get(RNG_KEY) if hasattr(state, "get") else None
        if self.resume is None or torch.distributed.is_initialized():
            return
        if saved is None:  # written by an older version, whose epochs were shuffled from the global stream
            print(f"{NOTE} WARNING: {self.resume.checkpoint} holds no random-number states (saved by an older "
                  "version): the resumed run continues, but not identically to an uninterrupted one", file=sys.stderr)
            return
        restore_rng_states(saved)

    # --- S3PRL interface ------------------------------------------------------------------------

    def get_dataloader(self, split: str, epoch: int = 0):
        if split not in self.datasets:
            raise StimulusError(f"unknown split {split!r}: {DOWNSTREAM} has train, dev and test (-t, runner.eval_dataloaders)")
        if split != "train":
            return make_loader(self.datasets[split], self.config, train=False)
        return make_loader(self.datasets[split], self.config, train=True, epoch=epoch, seed=int(self.args["seed"] or 0),
                           skip_batches=self._train_batches_to_skip(epoch))

    def forward(self, split: str, features: list, targets: torch.Tensor, clips: list, records, **kwargs):
        logits = self.head(features)
        targets = targets.to(logits.device)
        # Kept whole (no .item() per step): metrics are computed once per split in log_records.
        records["logits"].append(logits.detach())
        records["targets"].append(targets)
        records["clips"] += clips
        return self.objective(logits, targets)

    def log_records(self, split: str, records, logger, global_step: int, **kwargs) -> list:
        if not records["clips"]:
            return []
        logits = torch.cat(records["logits"]).double().cpu()
        prefix = f"{DOWNSTREAM}-fold{self.config.fold}/{split}"
        if split == "train":
            loss = soft_cross_entropy(logits, torch.cat(records["targets"]).cpu(), self.objective.class_weights.cpu())
            logger.add_scalar(f"{prefix}-loss", loss.item(), global_step=global_step)
            return []
        return self._evaluate(split, logits, records["clips"], logger, global_step, prefix)

    # --- evaluation -------------------------------------------------------------------------------

    def _loss(self, logits: torch.Tensor, stimulus: str, clips: list) -> float:
        targets = torch.from_numpy(self.labels.soft_targets(stimulus, clips))
        return soft_cross_entropy(logits, targets, self.objective.class_weights.cpu()).item()

    def _evaluate(self, split, logits, clips, logger, global_step, prefix) -> list:
        probs = torch.softmax(logits, dim=-1).numpy()  # float64: the CSV round-trips exactly
        frame = predictions_frame(clips, probs, self.labels, self.config.test_stimuli)
        losses = {s: self._loss(logits, s, clips) for s in self.config.test_stimuli}
        scores = score_stimuli(frame, losses, self.evalrc)
        tag, step = self._tag(global_step)
        covered = coverage(self.config.fold, split, clips, self.clips["train"])
        result = self._metadata(split, step) | {"n_clips": len(clips), **covered, "test_stimuli": scores}
        write_evaluation(self.expdir, split, tag, frame, result)
        for stimulus, score in scores.items():
            logger.add_scalar(f"{prefix}-{stimulus}-macro_f1", score["macro_f1"], global_step=global_step)
            logger.add_scalar(f"{prefix}-{stimulus}-loss", score["loss"], global_step=global_step)
        summary = ", ".join(f"{s} {v['macro_f1']:.4f} [{v['ci95'][0]:.4f}, {v['ci95'][1]:.4f}]" for s, v in scores.items())
        print(f"{NOTE} {split} {tag} macro-F1: {summary}", file=sys.stderr)
        if self.args["mode"] == "evaluate":
            self._write_layer_weights(tag, step)
            return []
        return self._select(split, probs, logits, clips)

    def _select(self, split, probs, logits, clips) -> list:
        """``["dev-best.ckpt"]`` when dev loss (paper) or dev macro-F1 on the training stimulus improves."""
        if split != "dev":
            return []
        stimulus = self.config.train_stimulus
        loss = self._loss(logits, stimulus, clips)
        f1 = macro_f1(self.labels.binary_labels(stimulus, clips), binarize(probs))
        improved = loss < self.best_dev_loss.item() if self.evalrc["select_by"] == "loss" else f1 > self.best_dev_macro_f1.item()
        self.best_dev_loss.fill_(min(loss, self.best_dev_loss.item()))
        self.best_dev_macro_f1.fill_(max(f1, self.best_dev_macro_f1.item()))
        return ["dev-best.ckpt"] if improved else []

    def _tag(self, global_step: int) -> tuple:
        if self.args["mode"] != "evaluate":
            return f"step-{global_step}", global_step
        if self.checkpoint is None:
            return "untrained", 0
        return Path(self.args["init_ckpt"]).stem, self.checkpoint["step"]

    def _metadata(self, split: str, step: int) -> dict:
        return {
            "schema": 1, "path": "s3prl", "upstream": self.args["upstream"], "upstream_ckpt": self.args["upstream_ckpt"],
            "fold": self.config.fold, "train_stimulus": self.config.train_stimulus, "votes": self.config.votes,
            "seed": self.args["seed"], "step": step,
            # the file whose head was scored: only -m evaluate scores one (training scores the running head,
            # also after resuming from, or starting with -i from, a checkpoint)
            "checkpoint": str(self.args["init_ckpt"]) if self.args["mode"] == "evaluate" and self.checkpoint else None,
            "split": split,
            "upstream_label": self.config.upstream_label or self.args["upstream"],
        } | {"upstream_identity": self.identity_now().record()}

    def _write_layer_weights(self, tag: str, step: int) -> None:
        """Featurizer layer weights of the evaluated checkpoint (read from it: the runner never passes
        its Featurizer to the expert). ``layer_weights.json`` is dev-best's; other checkpoints get a tagged name."""
        weights = None if self.checkpoint is None else self.checkpoint["layer_weights"]
        if weights is None:
            return  # one hidden state (e.g. fbank): no weighted sum to report
        write_layer_weights(self.expdir, tag, self._metadata("test", step) | {"step": step}, weights)


def _tolerate_missing_extra_state(state_dict, prefix, *args) -> None:
    state_dict.setdefault(prefix + EXTRA_STATE_KEY, None)
