"""recipes/run_paper.sh and s3prl_stimulus.study.recipe: idempotent, resumable stages over the whole grid.

Two halves. The orchestration (which runs exist, what state they are in, which commands run where, how
failures, GPUs and SLURM array tasks behave) is tested with a stand-in interpreter that records each
command and leaves the files the real one would, so these tests take seconds. Then the real thing,
stages 0-4 of run_paper.sh on both paths, with `fbank` and a tiny random WavLM, on a small generated
corpus that stage 0 downloads from a loopback HTTP server; each S3PRL process costs seconds of start-up,
so the grid is small (S3PRL path: one stimulus and fold; cache path: the full 4 x 5 grid, cheap there).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from s3prl_stimulus import STIMULI
from s3prl_stimulus.study import recipe
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.study.recipe import Run, Settings, Upstream

REPO = Path(__file__).resolve().parents[1]
RUN_PAPER = REPO / "recipes" / "run_paper.sh"


# --- upstream lists and options -----------------------------------------------------------------


def test_upstream_list_file_holds_the_papers_fifteen_upstreams():
    upstreams = recipe.read_upstreams(str(REPO / "recipes" / "upstreams.txt"))
    assert [u.name for u in upstreams] == list(recipe.PAPER_UPSTREAMS)
    assert len(upstreams) == 15 and upstreams[-1] == Upstream("fbank")
    assert all(u.ckpt is None and u.label == u.name for u in upstreams)


def test_upstream_entries_name_a_checkpoint_and_a_label(tmp_path):
    (tmp_path / "models").mkdir()
    listing = tmp_path / "list.txt"
    listing.write_text("# mine\nfbank\nwavlm_local:models/a.pt   # relative to the list\n"
                       "b=wavlm_local:/abs/b.pt\nurl=wavlm_url:https://host/x.pt\n")
    upstreams = recipe.read_upstreams(str(listing))
    assert upstreams == (Upstream("fbank"), Upstream("wavlm_local", str(tmp_path / "models" / "a.pt")),
                         Upstream("wavlm_local", "/abs/b.pt", "b"), Upstream("wavlm_url", "https://host/x.pt", "url"))
    assert recipe.read_upstreams("fbank, mel") == (Upstream("fbank"), Upstream("mel"))
    with pytest.raises(StimulusError, match="listed twice.*own label"):
        recipe.read_upstreams("wavlm_local:/a.pt,wavlm_local:/b.pt")
    with pytest.raises(StimulusError, match="NAME:CKPT"):
        recipe.read_upstreams("wavlm-large")


PAPER_LOCAL_ENTRIES = {  # read from S3PRL 0.4.18's hubconf files (test_compat checks them against S3PRL itself)
    "wavlm_large": "wavlm_local", "xls_r_1b": "wav2vec2_local", "wav2vec2_large_ll60k": "wav2vec2_local",
    "wav2vec2_large_lv60_cv_swbd_fsh": "wav2vec2_local", "hubert_large_ll60k": "hubert_local",
    "data2vec_large_ll60k": "data2vec_local", "decoar2": "decoar2_local", "wav2vec": "wav2vec_local",
    "apc": "apc_local", "vq_apc": "apc_local", "tera": "tera_local", "mockingjay": "mockingjay_local",
    "npc": "npc_local", "modified_cpc": "cpc_local",
}


def test_a_paper_upstream_with_a_local_file_runs_as_the_entry_that_reads_it(tmp_path):
    assert set(PAPER_LOCAL_ENTRIES) | {"fbank"} == set(recipe.PAPER_UPSTREAMS)
    for name, local in PAPER_LOCAL_ENTRIES.items():
        upstream = recipe.parse_upstream(f"{name}:/models/{name}.pt")
        assert (upstream.name, upstream.ckpt, upstream.label) == (local, f"/models/{name}.pt", name)
        assert recipe.parse_upstream(name) == Upstream(name)  # without a file: S3PRL's own download
    assert recipe.parse_upstream("mine=vq_apc:/m/v.pt") == Upstream("apc_local", "/m/v.pt", "mine")
    settings = settings_for(tmp_path, upstreams=("xls_r_1b:/models/xlsr.pt",))
    assert Settings.from_json(json.loads(json.dumps(settings.to_json()))) == settings  # a resumed recipe too
    run = recipe.plan_runs(settings)[0]
    train = recipe.s3prl_train_command(settings, run, resume=False)
    assert train[train.index("-u") + 1:train.index("-u") + 4] == ["wav2vec2_local", "-k", "/models/xlsr.pt"]
    assert recipe.run_dir(settings, run) == tmp_path / "s3prl" / "xls_r_1b" / "voice" / "fold1" / "seed1337"
    extract = recipe.extract_command(settings, run.upstream, [1])
    assert extract[extract.index("-u") + 1:extract.index("-u") + 6] == ["wav2vec2_local", "-k", "/models/xlsr.pt",
                                                                        "--name", "xls_r_1b"]
    with pytest.raises(StimulusError, match="S3PRL's wavlm_large ignores a checkpoint URL.*list wavlm_large alone"):
        recipe.parse_upstream("wavlm_large:https://host/w.pt")
    with pytest.raises(StimulusError, match="fbank is computed from the waveform and takes no checkpoint"):
        recipe.parse_upstream("fbank:/models/f.pt")


def test_the_grids_own_options_cannot_be_overridden():
    assert recipe.check_override(" config.runner.total_steps=2 ,,config.optimizer.lr=1e-3") == \
        "config.runner.total_steps=2,,config.optimizer.lr=1e-3"
    for option in ("config.downstream_expert.datarc.fold=2", "config.downstream_expert.datarc.audio_dir='/x'",
                   "config.downstream_expert.datarc.upstream_label='x'", "args.seed=3", "args.expdir='/x'"):
        with pytest.raises(StimulusError, match="recipe sets it"):
            recipe.check_override(option)
    with pytest.raises(StimulusError, match="one '='"):
        recipe.check_override("config.runner.total_steps")


def test_product_groups_cover_exactly_the_unfinished_runs():
    import random

    grid = [(s, k, seed) for s in STIMULI for k in (1, 2, 3, 4, 5) for seed in (1, 2)]
    rng = random.Random(0)
    for size in (1, 2, 7, 20, 40):
        chosen = rng.sample(grid, size)
        runs = [Run(Upstream("fbank"), s, k, seed) for s, k, seed in chosen]
        covered = [(s, k, seed) for stimuli, folds, seeds in recipe.product_groups(runs)
                   for s in stimuli for k in folds for seed in seeds]
        assert sorted(covered) == sorted(chosen)  # every unfinished run once, nothing else
    everything = [Run(Upstream("fbank"), *key) for key in grid]
    assert recipe.product_groups(everything) == [(STIMULI, (1, 2, 3, 4, 5), (1, 2))]


# --- run state ----------------------------------------------------------------------------------


def settings_for(root: Path, path="s3prl", upstreams=("fbank",), stimuli=("voice",), folds=(1,), seeds=(1337,),
                 python=sys.executable, **extra) -> Settings:
    return Settings(path=path, root=root, corpus=root / "AudioWAV",
                    upstreams=tuple(map(recipe.parse_upstream, upstreams)), stimuli=tuple(stimuli), folds=tuple(folds),
                    seeds=tuple(seeds), python=str(python), **extra)


def results_json(path: str, upstream: str, stimulus: str, fold: int, seed: int) -> dict:
    return {"schema": 1, "path": path, "upstream": upstream, "fold": fold, "train_stimulus": stimulus, "votes": "paper",
            "seed": seed, "step": 2, "checkpoint": None, "split": "test", "n_clips": 1,
            "test_stimuli": {s: {"macro_f1": 0.5, "ci95": [0.4, 0.6]} for s in STIMULI}}


def test_a_run_is_finished_only_with_its_own_valid_results_and_predictions(tmp_path):
    settings = settings_for(tmp_path)
    run = recipe.plan_runs(settings)[0]
    expdir = recipe.run_dir(settings, run)
    assert expdir == tmp_path / "s3prl" / "fbank" / "voice" / "fold1" / "seed1337"
    assert recipe.run_state(settings, run) == recipe.NEW
    expdir.mkdir(parents=True)
    (expdir / "states-4.ckpt").write_bytes(b"")
    assert recipe.run_state(settings, run) == recipe.INTERRUPTED
    (expdir / "dev-best.ckpt").write_bytes(b"")
    (expdir / recipe.TRAINED_MARKER).write_text("{}")
    assert recipe.run_state(settings, run) == recipe.TRAINED
    good = results_json("s3prl", "fbank", "voice", 1, 1337)
    for broken in ("{not json", json.dumps(good | {"schema": 2}), json.dumps(good | {"fold": 2}),
                   json.dumps(good | {"path": "cache"}), json.dumps(good | {"test_stimuli": {}}), "[]"):
        (expdir / recipe.RESULTS_FILE).write_text(broken)
        (expdir / recipe.PREDICTIONS_FILE).write_text("clip\n")
        assert recipe.run_state(settings, run) == recipe.TRAINED, broken
    (expdir / recipe.RESULTS_FILE).write_text(json.dumps(good))
    assert recipe.run_state(settings, run) == recipe.FINISHED
    (expdir / recipe.PREDICTIONS_FILE).unlink()
    assert recipe.run_state(settings, run) == recipe.TRAINED


# --- orchestration with a stand-in interpreter ---------------------------------------------------

FAKE_PYTHON = '''\
#!{python}
"""Stands in for `python` in the recipe's commands: records each call, then leaves what the real one would."""
import json, os, sys, time
from pathlib import Path

