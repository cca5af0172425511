"""Train and cross-test the whole (train stimulus × fold × seed) grid from feature caches, as one program.

Every run of the grid trains the paper's head on the clip means of a cache (:mod:`s3prl_stimulus.cache`
explains why that is exact). The R runs are stacked into batched tensors: layer weights ``[R, L]``,
projector ``[R, P, D]`` and ``[R, P]``, output layer ``[R, C, P]`` and ``[R, C]``. One step gathers each
run's batch ``[R, B, L, D]``, computes all logits with two batched matrix products, sums the runs'
losses and steps one optimizer over the stacked tensors. Runs never interact:

- the loss is a sum of per-run losses, so each run's gradient is its own;
- gradient clipping is computed per run (the norm over that run's slices), as S3PRL's runner clips
  each run's parameters;
- the optimizer is S3PRL's ``get_optimizer`` with the config's ``optimizer`` section (the paper:
  ``torch.optim.AdamW``, lr 1e-4); only element-wise optimizers are accepted, for which updating a
  stacked tensor equals updating each run's slice alone.

Everything else comes from the same config.yaml the S3PRL path reads (``runner``: steps, clipping,
accumulation, evaluation schedule; ``datarc``: batch size, votes, smoothing, test stimuli;
``evalrc``: dev-best rule and bootstrap), and the outputs are written by the same
functions as the S3PRL downstream's (``results.predictions_frame``, ``results.score_stimuli``), so their schema is identical, with
``"path": "cache"``.

What differs from the S3PRL path, by design: the initial head parameters (drawn with
``torch.manual_seed(seed)`` from the same head class) and the order of training batches (a
permutation per epoch from ``numpy.random.default_rng([seed, fold])``) are the sweep's own, shared
by every train stimulus of a (fold, seed) so that label sets are compared on identical draws; and the
features are each clip's own (the S3PRL path's depend on batch mates' padding).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import FoldLabels
from s3prl_stimulus.results import predictions_frame, score_stimuli
from s3prl_stimulus.results import write_evaluation as write_scored  # this module's write_evaluation scores first

ELEMENTWISE_TORCH_OPTIMIZERS = ("SGD", "Adam", "AdamW", "Adamax", "NAdam", "RAdam", "RMSprop", "Adagrad", "Adadelta")
ELEMENTWISE_S3PRL_OPTIMIZERS = ("Adam", "AdamW")
S3PRL_PATH = "train it through S3PRL instead: python -m s3prl_stimulus.run_downstream -m train -d emotion_stimulus ..."
HEAD_PARAMETERS = {
    "projector.weight": "projector_weight",
    "projector.bias": "projector_bias",
    "model.post_net.linear.weight": "linear_weight",
    "model.post_net.linear.bias": "linear_bias",
}
"""The paper's head (``StimulusHead`` of the S3PRL downstream) → this module's stacked parameters."""
HEAD_PREFIX = "head."  # the expert keeps its StimulusHead as ``self.head``
DOWNSTREAM = "emotion_stimulus"


# --- configuration ------------------------------------------------------------------------------


def load_config(path=None, override: Optional[str] = None) -> dict:
    """The S3PRL path's config (default: the packaged config.yaml) with ``-o`` overrides applied as S3PRL does."""
    import yaml

    from s3prl_stimulus.run_downstream import packaged_config

    path = Path(path) if path else packaged_config()
    try:
        with open(path, encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
    except (OSError, yaml.YAMLError) as err:
        raise StimulusError(f"cannot read config {path} ({err}): pass a config.yaml of the emotion_stimulus downstream") from None
    if override:
        config = apply_override(config, override)
    return config


def apply_override(config: dict, override: str) -> dict:
    """``config.a.b=V,,config.c=W`` with S3PRL's own parser (values ``eval``-ed, else kept as strings)."""
    from s3prl.utility.helper import override as s3prl_override

    config = copy.deepcopy(config)
    args = argparse.Namespace()
    for option in override.split(",,"):
        if option.strip() and not option.strip().startswith("config."):
            raise StimulusError(f"override {option.strip()!r}: the sweep takes config.* overrides only "
                                "(seeds, folds, stimuli and device are its own options)")
        if option.strip().count("=") != 1:
            raise StimulusError(f"override {option.strip()!r} must look like config.a.b=VALUE (one '=')")
    s3prl_override(override, args, config)
    return config


def check_linear_head(modelrc: dict) -> int:
    """The projector width, after checking the head is linear after pooling (else: use the S3PRL path)."""
    select = modelrc.get("select")
    options = dict(modelrc.get(select) or {}) if select else {}
    post_net = options.get("post_net") or {"select": "FrameLevel"}
    reasons = []
    if select != "UtteranceLevel":
        reasons.append(f"modelrc.select={select}")
    if options.get("pooling", "MeanPooling") != "MeanPooling":
        reasons.append(f"pooling={options.get('pooling')}")
    if options.get("pre_net"):
        reasons.append("a pre_net")
    if post_net.get("select") != "FrameLevel" or (post_net.get("FrameLevel") or {}).get("hiddens"):
        reasons.append(f"post_net={post_net}")
    if reasons:
        raise StimulusError(f"the head ({', '.join(reasons)}) is not linear after mean pooling, so clip means do not "
                            f"determine its output and the cache path cannot train it: {S3PRL_PATH}")
    if "projector_dim" not in modelrc:
        raise StimulusError("modelrc.projector_dim is missing (paper: 256)")
    return int(modelrc["projector_dim"])


def check_runner(config: dict) -> dict:
    """The runner settings the sweep reproduces; refuses those it cannot reproduce exactly."""
    runner = dict(config.get("runner") or {})
    needed = ("total_steps", "gradient_clipping", "gradient_accumulate_steps", "eval_step", "eval_dataloaders")
    missing = [k for k in needed if k not in runner]
    if missing:
        raise StimulusError(f"config runner section lacks {', '.join(missing)}: start from the packaged config.yaml")
    if runner.get("fp16"):
        raise StimulusError(f"runner.fp16 (mixed precision) is not reproduced by the cache path: set it false, or {S3PRL_PATH}")
    if config.get("specaug"):
        raise StimulusError(f"specaug changes frames during training, which clip means cannot express: {S3PRL_PATH}")
    for key in ("total_steps", "eval_step", "gradient_accumulate_steps"):
        if not isinstance(runner[key], int) or runner[key] < 1:
            raise StimulusError(f"runner.{key}={runner[key]!r} must be a positive integer")
    if runner["eval_step"] > runner["total_steps"]:
        raise StimulusError(f"runner.eval_step={runner['eval_step']} > total_steps={runner['total_steps']}: no dev "
                            "evaluation would choose dev-best; lower eval_step")
    if "dev" not in runner["eval_dataloaders"]:
        raise StimulusError("runner.eval_dataloaders lacks dev: dev-best is chosen on dev; keep [dev, test]")
    check_optimizer(config.get("optimizer") or {})
    return runner


def check_optimizer(optimizer: dict) -> None:
    name = optimizer.get("name")
    if name == "TorchOptim":
        ok = optimizer.get("torch_optim_name") in ELEMENTWISE_TORCH_OPTIMIZERS
    else:
        ok = name in ELEMENTWISE_S3PRL_OPTIMIZERS
    if not ok:
        shown = optimizer.get("torch_optim_name", name)
        raise StimulusError(f"optimizer {shown!r} is not element-wise (or unknown), so runs stacked in one tensor would "
                            f"not update as they do alone; use AdamW/Adam/SGD/..., or {S3PRL_PATH}")


# --- caches and data ----------------------------------------------------------------------------


def find_caches(paths: Sequence) -> list[Path]:
    """Cache directories: each path is a cache (holds manifest.json) or a directory of caches (searched 2 deep)."""
    from s3prl_stimulus.cache import MANIFEST

    found = []
    for path in map(Path, paths):
        if (path / MANIFEST).is_file():
            found.append(path)
        elif path.is_dir():
            found.extend(sorted(p.parent for p in path.glob(f"*/{MANIFEST}")))
            found.extend(sorted(p.parent for p in path.glob(f"*/*/{MANIFEST}")))
        else:
            raise StimulusError(f"--cache {path} does not exist: pass the --out of `s3prl-stimulus extract` or a cache in it")
    if not found:
        raise StimulusError(f"no feature cache under {', '.join(map(str, paths))}: create one with `s3prl-stimulus extract`")
    return found


def cache_for_fold(manifests: dict, fold: int, normalisation: str) -> Path:
    """The cache a fold needs: normalised with that fold's training statistics, or not normalised."""
    for path, manifest in manifests.items():
        norm = manifest["normalisation"]
        if norm["kind"] == normalisation and (normalisation == "none" or norm["fold"] == fold):
            return path
    want = f"normalised with fold {fold}'s training statistics" if normalisation == "train_mean_std" else "without normalisation"
    option = f"--folds {fold}" if normalisation == "train_mean_std" else "--normalisation none"
    raise StimulusError(f"no cache {want} among {', '.join(map(str, manifests))}: run `s3prl-stimulus extract ... {option}`")


def check_same_upstream(manifests: dict) -> None:
    """The caches of one sweep must come from one upstream, checkpoint, precision and crop."""
    fields = ("upstream", "dtype", "max_samples", "feature_normalize", "package_version")
    first_path, first = next(iter(manifests.items()))
    for path, manifest in manifests.items():
        differ = [f for f in fields if manifest[f] != first[f]]
        if differ:
            raise StimulusError(f"caches {first_path} and {path} differ in {', '.join(differ)}: sweep one upstream's "
                                f"caches at a time (e.g. --cache {first_path.parent}), extracted with the same options")


@dataclass
class FoldData:
    """One fold's clips per split (rows into the stacked feature table) and labels."""

    fold: int
    clips: dict  # split -> list of clip names (sorted)
    rows: dict  # split -> np.ndarray of rows in the stacked feature table
    labels: FoldLabels
    class_weights: dict = field(default_factory=dict)  # train stimulus -> float32 torch tensor [C]
    _memo: dict = field(default_factory=dict)

    def soft_targets(self, stimulus: str, split: str) -> np.ndarray:
        """float32 soft targets of ``split`` (memoised: evaluated every eval step for every run)."""
        key = ("soft", stimulus, split)
        if key not in self._memo:
            self._memo[key] = self.labels.soft_targets(stimulus, self.clips[split])
        return self._memo[key]

    def binary_labels(self, stimulus: str, split: str) -> np.ndarray:
        key = ("binary", stimulus, split)
        if key not in self._memo:
            self._memo[key] = self.labels.binary_labels(stimulus, self.clips[split])
        return self._memo[key]


def fold_clip_sets(cache, fold: int, datarc: dict) -> dict:
    """The fold's train/dev/test clips that the cache holds (and ``datarc.clips`` lists), sorted."""
    from s3prl_stimulus.audio import read_clip_list
    from s3prl_stimulus.partition import split_clips

    keep = set(cache.clips)
    if str(datarc.get("clips", "all")) not in ("all", "present"):
        keep &= set(read_clip_list(datarc["clips"]))
    clips = {s: [c for c in split_clips(fold, s) if c in keep] for s in ("train", "dev", "test")}
    full = {s: len(split_clips(fold, s)) for s in clips}
    if any(len(clips[s]) < full[s] for s in clips):
        counts = ", ".join(f"{len(clips[s])} of {full[s]} {s}" for s in clips)
        print(f"[sweep] WARNING: fold {fold}: the cache holds {counts} clips; the rest are LEFT OUT: results are not "
              "comparable with the full corpus", file=sys.stderr)
    empty = [s for s in clips if not clips[s]]
    if empty:
        raise StimulusError(f"cache {cache.path} holds no {'/'.join(empty)} clips of fold {fold}: extract a clip list "
                            "covering every split of the fold")
    return clips


def check_normalisation(cache, fold: int, train_clips: list) -> None:
    """The cache's waveform statistics must be the ones the S3PRL path would compute for this fold."""
    from s3prl_stimulus.audio import clips_fingerprint

    norm = cache.manifest["normalisation"]
    if norm["kind"] == "train_mean_std" and norm["train_clips_sha256"] != clips_fingerprint(train_clips):
        raise StimulusError(f"cache {cache.path} was normalised with statistics over another set of fold-{fold} training "
                            f"clips than the {len(train_clips)} this sweep trains on: extract with the same --clips")


def check_crop(cache, datarc: dict) -> None:
    """``datarc.max_seconds`` must crop the cache's clips as the extraction did."""
    from s3prl_stimulus.cache import truncation

    wanted = truncation(cache.manifest["samples"], datarc.get("max_seconds"))
    if wanted != cache.manifest["max_samples"]:
        raise StimulusError(f"cache {cache.path} crops clips at {cache.manifest['max_samples']} samples but "
                            f"datarc.max_seconds={datarc.get('max_seconds')} crops at {wanted}: extract with "
                            "--max-seconds matching the config")


# --- runs ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    train_stimulus: str
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.train_stimulus}/fold{self.fold}/seed{self.seed}"


