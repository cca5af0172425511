"""Train and cross-test the whole (train stimulus × fold × seed) grid from feature caches, as one program.

Every run of the grid trains the paper's head on the clip means of a cache (:mod:`s3prl_stimulus.cache`
explains why that is exact); all runs train together (:mod:`s3prl_stimulus.cache.training`).
``sweep`` trains and scores the grid; ``evaluate_checkpoint`` scores an S3PRL-path checkpoint from
the cache instead.

What differs from the S3PRL path, by design: the initial head parameters (drawn with
``torch.manual_seed(seed)`` from the same head class) and the order of training batches (a
permutation per epoch from ``numpy.random.default_rng([seed, fold])``) are the sweep's own, shared
by every train stimulus of a (fold, seed) so that label sets are compared on identical draws; and the
features are each clip's own (the S3PRL path's depend on batch mates' padding).

A checkpoint's head (``--init``, ``--evaluate``) is put on the cache's features only if it records
the cache's upstream identity (:mod:`s3prl_stimulus.integration.identity`); one that records none
needs ``allow_unverified_upstream``, and its outputs say "upstream unverified".
"""

from __future__ import annotations

import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import pandas as pd

from s3prl_stimulus import CLASSES, STIMULI
from s3prl_stimulus.cache import kernels
from s3prl_stimulus.cache.grid import Grid, cache_for_fold, check_same_upstream, find_caches, make_runs, prepare_grid
from s3prl_stimulus.cache.head import initial_head_state, load_run_state, make_batched_head
from s3prl_stimulus.cache.sweep_config import apply_override, check_linear_head, check_runner, load_config
from s3prl_stimulus.cache.sweep_outputs import (SweepContext, read_checkpoint, score_evaluation, summarise,
                                                summary_rows, write_run_outputs)
from s3prl_stimulus.cache.training import evaluate_split, train
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import UpstreamIdentity, verify_checkpoint
from s3prl_stimulus.results import write_evaluation as write_scored  # the name sweep_outputs gives it


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
    identity: UpstreamIdentity  # of the caches' upstream; unverified once an unverified checkpoint's head is loaded


def prepare(cache_paths, runs_spec, config, override, test_stimuli, votes, device, feature_normalize,
            training: bool = True, only: Optional[set] = None) -> Prepared:
    """Validate the config against the cache path's contract, load the caches, stack the grid, build the head.

    ``training=False`` (scoring a checkpoint) skips the runner/optimizer checks, which only training needs;
    ``only``: the names of the runs of ``runs_spec`` to stack (default all).
    """
    from s3prl_stimulus.cache.manifest import upstream_identity
    from s3prl_stimulus.cache.store import check_complete, load_cache
    from s3prl_stimulus.cache.upstream import check_device, default_device
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
    runs = [r for r in make_runs(*runs_spec) if only is None or r.name in only]
    device = check_device(device or default_device())
    manifests = {path: check_complete(path) for path in find_caches(cache_paths)}
    chosen = {k: cache_for_fold(manifests, k, str(datarc["normalisation"])) for k in sorted({r.fold for r in runs})}
    check_same_upstream({p: manifests[p] for p in chosen.values()})
    loaded = {p: load_cache(p) for p in dict.fromkeys(chosen.values())}  # a cache serving several folds: read once
    caches = {k: loaded[p] for k, p in chosen.items()}
    grid = prepare_grid(caches, runs, datarc, test_stimuli, feature_normalize, device)
    first = next(iter(caches.values()))
    up = first.manifest["upstream"]
    head = make_batched_head(len(runs), up["n_hidden"], first.weighted_sum, up["dim"], projector_dim, len(CLASSES)).to(device)
    return Prepared(config, datarc, evalrc, test_stimuli, runs, grid, head, first.manifest, chosen,
                    {k: manifests[p]["key"] for k, p in chosen.items()}, upstream_identity(first.manifest))


ALLOW_UNVERIFIED = "--allow-unverified-upstream"


def check_checkpoint_upstream(prepared: Prepared, checkpoint: dict, path, allow_unverified: bool, option: str) -> None:
    """Refuse a checkpoint trained on other upstream weights than the caches'; mark ``prepared`` unverified when
    the checkpoint records no identity and ``allow_unverified`` (or the config's evalrc) accepts that."""
    allow = allow_unverified or prepared.evalrc["allow_unverified_upstream"]
    fix = (f"pass --cache a cache extracted with the checkpoint's upstream (`s3prl-stimulus extract` with its -u/-k), "
           f"or {option} a checkpoint trained on this cache's upstream")
    prepared.identity = verify_checkpoint(prepared.identity, checkpoint, path, allow, ALLOW_UNVERIFIED, fix)
    if not prepared.identity.verified:
        print(f"[sweep] WARNING: {prepared.identity.reason}", file=sys.stderr)


