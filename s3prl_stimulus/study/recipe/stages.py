"""What stages 2 (train) and 3 (evaluate) still have to do, read from the run directories: the jobs to run,
the runs already finished, the runs that cannot be done yet."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from s3prl_stimulus.io import write_json_atomic
from s3prl_stimulus.results import FINAL_RESULTS as RESULTS_FILE
from s3prl_stimulus.study.recipe.local import Job, _timestamp
from s3prl_stimulus.study.recipe.plan import (
    DEV_BEST, authors_evaluate_command, authors_import_command, imported_checkpoints, FINISHED, INTERRUPTED, TRAINED, TRAINED_MARKER, Run, extract_command, is_finished,
    plan_runs, product_groups, run_dir, run_state, s3prl_evaluate_command, s3prl_train_command, sweep_command,
    upstream_dir,
)
from s3prl_stimulus.study.recipe.settings import Settings, Upstream


def _write_marker(expdir: Path, command: list) -> Optional[str]:
    if not (expdir / DEV_BEST).is_file():
        return f"training exited 0 but left no {DEV_BEST} in {expdir}"
    write_json_atomic(expdir / TRAINED_MARKER, {"finished": _timestamp(), "command": command})
    return None


def s3prl_train_job(settings: Settings, run: Run) -> Job:
    expdir = run_dir(settings, run)
    command = s3prl_train_command(settings, run, resume=run_state(settings, run) == INTERRUPTED)
    return Job(f"s3prl/{run.name}", f"s3prl/{run.name} train", expdir / "recipe-train.log", [command],
               finish=lambda: _write_marker(expdir, command))


def s3prl_evaluate_job(settings: Settings, run: Run) -> Job:
    expdir = run_dir(settings, run)

    def finish() -> Optional[str]:
        if is_finished(expdir, settings.path, run):
            return None
        return f"evaluation exited 0 but {expdir / RESULTS_FILE} is missing or not this run's results"

    return Job(f"s3prl/{run.name}", f"s3prl/{run.name} evaluate", expdir / "recipe-evaluate.log",
               [s3prl_evaluate_command(settings, run)],
               finish=finish)


def cache_job(settings: Settings, upstream: Upstream, runs: Sequence[Run]) -> Job:
    """Extract the caches the unfinished ``runs`` need, then sweep exactly those runs."""
    folds = sorted({r.fold for r in runs})
    commands = [extract_command(settings, upstream, folds)]
    commands += [sweep_command(settings, upstream, *group) for group in product_groups(runs)]

    def finish() -> Optional[str]:
        left = [r.name for r in runs if not is_finished(run_dir(settings, r), settings.path, r)]
        return f"the sweep left {len(left)} run(s) without results, e.g. {left[0]}" if left else None

    return Job(f"cache/{upstream.label}", f"cache/{upstream.label} extract + sweep of {len(runs)} run(s)",
               upstream_dir(settings, upstream) / "recipe-train.log", commands, finish=finish)


@dataclass
class Work:
    """What a stage has to do: jobs to run, runs already finished, runs it cannot do (with why)."""

    jobs: list
    finished: list
    missing: list  # (run name, reason)


def train_work(settings: Settings, blocked: Optional[dict] = None) -> Work:
    blocked = blocked or {}
    if settings.path == "authors":
        return authors_import_work(settings)
    jobs, finished = [], []
    if settings.path == "s3prl":
        for run in plan_runs(settings):
            state = run_state(settings, run)
            if state in (FINISHED, TRAINED):
                finished.append(run.name)
                continue
            job = s3prl_train_job(settings, run)
            job.blocked = blocked.get(run.upstream.label)
            jobs.append(job)
        return Work(jobs, finished, [])
    for upstream in settings.upstreams:
        runs = plan_runs(settings, [upstream])
        todo = [r for r in runs if run_state(settings, r) != FINISHED]
        finished += [r.name for r in runs if r not in todo]
        if todo:
            job = cache_job(settings, upstream, todo)
            job.blocked = blocked.get(upstream.label)
            jobs.append(job)
    return Work(jobs, finished, [])


def evaluate_work(settings: Settings, blocked: Optional[dict] = None) -> Work:
    """Stage 3. S3PRL path: evaluate every trained run's dev-best.ckpt on every label set. Cache path: the
    sweep already cross-tested every run, so only check."""
    blocked = blocked or {}
    if settings.path == "authors":
        return authors_evaluate_work(settings)
    jobs, finished, missing = [], [], []
    for run in plan_runs(settings):
        state = run_state(settings, run)
        if state == FINISHED:
            finished.append(run.name)
        elif settings.path == "s3prl" and state == TRAINED:
            job = s3prl_evaluate_job(settings, run)
            job.blocked = blocked.get(run.upstream.label)
            jobs.append(job)
        else:
            where = run_dir(settings, run) if settings.path == "s3prl" else upstream_dir(settings, run.upstream)
            missing.append((run.name, f"not trained ({state}): run stage 2; log {where / 'recipe-train.log'}"))
    return Work(jobs, finished, missing)


def authors_import_work(settings: Settings) -> Work:
    """Stage 2 of ``--path authors``: their models are imported, not trained (``--authors SRC``)."""
    imported = [run.name for run, _ in imported_checkpoints(settings)]
    if settings.authors is None:
        missing = [] if imported else [("authors", f"nothing imported under {settings.root / settings.path}: "
                                                   "pass --authors with the folder their zip unpacks to")]
        return Work([], imported, missing)
    log = settings.root / settings.path / "recipe-import.log"

    def finish() -> Optional[str]:
        return None if imported_checkpoints(settings) else f"the import left no checkpoint under {log.parent}"

    command = authors_import_command(settings)
    return Work([Job("authors/import", f"import {settings.authors}", log, [command], finish=finish)], [], [])


def authors_evaluate_work(settings: Settings) -> Work:
    """Stage 3 of ``--path authors``: S3PRL's ``-m evaluate -e`` of every imported checkpoint not yet scored."""
    jobs, finished = [], []
    for run, checkpoint in imported_checkpoints(settings):
        if is_finished(checkpoint.parent, "s3prl", run):
            finished.append(run.name)
            continue

        def finish(run=run, expdir=checkpoint.parent) -> Optional[str]:
            ok = is_finished(expdir, "s3prl", run)
            return None if ok else f"evaluation exited 0 but {expdir / RESULTS_FILE} is missing or not this run's results"

        jobs.append(Job(f"authors/{run.name}", f"authors/{run.name} evaluate", checkpoint.parent / "recipe-evaluate.log",
                        [authors_evaluate_command(settings, checkpoint)], finish=finish))
    missing = [] if jobs or finished else [("authors", f"no imported checkpoint under {settings.root / settings.path}: "
                                                       "run stage 2 (train) with --authors SRC, or import-authors")]
    return Work(jobs, finished, missing)


STAGES = {"train": train_work, "evaluate": evaluate_work}


def jobs_for(settings: Settings, stage: str, blocked: Optional[dict] = None) -> Work:
    return STAGES[stage](settings, blocked)