def make_runs(train_stimuli, folds, seeds) -> list[Run]:
    from s3prl_stimulus.labels import check_stimulus
    from s3prl_stimulus.partition import check_fold

    stimuli = list(dict.fromkeys(check_stimulus(s) for s in train_stimuli))
    folds = list(dict.fromkeys(check_fold(k) for k in folds))
    seeds = list(dict.fromkeys(int(s) for s in seeds))
    if not stimuli or not folds or not seeds:
        raise StimulusError("the grid is empty: give at least one train stimulus, fold and seed")
    return [Run(s, k, seed) for s in stimuli for k in folds for seed in seeds]


# --- the batched head ---------------------------------------------------------------------------


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


# --- batches ------------------------------------------------------------------------------------


class EpochShuffler:
    """Training batches of one (fold, seed): a fresh permutation per epoch, the last batch of an epoch may be short."""

    def __init__(self, n_clips: int, batch_size: int, seed: int, fold: int):
        self.n, self.batch_size = n_clips, batch_size
        self.rng = np.random.default_rng([seed, fold])
        self.order, self.cursor = self.rng.permutation(n_clips), 0

    def next_batch(self) -> np.ndarray:
        if self.cursor >= self.n:
            self.order, self.cursor = self.rng.permutation(self.n), 0
        batch = self.order[self.cursor:self.cursor + self.batch_size]
        self.cursor += len(batch)
        return batch


