"""What a sweep writes: per run the S3PRL path's result files, a checkpoint, layer weights, history; summaries.

The outputs are written by the same functions as the S3PRL downstream's (``results.predictions_frame``,
``results.score_stimuli``), so their schema is identical, with ``"path": "cache"``. ``dev-best.ckpt``
has the S3PRL runner's layout, so ``run_downstream -m evaluate -i`` scores a cache-trained head
through S3PRL; :func:`read_checkpoint` reads such checkpoints back.
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from s3prl_stimulus import STIMULI
from s3prl_stimulus.cache.grid import Grid, Run
from s3prl_stimulus.cache.head import DOWNSTREAM, run_state
from s3prl_stimulus.cache.training import TrainResult, evaluate_split, split_loss
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import EXTRA_STATE_KEY, UpstreamIdentity, checkpoint_state
from s3prl_stimulus.results import coverage, predictions_frame, score_stimuli
from s3prl_stimulus.results import write_evaluation as write_scored  # this module's write_evaluation scores first


# --- per run ------------------------------------------------------------------------------------


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
    identity: Optional[UpstreamIdentity] = None  # default: the cache's upstream, verified
    label: str = ""  # "upstream_label" of the results: the name the report shows these runs under

    def __post_init__(self):
        if self.identity is None:
            from s3prl_stimulus.cache.manifest import upstream_identity

            self.identity = upstream_identity(self.manifest)


def run_dir(context: SweepContext, run: Run) -> Path:
    return context.out / context.upstream_dir / run.train_stimulus / f"fold{run.fold}" / f"seed{run.seed}"


def metadata(context: SweepContext, run: Run, split: str, step: int, checkpoint: Optional[str]) -> dict:
    """The S3PRL path's results header, with ``"path": "cache"``."""
    datarc = context.config["downstream_expert"]["datarc"]
    return {
        "schema": 1, "path": "cache", "upstream": context.manifest["upstream"]["name"],
        "upstream_ckpt": context.manifest.get("upstream_ckpt"), "fold": run.fold, "train_stimulus": run.train_stimulus,
        "votes": str(datarc["votes"]), "seed": run.seed, "step": step, "checkpoint": checkpoint, "split": split,
        "upstream_label": context.label or context.manifest["upstream"]["name"],
    } | {"upstream_identity": context.identity.record()}


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
    covered = coverage(run.fold, split, clips, data.clips["train"])
    return frame, metadata(context, run, split, step, checkpoint) | {"n_clips": len(clips), **covered, "test_stimuli": scores}


def write_evaluation(context: SweepContext, grid: Grid, r: int, logits, split: str, tag: str, step: int,
                     checkpoint: Optional[str]) -> dict:
    """``predictions-<split>-<tag>.csv`` and ``results-<split>-<tag>.json`` of one run."""
    frame, result = score_evaluation(context, grid, r, logits, split, step, checkpoint)
    write_scored(run_dir(context, grid.runs[r]), split, tag, frame, result)
    return result


def write_checkpoint(context: SweepContext, grid: Grid, best_state, r: int, step: int, best_loss: float,
                     best_f1: float) -> Path:
    """``dev-best.ckpt`` in the runner's layout (``Featurizer``, ``Downstream``, ``Step``, ``Config``, ``Args``),
    so ``run_downstream -m evaluate -i <it>`` can evaluate a cache-trained head through S3PRL (which checks
    the upstream identity saved with the head)."""
    import torch

    from s3prl_stimulus.io import atomic_path

    run = grid.runs[r]
    featurizer, head_state = run_state(best_state, r)
    downstream = {"objective.class_weights": grid.folds[run.fold].class_weights[run.train_stimulus].cpu().clone(),
                  **head_state, "best_dev_loss": torch.tensor(best_loss), "best_dev_macro_f1": torch.tensor(best_f1),
                  EXTRA_STATE_KEY: checkpoint_state(context.identity)}  # where the S3PRL expert keeps its identity
    config = copy.deepcopy(context.config)
    config["downstream_expert"]["datarc"].update(fold=run.fold, train_stimulus=run.train_stimulus,
                                                 upstream_label=context.label or None)  # S3PRL's -e keeps the label
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

    from s3prl_stimulus.results import FINAL_TAG, write_layer_weights

    if not best_state.weighted:
        return  # one hidden state (e.g. fbank): no weighted sum
    run = grid.runs[r]
    weights = torch.softmax(best_state.featurizer_weights[r].detach().cpu().double(), dim=-1).tolist()
    metadata = {"upstream": context.manifest["upstream"]["name"], "fold": run.fold, "train_stimulus": run.train_stimulus,
                "checkpoint": checkpoint, "step": step}
    write_layer_weights(run_dir(context, run), FINAL_TAG, metadata, weights)


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
                         "loss": score["loss"], "dev_best_step": step, "n_clips": score["n_clips"],
                         "partition_clips": scores["partition_clips"], "complete": scores["complete"]})
    for step, dev, test_step in result.step_evaluations:
        for r in range(len(grid.runs)):
            for evaluation in (dev, test_step):
                write_evaluation(context, grid, r, evaluation.logits[r], evaluation.split, f"step-{step}", step, None)
    return rows