def initialise(prepared: Prepared, init: Optional[str], allow_unverified_upstream: bool = False) -> None:
    """Each run's starting parameters: an S3PRL checkpoint's head (``init``, like S3PRL's ``-i``, of the caches'
    upstream), or the downstream's head class drawn under ``torch.manual_seed(seed)`` with zero layer weights
    (S3PRL's init)."""
    import torch

    up = prepared.manifest["upstream"]
    if init:
        checkpoint = read_checkpoint(init)
        check_checkpoint_upstream(prepared, checkpoint, init, allow_unverified_upstream, "--init")
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
          name: Optional[str] = None, init: Optional[str] = None, progress: bool = True,
          allow_unverified_upstream: bool = False, overwrite: bool = False,
          save_every: Optional[float] = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train every (train stimulus, fold, seed) from the caches, cross-test each on ``test_stimuli``.

    Writes ``<out>/<upstream>/<train_stimulus>/fold<k>/seed<s>/`` per run and ``summary.csv``,
    ``summary-seeds.csv`` and ``sweep.json`` in ``<out>/<upstream>/``; the summaries cover every run there.
    Resumable (:mod:`s3prl_stimulus.cache.resume`): a killed sweep continues from its last saved evaluation step
    when rerun (saved at most every ``save_every`` seconds, default ``resume.SAVE_EVERY``; 0: every evaluation
    step), and finished runs are skipped unless ``overwrite``. Returns (long, grid) tables of every run there.
    """
    from s3prl_stimulus.cache.resume import SAVE_EVERY, TrainingState, is_finished, settings_key

    spec = (train_stimuli, folds, seeds)
    requested = make_runs(*spec)
    peek = _peek(cache_paths, config, override, votes, name)
    root = Path(out) / peek["directory"]
    key = settings_key(peek["config"], peek["cache_keys"], test_stimuli or _config_stimuli(peek["config"]["downstream_expert"]["datarc"]),
                       feature_normalize, init, all_steps, peek["identity"])
    state = TrainingState(root, key, SAVE_EVERY if save_every is None else save_every)
    done: set = set()
    while True:
        pending = state.pending_runs()
        if pending is not None and set(pending) <= {r.name for r in requested}:
            todo = set(pending)
        else:
            todo = {r.name for r in requested if r.name not in done and (overwrite or not is_finished(
                run_dir_under(root, r), r, peek["identity"]["weights_sha256"], peek["votes"]))}
        if not todo:
            break
        _train_and_write(cache_paths, spec, todo, peek, root, state, test_stimuli, device, feature_normalize,
                         all_steps, init, progress, allow_unverified_upstream)
        done |= todo
    skipped = len(requested) - len(done)
    if skipped:
        print(f"[sweep] {skipped} of {len(requested)} runs already finished under {root}: kept "
              "(--overwrite trains them again)", file=sys.stderr)
    return _write_summaries(root)


def run_dir_under(root: Path, run) -> Path:
    return root / run.train_stimulus / f"fold{run.fold}" / f"seed{run.seed}"


def _peek(cache_paths, config, override, votes, name) -> dict:
    """What deciding which runs to train needs, from the manifests alone (no features loaded)."""
    from s3prl_stimulus.cache.manifest import upstream_identity
    from s3prl_stimulus.cache.store import check_complete

    if not isinstance(config, dict):
        config = load_config(config, override)
    elif override:
        config = apply_override(config, override)
    config = copy.deepcopy(config)
    if votes is not None:
        config["downstream_expert"]["datarc"]["votes"] = votes
    manifests = [check_complete(path) for path in find_caches(cache_paths)]
    first = manifests[0]
    return {"config": config, "cache_keys": [m["key"] for m in manifests], "identity": upstream_identity(first).record(),
            "votes": str(config["downstream_expert"]["datarc"]["votes"]),
            "directory": name or first.get("name") or first["upstream"]["name"]}


def _train_and_write(cache_paths, spec, todo: set, peek: dict, root: Path, state, test_stimuli, device,
                     feature_normalize, all_steps, init, progress, allow_unverified_upstream) -> None:
    """Train the runs named ``todo`` as one stacked grid (resuming ``state`` when it holds them) and write them."""
    from s3prl_stimulus.io import write_json_atomic

    prepared = prepare(cache_paths, spec, peek["config"], None, test_stimuli, None, device, feature_normalize, only=todo)
    initialise(prepared, init, allow_unverified_upstream)
    implementation = kernels.describe(prepared.grid.features)
    if prepared.grid.features.device.type == "cpu" and not kernels.available():
        print(f"[sweep] {implementation}: training on the CPU takes about 1.3x longer (pip install numba)", file=sys.stderr)
    result = train(prepared.head, prepared.grid, prepared.config, progress=progress, keep_steps=all_steps, state=state)
    upstream = prepared.manifest["upstream"]["name"]
    label = str(prepared.config["downstream_expert"]["datarc"].get("upstream_label") or peek["directory"])
    context = SweepContext(root.parent, root.name, prepared.manifest, prepared.config, prepared.test_stimuli,
                           prepared.evalrc, feature_normalize, prepared.identity, label)
    rows = write_run_outputs(context, prepared.grid, result)
    if not rows:
        raise StimulusError("no run reached a dev-best checkpoint: check the cache for non-finite features")
    write_json_atomic(root / "sweep.json", {
        "path": "cache", "upstream": upstream, "caches": {str(k): str(p) for k, p in prepared.chosen.items()},
        "cache_keys": {str(k): v for k, v in prepared.keys.items()}, "runs": [run.name for run in prepared.runs],
        "test_stimuli": list(prepared.test_stimuli), "feature_normalize": feature_normalize, "init": init,
        "device": str(prepared.grid.features.device), "implementation": implementation, "config": prepared.config,
        "upstream_identity": prepared.identity.record(),
    })
    state.discard()  # every output of these runs is written: nothing left to resume


def _write_summaries(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """summary.csv and summary-seeds.csv of every finished run under ``root`` (not only this command's)."""
    from s3prl_stimulus.io import write_csv_atomic

    rows = summary_rows(root)
    if not rows:
        raise StimulusError(f"no finished run under {root}: nothing to summarise")
    long, table = summarise(rows)
    write_csv_atomic(root / "summary.csv", long)
    write_csv_atomic(root / "summary-seeds.csv", table)
    return long, table


def evaluate_checkpoint(cache_paths: Sequence, checkpoint, split: str = "test", out=None, device: Optional[str] = None,
                        test_stimuli=None, allow_unverified_upstream: bool = False) -> tuple[pd.DataFrame, dict]:
    """Score an S3PRL-path checkpoint from the cache, as ``run_downstream -m evaluate -e CKPT`` does.

    Fold, training stimulus, votes and the rest come from the checkpoint's own ``Config``/``Args``; its upstream
    identity must be the cache's (one that records none needs ``allow_unverified_upstream``).
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
    check_checkpoint_upstream(prepared, saved, checkpoint, allow_unverified_upstream, "--evaluate")
    cache_upstream = prepared.manifest["upstream"]["name"]
    if getattr(args, "upstream", cache_upstream) != cache_upstream:  # for checkpoints accepted unverified
        raise StimulusError(f"checkpoint {checkpoint} was trained on upstream {args.upstream}, the cache holds "
                            f"{cache_upstream}: pass that upstream's cache")
    load_run_state(prepared.head, 0, saved.get("Featurizer"), saved["Downstream"])
    logits = evaluate_split(prepared.head, prepared.grid, split).logits[0]
    label = str(datarc.get("upstream_label") or prepared.manifest.get("name") or cache_upstream)
    context = SweepContext(Path(out) if out else Path("."), "", prepared.manifest, prepared.config, prepared.test_stimuli,
                           prepared.evalrc, feature_normalize, prepared.identity, label)
    tag, step = Path(checkpoint).stem, int(saved.get("Step", 0))
    frame, result = score_evaluation(context, prepared.grid, 0, logits, split, step, str(checkpoint))
    if out:
        write_scored(Path(out), split, tag, frame, result)
        _write_evaluated_layer_weights(Path(out), saved, result, tag)
    return frame, result


def _write_evaluated_layer_weights(out: Path, saved: dict, result: dict, tag: str) -> None:
    """As the S3PRL path's ``-m evaluate``: the checkpoint's layer weights, ``layer_weights.json`` for dev-best
    (the report's Fig. 2 reads it beside the results)."""
    from s3prl_stimulus.downstream.emotion_stimulus.model import layer_weights
    from s3prl_stimulus.results import write_layer_weights

    weights = layer_weights(saved)
    if weights is not None:
        write_layer_weights(out, tag, result, weights)


def _config_stimuli(datarc: dict) -> list:
    stimuli = datarc.get("test_stimuli") or list(STIMULI)
    return [s.strip() for s in stimuli.split(",")] if isinstance(stimuli, str) else list(stimuli)