argv = sys.argv[1:]
start = time.time()
time.sleep(float(os.environ.get("FAKE_SLEEP", "0")))
with open(os.environ["FAKE_CALLS"], "a") as calls:
    calls.write(json.dumps({{"argv": argv, "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": start,
                            "end": time.time()}}) + "\\n")


def option(flag, default=None):
    return argv[argv.index(flag) + 1] if flag in argv else default


def overrides():
    pairs = (item.split("=", 1) for item in option("-o", "").split(",,") if item)
    return {{key: eval(value) for key, value in pairs}}


def results(expdir, path, upstream, stimulus, fold, seed):
    expdir.mkdir(parents=True, exist_ok=True)
    obj = {{"schema": 1, "path": path, "upstream": upstream, "fold": fold, "train_stimulus": stimulus,
           "votes": "paper", "seed": seed, "step": 2, "checkpoint": None, "split": "test", "n_clips": 1,
           "test_stimuli": {{"voice": {{"macro_f1": 0.5}}}}}}
    (expdir / "results-test-dev-best.json").write_text(json.dumps(obj))
    (expdir / "predictions-test-dev-best.csv").write_text("clip\\n")


module, mode = argv[1], option("-m") if argv[2:3] == ["-m"] else None
if module == "s3prl_stimulus.run_downstream":
    mode = argv[3]
    if mode == "train" and option("-u") == os.environ.get("FAKE_FAIL"):
        print("RuntimeError: this upstream is broken", file=sys.stderr)
        sys.exit(1)
    o = overrides()
    expdir = Path(o["args.expdir"])
    if mode == "train":
        expdir.mkdir(parents=True, exist_ok=True)
        (expdir / "dev-best.ckpt").write_text(json.dumps({{"upstream": option("-u"), "seed": int(option("--seed"))}}))
    else:
        saved = json.loads(Path(option("-e")).read_text())
        results(expdir, "s3prl", saved["upstream"], o["config.downstream_expert.datarc.train_stimulus"],
                o["config.downstream_expert.datarc.fold"], saved["seed"])