# --- training -----------------------------------------------------------------------------------


@dataclass
class Grid:
    """Everything the batched program needs, on the device."""

    runs: list
    folds: dict  # fold -> FoldData
    features: object  # torch [N_all, L, D]
    train_rows: object  # torch [sum n_r] rows into features, run after run
    train_targets: object  # torch [sum n_r, C] float32 soft targets of each run's train stimulus
    offsets: object  # torch [R] start of each run's block in train_rows
    class_weights: object  # torch [R, C] float32
    train_sizes: list


def prepare_grid(caches: dict, runs: list, datarc: dict, test_stimuli: Sequence[str], feature_normalize: bool, device):
    """Stack the folds' features on the device and each run's training rows, targets and class weights."""
    import torch

    from s3prl_stimulus.loss import ClassBalancedSoftCrossEntropy

    blocks, folds, start = [], {}, 0
    train_stimuli = list(dict.fromkeys(r.train_stimulus for r in runs))
    stimuli = list(dict.fromkeys([*train_stimuli, *test_stimuli]))
    for fold, cache in caches.items():
        clips = fold_clip_sets(cache, fold, datarc)
        check_normalisation(cache, fold, clips["train"])
        check_crop(cache, datarc)
        rows = {s: cache.index_of(c) + start for s, c in clips.items()}
        blocks.append(cache.features(feature_normalize))
        start += len(cache.clips)
        labels = FoldLabels(str(datarc["votes"]), float(datarc["smoothing"]), stimuli, clips)
        data = FoldData(fold, clips, rows, labels)
        for stimulus in train_stimuli:
            binary = labels.binary_labels(stimulus, clips["train"])
            data.class_weights[stimulus] = ClassBalancedSoftCrossEntropy.from_labels(binary).class_weights
        folds[fold] = data
    features = torch.from_numpy(np.concatenate(blocks) if len(blocks) > 1 else blocks[0]).to(device)
    train_rows, train_targets, offsets, sizes = [], [], [], []
    for run in runs:
        data = folds[run.fold]
        offsets.append(sum(sizes))
        sizes.append(len(data.clips["train"]))
        train_rows.append(data.rows["train"])
        train_targets.append(data.labels.soft_targets(run.train_stimulus, data.clips["train"]))
    weights = torch.stack([folds[r.fold].class_weights[r.train_stimulus] for r in runs])
    return Grid(runs, folds, features, torch.from_numpy(np.concatenate(train_rows)).to(device),
                torch.from_numpy(np.concatenate(train_targets).astype(np.float32)).to(device),
                torch.tensor(offsets, device=device), weights.to(device), sizes)


