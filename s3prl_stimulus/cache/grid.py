"""The grid's data: the cache each fold reads, the fold's clips and labels, the runs, and their training batches.

A fold's cache must match the sweep's request (normalisation statistics, crop, one upstream). Runs
sharing a (fold, seed) share their training batches: a permutation per epoch from
``numpy.random.default_rng([seed, fold])``, the same for every train stimulus so that label sets
are compared on identical draws.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import FoldLabels
from s3prl_stimulus.seeds import check_seed


# --- caches and data ----------------------------------------------------------------------------


def find_caches(paths: Sequence) -> list[Path]:
    """Cache directories: each path is a cache (holds manifest.json) or a directory of caches (searched 2 deep)."""
    from s3prl_stimulus.cache.manifest import MANIFEST

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
    """The cache a fold needs: normalised with that fold's training statistics (its own, or one cache that the
    fold-invariance test let serve every fold, :mod:`s3prl_stimulus.cache.invariance`), or not normalised."""
    from s3prl_stimulus.cache.normalisation import fold_entry

    for path, manifest in manifests.items():
        kind = manifest["normalisation"]["kind"]
        if kind == normalisation and (normalisation == "none" or fold_entry(manifest, fold) is not None):
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
    from s3prl_stimulus.cache.normalisation import fold_entry

    if cache.manifest["normalisation"]["kind"] != "train_mean_std":
        return
    norm = fold_entry(cache.manifest, fold)
    if norm is None:
        raise StimulusError(f"cache {cache.path} holds no fold-{fold} normalisation: extract with --folds {fold}")
    if norm["train_clips_sha256"] != clips_fingerprint(train_clips):
        raise StimulusError(f"cache {cache.path} was normalised with statistics over another set of fold-{fold} training "
                            f"clips than the {len(train_clips)} this sweep trains on: extract with the same --clips")


def check_crop(cache, datarc: dict) -> None:
    """``datarc.max_seconds`` must crop the cache's clips as the extraction did."""
    from s3prl_stimulus.cache.normalisation import truncation

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
    seeds = list(dict.fromkeys(check_seed(s, "--seeds") for s in seeds))
    if not stimuli or not folds or not seeds:
        raise StimulusError("the grid is empty: give at least one train stimulus, fold and seed")
    return [Run(s, k, seed) for s in stimuli for k in folds for seed in seeds]


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


# --- the stacked grid ---------------------------------------------------------------------------


@dataclass
class BatchGroup:
    """Runs sharing a (fold, seed): they train on the same batches, so each batch is gathered once for them."""

    key: tuple  # (fold, seed)
    runs: object  # torch [S] run indices, in grid order
    n_train: int  # the fold's training clips


@dataclass
class Grid:
    """Everything the batched program needs, on the device."""

    runs: list
    folds: dict  # fold -> FoldData
    features: object  # torch [N_all, L, D] (see feature_table); folds served by one cache share rows
    train_rows: object  # torch [sum n_r] rows into features, run after run
    train_targets: object  # torch [sum n_r, C] float32 soft targets of each run's train stimulus
    offsets: object  # torch [R] start of each run's block in train_rows
    class_weights: object  # torch [R, C] float32
    train_sizes: list
    groups: list = field(default_factory=list)  # BatchGroup, in order of first run
    group_rows: object = None  # torch [G, max n_train]: each group's training rows into features (zero padded)
    run_group: object = None  # torch [R]: each run's group
    run_slot: object = None  # torch [R]: each run's place in the groups' concatenated members
    evaluation_plans: dict = field(default_factory=dict)  # splits -> which clips evaluation reads, and for whom


