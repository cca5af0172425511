"""Running jobs on this machine: a job's commands into its log (also what a SLURM array task does), and the
local launcher, one job at a time or one per GPU."""

from __future__ import annotations

import datetime
import os
import queue
import shlex
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.progress import duration
from s3prl_stimulus.study.recipe.settings import split_list


@dataclass
class Job:
    """Commands run one after the other, appended to one log; ``finish`` checks what they left behind
    (and may record it), returning a problem or None."""

    key: str  # stable identity (a SLURM task finds its job by it): "s3prl/<run>" or "cache/<upstream>"
    name: str
    log: Path
    commands: list
    finish: Callable[[], Optional[str]] = lambda: None
    blocked: Optional[str] = None  # why it cannot start (preflight); reported as a failure


@dataclass(frozen=True)
class Outcome:
    name: str
    ok: bool
    detail: str = ""
    log: Optional[Path] = None
    seconds: float = 0.0


def _timestamp() -> str:
    return datetime.datetime.now().isoformat(timespec="seconds")


def last_line(path: Path) -> str:
    """The log's last non-blank line: S3PRL's and Python's errors end there."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 4096))
            lines = handle.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    lines = [line.strip() for line in lines if line.strip() and not line.startswith("# ")]
    return lines[-1][:300] if lines else ""


PROGRESS_EVERY_S = 60.0
"""Seconds between a running job's progress reports on the console (its log's latest line)."""


def execute(job: Job, env: Optional[dict] = None, progress: Optional[Callable[[str], None]] = None) -> Outcome:
    """Run ``job``'s commands into its log; the first failing command ends the job. While a command runs,
    ``progress`` gets the log's latest line every :data:`PROGRESS_EVERY_S` seconds (a heartbeat of
    extract/sweep, S3PRL's step counter)."""
    start = time.monotonic()
    if job.blocked:
        return Outcome(job.name, False, job.blocked, None)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log:
        for command in job.commands:
            log.write(f"# {_timestamp()} $ {shlex.join(command)}\n")
            log.flush()
            status = _run_into_log(command, log, env, job.log, progress, start)
            if status != 0:
                log.write(f"# {_timestamp()} exit status {status}\n")
                log.flush()
                return Outcome(job.name, False, f"exit status {status}: {last_line(job.log)}", job.log,
                               time.monotonic() - start)
    problem = job.finish()
    if problem:
        with open(job.log, "a", encoding="utf-8") as log:
            log.write(f"# {_timestamp()} {problem}\n")
    return Outcome(job.name, problem is None, problem or "", job.log, time.monotonic() - start)


def _run_into_log(command: list, log, env: Optional[dict], log_path: Path,
                  progress: Optional[Callable[[str], None]], start: float) -> int:
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                               cwd=log_path.parent)
    try:
        while True:
            try:
                return process.wait(timeout=PROGRESS_EVERY_S)
            except subprocess.TimeoutExpired:
                if progress is not None:
                    latest = last_line(log_path)
                    progress(f"running for {duration(time.monotonic() - start)}" + (f": {latest}" if latest else ""))
    except BaseException:  # Ctrl-C or a kill of the recipe: the job stops with it, as subprocess.run did
        process.kill()
        process.wait()
        raise


def gpu_environment(gpu: Optional[str]) -> dict:
    env = dict(os.environ)
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def run_local(jobs: Sequence[Job], gpus: Sequence[str] = (), report: Callable[[str], None] = print) -> list[Outcome]:
    """Run ``jobs``: one after the other without GPUs, else one at a time per GPU (``CUDA_VISIBLE_DEVICES``)."""
    total = len(jobs)
    outcomes: list = []
    lock = threading.Lock()
    pending: queue.Queue = queue.Queue()
    for index, job in enumerate(jobs, 1):
        pending.put((index, job))

    def work(gpu: Optional[str]) -> None:
        where = f" on GPU {gpu}" if gpu is not None else ""
        while True:
            try:
                index, job = pending.get_nowait()
            except queue.Empty:
                return
            if not job.blocked:
                with lock:
                    report(f"[{index}/{total}] {job.name}{where}: started (log {job.log})")
            def progress(text: str, index=index, job=job) -> None:
                with lock:
                    report(f"[{index}/{total}] {job.name}: {text}")

            try:
                outcome = execute(job, gpu_environment(gpu), progress)
            except Exception as err:  # e.g. the log cannot be written: report it, keep the other jobs going
                outcome = Outcome(job.name, False, f"{type(err).__name__}: {err}", job.log)
            with lock:
                outcomes.append(outcome)
                verdict = "done" if outcome.ok else f"FAILED ({outcome.detail})"
                took = "" if job.blocked else f" in {outcome.seconds:.0f} s"
                report(f"[{index}/{total}] {job.name}: {verdict}{took}")

    if not gpus:
        work(None)
    else:
        threads = [threading.Thread(target=work, args=(gpu,), daemon=True) for gpu in gpus]
        for thread in threads:
            thread.start()
        for thread in threads:
            while thread.is_alive():  # join with a timeout so Ctrl-C reaches the main thread
                thread.join(0.5)
    order = {job.name: i for i, job in enumerate(jobs)}
    return sorted(outcomes, key=lambda o: order[o.name])


def parse_gpus(ngpu: int, gpu_ids: Optional[str]) -> list[str]:
    if gpu_ids:
        ids = split_list(gpu_ids)
        if not all(i.isdigit() for i in ids):
            raise StimulusError(f"--gpu_ids {gpu_ids!r}: give GPU indices such as 0,1,3")
        return ids
    if ngpu < 0:
        raise StimulusError(f"--ngpu {ngpu}: give 0 (CPU or the visible GPU, one job at a time) or more")
    return [str(i) for i in range(ngpu)]