class BatchPlan:
    """Per step, every run's batch positions ``[R, B]`` and mask; runs sharing (fold, seed) share batches."""

    def __init__(self, grid: Grid, batch_size: int):
        self.batch_size = batch_size
        self.groups: dict = {}
        self.members = []
        for r, run in enumerate(grid.runs):
            key = (run.fold, run.seed)
            if key not in self.groups:
                self.groups[key] = EpochShuffler(grid.train_sizes[r], batch_size, run.seed, run.fold)
            self.members.append(key)

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        batches = {key: shuffler.next_batch() for key, shuffler in self.groups.items()}
        positions = np.zeros((len(self.members), self.batch_size), dtype=np.int64)
        counts = np.zeros(len(self.members), dtype=np.int64)
        for r, key in enumerate(self.members):
            batch = batches[key]
            positions[r, :len(batch)] = batch
            counts[r] = len(batch)
        return positions, counts


def batched_loss(head, grid: Grid, positions, counts, accumulate: int):
    """Sum over runs of each run's class-balanced soft CE (mean over its batch), divided by ``accumulate``.

    :func:`s3prl_stimulus.loss.soft_cross_entropy` takes a mean over every row of the stacked batch;
    its per-clip scaling is linear in the class weights, so run r's rows get weights
    ``w_r * R*B / (n_r * accumulate)``: the stacked mean then equals the sum of per-run means, and
    padding rows (zero targets) add nothing.
    """
    import torch

    from s3prl_stimulus.loss import soft_cross_entropy

    n_runs, batch = positions.shape
    mask = torch.arange(batch, device=positions.device).unsqueeze(0) < counts.unsqueeze(1)
    flat = grid.offsets.unsqueeze(1) + positions
    logits = head(grid.features[grid.train_rows[flat]])
    targets = grid.train_targets[flat] * mask.unsqueeze(-1)
    scale = (n_runs * batch) / (counts.to(torch.float32) * accumulate)
    weights = (grid.class_weights * scale.unsqueeze(1)).unsqueeze(1).expand(-1, batch, -1)
    n_classes = logits.shape[-1]
    return soft_cross_entropy(logits.reshape(-1, n_classes), targets.reshape(-1, n_classes), weights.reshape(-1, n_classes))


@dataclass
class Evaluation:
    """Logits (float64, CPU) of every run on one split, in the fold's clip order."""

    split: str
    logits: dict  # run index -> torch.DoubleTensor [N, C]


def evaluate_split(head, grid: Grid, split: str) -> Evaluation:
    import torch

    out = {}
    with torch.no_grad():
        for fold, data in grid.folds.items():
            runs = [r for r, run in enumerate(grid.runs) if run.fold == fold]
            if not runs:
                continue
            means = grid.features[torch.from_numpy(data.rows[split]).to(grid.features.device)]
            logits = head.run_logits(torch.tensor(runs, device=means.device), means)
            for i, r in enumerate(runs):
                out[r] = logits[i].double().cpu()  # as the expert: float32 logits, scored in float64
    return Evaluation(split, out)


def split_loss(grid: Grid, run_index: int, logits, split: str, stimulus: str) -> float:
    """The expert's loss on a split: class-balanced soft CE against ``stimulus``'s targets, mean over clips."""
    import torch

    from s3prl_stimulus.loss import soft_cross_entropy

    run = grid.runs[run_index]
    data = grid.folds[run.fold]
    targets = torch.from_numpy(data.soft_targets(stimulus, split))
    return soft_cross_entropy(logits, targets, data.class_weights[run.train_stimulus].cpu()).item()


def dev_scores(grid: Grid, run_index: int, logits) -> tuple[float, float]:
    """Dev loss and dev macro-F1 on the run's training stimulus (the expert's dev-best criteria)."""
    import torch

    from s3prl_stimulus.metrics import binarize, macro_f1

    run = grid.runs[run_index]
    data = grid.folds[run.fold]
    loss = split_loss(grid, run_index, logits, "dev", run.train_stimulus)
    probs = torch.softmax(logits, dim=-1).numpy()
    return loss, macro_f1(data.binary_labels(run.train_stimulus, "dev"), binarize(probs))