def prepare_grid(caches: dict, runs: list, datarc: dict, test_stimuli: Sequence[str], feature_normalize: bool, device):
    """Stack the folds' features on the device and each run's training rows, targets and class weights.

    Folds served by one cache (one extraction for every fold's normalisation) share its block of rows.
    """
    import torch

    from s3prl_stimulus.loss import ClassBalancedSoftCrossEntropy

    blocks, starts, folds = [], {}, {}
    train_stimuli = list(dict.fromkeys(r.train_stimulus for r in runs))
    stimuli = list(dict.fromkeys([*train_stimuli, *test_stimuli]))
    for fold, cache in caches.items():
        clips = fold_clip_sets(cache, fold, datarc)
        check_normalisation(cache, fold, clips["train"])
        check_crop(cache, datarc)
        if id(cache) not in starts:
            starts[id(cache)] = sum(len(b) for b in blocks)
            blocks.append(cache.features(feature_normalize))
        rows = {s: cache.index_of(c) + starts[id(cache)] for s, c in clips.items()}
        labels = FoldLabels(str(datarc["votes"]), float(datarc["smoothing"]), stimuli, clips)
        data = FoldData(fold, clips, rows, labels)
        for stimulus in train_stimuli:
            binary = labels.binary_labels(stimulus, clips["train"])
            data.class_weights[stimulus] = ClassBalancedSoftCrossEntropy.from_labels(binary).class_weights
        folds[fold] = data
    features = feature_table(blocks, device)
    train_rows, train_targets, offsets, sizes = [], [], [], []
    for run in runs:
        data = folds[run.fold]
        offsets.append(sum(sizes))
        sizes.append(len(data.clips["train"]))
        train_rows.append(data.rows["train"])
        train_targets.append(data.labels.soft_targets(run.train_stimulus, data.clips["train"]))
    weights = torch.stack([folds[r.fold].class_weights[r.train_stimulus] for r in runs])
    grid = Grid(runs, folds, features, torch.from_numpy(np.concatenate(train_rows)).to(device),
                torch.from_numpy(np.concatenate(train_targets).astype(np.float32)).to(device),
                torch.tensor(offsets, device=device), weights.to(device), sizes)
    _add_batch_groups(grid, device)
    return grid


def feature_table(blocks: list, device):
    """The caches' means ``[N, L, D]`` stacked into one clip-major table ``[N_all, L, D]`` on the device.

    Clip-major, a clip's hidden states are one contiguous block, so gathering a batch copies B blocks of
    ``L*D`` values (not ``L*B`` rows of D), and a single cache becomes the table without a copy.
    """
    import torch

    if len(blocks) == 1:
        return torch.from_numpy(np.ascontiguousarray(blocks[0])).to(device)
    return torch.from_numpy(np.concatenate(blocks)).to(device)


def _add_batch_groups(grid: Grid, device) -> None:
    """Group the runs by (fold, seed): members, the fold's training rows, and each run's place among them."""
    import torch

    members: dict = {}
    for r, run in enumerate(grid.runs):
        members.setdefault((run.fold, run.seed), []).append(r)
    keys = list(members)
    table = np.zeros((len(keys), max(len(grid.folds[fold].rows["train"]) for fold, _ in keys)), dtype=np.int64)
    for g, (fold, _) in enumerate(keys):
        rows = grid.folds[fold].rows["train"]
        table[g, :len(rows)] = rows
    order = [r for key in keys for r in members[key]]
    slot = np.empty(len(grid.runs), dtype=np.int64)
    slot[order] = np.arange(len(order))
    grid.groups = [BatchGroup(key, torch.tensor(members[key], device=device), len(grid.folds[key[0]].rows["train"]))
                   for key in keys]
    grid.group_rows = torch.from_numpy(table).to(device)
    grid.run_group = torch.tensor([keys.index((run.fold, run.seed)) for run in grid.runs], device=device)
    grid.run_slot = torch.from_numpy(slot).to(device)


class BatchPlan:
    """Per step, each (fold, seed) group's batch positions ``[G, B]`` (zero padded) and sizes ``[G]``.

    Runs of a group share its batches; ``groups`` follows ``grid.groups``' order.
    """

    def __init__(self, grid: Grid, batch_size: int):
        self.batch_size = batch_size
        self.groups: dict = {group.key: EpochShuffler(group.n_train, batch_size, group.key[1], group.key[0])
                             for group in grid.groups}

    def next(self) -> tuple[np.ndarray, np.ndarray]:
        positions = np.zeros((len(self.groups), self.batch_size), dtype=np.int64)
        counts = np.zeros(len(self.groups), dtype=np.int64)
        for g, shuffler in enumerate(self.groups.values()):
            batch = shuffler.next_batch()
            positions[g, :len(batch)] = batch
            counts[g] = len(batch)
        return positions, counts