elif module == "s3prl_stimulus" and argv[2] == "sweep":
    def values(flag):
        i = argv.index(flag) + 1
        out = []
        while i < len(argv) and not argv[i].startswith("-"):
            out.append(argv[i]); i += 1
        return out
    name, out = option("--name"), Path(option("--out"))
    for stimulus in values("--train-stimuli"):
        for fold in values("--folds"):
            for seed in values("--seeds"):
                results(out / name / stimulus / f"fold{{fold}}" / f"seed{{seed}}", "cache", name, stimulus, int(fold),
                        int(seed))
'''


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A stand-in interpreter; ``fake.calls()`` lists the commands it ran, in order."""
    python = tmp_path / "fake-python"
    python.write_text(FAKE_PYTHON.format(python=sys.executable))
    python.chmod(0o755)
    calls_file = tmp_path / "calls.jsonl"
    monkeypatch.setenv("FAKE_CALLS", str(calls_file))

    class Fake:
        path = python

        @staticmethod
        def calls() -> list:
            if not calls_file.exists():
                return []
            return [json.loads(line) for line in calls_file.read_text().splitlines()]

    return Fake


def stage(settings, name, lines=None, **kwargs) -> int:
    lines = [] if lines is None else lines
    return recipe.run_stage(settings, name, report=lines.append, **kwargs)


def test_stages_skip_finished_runs_and_a_failing_upstream_does_not_stop_the_others(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_FAIL", "mel")
    settings = settings_for(tmp_path / "exp", upstreams=("fbank", "mel"), stimuli=("voice", "face"), python=fake.path)
    lines = []
    assert stage(settings, "train", lines) == 1
    trained = [c["argv"] for c in fake.calls()]
    assert len(trained) == 4 and all(a[3] == "train" and "-a" not in a for a in trained)
    failed = [line for line in lines if line.strip().startswith("FAILED")]
    assert len(failed) == 2 and all("mel" in line and "this upstream is broken" in line for line in failed)
    log = tmp_path / "exp" / "s3prl" / "mel" / "voice" / "fold1" / "seed1337" / "recipe-train.log"
    assert "RuntimeError: this upstream is broken" in log.read_text() and str(log) in failed[0] + failed[1]
    assert stage(settings, "evaluate", lines) == 1  # the two fbank runs evaluated, the mel runs missing
    assert [c["argv"][3] for c in fake.calls()[4:]] == ["evaluate", "evaluate"]
    assert sum(line.strip().startswith("MISSING") and "mel" in line for line in lines) == 2
    for run in recipe.plan_runs(settings):
        assert recipe.run_state(settings, run) == (recipe.FINISHED if run.upstream.name == "fbank" else recipe.NEW)

    monkeypatch.delenv("FAKE_FAIL")
    before = len(fake.calls())
    lines = []
    assert stage(settings, "train", lines) == 0 and stage(settings, "evaluate", lines) == 0, lines  # mel redone
    redone = fake.calls()[before:]
    assert [(c["argv"][3], c["argv"][c["argv"].index("-u") + 1] if "-u" in c["argv"] else "") for c in redone] == \
        [("train", "mel"), ("train", "mel"), ("evaluate", ""), ("evaluate", "")]
    before = len(fake.calls())
    lines = []
    assert stage(settings, "train", lines) == 0 and stage(settings, "evaluate", lines) == 0
    assert len(fake.calls()) == before  # nothing left to do
    assert lines == ["stage train: 4 run(s) already finished (skipped), 0 job(s) done, 0 failed, 0 run(s) missing",
                     "stage evaluate: 4 run(s) already finished (skipped), 0 job(s) done, 0 failed, 0 run(s) missing"]


def test_commands_carry_the_grid_and_an_interrupted_run_resumes_with_dash_a(tmp_path, fake):
    settings = settings_for(tmp_path / "exp", upstreams=("fbank", f"mine=wavlm_local:{tmp_path / 'w.pt'}"),
                            folds=(3,), seeds=(7,), python=fake.path, override="config.runner.total_steps=2",
                            votes="crema-d", clips="present")
    (tmp_path / "w.pt").write_bytes(b"")
    interrupted = recipe.run_dir(settings, recipe.plan_runs(settings)[1])
    interrupted.mkdir(parents=True)
    (interrupted / "states-2.ckpt").write_bytes(b"")
    assert stage(settings, "train") == 0
    fresh, resumed = (c["argv"] for c in fake.calls())
    assert "-a" not in fresh and "-a" in resumed
    assert resumed[resumed.index("-k") + 1] == str(tmp_path / "w.pt") and resumed[resumed.index("--seed") + 1] == "7"
    assert resumed[resumed.index("-p") + 1] == str(interrupted)
    options = dict(item.split("=", 1) for item in resumed[resumed.index("-o") + 1].split(",,"))
    datarc = "config.downstream_expert.datarc"
    assert {k: eval(v) for k, v in options.items()} == {
        f"{datarc}.audio_dir": str(settings.corpus), f"{datarc}.fold": 3, f"{datarc}.train_stimulus": "voice",
        f"{datarc}.votes": "crema-d", f"{datarc}.clips": "present", f"{datarc}.upstream_label": "mine",
        "args.expdir": str(interrupted), "config.runner.total_steps": 2}
    assert interrupted.parts[-4] == "mine"  # the label names the directory and travels into the results
    assert json.loads((interrupted / recipe.TRAINED_MARKER).read_text())["command"] == [str(fake.path), *resumed]


def test_local_launcher_runs_one_job_per_gpu(tmp_path, fake, monkeypatch):
    monkeypatch.setenv("FAKE_SLEEP", "0.4")
    settings = settings_for(tmp_path / "exp", stimuli=STIMULI, python=fake.path)
    assert stage(settings, "train", gpus=["0", "3"]) == 0
    calls = fake.calls()
    assert len(calls) == 4 and {c["gpu"] for c in calls} == {"0", "3"}
    for gpu in ("0", "3"):
        spans = sorted((c["start"], c["end"]) for c in calls if c["gpu"] == gpu)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:])), f"two jobs at once on GPU {gpu}"
    assert min(c["end"] for c in calls if c["gpu"] == "0") > min(c["start"] for c in calls if c["gpu"] == "3")
    assert recipe.parse_gpus(2, None) == ["0", "1"] and recipe.parse_gpus(0, "1,5") == ["1", "5"]


def test_dry_run_prints_every_command_and_runs_nothing(tmp_path, fake):
    settings = settings_for(tmp_path / "exp", upstreams=("fbank", "mfcc"), stimuli=("voice", "all"), folds=(1, 2),
                            python=fake.path)
    lines = []
    assert stage(settings, "train", lines, dry_run=True) == 0
    commands = [line for line in lines if line.startswith(str(fake.path))]
    assert len(commands) == 8 and all(" -m train " in c for c in commands)
    expected = {f"-p {recipe.run_dir(settings, run)}" for run in recipe.plan_runs(settings)}
    assert {re.search(r"-p \S+", c).group(0) for c in commands} == expected
    lines = []
    assert stage(settings, "train", lines, dry_run=True, launcher="slurm") == 0
    assert any(line.startswith("#SBATCH --array=0-7") for line in "\n".join(lines).splitlines())
    assert fake.calls() == [] and not (tmp_path / "exp").exists()


def test_cache_path_sweeps_only_the_runs_without_results(tmp_path, fake):
    settings = settings_for(tmp_path / "exp", path="cache", upstreams=("fbank", "mel"), stimuli=STIMULI,
                            folds=(1, 2, 3, 4, 5), python=fake.path)
    assert stage(settings, "train") == 0 and stage(settings, "evaluate") == 0
    extract, sweep = fake.calls()[0]["argv"], fake.calls()[1]["argv"]
    assert extract[2:3] == ["extract"] and extract[extract.index("--folds") + 1:][:5] == ["1", "2", "3", "4", "5"]
    assert extract[extract.index("--out") + 1] == str(tmp_path / "exp" / "features")
    assert sweep[sweep.index("--cache") + 1] == str(tmp_path / "exp" / "features" / "fbank")
    assert len(fake.calls()) == 4  # extract + sweep per upstream; stage 3 only checks
    runs = recipe.plan_runs(settings)
    assert all(recipe.run_state(settings, r) == recipe.FINISHED for r in runs)

    gone = [r for r in runs if (r.upstream.name, r.train_stimulus, r.fold) in (("mel", "face", 3), ("mel", "av", 3))]
    for run in gone:
        (recipe.run_dir(settings, run) / recipe.RESULTS_FILE).unlink()
    assert stage(settings, "evaluate") == 1  # stage 3 reports them missing
    assert stage(settings, "train") == 0
    extract, sweep = (c["argv"] for c in fake.calls()[4:])
    folds = extract.index("--folds")
    assert extract[extract.index("-u") + 1] == "mel"
    assert extract[folds + 1:folds + 2] == ["3"] and not extract[folds + 2:folds + 3] == ["4"]  # only fold 3's cache is needed
    assert all(a.startswith("--") for a in extract[folds + 2:folds + 3])
    assert sweep[sweep.index("--train-stimuli"):sweep.index("--votes")] == \
        ["--train-stimuli", "face", "av", "--folds", "3", "--seeds", "1337"]


def test_slurm_array_tasks_each_run_their_own_unit(tmp_path, fake, monkeypatch):
    settings = settings_for(tmp_path / "exp", stimuli=("voice", "face", "av"), python=fake.path)
    slurm = recipe.SlurmOptions(gpus_per_task=1, max_parallel=2, sbatch_args="--partition=gpu --time=1:00:00",
                                submit=False)
    assert stage(settings, "train", slurm=slurm, launcher="slurm") == 0
    (script,) = (tmp_path / "exp" / "slurm").glob("s3prl-train-*.sbatch")
    text = script.read_text()
    for line in ("#SBATCH --array=0-2%2", "#SBATCH --gres=gpu:1", "#SBATCH --partition=gpu", "#SBATCH --time=1:00:00"):
        assert line in text.splitlines()
    assert fake.calls() == []  # written, not submitted

    def task(index, script=script):
        env = dict(os.environ, SLURM_ARRAY_TASK_ID=str(index))
        return subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=60)

    assert task(1).returncode == 0
    (call,) = fake.calls()
    runs = recipe.plan_runs(settings)
    assert call["argv"][call["argv"].index("-p") + 1] == str(recipe.run_dir(settings, runs[1]))  # the face run
    assert "nothing to do" in task(1).stdout and len(fake.calls()) == 1  # already trained: skipped
    assert subprocess.run(["bash", str(script)], capture_output=True, text=True).returncode != 0  # needs the index
    assert task(5).returncode == 2

    # Submitted for real, SLURM being a stand-in sbatch that runs the array's tasks one by one.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(textwrap.dedent("""\
        #!/usr/bin/env bash
        script="${@: -1}"
        last=$(grep -oP '^#SBATCH --array=0-\\K[0-9]+' "$script")
        status=0
        for i in $(seq 0 "$last"); do SLURM_ARRAY_TASK_ID=$i bash "$script" || status=1; done
        exit $status
        """))
    (bin_dir / "sbatch").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    lines = []
    assert stage(settings, "train", lines, slurm=recipe.SlurmOptions(), launcher="slurm") == 0
    assert any("2 job(s) done, 0 failed" in line for line in lines)
    assert stage(settings, "evaluate", lines, slurm=recipe.SlurmOptions(), launcher="slurm") == 0
    assert [c["argv"][3] for c in fake.calls()[1:]] == ["train", "train", "evaluate", "evaluate", "evaluate"]
    assert all(recipe.run_state(settings, r) == recipe.FINISHED for r in runs)


# --- preflight ----------------------------------------------------------------------------------


def test_preflight_names_missing_weights_when_offline_without_downloading(tmp_path, monkeypatch):
    pytest.importorskip("s3prl")
    import s3prl.util.download as download

    monkeypatch.setattr(download, "_download_dir", tmp_path / "s3prl-cache")
    url = "https://weights.example.invalid/wavlm_large.pt"

    class Hub:
        @staticmethod
        def wavlm_large():
            download._urls_to_filepaths(url)
            raise AssertionError("the probe must stop the hub function before it loads anything")

        @staticmethod
        def no_weights():
            return object()

        @staticmethod
        def vq_apc():
            download._urls_to_filepaths(url.replace("wavlm_large", "vq_apc"))

        wavlm_local = staticmethod(lambda ckpt: object())

    (tmp_path / "tiny.pt").write_bytes(b"x")
    upstreams = recipe.read_upstreams(f"fbank,wavlm_large,no_weights,wavlm_local:{tmp_path / 'tiny.pt'},"
                                      f"b=wavlm_local:{tmp_path / 'absent.pt'},hubert_local,vq_apc,"
                                      f"mine=wavlm_large:{tmp_path / 'tiny.pt'}")
    asked = []
    checks = recipe.preflight(upstreams, hub=Hub, connect=lambda u: asked.append(u) or False)
    verdicts = {c.upstream.label: c for c in checks}
    assert [c.upstream.label for c in checks] == [u.label for u in upstreams]
    assert verdicts["fbank"].ok and verdicts["no_weights"].ok and verdicts["wavlm_local"].ok
    # wavlm_large with a file: checked as the file S3PRL's wavlm_local will read (wavlm_large would drop it)
    assert verdicts["mine"].ok and verdicts["mine"].message.endswith("tiny.pt, read by S3PRL's wavlm_local")
    assert "vq_apc:/path/to/model.pt (run as S3PRL's apc_local:/path/to/model.pt)" in verdicts["vq_apc"].message
    offline = verdicts["wavlm_large"]
    assert not offline.ok and asked == [url, url.replace("wavlm_large", "vq_apc")]
    cached = tmp_path / "s3prl-cache" / f"{hashlib.sha256(url.encode()).hexdigest()}.wavlm_large.pt"
    assert url in offline.message and str(cached) in offline.message and "cannot be reached" in offline.message
    assert "wavlm_large:/path/to/model.pt (run as S3PRL's wavlm_local:/path/to/model.pt)" in offline.message
    assert not cached.exists()  # nothing downloaded
    assert not verdicts["b"].ok and "absent.pt does not exist" in verdicts["b"].message
    assert not verdicts["hubert_local"].ok and "hubert_local:/path/to/model.pt" in verdicts["hubert_local"].message

    cached.write_bytes(b"weights")  # once S3PRL has the file, no connection is needed
    asked.clear()
    (check,) = recipe.preflight(upstreams[1:2], hub=Hub, connect=lambda u: asked.append(u) or False)
    assert check.ok and str(cached) in check.message and asked == []


def test_run_paper_sh_rejects_unknown_options_and_prints_help():
    bad = subprocess.run(["bash", str(RUN_PAPER), "--no_such_option", "1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --no_such_option" in bad.stderr
    usage = subprocess.run(["bash", str(RUN_PAPER), "--help"], capture_output=True, text=True)
    assert usage.returncode == 0 and "--stop_stage (4)" in usage.stdout and "--path (s3prl)" in usage.stdout


def test_run_paper_sh_dry_run_lists_every_stage_and_writes_nothing(tmp_path):
    run = subprocess.run(
        ["bash", str(RUN_PAPER), "--dry_run", "true", "--expdir", str(tmp_path / "exp"), "--upstreams", "fbank,mel",
         "--stimuli", "voice,face", "--folds", "1,2", "--python", sys.executable, "--preflight", "false"],
        capture_output=True, text=True, timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr
    out = run.stdout
    for fragment in ("-m s3prl_stimulus download --to", "-m s3prl_stimulus verify --corpus",
                     "-m s3prl_stimulus labels --out", "-m s3prl_stimulus agreement",
                     f"-m s3prl_stimulus report {tmp_path / 'exp' / 's3prl'}"):
        assert fragment in out
    assert out.count(" -m train ") == 8 and "8 missing" in out
    assert not (tmp_path / "exp").exists()


# --- the real thing: stages 0-4 on both paths -----------------------------------------------------

needs_s3prl = [pytest.mark.s3prl, pytest.mark.slow,
               pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]
CLIPS_PER_BLOCK = 6  # the fewest that give every fold's training set a positive clip of every class, all stimuli
DATARC = "config.downstream_expert.datarc"
TINY = ",,".join([
    "config.runner.total_steps=2", "config.runner.log_step=2", "config.runner.eval_step=2", "config.runner.save_step=2",
    f"{DATARC}.num_workers=0", f"{DATARC}.train_batch_size=4", f"{DATARC}.eval_batch_size=4",
    "config.downstream_expert.evalrc.bootstrap_samples=50",
])


class Corpus:
    """Generated clips served from 127.0.0.1, with the manifest stage 0 checks them against."""

    def __init__(self, root: Path):
        from s3prl_stimulus.testing import make_corpus, tiny_clip_subset

        self.clips = tiny_clip_subset(CLIPS_PER_BLOCK, fold=None)
        served = root / "served"
        make_corpus(served, self.clips, max_seconds=1.0)
        self.manifest = root / "manifest.csv"
        files = [served / f"{clip}.wav" for clip in self.clips]
        rows = [f"{f.stem},{f.stat().st_size},{hashlib.sha256(f.read_bytes()).hexdigest()}" for f in files]
        self.manifest.write_text("clip,bytes,sha256\n" + "\n".join(rows) + "\n")
        self.requests = []
        corpus = self

        class Handler(SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                corpus.requests.append(self.path)
                super().do_GET()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(served)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


def run_paper(root: Path, corpus: Corpus, *options) -> subprocess.CompletedProcess:
    command = ["bash", str(RUN_PAPER), "--expdir", str(root / "exp"), "--corpus", str(root / "AudioWAV"),
               "--base_url", corpus.url, "--manifest", str(corpus.manifest), "--python", sys.executable,
               "--clips", "present", "--override", TINY, "--report_args", "--bootstraps 50", *map(str, options)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def snapshot(*directories: Path, skip=()) -> dict:
    """(size, mtime) of every file: equal snapshots mean nothing was written."""
    return {p: (p.stat().st_size, p.stat().st_mtime_ns) for d in directories for p in sorted(d.rglob("*"))
            if p.is_file() and not any(part in skip for part in p.parts)}


@pytest.fixture(scope="module")
def paper(tmp_path_factory):
    """run_paper.sh twice on each path: the first time does everything, the second time nothing."""
    from s3prl_stimulus.testing import make_tiny_wavlm

    root = tmp_path_factory.mktemp("paper")
    corpus = Corpus(root)
    make_tiny_wavlm(root / "wavlm.pt")
    upstreams = f"fbank,wavlm_local:{root / 'wavlm.pt'}"
    facts = {"root": root, "corpus": corpus, "upstreams": upstreams}
    facts["s3prl"] = ok(run_paper(root, corpus, "--path", "s3prl", "--upstreams", upstreams, "--stimuli", "voice",
                                  "--folds", "1"))
    facts["requests_after_download"] = len(corpus.requests)
    facts["cache"] = ok(run_paper(root, corpus, "--path", "cache", "--upstreams", upstreams))
    exp = root / "exp"
    trees = (exp / "s3prl", exp / "cache", exp / "features", root / "AudioWAV")
    facts["before"] = snapshot(*trees)
    facts["requests_before_rerun"] = len(corpus.requests)
    facts["rerun"] = [ok(run_paper(root, corpus, "--path", "s3prl", "--upstreams", upstreams, "--stimuli", "voice",
                                   "--folds", "1")),
                      ok(run_paper(root, corpus, "--path", "cache", "--upstreams", upstreams))]
    facts["after"] = snapshot(*trees)
    facts["requests_after_rerun"] = len(corpus.requests)
    return facts


def read_results(expdir: Path) -> dict:
    return json.loads((expdir / recipe.RESULTS_FILE).read_text())


def e2e(test):
    for mark in needs_s3prl:
        test = mark(test)
    return test


@e2e
@pytest.mark.parametrize("upstream", ["fbank", "wavlm_local"])
def test_stages_0_to_4_on_the_s3prl_path(paper, upstream):
    root, exp = paper["root"], paper["root"] / "exp"
    assert sorted(p.stem for p in (root / "AudioWAV").glob("*.wav")) == paper["corpus"].clips
    assert paper["requests_after_download"] == len(paper["corpus"].clips)
    assert "corpus is usable" in paper["s3prl"].stdout
    assert len(list((exp / "labels").glob("*.csv"))) == 20
    assert "| voice | 1.0000 | 0.4594 |" in (exp / "table2_agreement.md").read_text()  # Table II, paper votes
    expdir = exp / "s3prl" / upstream / "voice" / "fold1" / "seed1337"
    result = read_results(expdir)
    assert {k: result[k] for k in ("path", "upstream", "fold", "train_stimulus", "seed", "split", "n_clips")} == {
        "path": "s3prl", "upstream": upstream, "fold": 1, "train_stimulus": "voice", "seed": 1337, "split": "test",
        "n_clips": CLIPS_PER_BLOCK}
    assert list(result["test_stimuli"]) == list(STIMULI)  # cross-tested on every label set
    assert result["checkpoint"].endswith("dev-best.ckpt")
    assert (expdir / recipe.TRAINED_MARKER).is_file()
    assert (expdir / "layer_weights.json").is_file() == (upstream == "wavlm_local")
    index = (exp / "report_s3prl" / "index.md").read_text()
    assert upstream in index and "missing" in index.lower()  # folds 2-5 were not run: shown as missing


@e2e
def test_stages_0_to_4_on_the_cache_path(paper):
    exp = paper["root"] / "exp"
    assert paper["requests_before_rerun"] == paper["requests_after_download"]  # its stage 0: nothing to fetch
    runs = sorted(exp.glob("cache/*/*/fold*/seed1337/" + recipe.RESULTS_FILE))
    assert len(runs) == 2 * 4 * 5
    for path in runs:
        result = json.loads(path.read_text())
        upstream, stimulus, fold = path.parts[-5], path.parts[-4], int(path.parts[-3][4:])
        assert (result["path"], result["upstream"], result["train_stimulus"], result["fold"]) == \
            ("cache", upstream, stimulus, fold)
        assert list(result["test_stimuli"]) == list(STIMULI)
    # Stage 4: Table III has every cell (all five folds ran); its fbank voice cell is the macro-F1 of the five
    # folds' pooled test predictions, as the core metrics compute it.
    import pandas as pd

    from s3prl_stimulus import CLASSES, metrics

    table = pd.read_csv(exp / "report_cache" / "table3_matched.csv").set_index("upstream")
    assert sorted(table.index) == ["fbank", "wavlm_local"]
    assert (table[[f"{s}_n_folds" for s in STIMULI]] == 5).all().all() and table.notna().sum().sum() > 0
    predictions = sorted(exp.glob("cache/fbank/voice/fold*/seed1337/" + recipe.PREDICTIONS_FILE))
    pooled = pd.concat(pd.read_csv(p) for p in predictions)
    assert len(pooled) == len(paper["corpus"].clips)  # every clip tested once over the five folds
    expected = metrics.macro_f1(pooled[[f"voice_{c}" for c in CLASSES]].to_numpy(),
                                metrics.binarize(pooled[list(CLASSES)].to_numpy()))
    assert table.loc["fbank", "voice_macro_f1"] == pytest.approx(expected, abs=1e-6)
    assert "stage evaluate: 40 run(s) already finished" in paper["cache"].stdout  # the sweep cross-tested them


@e2e
def test_rerunning_the_recipe_does_nothing(paper):
    assert paper["requests_after_rerun"] == paper["requests_before_rerun"] == paper["requests_after_download"]
    assert paper["after"] == paper["before"]  # no run, cache or clip was written again
    for rerun in paper["rerun"]:
        assert "0 job(s) done, 0 failed, 0 run(s) missing" in rerun.stdout
        assert "started" not in rerun.stdout


@e2e
def test_deleting_one_runs_results_redoes_only_that_run(paper):
    root, exp = paper["root"], paper["root"] / "exp"
    s3prl_run = exp / "s3prl" / "fbank" / "voice" / "fold1" / "seed1337"
    cache_run = exp / "cache" / "fbank" / "face" / "fold3" / "seed1337"
    old = {run: read_results(run) for run in (s3prl_run, cache_run)}
    for run in old:
        (run / recipe.RESULTS_FILE).unlink()
    trees = (exp / "s3prl", exp / "cache", exp / "features")
    before = snapshot(*trees)
    train_log = (s3prl_run / "recipe-train.log").read_text()
    ok(run_paper(root, paper["corpus"], "--path", "s3prl", "--upstreams", paper["upstreams"], "--stimuli", "voice",
                 "--folds", "1", "--stage", "2", "--stop_stage", "3"))
    ok(run_paper(root, paper["corpus"], "--path", "cache", "--upstreams", paper["upstreams"], "--stage", "2",
                 "--stop_stage", "3"))
    after = snapshot(*trees)
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    # Besides the two runs: the upstream's job log and the sweep's own summaries of what it just ran.
    upstream_files = {exp / "cache" / "fbank" / name
                      for name in ("recipe-train.log", "summary.csv", "summary-seeds.csv", "sweep.json")}
    assert {p for p in changed if p not in upstream_files and p.parent not in (s3prl_run, cache_run)} == set()
    assert (s3prl_run / "recipe-train.log").read_text() == train_log  # evaluated again, not retrained
    for run, before_scores in old.items():
        # The same checkpoint (S3PRL path) / the same training run (a sweep's runs never interact): the same
        # predictions, so the same F1 and intervals; the loss may move in the last float32 bits when the sweep
        # stacks a different number of runs.
        for stimulus, score in read_results(run)["test_stimuli"].items():
            was = before_scores["test_stimuli"][stimulus]
            assert {k: v for k, v in score.items() if k != "loss"} == {k: v for k, v in was.items() if k != "loss"}
            assert score["loss"] == pytest.approx(was["loss"], rel=1e-6)
    last_sweep = [line for line in (exp / "cache" / "fbank" / "recipe-train.log").read_text().splitlines()
                  if " sweep " in line and line.startswith("# ")][-1]
    assert "--train-stimuli face --folds 3 --seeds 1337" in last_sweep, last_sweep


@e2e
def test_slurm_array_tasks_train_and_cross_test(paper):
    root, exp = paper["root"], paper["root"] / "exp"
    common = ("--path", "s3prl", "--upstreams", "fbank", "--stimuli", "voice,face", "--folds", "1",
              "--launcher", "slurm", "--submit", "false", "--ngpu", "1")
    for stage_number, kind in ((2, "train"), (3, "evaluate")):
        ok(run_paper(root, paper["corpus"], *common, "--stage", stage_number, "--stop_stage", stage_number))
        (script,) = (exp / "slurm").glob(f"s3prl-{kind}-*.sbatch")
        assert "#SBATCH --array=0-0" in script.read_text()  # voice is finished: one task, for face
        env = dict(os.environ, SLURM_ARRAY_TASK_ID="0", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        task = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=300)
        assert task.returncode == 0, task.stdout[-2000:] + task.stderr[-2000:]
    result = read_results(exp / "s3prl" / "fbank" / "face" / "fold1" / "seed1337")
    assert (result["path"], result["train_stimulus"], list(result["test_stimuli"])) == ("s3prl", "face", list(STIMULI))


@e2e
def test_killing_the_recipe_at_two_points_then_rerunning_it_gives_the_uninterrupted_outputs(paper):
    """Fault injection: SIGKILL to the whole recipe (run_paper.sh, the recipe driver and its extract/sweep job)
    while its cache is being extracted and again while it trains; the same command then finishes the work."""
    import signal
    import time

    root = paper["root"]
    longer = TINY.replace("total_steps=2", "total_steps=240").replace("eval_step=2", "eval_step=40")
    common = ["--stage", "2", "--stop_stage", "4", "--path", "cache", "--upstreams", "fbank", "--folds", "1,2",
              "--stimuli", "voice,all", "--override", longer]

    def command(expdir: Path) -> list:
        return ["bash", str(RUN_PAPER), "--expdir", str(expdir), "--corpus", str(root / "AudioWAV"), "--python",
                sys.executable, "--clips", "present", "--report_args", "--bootstraps 50", *common]

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ok(subprocess.run(command(root / "whole"), capture_output=True, text=True, timeout=600, env=env))
    killed = root / "killed"
    points = [lambda: any((killed / "features").glob("fbank/*/manifest.json")),
              lambda: any((killed / "cache").glob("fbank/.sweep-state.pt"))]
    for reached in points:
        process = subprocess.Popen(command(killed), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                   start_new_session=True)
        deadline = time.monotonic() + 300
        while process.poll() is None and not reached() and time.monotonic() < deadline:
            time.sleep(0.002)
        assert process.poll() is None, "the recipe finished before it could be killed"
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    ok(subprocess.run(command(killed), capture_output=True, text=True, timeout=600, env=env))

    def outputs(expdir: Path) -> dict:
        files = sorted(expdir.glob("cache/fbank/*/fold*/seed*/*-test-dev-best.*")) + sorted(expdir.glob("report_cache/*.csv"))
        return {str(p.relative_to(expdir)): p.read_text().replace(str(expdir), "EXP") for p in files}

    whole, again = outputs(root / "whole"), outputs(killed)
    assert len(whole) == 2 * 2 * 2 + len(list((root / "whole" / "report_cache").glob("*.csv"))) and whole == again
    assert not [p for p in killed.rglob("*") if p.name.endswith(".tmp") or p.name == ".sweep-state.pt"]