# --- summaries ----------------------------------------------------------------------------------


def summary_rows(root: Path) -> list[dict]:
    """One row per finished run × test stimulus under ``root``, read from the runs' final results JSONs."""
    import json

    from s3prl_stimulus.results import FINAL_RESULTS

    rows = []
    for path in sorted(Path(root).glob(f"*/fold*/seed*/{FINAL_RESULTS}")):
        result = json.loads(path.read_text(encoding="utf-8"))
        if result.get("path") != "cache":
            continue
        for stimulus, score in result["test_stimuli"].items():
            rows.append({"train_stimulus": result["train_stimulus"], "fold": result["fold"], "seed": result["seed"],
                         "test_stimulus": stimulus, "macro_f1": score["macro_f1"], "ci95_lo": score["ci95"][0],
                         "ci95_hi": score["ci95"][1], "loss": score["loss"], "dev_best_step": result["step"],
                         "n_clips": score["n_clips"], "partition_clips": result.get("partition_clips"),
                         "complete": result.get("complete", True)})
    return rows


def summarise(rows: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Long table of every run × test stimulus, and mean ± std over seeds (sample std, ddof=1; 0 with one seed).

    The grid table averages each seed's macro-F1 over folds first, then takes mean ± std over seeds;
    its ``complete`` is false when any run of the cell used part of the corpus.
    """
    long = pd.DataFrame(rows).sort_values(["train_stimulus", "test_stimulus", "fold", "seed"]).reset_index(drop=True)
    per_seed = long.groupby(["train_stimulus", "test_stimulus", "seed"])["macro_f1"].mean().reset_index()
    grid = per_seed.groupby(["train_stimulus", "test_stimulus"])["macro_f1"].agg(["mean", "std", "count"]).reset_index()
    grid["std"] = grid["std"].fillna(0.0)
    grid = grid.rename(columns={"mean": "macro_f1_mean", "std": "macro_f1_std", "count": "n_seeds"})
    complete = long.groupby(["train_stimulus", "test_stimulus"])["complete"].all().rename("complete").reset_index()
    return long, grid.merge(complete, on=["train_stimulus", "test_stimulus"])


INCOMPLETE_MARK = " †"
"""Appended to a cell built from runs on part of the corpus (``complete: false``)."""


def grid_table(grid: pd.DataFrame) -> pd.DataFrame:
    """Train stimulus × test stimulus, ``mean ± std`` over seeds of the fold-averaged macro-F1 (``†``: incomplete runs)."""
    cells = grid.assign(cell=[f"{m:.4f} ± {s:.4f}{'' if done else INCOMPLETE_MARK}"
                              for m, s, done in zip(grid["macro_f1_mean"], grid["macro_f1_std"], grid["complete"])])
    order = [s for s in STIMULI if s in set(cells["test_stimulus"])]
    table = cells.pivot(index="train_stimulus", columns="test_stimulus", values="cell")
    table = table.reindex(index=[s for s in STIMULI if s in table.index], columns=order)
    table.index.name = "train \\ test"
    return table


# --- checkpoints --------------------------------------------------------------------------------


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