@dataclass
class TrainResult:
    best_step: list  # per run: step of dev-best (0: never improved)
    best_state: object  # BatchedHead holding each run's dev-best parameters
    history: list  # rows: run, step, dev_loss, dev_macro_f1, test_loss, test_macro_f1
    best_loss: list  # per run: lowest dev loss so far (the expert's best_dev_loss buffer)
    best_f1: list  # per run: highest dev macro-F1 so far (best_dev_macro_f1)
    step_evaluations: list = field(default_factory=list)  # (step, dev, test Evaluations) when all steps are kept


def train(head, grid: Grid, config: dict, progress: bool = True, keep_steps: bool = False) -> TrainResult:
    """The S3PRL runner's training loop, for every run at once (see the module docstring)."""
    import torch
    from tqdm import tqdm

    runner = config["runner"]
    total, accumulate, eval_step = runner["total_steps"], runner["gradient_accumulate_steps"], runner["eval_step"]
    select_by = config["downstream_expert"]["evalrc"]["select_by"]
    optimizer, scheduler = build_optimizer(head, config, total)
    plan = BatchPlan(grid, int(config["downstream_expert"]["datarc"]["train_batch_size"]))
    best = copy.deepcopy(head)
    result = TrainResult([0] * len(grid.runs), best, [], [math.inf] * len(grid.runs), [-math.inf] * len(grid.runs))
    device = grid.features.device
    head.train()
    for step in tqdm(range(1, total + 1), desc=f"sweep {len(grid.runs)} runs", unit="step", disable=not progress,
                     dynamic_ncols=True):
        for _ in range(accumulate):
            positions, counts = plan.next()
            positions, counts = torch.from_numpy(positions).to(device), torch.from_numpy(counts).to(device)
            batched_loss(head, grid, positions, counts, accumulate).backward()
        norms = head.clip_gradients(float(runner["gradient_clipping"]))
        if torch.isnan(norms).any():
            bad = grid.runs[int(torch.nonzero(torch.isnan(norms))[0])]
            raise StimulusError(f"run {bad.name}: gradient norm is NaN at step {step} (S3PRL would skip that step, which "
                                f"stacked runs cannot): check the cache for non-finite features, or {S3PRL_PATH}")
        optimizer.step()
        optimizer.zero_grad()
        if scheduler:
            scheduler.step()
        if step % eval_step == 0:
            _evaluate_step(head, grid, step, select_by, result, keep_steps)
    return result


def _evaluate_step(head, grid, step, select_by, result: TrainResult, keep_steps: bool) -> None:
    """Dev (and test) evaluation at an eval step; dev-best snapshots per run (strict improvement, as the expert)."""
    import torch

    from s3prl_stimulus.metrics import binarize, macro_f1

    head.eval()
    dev = evaluate_split(head, grid, "dev")
    test = evaluate_split(head, grid, "test")
    improved = []
    for r, run in enumerate(grid.runs):
        loss, f1 = dev_scores(grid, r, dev.logits[r])
        better = loss < result.best_loss[r] if select_by == "loss" else f1 > result.best_f1[r]
        result.best_loss[r], result.best_f1[r] = min(loss, result.best_loss[r]), max(f1, result.best_f1[r])
        if better:
            improved.append(r)
            result.best_step[r] = step
        data = grid.folds[run.fold]
        test_probs = torch.softmax(test.logits[r], dim=-1).numpy()
        result.history.append({
            "run": r, "step": step, "dev_loss": loss, "dev_macro_f1": f1,
            "test_loss": split_loss(grid, r, test.logits[r], "test", run.train_stimulus),
            "test_macro_f1": macro_f1(data.binary_labels(run.train_stimulus, "test"), binarize(test_probs)),
        })
    if improved:
        index = torch.tensor(improved, device=grid.features.device)
        with torch.no_grad():
            for target, source in zip(result.best_state.parameters(), head.parameters()):
                target[index] = source[index]
    if keep_steps:
        result.step_evaluations.append((step, dev, test))
    head.train()


# --- outputs ------------------------------------------------------------------------------------


@dataclass
class SweepContext:
    """Metadata shared by every run's output files."""

    out: Path
    upstream_dir: str
    manifest: dict
    config: dict
    test_stimuli: tuple
    evalrc: dict
    feature_normalize: bool = False


def run_dir(context: SweepContext, run: Run) -> Path:
    return context.out / context.upstream_dir / run.train_stimulus / f"fold{run.fold}" / f"seed{run.seed}"


def metadata(context: SweepContext, run: Run, split: str, step: int, checkpoint: Optional[str]) -> dict:
    """The S3PRL path's results header, with ``"path": "cache"``."""
    datarc = context.config["downstream_expert"]["datarc"]
    return {
        "schema": 1, "path": "cache", "upstream": context.manifest["upstream"]["name"],
        "upstream_ckpt": context.manifest.get("upstream_ckpt"), "fold": run.fold, "train_stimulus": run.train_stimulus,
        "votes": str(datarc["votes"]), "seed": run.seed, "step": step, "checkpoint": checkpoint, "split": split,
    }


