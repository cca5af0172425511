"""The grid's runs: where each lives, what state its files say it is in, and the commands that train,
evaluate, extract and sweep it."""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from s3prl_stimulus import STIMULI
from s3prl_stimulus.results import FINAL_PREDICTIONS as PREDICTIONS_FILE, FINAL_RESULTS as RESULTS_FILE
from s3prl_stimulus.study.recipe.settings import DATARC, Settings, Upstream, override_value

DOWNSTREAM = "emotion_stimulus"
DEV_BEST = "dev-best.ckpt"
TRAINED_MARKER = "recipe-train.done"
STATES_GLOB = "states-*.ckpt"
FINISHED, TRAINED, INTERRUPTED, NEW = "finished", "trained", "interrupted", "new"


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


def status_table(settings: Settings) -> list[tuple[str, str]]:
    return [(run.name, run_state(settings, run)) for run in plan_runs(settings)]


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
    """S3PRL ``-o`` for one run: the grid's datarc options (with the upstream's label, which its results carry),
    the expdir (a moved root still resumes in place), then the user's extra options."""
    return _override_string(settings, {
        f"{DATARC}.audio_dir": _literal(settings.corpus),
        f"{DATARC}.fold": run.fold,
        f"{DATARC}.train_stimulus": _literal(run.train_stimulus),
        f"{DATARC}.votes": _literal(settings.votes),
        f"{DATARC}.clips": _literal(settings.clips),
        f"{DATARC}.upstream_label": _literal(run.upstream.label),
        "args.expdir": _literal(expdir),
    })


def _plain_value(text: str) -> str:
    """An ``-o`` value as a command-line word: ``'none'`` → none, ``10`` → 10."""
    return text.strip().strip("'\"")


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
    return command + _device(settings)  # its log gets heartbeat lines (s3prl_stimulus.progress)


def sweep_command(settings: Settings, upstream: Upstream, stimuli, folds, seeds) -> list[str]:
    """``s3prl-stimulus sweep`` of one upstream's runs; its ``--name`` is the label the results carry."""
    override = _override_string(settings, {f"{DATARC}.clips": _literal(settings.clips)})
    return ([settings.python, "-m", "s3prl_stimulus", "sweep", "--cache", str(settings.features / upstream.label),
             "--out", str(settings.root / settings.path), "--name", upstream.label,
             "--train-stimuli", *stimuli, "--folds", *map(str, folds), "--seeds", *map(str, seeds),
             "--votes", settings.votes, "-o", override] + _device(settings))


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


# --- the authors' released models (--path authors) ------------------------------------------------

AUTHORS_RECORD = "import.json"  # beside each imported dev-best.ckpt (study.authors)


def authors_upstream(settings: Settings) -> Optional[Upstream]:
    """The upstream the imported models are evaluated on: the one entry of ``--upstreams``, else their own."""
    return settings.upstreams[0] if len(settings.upstreams) == 1 else None


def authors_import_command(settings: Settings) -> list[str]:
    """``s3prl-stimulus import-authors`` of ``--authors`` into ``<root>/authors`` (a rerun is a no-op)."""
    command = [settings.python, "-m", "s3prl_stimulus", "import-authors", str(settings.authors),
               "--out", str(settings.root / settings.path), "--corpus", str(settings.corpus),
               "--votes", settings.votes, "--clips", settings.clips]
    upstream = authors_upstream(settings)
    if upstream is not None:
        command += ["--upstream", upstream.name] + (["--upstream-ckpt", upstream.ckpt] if upstream.ckpt else [])
    return command


def imported_checkpoints(settings: Settings) -> list[tuple[Run, Path]]:
    """Every imported ``dev-best.ckpt`` under ``<root>/authors`` of the grid's stimuli and folds, as a run
    (the upstream the import named, under its directory)."""
    found = []
    for record_file in sorted((settings.root / settings.path).glob(f"*/*/fold*/seed*/{AUTHORS_RECORD}")):
        try:
            record = json.loads(record_file.read_text(encoding="utf-8"))
            upstream = Upstream(record["upstream_identity"]["upstream"], None, record_file.parents[3].name)
            run = Run(upstream, record["train_stimulus"], int(record["fold"]), int(record["seed"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue  # not an import record: a checkpoint without one is not evaluated here
        if run.train_stimulus in settings.stimuli and run.fold in settings.folds:
            found.append((run, record_file.with_name(DEV_BEST)))
    return found


def authors_evaluate_command(settings: Settings, checkpoint: Path) -> list[str]:
    """S3PRL's ``-m evaluate -e`` of an imported checkpoint: its upstream and label come from the checkpoint."""
    expdir = checkpoint.parent
    overrides = _override_string(settings, {
        f"{DATARC}.audio_dir": _literal(settings.corpus), f"{DATARC}.votes": _literal(settings.votes),
        f"{DATARC}.clips": _literal(settings.clips), "args.expdir": _literal(expdir)})
    return ([settings.python, "-m", "s3prl_stimulus.run_downstream", "-m", "evaluate", "-e", str(checkpoint)]
            + _device(settings) + ["-o", overrides])
