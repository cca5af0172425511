"""The paper's study as one resumable recipe: train every (upstream, train stimulus, fold, seed), cross-test it.

``recipes/run_paper.sh`` runs this module for its stage 2 (train) and stage 3 (cross-test evaluation)::

    python -m s3prl_stimulus.recipe train    --path s3prl|cache --root EXP --corpus AudioWAV [options]
    python -m s3prl_stimulus.recipe evaluate --path s3prl|cache --root EXP --corpus AudioWAV [options]
    python -m s3prl_stimulus.recipe status | preflight [same options]
    python -m s3prl_stimulus.recipe task --plan PLAN.json --index I      (one SLURM array task)

Every run owns ``<root>/<path>/<upstream>/<train_stimulus>/fold<k>/seed<s>/`` (docs/design.md). Its state is
read from the files there, never remembered, so any stage can be rerun, interrupted and rerun again:

- **finished**: ``results-test-dev-best.json`` is valid JSON of the results schema, written for this very
  run (path, upstream, train stimulus, fold, seed), beside its predictions CSV. Every stage skips it.
- **trained** (S3PRL path): ``recipe-train.done``, written here once S3PRL exited 0 and left
  ``dev-best.ckpt``. Stage 2 skips it; stage 3 evaluates ``dev-best.ckpt`` on every label set.
- **interrupted** (S3PRL path): ``states-*.ckpt`` without the marker: stage 2 resumes it with S3PRL's ``-a``.
- **new**: trained from scratch.

The S3PRL path runs one ``run_downstream`` process per run and step; the cache path runs one job per
upstream (``extract``, which resumes by itself, then ``sweep`` over the runs not finished yet). Each job
appends to its own log file; a failing job is reported with its log and the recipe carries on, then
exits 1 with the list of failures.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from s3prl_stimulus import STIMULI
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_json_atomic, write_text_atomic
from s3prl_stimulus.partition import FOLDS, check_fold
from s3prl_stimulus.results import FINAL_PREDICTIONS as PREDICTIONS_FILE, FINAL_RESULTS as RESULTS_FILE

PATHS = ("s3prl", "cache")
PAPER_UPSTREAMS = (
    "wavlm_large", "xls_r_1b", "hubert_large_ll60k", "wav2vec2_large_ll60k", "data2vec_large_ll60k", "decoar2",
    "wav2vec2_large_lv60_cv_swbd_fsh", "wav2vec", "apc", "vq_apc", "tera", "mockingjay", "npc", "modified_cpc", "fbank",
)
"""The paper's 14 SSL upstreams + FBANK, in S3PRL's names (recipes/upstreams.txt lists the same)."""
DEFAULT_SEEDS = (1337,)
"""S3PRL's own default ``--seed``: one run per (upstream, stimulus, fold), as in the paper."""
FEATURE_UPSTREAMS = frozenset({"fbank", "fbank_no_cmvn", "mel", "mfcc", "linear", "spectrogram"})
"""Upstreams computed from the waveform alone: nothing to download."""
DOWNSTREAM = "emotion_stimulus"
DATARC = "config.downstream_expert.datarc"
RECIPE_OWNED_OPTIONS = ("audio_dir", "fold", "train_stimulus", "votes", "clips")
"""datarc options the recipe sets for every run (use its own options to change them, not --override)."""
DEV_BEST = "dev-best.ckpt"
TRAINED_MARKER = "recipe-train.done"
STATES_GLOB = "states-*.ckpt"
FINISHED, TRAINED, INTERRUPTED, NEW = "finished", "trained", "interrupted", "new"
CONNECT_TIMEOUT_S = 3.0
"""Preflight: how long to wait for a connection to a weights server before calling the machine offline."""
PLAN_SCHEMA = 1

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_LABEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")


# --- upstreams ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Upstream:
    """One line of the upstream list: ``NAME``, ``NAME:CKPT`` or ``LABEL=NAME[:CKPT]``.

    ``name`` is S3PRL's ``-u``, ``ckpt`` its ``-k`` (a local file, made absolute, or a URL), ``label`` the
    directory the runs go to (default: the name).
    """

    name: str
    ckpt: Optional[str] = None
    label: str = ""

    def __post_init__(self):
        if not self.label:
            object.__setattr__(self, "label", self.name)

    @property
    def local_ckpt(self) -> bool:
        return self.ckpt is not None and "://" not in self.ckpt