def score_evaluation(context: SweepContext, grid: Grid, r: int, logits, split: str, step: int,
                     checkpoint: Optional[str]) -> tuple[pd.DataFrame, dict]:
    """Predictions frame and results dict of one run on one split, built as the S3PRL path builds them."""
    import torch

    run = grid.runs[r]
    data = grid.folds[run.fold]
    clips = data.clips[split]
    probs = torch.softmax(logits, dim=-1).numpy()
    frame = predictions_frame(clips, probs, data.labels, context.test_stimuli)
    losses = {s: split_loss(grid, r, logits, split, s) for s in context.test_stimuli}
    scores = score_stimuli(frame, losses, context.evalrc)
    return frame, metadata(context, run, split, step, checkpoint) | {"n_clips": len(clips), "test_stimuli": scores}


def write_evaluation(context: SweepContext, grid: Grid, r: int, logits, split: str, tag: str, step: int,
                     checkpoint: Optional[str]) -> dict:
    """``predictions-<split>-<tag>.csv`` and ``results-<split>-<tag>.json`` of one run."""
    frame, result = score_evaluation(context, grid, r, logits, split, step, checkpoint)
    write_scored(run_dir(context, grid.runs[r]), split, tag, frame, result)
    return result


def write_checkpoint(context: SweepContext, grid: Grid, best_state, r: int, step: int, best_loss: float,
                     best_f1: float) -> Path:
    """``dev-best.ckpt`` in the runner's layout (``Featurizer``, ``Downstream``, ``Step``, ``Config``, ``Args``),
    so ``run_downstream -m evaluate -i <it>`` can evaluate a cache-trained head through S3PRL."""
    import torch

    from s3prl_stimulus.io import atomic_path

    run = grid.runs[r]
    featurizer, head_state = run_state(best_state, r)
    downstream = {"objective.class_weights": grid.folds[run.fold].class_weights[run.train_stimulus].cpu().clone(),
                  **head_state, "best_dev_loss": torch.tensor(best_loss), "best_dev_macro_f1": torch.tensor(best_f1)}
    config = copy.deepcopy(context.config)
    config["downstream_expert"]["datarc"].update(fold=run.fold, train_stimulus=run.train_stimulus)
    args = argparse.Namespace(downstream=DOWNSTREAM, upstream=context.manifest["upstream"]["name"],
                              upstream_ckpt=context.manifest.get("upstream_ckpt"), seed=run.seed,
                              upstream_feature_normalize=context.feature_normalize, path="cache")
    path = run_dir(context, run) / "dev-best.ckpt"
    with atomic_path(path) as tmp:
        torch.save({"Featurizer": featurizer, "Downstream": downstream, "Step": step, "Epoch": 0,
                    "Config": config, "Args": args}, tmp)
    return path


def write_layer_weights(context: SweepContext, grid: Grid, best_state, r: int, step: int, checkpoint: str) -> None:
    import torch

    from s3prl_stimulus.io import write_json_atomic

    if not best_state.weighted:
        return  # one hidden state (e.g. fbank): no weighted sum
    run = grid.runs[r]
    weights = torch.softmax(best_state.featurizer_weights[r].detach().cpu().double(), dim=-1).tolist()
    record = {"upstream": context.manifest["upstream"]["name"], "fold": run.fold, "train_stimulus": run.train_stimulus,
              "checkpoint": checkpoint, "step": step, "weights": weights}
    write_json_atomic(run_dir(context, run) / "layer_weights.json", record)


def write_run_outputs(context: SweepContext, grid: Grid, result: TrainResult) -> list[dict]:
    """Per run: dev-best test predictions/results, layer weights, checkpoint and training history."""
    from s3prl_stimulus.io import write_csv_atomic

    history = pd.DataFrame(result.history)
    test = evaluate_split(result.best_state, grid, "test")
    rows = []
    for r, run in enumerate(grid.runs):
        step = result.best_step[r]
        if step == 0:
            print(f"[sweep] WARNING: run {run.name}: dev never improved (non-finite loss?): no dev-best written", file=sys.stderr)
            continue
        checkpoint = str(write_checkpoint(context, grid, result.best_state, r, step, result.best_loss[r], result.best_f1[r]))
        scores = write_evaluation(context, grid, r, test.logits[r], "test", "dev-best", step, checkpoint)
        write_layer_weights(context, grid, result.best_state, r, step, checkpoint)
        write_csv_atomic(run_dir(context, run) / "history.csv", history[history["run"] == r].drop(columns="run"))
        for stimulus, score in scores["test_stimuli"].items():
            rows.append({"train_stimulus": run.train_stimulus, "fold": run.fold, "seed": run.seed, "test_stimulus": stimulus,
                         "macro_f1": score["macro_f1"], "ci95_lo": score["ci95"][0], "ci95_hi": score["ci95"][1],
                         "loss": score["loss"], "dev_best_step": step, "n_clips": score["n_clips"]})
    for step, dev, test_step in result.step_evaluations:
        for r in range(len(grid.runs)):
            for evaluation in (dev, test_step):
                write_evaluation(context, grid, r, evaluation.logits[r], evaluation.split, f"step-{step}", step, None)
    return rows


