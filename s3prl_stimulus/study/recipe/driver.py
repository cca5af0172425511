"""Running a stage: preflight, then its jobs on the chosen launcher (or only printed), then the summary and
exit status."""

from __future__ import annotations

import shlex
from typing import Callable, Sequence

from s3prl_stimulus.study.recipe.local import Job, Outcome, last_line, run_local
from s3prl_stimulus.study.recipe.settings import Settings
from s3prl_stimulus.study.recipe.slurm import SlurmOptions, slurm_script, submit_slurm
from s3prl_stimulus.study.recipe.stages import Work, jobs_for
from s3prl_stimulus.study.recipe.weights import preflight_blocks, reachable


def print_commands(jobs: Sequence[Job], report: Callable[[str], None] = print) -> None:
    for job in jobs:
        report(f"# {job.name} (log {job.log})" + (f" -- would not start: {job.blocked}" if job.blocked else ""))
        for command in job.commands:
            report(shlex.join(command))


def summarise(stage: str, work: Work, outcomes: Sequence[Outcome], report: Callable[[str], None] = print) -> int:
    failed = [o for o in outcomes if not o.ok]
    report(f"stage {stage}: {len(work.finished)} run(s) already finished (skipped), {len(outcomes) - len(failed)} "
           f"job(s) done, {len(failed)} failed, {len(work.missing)} run(s) missing")
    for outcome in failed:
        report(f"  FAILED {outcome.name}: {outcome.detail}" + (f" (log {outcome.log})" if outcome.log else ""))
    for name, reason in work.missing:
        report(f"  MISSING {name}: {reason}")
    return 1 if failed or work.missing else 0


def run_stage(settings: Settings, stage: str, launcher: str = "local", gpus: Sequence[str] = (),
              slurm: SlurmOptions = SlurmOptions(), dry_run: bool = False, check_upstreams: bool = True,
              report: Callable[[str], None] = print, hub=None, connect: Callable[[str], bool] = reachable) -> int:
    """Stage ``train`` or ``evaluate`` over the grid; returns the exit status (1 when anything failed)."""
    # the authors' path trains nothing; its evaluation takes the upstream from each imported checkpoint
    needs_upstreams = settings.path != "authors" and (stage == "train" or settings.path == "s3prl")
    blocked = preflight_blocks(settings, report, hub, connect) if (check_upstreams and needs_upstreams) else {}
    work = jobs_for(settings, stage, blocked)
    if dry_run:
        report(f"# dry run, stage {stage} ({settings.path} path, {launcher} launcher): {len(work.finished)} run(s) "
               f"finished, {len(work.jobs)} job(s) to run, {len(work.missing)} missing")
        if launcher == "slurm" and work.jobs:
            report("# SLURM array script that would be written:")
            report(slurm_script(settings, stage, len(work.jobs), settings.root / "slurm" / "PLAN.json", slurm).rstrip())
        print_commands(work.jobs, report)
        for name, reason in work.missing:
            report(f"# missing {name}: {reason}")
        return 0
    if not work.jobs:
        return summarise(stage, work, [], report)
    if launcher == "slurm":
        runnable = [j for j in work.jobs if not j.blocked]
        outcomes = [Outcome(j.name, False, j.blocked) for j in work.jobs if j.blocked]
        if runnable:
            submit_slurm(settings, stage, runnable, slurm, report)
        if runnable and not slurm.submit:
            return summarise(stage, work, outcomes, report)
        outcomes += [_outcome_after_slurm(settings, stage, job) for job in runnable]
        return summarise(stage, work, outcomes, report)
    outcomes = run_local(work.jobs, gpus, report)
    return summarise(stage, work, outcomes, report)


def _outcome_after_slurm(settings: Settings, stage: str, job: Job) -> Outcome:
    """A submitted job's outcome, read from the files once SLURM is done (the job is gone if it finished)."""
    still = {j.key for j in jobs_for(settings, stage).jobs}
    if job.key not in still:
        return Outcome(job.name, True, "", job.log)
    detail = last_line(job.log) if job.log.is_file() else "no log: the task did not start (see the slurm/logs files)"
    return Outcome(job.name, False, detail, job.log)