def parse_upstream(spec: str, base: Path = Path(".")) -> Upstream:
    """``NAME``, ``NAME:CKPT`` or ``LABEL=NAME[:CKPT]`` (relative checkpoints are taken from ``base``)."""
    text = spec.strip()
    label = ""
    head, sep, rest = text.partition("=")
    if sep and _LABEL.fullmatch(head) and ":" not in head:
        label, text = head, rest
    name, sep, ckpt = text.partition(":")
    if not _NAME.fullmatch(name) or (sep and not ckpt):
        raise StimulusError(f"upstream {spec!r}: write NAME, NAME:CKPT or LABEL=NAME:CKPT (e.g. wavlm_large, "
                            "wavlm_local:/models/wavlm.pt, mine=wavlm_local:/models/wavlm.pt)")
    if ckpt and "://" not in ckpt:
        ckpt = str((base / Path(ckpt).expanduser()).resolve())
    return Upstream(name, ckpt or None, label)


def read_upstreams(spec: str) -> tuple[Upstream, ...]:
    """Upstreams from a list file (one per line, ``#`` comments) or a comma/space-separated list."""
    path = Path(spec)
    if path.is_file():
        lines = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
        items, base = [line for line in lines if line], path.resolve().parent
    else:
        items, base = [item for item in re.split(r"[,\s]+", spec) if item], Path(".")
    if not items:
        raise StimulusError(f"no upstreams in {spec!r}: give a list file (one NAME[:CKPT] per line) "
                            "or names like fbank,wavlm_large")
    upstreams = tuple(parse_upstream(item, base) for item in items)
    labels = [u.label for u in upstreams]
    twice = sorted({label for label in labels if labels.count(label) > 1})
    if twice:
        raise StimulusError(f"upstream directory {twice[0]!r} is listed twice: give each entry its own label, "
                            f"e.g. a={twice[0]}:/path/a.pt and b={twice[0]}:/path/b.pt")
    return upstreams


# --- settings -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """Everything that defines the grid and how its commands are spelled."""

    path: str
    root: Path
    corpus: Path
    upstreams: tuple
    stimuli: tuple
    folds: tuple
    seeds: tuple
    votes: str = "paper"
    clips: str = "all"
    override: str = ""
    features: Optional[Path] = None
    python: str = sys.executable
    device: Optional[str] = None

    def __post_init__(self):
        if self.features is None:
            object.__setattr__(self, "features", self.root / "features")

    def to_json(self) -> dict:
        obj = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        obj.update(root=str(self.root), corpus=str(self.corpus), features=str(self.features),
                   upstreams=[dataclasses.asdict(u) for u in self.upstreams],
                   stimuli=list(self.stimuli), folds=list(self.folds), seeds=list(self.seeds))
        return obj

    @classmethod
    def from_json(cls, obj: dict) -> "Settings":
        obj = dict(obj)
        obj.update(root=Path(obj["root"]), corpus=Path(obj["corpus"]), features=Path(obj["features"]),
                   upstreams=tuple(Upstream(**u) for u in obj["upstreams"]),
                   stimuli=tuple(obj["stimuli"]), folds=tuple(obj["folds"]), seeds=tuple(obj["seeds"]))
        return cls(**obj)


def split_list(values) -> list[str]:
    """``["voice,face", "av"]`` or ``"voice face"`` → ``["voice", "face", "av"]``."""
    values = [values] if isinstance(values, str) else list(values or [])
    return [item for value in values for item in re.split(r"[,\s]+", str(value)) if item]


def check_stimuli(values) -> tuple:
    stimuli = tuple(dict.fromkeys(split_list(values)))
    unknown = [s for s in stimuli if s not in STIMULI]
    if unknown or not stimuli:
        raise StimulusError(f"train stimuli {unknown or stimuli!r}: choose from {', '.join(STIMULI)}")
    return stimuli


def check_seeds(values) -> tuple:
    try:
        seeds = tuple(dict.fromkeys(int(s) for s in split_list(values)))
    except ValueError:
        raise StimulusError(f"seeds {values!r}: give integers, e.g. --seeds 1337 or --seeds 1,2,3") from None
    if not seeds:
        raise StimulusError("no seeds given: pass e.g. --seeds 1337")
    return seeds


