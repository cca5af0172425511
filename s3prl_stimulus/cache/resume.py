"""A sweep survives being killed: its stacked training state on disk, and which runs are already finished.

At an evaluation step the sweep saves, atomically, everything the rest of its training depends on:
the stacked head, its dev-best copy, the optimizer (and scheduler), each (fold, seed) shuffler's random
state and position, and the evaluation history: at the first evaluation step of a process, then at the
first one at least ``save_every`` seconds (default :data:`SAVE_EVERY`) after the previous save, so that a
paper-size sweep (110 evaluations, ~85 MB of state for a Large upstream) does not spend about a minute
writing it (``benchmarks/bench_paper_sweep.py``). Rerunning the same command finds that file and
continues from it, so the outputs equal an uninterrupted sweep's whichever step was saved last. The file is keyed by the settings (config, caches,
test stimuli, ...) and lists its runs; a file of other settings is set aside, never silently resumed.
Once every output of its runs is written, the file is removed.

A run whose ``results-test-dev-best.json`` already holds this upstream's results is finished: a rerun
skips it unless ``--overwrite``. Runs never interact (:mod:`s3prl_stimulus.cache.training`), so training
only the unfinished runs gives them the results a full grid would.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path
from typing import Optional

from s3prl_stimulus.cache.grid import BatchPlan, Run
from s3prl_stimulus.io import atomic_path, sha256_file
from s3prl_stimulus.results import FINAL_RESULTS

STATE_FILE = ".sweep-state.pt"
STATE_SCHEMA = 1
SAVE_EVERY = 60.0  # seconds: a kill loses at most about this much training, plus the evaluation steps' interval


def settings_key(config: dict, cache_keys: list, test_stimuli, feature_normalize: bool, init: Optional[str],
                 all_steps: bool, identity: dict) -> str:
    """SHA-256 of everything a run's training and outputs depend on, apart from which runs there are."""
    fields = {
        "schema": STATE_SCHEMA, "config": config, "cache_keys": sorted(cache_keys), "test_stimuli": list(test_stimuli),
        "feature_normalize": bool(feature_normalize), "init": sha256_file(init) if init else None,
        "all_steps": bool(all_steps), "identity": identity,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def is_finished(directory: Path, run: Run, weights_sha256: Optional[str], votes: str) -> bool:
    """Whether ``directory`` holds this run's final results, computed from this upstream's weights."""
    try:
        result = json.loads((directory / FINAL_RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    identity = result.get("upstream_identity") or {}
    return (result.get("path") == "cache" and result.get("train_stimulus") == run.train_stimulus
            and result.get("fold") == run.fold and result.get("seed") == run.seed and str(result.get("votes")) == votes
            and identity.get("weights_sha256") == weights_sha256 and isinstance(result.get("test_stimuli"), dict))


class TrainingState:
    """The state file of one upstream directory: read, matched to the settings, saved, removed."""

    def __init__(self, root: Path, key: str, save_every: float = SAVE_EVERY):
        self.path = Path(root) / STATE_FILE
        self.key = key
        self.saved: Optional[dict] = None
        self.save_every = float(save_every)
        self.last_save: Optional[float] = None  # time.monotonic() of this process's last save

    def due(self) -> bool:
        """Whether to save at this evaluation step: the process's first, then ``save_every`` seconds after the last."""
        return self.last_save is None or time.monotonic() - self.last_save >= self.save_every

    def pending_runs(self) -> Optional[list[str]]:
        """Run names of a saved state with these settings, or None (no file, or other settings: set aside)."""
        import torch

        if not self.path.is_file():
            return None
        try:
            saved = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:  # truncated by a kill during the rename's predecessor, or foreign: start over
            saved = None
        if not isinstance(saved, dict) or saved.get("key") != self.key:
            self.discard("its settings differ from this command's" if saved else "it cannot be read")
            return None
        self.saved = saved
        return list(saved["runs"])

    def restore(self, runs: list, head, optimizer, scheduler, plan: BatchPlan, result) -> int:
        """Put the saved state into the training objects; the step to continue after (0: nothing saved)."""
        if self.saved is None or self.saved["runs"] != [r.name for r in runs]:
            return 0
        saved = self.saved
        head.load_state_dict(saved["head"])
        result.best_state.load_state_dict(saved["best_head"])
        optimizer.load_state_dict(saved["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(saved["scheduler"])
        restore_plan(plan, saved["plan"])
        result.best_step[:], result.best_loss[:], result.best_f1[:] = saved["best_step"], saved["best_loss"], saved["best_f1"]
        result.history[:] = saved["history"]
        result.step_evaluations[:] = [evaluations_from_saved(e) for e in saved["step_evaluations"]]
        return int(saved["step"])

    def save(self, step: int, runs: list, head, optimizer, scheduler, plan: BatchPlan, result) -> None:
        import torch

        state = {
            "key": self.key, "runs": [r.name for r in runs], "step": step, "head": head.state_dict(),
            "best_head": result.best_state.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": None if scheduler is None else scheduler.state_dict(), "plan": plan_state(plan),
            "best_step": list(result.best_step), "best_loss": list(result.best_loss), "best_f1": list(result.best_f1),
            "history": list(result.history), "step_evaluations": [evaluations_to_save(e) for e in result.step_evaluations],
        }
        with atomic_path(self.path) as tmp:
            torch.save(state, tmp)
        self.last_save = time.monotonic()

    def discard(self, why: str = "") -> None:
        if self.path.exists():
            if why:
                print(f"[sweep] note: not resuming {self.path}: {why}; training from the start", flush=True)
            self.path.unlink()


def plan_state(plan: BatchPlan) -> list:
    """Each (fold, seed) shuffler's random generator, epoch order and position, in the plan's group order."""
    import torch

    return [{"rng": shuffler.rng.bit_generator.state, "order": torch.from_numpy(shuffler.order.copy()),
             "cursor": int(shuffler.cursor)} for shuffler in plan.groups.values()]


def restore_plan(plan: BatchPlan, saved: list) -> None:
    for shuffler, state in zip(plan.groups.values(), saved, strict=True):
        shuffler.rng.bit_generator.state = state["rng"]
        shuffler.order, shuffler.cursor = state["order"].numpy().copy(), int(state["cursor"])


def evaluations_to_save(entry) -> list:
    step, dev, test = entry
    return [step, [dev.split, dev.logits], [test.split, test.logits]]


def evaluations_from_saved(entry):
    from s3prl_stimulus.cache.training import Evaluation

    step, (dev_split, dev_logits), (test_split, test_logits) = entry
    return step, Evaluation(dev_split, dict(dev_logits)), Evaluation(test_split, dict(test_logits))