def summarise(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long table of every run × test stimulus, and mean ± std over seeds (sample std, ddof=1; 0 with one seed).

    The grid table averages each seed's macro-F1 over folds first, then takes mean ± std over seeds.
    """
    long = pd.DataFrame(rows).sort_values(["train_stimulus", "test_stimulus", "fold", "seed"]).reset_index(drop=True)
    per_seed = long.groupby(["train_stimulus", "test_stimulus", "seed"])["macro_f1"].mean().reset_index()
    grid = per_seed.groupby(["train_stimulus", "test_stimulus"])["macro_f1"].agg(["mean", "std", "count"]).reset_index()
    grid["std"] = grid["std"].fillna(0.0)
    grid = grid.rename(columns={"mean": "macro_f1_mean", "std": "macro_f1_std", "count": "n_seeds"})
    return long, grid


def grid_table(grid: pd.DataFrame) -> pd.DataFrame:
    """Train stimulus × test stimulus, ``mean ± std`` over seeds of the fold-averaged macro-F1."""
    cells = grid.assign(cell=[f"{m:.4f} ± {s:.4f}" for m, s in zip(grid["macro_f1_mean"], grid["macro_f1_std"])])
    order = [s for s in STIMULI if s in set(cells["test_stimulus"])]
    table = cells.pivot(index="train_stimulus", columns="test_stimulus", values="cell")
    table = table.reindex(index=[s for s in STIMULI if s in table.index], columns=order)
    table.index.name = "train \\ test"
    return table


# --- entry points -------------------------------------------------------------------------------


def read_checkpoint(path) -> dict:
    """An S3PRL runner checkpoint (``argparse.Namespace`` allowed, nothing else beyond tensors)."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise StimulusError(f"checkpoint {path} does not exist: pass a dev-best.ckpt or states-*.ckpt of an {DOWNSTREAM} run")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(path, map_location="cpu")
    except Exception as err:  # truncated file, not a checkpoint, foreign pickle
        raise StimulusError(f"cannot load checkpoint {path} ({type(err).__name__}): pass a dev-best.ckpt or "
                            f"states-*.ckpt of an {DOWNSTREAM} run") from None
    task = getattr(checkpoint.get("Args"), "downstream", None) if isinstance(checkpoint, dict) else None
    if task != DOWNSTREAM or "Downstream" not in checkpoint:
        raise StimulusError(f"checkpoint {path} was trained for downstream {task!r}, not {DOWNSTREAM}: pass a checkpoint "
                            f"of an {DOWNSTREAM} run")
    return checkpoint


@dataclass
class Prepared:
    config: dict
    datarc: dict
    evalrc: dict
    test_stimuli: tuple
    runs: list
    grid: Grid
    head: object
    manifest: dict
    chosen: dict  # fold -> cache path
    keys: dict  # fold -> cache key


def prepare(cache_paths, runs_spec, config, override, test_stimuli, votes, device, feature_normalize,
            training: bool = True) -> Prepared:
    """Validate the config against the cache path's contract, load the caches, stack the grid, build the head.

    ``training=False`` (scoring a checkpoint) skips the runner/optimizer checks, which only training needs.
    """
    from s3prl_stimulus.cache import check_complete, check_device, default_device, load_cache
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import parse_evalrc
    from s3prl_stimulus.labels import check_smoothing, check_stimulus

    if not isinstance(config, dict):
        config = load_config(config, override)
    elif override:
        config = apply_override(config, override)
    config = copy.deepcopy(config)
    if training:
        check_runner(config)
    expert = config["downstream_expert"]
    datarc, evalrc = expert["datarc"], parse_evalrc(expert.get("evalrc"))
    expert["evalrc"] = evalrc
    if votes is not None:
        datarc["votes"] = votes
    check_smoothing(datarc["smoothing"])
    projector_dim = check_linear_head(expert["modelrc"])
    test_stimuli = tuple(dict.fromkeys(check_stimulus(s) for s in (test_stimuli or _config_stimuli(datarc))))
    runs = make_runs(*runs_spec)
    device = check_device(device or default_device())
    manifests = {path: check_complete(path) for path in find_caches(cache_paths)}
    chosen = {k: cache_for_fold(manifests, k, str(datarc["normalisation"])) for k in sorted({r.fold for r in runs})}
    check_same_upstream({p: manifests[p] for p in chosen.values()})
    caches = {k: load_cache(p) for k, p in chosen.items()}
    grid = prepare_grid(caches, runs, datarc, test_stimuli, feature_normalize, device)
    first = next(iter(caches.values()))
    up = first.manifest["upstream"]
    head = make_batched_head(len(runs), up["n_hidden"], first.weighted_sum, up["dim"], projector_dim, len(CLASSES)).to(device)
    return Prepared(config, datarc, evalrc, test_stimuli, runs, grid, head, first.manifest, chosen,
                    {k: manifests[p]["key"] for k, p in chosen.items()})


def initialise(prepared: Prepared, init: Optional[str]) -> None:
    """Each run's starting parameters: an S3PRL checkpoint's head (``init``, like S3PRL's ``-i``), or the
    downstream's head class drawn under ``torch.manual_seed(seed)`` with zero layer weights (S3PRL's init)."""
    import torch

    up = prepared.manifest["upstream"]
    if init:
        checkpoint = read_checkpoint(init)
        for r in range(len(prepared.runs)):
            load_run_state(prepared.head, r, checkpoint.get("Featurizer"), checkpoint["Downstream"])
        return
    zeros = {"weights": torch.zeros(up["n_hidden"])} if prepared.head.weighted else {}
    for seed in sorted({r.seed for r in prepared.runs}):
        initial = initial_head_state(seed, up["dim"], prepared.config["downstream_expert"]["modelrc"])
        for r in [i for i, run in enumerate(prepared.runs) if run.seed == seed]:
            load_run_state(prepared.head, r, zeros, initial)


def sweep(cache_paths: Sequence, out, train_stimuli=STIMULI, folds=(1, 2, 3, 4, 5), seeds=(1337,),
          test_stimuli=None, config=None, override: Optional[str] = None, device: Optional[str] = None,
          feature_normalize: bool = False, votes: Optional[str] = None, all_steps: bool = False,
          name: Optional[str] = None, init: Optional[str] = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (train stimulus, fold, seed) from the caches, cross-test each on ``test_stimuli``.

    Writes ``<out>/<upstream>/<train_stimulus>/fold<k>/seed<s>/`` per run and ``summary.csv``,
    ``summary-seeds.csv`` and ``sweep.json`` in ``<out>/<upstream>/``. Returns (long, grid) tables.
    """
    from s3prl_stimulus.io import write_csv_atomic, write_json_atomic

    prepared = prepare(cache_paths, (train_stimuli, folds, seeds), config, override, test_stimuli, votes, device,
                       feature_normalize)
    initialise(prepared, init)
    result = train(prepared.head, prepared.grid, prepared.config, progress=progress, keep_steps=all_steps)
    upstream = prepared.manifest["upstream"]["name"]
    directory_name = name or prepared.manifest.get("name") or upstream
    context = SweepContext(Path(out), directory_name, prepared.manifest, prepared.config, prepared.test_stimuli,
                           prepared.evalrc, feature_normalize)
    rows = write_run_outputs(context, prepared.grid, result)
    if not rows:
        raise StimulusError("no run reached a dev-best checkpoint: check the cache for non-finite features")
    long, table = summarise(rows)
    root = Path(out) / context.upstream_dir
    write_csv_atomic(root / "summary.csv", long)
    write_csv_atomic(root / "summary-seeds.csv", table)
    write_json_atomic(root / "sweep.json", {
        "path": "cache", "upstream": upstream, "caches": {str(k): str(p) for k, p in prepared.chosen.items()},
        "cache_keys": {str(k): v for k, v in prepared.keys.items()}, "runs": [run.name for run in prepared.runs],
        "test_stimuli": list(prepared.test_stimuli), "feature_normalize": feature_normalize, "init": init,
        "device": str(prepared.grid.features.device), "config": prepared.config,
    })
    return long, table


def evaluate_checkpoint(cache_paths: Sequence, checkpoint, split: str = "test", out=None, device: Optional[str] = None,
                        test_stimuli=None) -> tuple[pd.DataFrame, dict]:
    """Score an S3PRL-path checkpoint from the cache, as ``run_downstream -m evaluate -e CKPT`` does.

    Fold, training stimulus, votes and the rest come from the checkpoint's own ``Config``/``Args``.
    Returns the predictions frame and the results dict; with ``out``, also writes
    ``predictions-<split>-<stem>.csv`` / ``results-<split>-<stem>.json`` there (``"path": "cache"``).
    """
    from s3prl_stimulus.partition import split_name

    split = {"Development": "dev", "Test": "test", "Train": "train"}[split_name(split)]
    if split == "train":
        raise StimulusError("evaluate the dev or test split (the S3PRL path scores dev and test)")
    saved = read_checkpoint(checkpoint)
    args, config = saved["Args"], saved.get("Config") or load_config()
    datarc = config["downstream_expert"]["datarc"]
    feature_normalize = bool(getattr(args, "upstream_feature_normalize", False))
    runs_spec = ([datarc["train_stimulus"]], [datarc["fold"]], [int(getattr(args, "seed", 0) or 0)])
    prepared = prepare(cache_paths, runs_spec, config, None, test_stimuli, None, device, feature_normalize, training=False)
    cache_upstream = prepared.manifest["upstream"]["name"]
    if getattr(args, "upstream", cache_upstream) != cache_upstream:
        raise StimulusError(f"checkpoint {checkpoint} was trained on upstream {args.upstream}, the cache holds "
                            f"{cache_upstream}: pass that upstream's cache")
    load_run_state(prepared.head, 0, saved.get("Featurizer"), saved["Downstream"])
    logits = evaluate_split(prepared.head, prepared.grid, split).logits[0]
    context = SweepContext(Path(out) if out else Path("."), "", prepared.manifest, prepared.config, prepared.test_stimuli,
                           prepared.evalrc, feature_normalize)
    tag, step = Path(checkpoint).stem, int(saved.get("Step", 0))
    frame, result = score_evaluation(context, prepared.grid, 0, logits, split, step, str(checkpoint))
    if out:
        write_scored(Path(out), split, tag, frame, result)
    return frame, result


def _config_stimuli(datarc: dict) -> list:
    stimuli = datarc.get("test_stimuli") or list(STIMULI)
    return [s.strip() for s in stimuli.split(",")] if isinstance(stimuli, str) else list(stimuli)