def check_override(override: str) -> str:
    """The user's extra S3PRL ``-o`` options; the grid's own datarc options are refused (they come from the recipe)."""
    options = [o.strip() for o in (override or "").split(",,") if o.strip()]
    for option in options:
        key = option.split("=", 1)[0].strip()
        if option.count("=") != 1 or not key.startswith(("config.", "args.")):
            raise StimulusError(f"--override {option!r}: write S3PRL options as config.a.b=VALUE (one '='), "
                                "joined by ',,'")
        owned = [name for name in RECIPE_OWNED_OPTIONS if key == f"{DATARC}.{name}"]
        if owned or key in ("args.expdir", "args.seed", "args.upstream", "args.upstream_ckpt"):
            raise StimulusError(f"--override {key}: the recipe sets it for every run; use the recipe's own option "
                                "(--corpus, --folds, --stimuli, --votes, --clips, --seeds, --upstreams, --root)")
    return ",,".join(options)


def override_value(override: str, key: str) -> Optional[str]:
    """The raw value the user's ``-o`` gives ``key`` (None when absent)."""
    for option in (override or "").split(",,"):
        name, _, value = option.partition("=")
        if name.strip() == key:
            return value.strip()
    return None


def _plain_value(text: str) -> str:
    """An ``-o`` value as a command-line word: ``'none'`` → none, ``10`` → 10."""
    return text.strip().strip("'\"")


def _checked_path(value, option: str) -> Path:
    path = Path(value).expanduser().resolve()
    if "=" in str(path) or ",," in str(path):
        raise StimulusError(f"{option} {path}: S3PRL's -o cannot carry a path containing '=' or ',,'; "
                            "use another directory")
    return path


def make_settings(args: argparse.Namespace) -> Settings:
    if args.path not in PATHS:
        raise StimulusError(f"--path {args.path!r}: choose s3prl or cache")
    folds = tuple(dict.fromkeys(check_fold(k) for k in split_list(args.folds)))
    if not folds:
        raise StimulusError("no folds given: pass e.g. --folds 1,2,3,4,5")
    clips = args.clips
    if clips not in ("all", "present"):
        clips = str(_checked_path(clips, "--clips"))
        if not Path(clips).is_file():
            raise StimulusError(f"--clips {args.clips}: give all, present or a file listing clip names")
    votes = args.votes
    if votes not in ("paper", "crema-d"):
        votes = str(_checked_path(votes, "--votes"))
    return Settings(
        path=args.path, root=_checked_path(args.root, "--root"), corpus=_checked_path(args.corpus, "--corpus"),
        upstreams=read_upstreams(args.upstreams), stimuli=check_stimuli(args.stimuli), folds=folds,
        seeds=check_seeds(args.seeds), votes=votes, clips=clips, override=check_override(args.override),
        features=_checked_path(args.features, "--features") if args.features else None,
        python=args.python, device=args.device,
    )


# --- runs and their state -----------------------------------------------------------------------


@dataclass(frozen=True)
class Run:
    upstream: Upstream
    train_stimulus: str
    fold: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.upstream.label}/{self.train_stimulus}/fold{self.fold}/seed{self.seed}"


def plan_runs(settings: Settings, upstreams: Optional[Sequence[Upstream]] = None) -> list[Run]:
    """Every (upstream, train stimulus, fold, seed) of the grid, upstream-major."""
    chosen = settings.upstreams if upstreams is None else upstreams
    return [Run(u, s, k, seed) for u, s, k, seed in
            itertools.product(chosen, settings.stimuli, settings.folds, settings.seeds)]


def run_dir(settings: Settings, run: Run) -> Path:
    """``<root>/<path>/<upstream>/<train_stimulus>/fold<k>/seed<s>/`` (docs/design.md)."""
    return upstream_dir(settings, run.upstream) / run.train_stimulus / f"fold{run.fold}" / f"seed{run.seed}"


def upstream_dir(settings: Settings, upstream: Upstream) -> Path:
    return settings.root / settings.path / upstream.label


