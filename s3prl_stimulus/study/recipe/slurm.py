"""The SLURM launcher: a plan of a stage's units and an array script over them, submitted with ``sbatch --wait``;
each array task runs its unit as the files are when it starts."""

from __future__ import annotations

import datetime
import json
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_json_atomic, write_text_atomic
from s3prl_stimulus.study.recipe.local import Job, execute
from s3prl_stimulus.study.recipe.settings import Settings
from s3prl_stimulus.study.recipe.stages import STAGES, jobs_for

PLAN_SCHEMA = 1


@dataclass(frozen=True)
class SlurmOptions:
    gpus_per_task: int = 0
    max_parallel: Optional[int] = None
    sbatch_args: str = ""
    submit: bool = True


def write_plan(settings: Settings, stage: str, jobs: Sequence[Job], stamp: str) -> Path:
    plan = settings.root / "slurm" / f"{settings.path}-{stage}-{stamp}.json"
    write_json_atomic(plan, {"schema": PLAN_SCHEMA, "stage": stage, "settings": settings.to_json(),
                             "units": [j.key for j in jobs]})
    return plan


def slurm_script(settings: Settings, stage: str, n_tasks: int, plan: Path, options: SlurmOptions) -> str:
    throttle = f"%{options.max_parallel}" if options.max_parallel else ""
    logs = settings.root / "slurm" / "logs" / f"{settings.path}-{stage}-%A_%a.out"
    lines = [
        "#!/usr/bin/env bash",
        f"#SBATCH --job-name=stimulus-{settings.path}-{stage}",
        f"#SBATCH --array=0-{n_tasks - 1}{throttle}",
        f"#SBATCH --output={logs}",
    ]
    if options.gpus_per_task:
        lines.append(f"#SBATCH --gres=gpu:{options.gpus_per_task}")
    lines += [f"#SBATCH {arg}" for arg in shlex.split(options.sbatch_args or "")]
    unit = "run" if settings.path == "s3prl" else "upstream"
    lines += [
        f"# Written by `python -m s3prl_stimulus.study.recipe {stage}`: one array task per {unit} not finished "
        "when it was",
        f"# written ({n_tasks}); each task picks its unit from {plan.name} by SLURM_ARRAY_TASK_ID, skips it if",
        "# another run finished it meanwhile, and writes the same per-run log as the local launcher.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(settings.root))}",
        f"exec {shlex.quote(sys.executable)} -m s3prl_stimulus.study.recipe task --plan {shlex.quote(str(plan))} "
        '--index "${SLURM_ARRAY_TASK_ID:?set by SLURM (sbatch --array); set it by hand to run one task}"',
    ]
    return "\n".join(lines) + "\n"


def submit_slurm(settings: Settings, stage: str, jobs: Sequence[Job], options: SlurmOptions,
                 report: Callable[[str], None] = print) -> Optional[Path]:
    """Write the plan and array script; with ``options.submit``, submit it and wait (``sbatch --wait``)."""
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    plan = write_plan(settings, stage, jobs, stamp)
    script = plan.with_suffix(".sbatch")
    write_text_atomic(script, slurm_script(settings, stage, len(jobs), plan, options))
    (settings.root / "slurm" / "logs").mkdir(parents=True, exist_ok=True)
    report(f"wrote SLURM array script {script} ({len(jobs)} task(s)), plan {plan}")
    if not options.submit:
        report(f"submit it with: sbatch {script}   (then rerun this stage to check the results)")
        return script
    if shutil.which("sbatch") is None:
        raise StimulusError(f"sbatch is not on PATH: submit {script} on the cluster yourself (then rerun this stage "
                            "to check), or use --launcher local")
    report("submitting with sbatch --wait: this waits for every task")
    status = subprocess.run(["sbatch", "--wait", str(script)]).returncode
    report(f"sbatch --wait returned {status}")
    return script


def run_task(plan_file: Path, index: int, report: Callable[[str], None] = print) -> int:
    """One SLURM array task: rebuild the plan's stage from the files as they are now, run unit ``index``."""
    try:
        plan = json.loads(Path(plan_file).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StimulusError(f"cannot read plan {plan_file} ({err}): rerun the stage that wrote it") from None
    if plan.get("schema") != PLAN_SCHEMA or plan.get("stage") not in STAGES:
        raise StimulusError(f"{plan_file} is not a recipe plan of schema {PLAN_SCHEMA}: rerun the stage that wrote it")
    units = plan["units"]
    if not 0 <= index < len(units):
        raise StimulusError(f"task index {index} outside the plan's {len(units)} unit(s) (0-{len(units) - 1})")
    settings = Settings.from_json(plan["settings"])
    work = jobs_for(settings, plan["stage"])
    job = next((j for j in work.jobs if j.key == units[index]), None)
    if job is None:
        report(f"{units[index]}: nothing to do (finished meanwhile)")
        return 0
    report(f"{job.name}: started (log {job.log})")
    outcome = execute(job)
    report(f"{job.name}: {'done' if outcome.ok else 'FAILED (' + outcome.detail + ')'} in {outcome.seconds:.0f} s")
    return 0 if outcome.ok else 1