def is_finished(expdir: Path, path: str, run: Run) -> bool:
    """Whether ``expdir`` holds this run's final results: valid schema-1 JSON of *this* run, and predictions."""
    try:
        obj = json.loads((expdir / RESULTS_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(obj, dict):
        return False
    expected = {"schema": 1, "path": path, "upstream": run.upstream.name, "train_stimulus": run.train_stimulus,
                "fold": run.fold, "seed": run.seed, "split": "test"}
    if any(obj.get(key) != value for key, value in expected.items()):
        return False
    scores = obj.get("test_stimuli")
    if not isinstance(scores, dict) or not scores:
        return False
    if not all(isinstance(s, dict) and isinstance(s.get("macro_f1"), (int, float)) for s in scores.values()):
        return False
    return (expdir / PREDICTIONS_FILE).is_file()


def run_state(settings: Settings, run: Run) -> str:
    expdir = run_dir(settings, run)
    if is_finished(expdir, settings.path, run):
        return FINISHED
    if (expdir / TRAINED_MARKER).is_file() and (expdir / DEV_BEST).is_file():
        return TRAINED
    if any(expdir.glob(STATES_GLOB)):
        return INTERRUPTED
    return NEW


# --- commands -----------------------------------------------------------------------------------


def _literal(text: str) -> str:
    """A Python string literal for S3PRL's ``-o`` (it ``eval``s values), in double quotes so that shell-quoted
    commands stay readable."""
    return json.dumps(str(text))


def _override_string(settings: Settings, items: dict) -> str:
    options = [f"{key}={value}" for key, value in items.items()]
    if settings.override:
        options.append(settings.override)
    return ",,".join(options)


def s3prl_overrides(settings: Settings, run: Run, expdir: Path) -> str:
    """S3PRL ``-o`` for one run: the grid's datarc options, the expdir (a moved root still resumes in place),
    then the user's extra options."""
    return _override_string(settings, {
        f"{DATARC}.audio_dir": _literal(settings.corpus),
        f"{DATARC}.fold": run.fold,
        f"{DATARC}.train_stimulus": _literal(run.train_stimulus),
        f"{DATARC}.votes": _literal(settings.votes),
        f"{DATARC}.clips": _literal(settings.clips),
        "args.expdir": _literal(expdir),
    })


def _device(settings: Settings) -> list[str]:
    return ["--device", settings.device] if settings.device else []


def s3prl_train_command(settings: Settings, run: Run, resume: bool) -> list[str]:
    expdir = run_dir(settings, run)
    command = [settings.python, "-m", "s3prl_stimulus.run_downstream", "-m", "train", "-u", run.upstream.name]
    if run.upstream.ckpt:
        command += ["-k", run.upstream.ckpt]
    command += ["-d", DOWNSTREAM, "-p", str(expdir), "--seed", str(run.seed)]
    if resume:
        command.append("-a")
    return command + _device(settings) + ["-o", s3prl_overrides(settings, run, expdir)]


def s3prl_evaluate_command(settings: Settings, run: Run) -> list[str]:
    expdir = run_dir(settings, run)
    return ([settings.python, "-m", "s3prl_stimulus.run_downstream", "-m", "evaluate", "-e", str(expdir / DEV_BEST)]
            + _device(settings) + ["-o", s3prl_overrides(settings, run, expdir)])


def extract_command(settings: Settings, upstream: Upstream, folds: Sequence[int]) -> list[str]:
    """``s3prl-stimulus extract`` for the folds' caches, cropped and normalised as the config (and -o) say."""
    command = [settings.python, "-m", "s3prl_stimulus", "extract", "--corpus", str(settings.corpus),
               "--out", str(settings.features), "-u", upstream.name]
    if upstream.ckpt:
        command += ["-k", upstream.ckpt]
    command += ["--name", upstream.label, "--clips", settings.clips, "--folds", *map(str, folds)]
    normalisation = override_value(settings.override, f"{DATARC}.normalisation")
    if normalisation is not None:
        command += ["--normalisation", _plain_value(normalisation)]
    max_seconds = override_value(settings.override, f"{DATARC}.max_seconds")
    if max_seconds is not None:
        command += ["--max-seconds", _plain_value(max_seconds)]
    return command + _device(settings) + ["--no-progress"]


def sweep_command(settings: Settings, upstream: Upstream, stimuli, folds, seeds) -> list[str]:
    override = _override_string(settings, {f"{DATARC}.clips": _literal(settings.clips)})
    return ([settings.python, "-m", "s3prl_stimulus", "sweep", "--cache", str(settings.features / upstream.label),
             "--out", str(settings.root / settings.path), "--name", upstream.label,
             "--train-stimuli", *stimuli, "--folds", *map(str, folds), "--seeds", *map(str, seeds),
             "--votes", settings.votes, "-o", override] + _device(settings) + ["--no-progress"])


def product_groups(runs: Sequence[Run]) -> list[tuple[tuple, tuple, tuple]]:
    """Cover ``runs`` (one upstream's) with grids stimuli × folds × seeds that hold nothing else, so a sweep
    redoes exactly the runs that are not finished. All runs → one grid."""
    stimuli_of = {}
    for run in runs:
        stimuli_of.setdefault((run.fold, run.seed), set()).add(run.train_stimulus)
    folds_of = {}
    for (fold, seed), stimuli in stimuli_of.items():
        key = tuple(s for s in STIMULI if s in stimuli)
        folds_of.setdefault((key, seed), set()).add(fold)
    seeds_of = {}
    for (stimuli, seed), folds in folds_of.items():
        seeds_of.setdefault((stimuli, tuple(sorted(folds))), []).append(seed)
    return [(stimuli, folds, tuple(sorted(seeds))) for (stimuli, folds), seeds in sorted(seeds_of.items())]


# --- jobs ---------------------------------------------------------------------------------------


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


def execute(job: Job, env: Optional[dict] = None) -> Outcome:
    """Run ``job``'s commands into its log; the first failing command ends the job."""
    start = time.monotonic()
    if job.blocked:
        return Outcome(job.name, False, job.blocked, None)
    job.log.parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log:
        for command in job.commands:
            log.write(f"# {_timestamp()} $ {shlex.join(command)}\n")
            log.flush()
            status = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, cwd=job.log.parent).returncode
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
            try:
                outcome = execute(job, gpu_environment(gpu))
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


# --- stage 2 and 3 jobs -------------------------------------------------------------------------


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


STAGES = {"train": train_work, "evaluate": evaluate_work}


# --- preflight: upstream weights ----------------------------------------------------------------


class _Probed(BaseException):
    """Raised from inside S3PRL's downloader to stop a hub function once it names its weights file."""


def weights_of(name: str, hub=None) -> Optional[tuple[str, Path]]:
    """(URL, local cache file) of the first file S3PRL's hub function ``name`` would download; None when it
    needs none. Nothing is downloaded: S3PRL's downloader is replaced for the call and stops it."""
    if hub is None:
        from s3prl_stimulus.cache import import_hub

        hub = import_hub()
    import s3prl.util.download as download

    seen = []

    def record(filepath, url, *args, **kwargs):
        seen.append((str(url), Path(filepath)))
        raise _Probed

    original, download._download = download._download, record
    try:
        getattr(hub, name)()
    except _Probed:
        pass
    except Exception as err:  # an upstream that fails before naming a file: report it, do not guess
        if not seen:
            raise StimulusError(f"upstream {name}: S3PRL failed before naming its weights ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
    finally:
        download._download = original
    return seen[0] if seen else None


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (nothing is sent)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Preflight:
    upstream: Upstream
    ok: bool
    message: str


def preflight(upstreams: Sequence[Upstream], hub=None, connect: Callable[[str], bool] = reachable) -> list[Preflight]:
    """Whether each upstream can be built here: local files exist; downloadable weights are cached by S3PRL
    or their server answers. Imports S3PRL's hub only when some upstream would download."""
    checks, probe = [], []
    for upstream in upstreams:
        if upstream.local_ckpt:
            ok = Path(upstream.ckpt).is_file()
            checks.append(Preflight(upstream, ok, f"local checkpoint {upstream.ckpt}" if ok else
                                    f"{upstream.label}: checkpoint {upstream.ckpt} does not exist: fix the path in "
                                    "the upstream list"))
        elif upstream.name in FEATURE_UPSTREAMS:
            checks.append(Preflight(upstream, True, "computed from the waveform: nothing to download"))
        elif upstream.name.endswith("_local"):
            checks.append(Preflight(upstream, False, f"{upstream.label}: {upstream.name} needs a checkpoint file: "
                                                     f"list it as {upstream.name}:/path/to/model.pt"))
        elif upstream.ckpt:  # a URL given as -k
            checks.append(_download_check(upstream, upstream.ckpt, None, connect, f"{upstream.name}:/path/to/model.pt"))
        else:
            probe.append(upstream)
    if probe:
        for upstream in probe:
            try:
                found = weights_of(upstream.name, hub)
            except StimulusError as err:
                checks.append(Preflight(upstream, False, str(err)))
                continue
            if found is None:
                checks.append(Preflight(upstream, True, "needs no download"))
            else:
                checks.append(_download_check(upstream, *found, connect, _local_spelling(upstream.name, hub)))
    order = {u.label: i for i, u in enumerate(upstreams)}
    return sorted(checks, key=lambda c: order[c.upstream.label])


def _local_spelling(name: str, hub=None) -> str:
    """How to list ``name``'s model from a file: ``wavlm_large`` → ``wavlm_local:/path/to/model.pt`` when the hub has
    that ``*_local`` upstream."""
    if hub is None:
        from s3prl_stimulus.cache import import_hub

        hub = import_hub()
    local = f"{name.split('_')[0]}_local"
    return f"{local if hasattr(hub, local) else 'NAME_local'}:/path/to/model.pt"


def _download_check(upstream: Upstream, url: str, cached: Optional[Path], connect, local: str) -> Preflight:
    if cached is not None and cached.is_file():
        return Preflight(upstream, True, f"weights cached at {cached}")
    host = urllib.parse.urlsplit(url).hostname
    if connect(url):
        return Preflight(upstream, True, f"weights will be downloaded from {host} at first use ({url})")
    where = f" to {cached}" if cached is not None else ""
    return Preflight(upstream, False, (
        f"{upstream.label}: needs its weights from {url}, which are not in S3PRL's download cache, and {host} "
        "cannot be "
        f"reached from this machine (offline?): run once where the network is reachable, or copy the file{where}, or "
        f"list a local checkpoint as {local}"))


def preflight_blocks(settings: Settings, report: Callable[[str], None] = print, hub=None,
                     connect: Callable[[str], bool] = reachable) -> dict:
    """Run the preflight, print its findings, return {upstream label: why its jobs cannot start}."""
    blocked = {}
    for check in preflight(settings.upstreams, hub=hub, connect=connect):
        if not check.ok:
            blocked[check.upstream.label] = f"preflight: {check.message}"
            report(f"preflight: {check.message}")
    return blocked


# --- SLURM --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SlurmOptions:
    gpus_per_task: int = 0
    max_parallel: Optional[int] = None
    sbatch_args: str = ""
    submit: bool = True


def jobs_for(settings: Settings, stage: str, blocked: Optional[dict] = None) -> Work:
    return STAGES[stage](settings, blocked)


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
        f"# Written by `python -m s3prl_stimulus.recipe {stage}`: one array task per {unit} not finished when it was",
        f"# written ({n_tasks}); each task picks its unit from {plan.name} by SLURM_ARRAY_TASK_ID, skips it if",
        "# another run finished it meanwhile, and writes the same per-run log as the local launcher.",
        "set -euo pipefail",
        f"cd {shlex.quote(str(settings.root))}",
        f"exec {shlex.quote(sys.executable)} -m s3prl_stimulus.recipe task --plan {shlex.quote(str(plan))} "
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


# --- driver -------------------------------------------------------------------------------------


def parse_gpus(ngpu: int, gpu_ids: Optional[str]) -> list[str]:
    if gpu_ids:
        ids = split_list(gpu_ids)
        if not all(i.isdigit() for i in ids):
            raise StimulusError(f"--gpu_ids {gpu_ids!r}: give GPU indices such as 0,1,3")
        return ids
    if ngpu < 0:
        raise StimulusError(f"--ngpu {ngpu}: give 0 (CPU or the visible GPU, one job at a time) or more")
    return [str(i) for i in range(ngpu)]


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
    needs_upstreams = stage == "train" or settings.path == "s3prl"
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


def status_table(settings: Settings) -> list[tuple[str, str]]:
    return [(run.name, run_state(settings, run)) for run in plan_runs(settings)]


# --- command line -------------------------------------------------------------------------------


def _add_grid_arguments(parser: argparse.ArgumentParser) -> None:
    def option(*names, **kwargs):
        # Both spellings: --gpu_ids (run_paper.sh, ESPnet style) and --gpu-ids.
        spelled = [n for name in names for n in dict.fromkeys((name, name.replace("_", "-")))]
        parser.add_argument(*spelled, **kwargs)

    option("--path", default="s3prl", choices=PATHS,
           help="s3prl: one run_downstream per run; cache: extract + sweep per upstream")
    option("--root", default="exp/stimulus", help="expdir root: runs go to ROOT/PATH/UPSTREAM/STIMULUS/foldK/seedS")
    option("--corpus", default="data/CREMA-D/AudioWAV", help="CREMA-D AudioWAV directory")
    option("--upstreams", default=",".join(PAPER_UPSTREAMS),
           help="list file (one NAME, NAME:CKPT or LABEL=NAME:CKPT per line) or comma-separated names "
                "(default: the paper's 15)")
    option("--stimuli", default=" ".join(STIMULI), help="training label sets (default: voice face av all)")
    option("--folds", default=" ".join(map(str, FOLDS)), help="folds (default: 1 2 3 4 5)")
    option("--seeds", default=" ".join(map(str, DEFAULT_SEEDS)), help="seeds (default: 1337, S3PRL's)")
    option("--votes", default="paper", help="votes source: paper | crema-d | FILE (default: paper)")
    option("--clips", default="all", help="all | present | FILE listing clips (datarc.clips; default: all)")
    option("--override", default="",
           help="extra S3PRL -o options, e.g. config.runner.total_steps=2000,,config.optimizer.lr=1e-3")
    option("--features", default=None, help="feature caches of the cache path (default: ROOT/features)")
    option("--device", default=None, help="cpu | cuda (default: cuda when available)")
    option("--python", default=sys.executable, help="Python that runs the commands (default: this one)")


def _add_launch_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", default="local", choices=("local", "slurm"))
    parser.add_argument("--ngpu", type=int, default=0, help="local: run one job per GPU over GPUs 0..N-1; "
                                                            "slurm: ask each task for a GPU when N > 0")
    parser.add_argument("--gpu_ids", "--gpu-ids", default=None, help="local: these GPU indices instead (e.g. 0,2,3)")
    parser.add_argument("--slurm_args", "--slurm-args", default="",
                        help="extra #SBATCH options, e.g. \"--partition=gpu --time=24:00:00 --mem=32G\"")
    parser.add_argument("--slurm_max_parallel", "--slurm-max-parallel", type=int, default=None,
                        help="at most this many array tasks at once")
    parser.add_argument("--submit", default="true", choices=("true", "false"),
                        help="slurm: submit with sbatch --wait (true) or only write the script (false)")
    parser.add_argument("--dry_run", "--dry-run", action="store_true", help="print every command, run nothing")
    parser.add_argument("--preflight", default="true", choices=("true", "false"),
                        help="check that upstream weights are available before starting (default: true)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m s3prl_stimulus.recipe", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="action", required=True)
    for action, text in (("train", "stage 2: train every run of the grid"),
                         ("evaluate", "stage 3: cross-test every dev-best checkpoint on every label set"),
                         ("status", "print every run of the grid with its state"),
                         ("preflight", "check that every upstream can be built here")):
        sp = sub.add_parser(action, help=text, description=text)
        _add_grid_arguments(sp)
        if action in STAGES:
            _add_launch_arguments(sp)
    task = sub.add_parser("task", help="run one unit of a written plan (a SLURM array task)")
    task.add_argument("--plan", required=True)
    task.add_argument("--index", required=True, type=int)
    return parser


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.action == "task":
            return run_task(Path(args.plan), args.index)
        settings = make_settings(args)
        if args.action == "status":
            for name, state in status_table(settings):
                print(f"{state:12s} {name}")
            return 0
        if args.action == "preflight":
            checks = preflight(settings.upstreams)
            for check in checks:
                label = f"{check.upstream.label}: "
                message = check.message if check.message.startswith(label) else label + check.message
                print(f"{'ok' if check.ok else 'NOT AVAILABLE':14s} {message}")
            return 0 if all(c.ok for c in checks) else 1
        slurm = SlurmOptions(1 if args.ngpu > 0 else 0, args.slurm_max_parallel, args.slurm_args, args.submit == "true")
        return run_stage(settings, args.action, args.launcher, parse_gpus(args.ngpu, args.gpu_ids), slurm,
                         args.dry_run, args.preflight == "true")
    except StimulusError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
