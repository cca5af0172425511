"""The batched sweep: every run trains exactly as it would alone, outputs follow the S3PRL path's schema.

Caches here are synthetic (random frame-level hidden states for real CREMA-D clip names, written
with the cache module's own writer), so the reference can run S3PRL's featurizer arithmetic and the
downstream's head on the frames themselves, one run at a time, with ragged batches.
"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from s3prl_stimulus import CLASSES
from s3prl_stimulus.cache import kernels, store, sweep_outputs, sweeping, training
from s3prl_stimulus.cache.grid import EpochShuffler
from s3prl_stimulus.cache.head import HEAD_PREFIX, initial_head_state, run_state
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.partition import split_clips

# S3PRL's optimizers and featurizer code are the reference (no upstream is built here)
pytestmark = [pytest.mark.s3prl, pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]

L, D = 3, 8
STEPS, EVAL_STEP, BATCH, CLIP = 12, 4, 7, 0.1
OVERRIDE = (f"config.runner.total_steps={STEPS},,config.runner.eval_step={EVAL_STEP},,"
            f"config.downstream_expert.datarc.train_batch_size={BATCH},,config.runner.gradient_clipping={CLIP},,"
            "config.downstream_expert.modelrc.projector_dim=16,,config.downstream_expert.evalrc.bootstrap_samples=20,,"
            "config.optimizer.lr=1.0e-3")  # 10x the paper's: trajectories move further in 12 steps


def write_synthetic_cache(cache_dir: Path, clips: list, fold, hidden: dict, name="synthetic") -> Path:
    """A complete cache of ``hidden[clip]`` ([L, T, D] frames): means, layer-normalised means, frame counts."""
    from s3prl_stimulus.testing import write_feature_cache

    frames = [hidden[c] for c in clips]
    return write_feature_cache(cache_dir, clips, np.stack([f.mean(dim=1).numpy() for f in frames]),
                               [f.shape[1] for f in frames], fold,
                               np.stack([F.layer_norm(f, (D,)).mean(dim=1).numpy() for f in frames]), name)


@pytest.fixture(scope="module")
def grid_data(tmp_path_factory):
    """40 clips (8 per speaker block: every fold has 24 train, 8 dev, 8 test), frames of 5-40 steps, two fold caches."""
    from s3prl_stimulus.testing import tiny_clip_subset

    root = tmp_path_factory.mktemp("sweep")
    clips = tiny_clip_subset(8, fold=None)
    generator = torch.Generator().manual_seed(0)
    hidden = {c: torch.randn(L, int(torch.randint(5, 40, (1,), generator=generator)), D, generator=generator) * 2 + 0.5
              for c in clips}
    for fold in (1, 2):
        write_synthetic_cache(root / "caches" / "synthetic" / f"fold{fold}", clips, fold, hidden)
    return root, clips, hidden


# --- the reference: one run alone, frame-level, as the S3PRL path computes it ---------------------


def reference_run(run, hidden, config, feature_normalize, initial, clips_by_split, labels, class_weights):
    from s3prl.optimizers import get_optimizer
    from s3prl.upstream.interfaces import Featurizer

    from s3prl_stimulus.downstream.emotion_stimulus.model import StimulusHead
    from s3prl_stimulus.loss import ClassBalancedSoftCrossEntropy, soft_cross_entropy

    modelrc = config["downstream_expert"]["modelrc"]
    featurizer = torch.nn.Module()
    featurizer.weights = torch.nn.Parameter(torch.zeros(L))
    featurizer.layer_num, featurizer.normalize = L, feature_normalize
    head = StimulusHead(D, len(CLASSES), modelrc)
    head.load_state_dict(initial)
    objective = ClassBalancedSoftCrossEntropy(class_weights)
    optimizer = get_optimizer([featurizer, head], STEPS, config["optimizer"])
    params = [featurizer.weights, *head.parameters()]

    def features(clips):  # S3PRL's weighted sum (its own code), each clip alone
        return [Featurizer._weighted_sum(featurizer, [h.unsqueeze(0) for h in hidden[c]])[0] for c in clips]

    train = clips_by_split["train"]
    targets = torch.from_numpy(labels.soft_targets(run.train_stimulus, train))
    shuffler = EpochShuffler(len(train), BATCH, run.seed, run.fold)
    best_loss, best_step, clipped = float("inf"), 0, 0
    for step in range(1, STEPS + 1):
        batch = shuffler.next_batch()
        loss = objective(head(features([train[i] for i in batch])), targets[batch])
        loss.backward()
        clipped += float(torch.nn.utils.clip_grad_norm_(params, CLIP)) > CLIP
        optimizer.step()
        optimizer.zero_grad()
        if step % EVAL_STEP == 0:
            with torch.no_grad():
                dev = clips_by_split["dev"]
                logits = head(features(dev)).double()
                dev_loss = soft_cross_entropy(logits, torch.from_numpy(labels.soft_targets(run.train_stimulus, dev)),
                                              objective.class_weights).item()
            if dev_loss < best_loss:
                best_loss, best_step = dev_loss, step
    return featurizer.weights.detach(), head.state_dict(), best_step, clipped


@pytest.mark.parametrize("feature_normalize", [False, True])
def test_every_stacked_run_trains_exactly_as_it_would_alone(grid_data, feature_normalize):
    root, clips, hidden = grid_data
    prepared = sweeping.prepare([root / "caches"], (["voice", "all"], [1, 2], [1, 2]), None, OVERRIDE, None, None, "cpu",
                                feature_normalize)
    sweeping.initialise(prepared, None)
    result = training.train(prepared.head, prepared.grid, prepared.config, progress=False)
    assert len(prepared.runs) == 8
    for r, run in enumerate(prepared.runs):
        data = prepared.grid.folds[run.fold]
        initial = initial_head_state(run.seed, D, prepared.config["downstream_expert"]["modelrc"])
        weights, head_state, best_step, clipped = reference_run(
            run, hidden, prepared.config, feature_normalize, initial, data.clips, data.labels,
            data.class_weights[run.train_stimulus])
        featurizer, ours = run_state(prepared.head, r)
        assert clipped > 0 and result.best_step[r] == best_step
        torch.testing.assert_close(featurizer["weights"], weights, rtol=1e-4, atol=1e-6)
        for name, value in head_state.items():
            torch.testing.assert_close(ours[HEAD_PREFIX + name], value, rtol=1e-4, atol=1e-6)
            assert (value - initial[name]).abs().max() > 1e-3  # it did train


def run_files(out: Path, stimulus: str, fold: int, seed: int) -> Path:
    return out / "synthetic" / stimulus / f"fold{fold}" / f"seed{seed}"


def test_sweep_writes_the_s3prl_schema_a_summary_and_seed_statistics(grid_data, tmp_path):
    from s3prl_stimulus.metrics import binarize, macro_f1

    root, _, _ = grid_data
    long, grid = sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice", "face"], folds=[1], seeds=[3, 4],
                                override=OVERRIDE, device="cpu", progress=False)
    directory = run_files(tmp_path, "face", 1, 4)
    result = json.loads((directory / "results-test-dev-best.json").read_text())
    assert list(result) == ["schema", "path", "upstream", "upstream_ckpt", "fold", "train_stimulus", "votes", "seed", "step",
                            "checkpoint", "split", "upstream_label", "upstream_identity", "n_clips", "partition_clips",
                            "complete", "test_stimuli"]
    assert result["upstream_label"] == "synthetic"  # no --name: the cache's name, as the directory
    assert result["upstream_identity"] == {"upstream": "synthetic", "upstream_ckpt": None, "weights_sha256": "0" * 64,
                                           "verified": True, "reason": None}
    # 8 of the fold's test clips in the synthetic caches: the JSON says the run is not the full corpus
    assert (result["partition_clips"], result["complete"]) == (len(split_clips(1, "test")), False)
    assert (result["path"], result["fold"], result["train_stimulus"], result["seed"], result["split"]) == ("cache", 1, "face", 4, "test")
    assert result["step"] in (4, 8, 12) and list(result["test_stimuli"]) == ["voice", "face", "av", "all"]
    frame = pd.read_csv(directory / "predictions-test-dev-best.csv")
    assert list(frame.columns[:8]) == ["clip", "speaker", *CLASSES] and len(frame) == result["n_clips"] == 8
    for stimulus, score in result["test_stimuli"].items():
        truth = frame[[f"{stimulus}_{c}" for c in CLASSES]].to_numpy()
        assert score["macro_f1"] == pytest.approx(macro_f1(truth, binarize(frame[list(CLASSES)].to_numpy())))
        assert set(score) == {"macro_f1", "ci95", "per_class_f1", "loss", "n_clips"}
    weights = json.loads((directory / "layer_weights.json").read_text())["weights"]
    assert len(weights) == L and sum(weights) == pytest.approx(1.0)
    history = pd.read_csv(directory / "history.csv")
    assert list(history["step"]) == [4, 8, 12]
    assert history.set_index("step")["dev_loss"].idxmin() == result["step"]  # dev-best = lowest dev loss
    # the dev-best checkpoint scores back to the same predictions through evaluate_checkpoint
    again, scored = sweeping.evaluate_checkpoint([root / "caches"], directory / "dev-best.ckpt", device="cpu")
    assert scored["upstream_label"] == "synthetic"
    np.testing.assert_allclose(again[list(CLASSES)].to_numpy(), frame[list(CLASSES)].to_numpy(), atol=1e-12)
    # summary: runs x test stimuli; seed statistics recomputed from it
    assert len(long) == 2 * 2 * 4 and set(long["seed"]) == {3, 4}
    summary = pd.read_csv(tmp_path / "synthetic" / "summary.csv")
    assert (summary["n_clips"] == 8).all() and (summary["partition_clips"] == len(split_clips(1, "test"))).all()
    assert not summary["complete"].any() and not pd.read_csv(tmp_path / "synthetic" / "summary-seeds.csv")["complete"].any()
    cell = summary[(summary.train_stimulus == "voice") & (summary.test_stimulus == "av")]["macro_f1"]
    row = grid[(grid.train_stimulus == "voice") & (grid.test_stimulus == "av")].iloc[0]
    assert row["macro_f1_mean"] == pytest.approx(cell.mean()) and row["macro_f1_std"] == pytest.approx(cell.std(ddof=1))
    assert row["n_seeds"] == 2
    table = sweep_outputs.grid_table(grid)
    assert table.loc["voice", "av"] == f"{cell.mean():.4f} ± {cell.std(ddof=1):.4f} †"  # † built from incomplete runs
    record = json.loads((tmp_path / "synthetic" / "sweep.json").read_text())
    assert record["runs"] == ["voice/fold1/seed3", "voice/fold1/seed4", "face/fold1/seed3", "face/fold1/seed4"]
    assert record["implementation"] == kernels.describe(torch.zeros(1))  # the step's implementation, for the record


def test_without_numba_the_sweep_says_so_and_records_the_pytorch_path(grid_data, tmp_path, monkeypatch, capsys):
    root, _, _ = grid_data
    monkeypatch.setattr(kernels, "numba", None)
    monkeypatch.setattr(kernels, "UNAVAILABLE", "ImportError: No module named 'numba'")
    sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice"], folds=[1], seeds=[1], override=OVERRIDE,
                   device="cpu", progress=False)
    assert "(numba unavailable: ImportError: No module named 'numba'): training on the CPU takes" in capsys.readouterr().err
    record = json.loads((tmp_path / "synthetic" / "sweep.json").read_text())
    assert record["implementation"] == "PyTorch operations (numba unavailable: ImportError: No module named 'numba')"


@pytest.mark.parametrize("override, message", [
    ("config.downstream_expert.modelrc.UtteranceLevel.pooling='AttentivePooling'", "not linear after mean pooling.*run_downstream"),
    ("config.downstream_expert.modelrc.select='DeepModel'", "not linear after mean pooling"),
    ("config.downstream_expert.modelrc.UtteranceLevel.post_net={'select': 'FrameLevel', 'FrameLevel': {'hiddens': [32]}}",
     "not linear after mean pooling"),
    ("config.optimizer={'name': 'AdamW_with_schedule', 'lr': 1e-4}", "not element-wise"),
    ("config.runner.fp16=True", "fp16"),
    ("config.runner.total_steps=10,,config.runner.eval_step=100", "no dev evaluation would choose dev-best"),
    ("config.downstream_expert.datarc.normalisation='none'", "no cache without normalisation.*--normalisation none"),
    ("config.downstream_expert.datarc.max_seconds=2", "crops clips at None samples but datarc.max_seconds=2"),
    ("args.seed=3", "config.\\* overrides only"),
])
def test_what_the_cache_path_cannot_reproduce_is_refused(grid_data, tmp_path, override, message):
    root, _, _ = grid_data
    with pytest.raises(StimulusError, match=message) as error:
        sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice"], folds=[1], override=override, device="cpu",
                       progress=False)
    assert "\n" not in str(error.value) and not list(tmp_path.iterdir())


def test_caches_that_do_not_fit_the_request_are_refused(grid_data, tmp_path):
    root, clips, hidden = grid_data
    base = dict(train_stimuli=["voice"], override=OVERRIDE, device="cpu", progress=False)
    with pytest.raises(StimulusError, match="no cache normalised with fold 3's training statistics.*--folds 3"):
        sweeping.sweep([root / "caches"], tmp_path / "a", folds=[3], **base)
    other = write_synthetic_cache(tmp_path / "other" / "fold2", clips, 2, hidden, name="another")
    with pytest.raises(StimulusError, match="differ in upstream"):
        sweeping.sweep([root / "caches" / "synthetic" / "fold1", other], tmp_path / "b", folds=[1, 2], **base)
    subset = tmp_path / "subset.txt"
    subset.write_text("\n".join(clips[:-1]))  # drops a speaker-1073+ clip: fold 1 trains on it
    with pytest.raises(StimulusError, match="normalised with statistics over another set of fold-1 training clips"):
        sweeping.sweep([root / "caches"], tmp_path / "c", folds=[1], **base | {
            "override": OVERRIDE + f",,config.downstream_expert.datarc.clips='{subset}'"})
    unfinished = tmp_path / "unfinished" / "fold1"
    write_synthetic_cache(unfinished, clips, 1, hidden)
    (unfinished / store.COMPLETE).unlink()
    with pytest.raises(StimulusError, match="unfinished.*rerun the same `s3prl-stimulus extract`"):
        sweeping.sweep([unfinished], tmp_path / "d", folds=[1], **base)
    with pytest.raises(StimulusError, match="does not exist"):
        sweeping.sweep([tmp_path / "nowhere"], tmp_path / "e", folds=[1], **base)
    assert not any((tmp_path / x).exists() for x in "abcde")


def test_cli_runs_the_grid_and_reports_errors_in_one_line(grid_data, tmp_path, capsys):
    from s3prl_stimulus.cli import main

    root, _, _ = grid_data
    code = main(["sweep", "--cache", str(root / "caches"), "--out", str(tmp_path), "--folds", "2", "--seeds", "1", "2",
                 "--train-stimuli", "av", "-o", OVERRIDE, "--device", "cpu", "--no-progress", "--format", "csv", "--all-steps",
                 "--name", "mine"])
    out, err = capsys.readouterr()
    assert code == 0 and "2 runs written" in out and "av," in out
    assert " †" in out and "†: built from runs on part of the corpus" in err  # fold 2: 8 of its 1,470 test clips
    directory = tmp_path / "mine" / "av" / "fold2" / "seed2"
    assert json.loads((directory / "results-test-dev-best.json").read_text())["upstream_label"] == "mine"
    saved = sweep_outputs.read_checkpoint(directory / "dev-best.ckpt")  # S3PRL's -e of it keeps the label
    assert saved["Config"]["downstream_expert"]["datarc"]["upstream_label"] == "mine"
    for step in (4, 8, 12):  # --all-steps: the S3PRL path's per-evaluation files too
        result = json.loads((directory / f"results-dev-step-{step}.json").read_text())
        assert (result["step"], result["split"], result["checkpoint"]) == (step, "dev", None)
        assert (directory / f"predictions-test-step-{step}.csv").is_file()
    code = main(["sweep", "--cache", str(root / "caches"), "--out", str(tmp_path / "x"), "--folds", "2",
                 "-o", OVERRIDE + ",,config.downstream_expert.modelrc.select='DeepModel'", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.splitlines()[-1].startswith("error: ") and "S3PRL" in err.splitlines()[-1]


# --- no lost work (issue 10, item 2): resume after a kill, finished runs kept, summaries of every run ---------


def output_files(root: Path) -> dict:
    """Every output under ``root`` by relative path: checkpoints as their tensors, other files as bytes (with
    ``root`` itself, which results name in their checkpoint paths, written as ROOT)."""
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        key = str(path.relative_to(root))
        if path.suffix == ".ckpt":
            saved = sweep_outputs.read_checkpoint(path)
            files[key] = {k: v for k, v in saved["Downstream"].items() if torch.is_tensor(v)}
        else:
            files[key] = path.read_bytes().replace(str(root).encode(), b"ROOT")
    return files


def assert_same_outputs(a: Path, b: Path) -> None:
    first, second = output_files(a), output_files(b)
    assert sorted(first) == sorted(second)
    for key, value in first.items():
        if isinstance(value, dict):
            assert value.keys() == second[key].keys() and all(torch.equal(value[k], second[key][k]) for k in value), key
        else:
            assert value == second[key], key


def test_a_killed_sweep_resumes_to_the_outputs_of_an_uninterrupted_one(grid_data, tmp_path, monkeypatch):
    from s3prl_stimulus.cache import resume

    root, _, _ = grid_data
    grid = dict(train_stimuli=["voice", "av"], folds=[1, 2], seeds=[5], override=OVERRIDE, device="cpu", progress=False,
                save_every=0)  # save at every evaluation step
    sweeping.sweep([root / "caches"], tmp_path / "whole", **grid)
    real_save, saved_steps = resume.TrainingState.save, []

    def save_then_die(self, step, *args):
        real_save(self, step, *args)
        saved_steps.append(step)
        if step == 2 * EVAL_STEP:
            raise SystemExit("killed after the second evaluation")

    monkeypatch.setattr(resume.TrainingState, "save", save_then_die)
    with pytest.raises(SystemExit):
        sweeping.sweep([root / "caches"], tmp_path / "killed", **grid)
    state = tmp_path / "killed" / "synthetic" / resume.STATE_FILE
    assert saved_steps == [EVAL_STEP, 2 * EVAL_STEP] and state.is_file()
    assert not list((tmp_path / "killed").rglob(resume.FINAL_RESULTS))  # nothing written before training ends
    monkeypatch.setattr(resume.TrainingState, "save", real_save)
    resumed_from = []
    real_restore = resume.TrainingState.restore
    monkeypatch.setattr(resume.TrainingState, "restore", lambda self, *a: resumed_from.append(real_restore(self, *a))
                        or resumed_from[-1])
    sweeping.sweep([root / "caches"], tmp_path / "killed", **grid)  # the same command again
    assert resumed_from == [2 * EVAL_STEP] and not state.exists()
    assert_same_outputs(tmp_path / "whole", tmp_path / "killed")
    assert not [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp")]


def test_finished_runs_are_kept_and_summaries_cover_every_run(grid_data, tmp_path, monkeypatch, capsys):
    root, _, _ = grid_data
    common = dict(folds=[1], override=OVERRIDE, device="cpu", progress=False)
    sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice"], seeds=[1], **common)
    first = output_files(tmp_path / "synthetic" / "voice")
    mtime = (tmp_path / "synthetic" / "voice" / "fold1" / "seed1" / "results-test-dev-best.json").stat().st_mtime_ns
    trained = []
    real_train = sweeping.train
    monkeypatch.setattr(sweeping, "train", lambda head, grid, *a, **k: trained.append(
        [r.name for r in grid.runs]) or real_train(head, grid, *a, **k))
    long, _ = sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice", "face"], seeds=[1], **common)
    assert trained == [["face/fold1/seed1"]]  # voice/fold1/seed1 is finished: kept as it was
    assert "1 of 2 runs already finished" in capsys.readouterr().err
    again = output_files(tmp_path / "synthetic" / "voice")
    assert again.keys() == first.keys() and all(again[k] == first[k] for k in first if not k.endswith(".ckpt"))
    assert (tmp_path / "synthetic" / "voice" / "fold1" / "seed1" / "results-test-dev-best.json").stat().st_mtime_ns == mtime
    summary = pd.read_csv(tmp_path / "synthetic" / "summary.csv")
    assert sorted(set(summary["train_stimulus"])) == ["face", "voice"] and len(summary) == len(long) == 2 * 4
    # a command over runs that are all finished trains nothing and still writes the full summary
    long, _ = sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["face"], seeds=[1], **common)
    assert trained == [["face/fold1/seed1"]] and len(long) == 2 * 4
    sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["face"], seeds=[1], overwrite=True, **common)
    assert trained[-1] == ["face/fold1/seed1"]


def test_a_saved_state_of_other_settings_is_not_resumed(grid_data, tmp_path, monkeypatch, capsys):
    from s3prl_stimulus.cache import resume

    root, _, _ = grid_data
    grid = dict(train_stimuli=["av"], folds=[1], seeds=[2], device="cpu", progress=False)

    def die(self, step, *args):
        raise SystemExit("killed")

    real_save = resume.TrainingState.save
    monkeypatch.setattr(resume.TrainingState, "save", lambda self, step, *a: (real_save(self, step, *a), die(self, step)))
    with pytest.raises(SystemExit):
        sweeping.sweep([root / "caches"], tmp_path, override=OVERRIDE, **grid)
    monkeypatch.setattr(resume.TrainingState, "save", real_save)
    other = OVERRIDE.replace("config.optimizer.lr=1.0e-3", "config.optimizer.lr=2.0e-3")
    sweeping.sweep([root / "caches"], tmp_path, override=other, **grid)
    assert "not resuming" in capsys.readouterr().out and not (tmp_path / "synthetic" / resume.STATE_FILE).exists()
    sweeping.sweep([root / "caches"], tmp_path / "fresh", override=other, **grid)
    assert_same_outputs(tmp_path / "synthetic" / "av", tmp_path / "fresh" / "synthetic" / "av")


@pytest.mark.parametrize("save_every, expected", [(3600.0, [EVAL_STEP]), (0.0, list(range(EVAL_STEP, STEPS + 1, EVAL_STEP)))])
def test_the_state_is_saved_at_the_first_evaluation_then_once_per_interval(grid_data, tmp_path, monkeypatch, save_every,
                                                                           expected):
    from s3prl_stimulus.cache import resume

    root, _, _ = grid_data
    real_save, saved_steps = resume.TrainingState.save, []

    def recorded(self, step, *args):
        saved_steps.append(step)
        real_save(self, step, *args)

    monkeypatch.setattr(resume.TrainingState, "save", recorded)
    sweeping.sweep([root / "caches"], tmp_path, train_stimuli=["voice"], folds=[1], seeds=[5], override=OVERRIDE,
                   device="cpu", progress=False, save_every=save_every)
    assert saved_steps == expected and len(expected) >= 1 + (save_every == 0)
    assert not (tmp_path / "synthetic" / resume.STATE_FILE).exists()  # removed once the outputs are written


def test_sigkill_at_two_points_then_the_same_command_gives_the_uninterrupted_outputs(grid_data, tmp_path):
    """Fault injection with real kills (no clean-up runs): the state file is all that survives."""
    import signal
    import subprocess
    import sys
    import time

    from s3prl_stimulus.cache.resume import STATE_FILE

    root, _, _ = grid_data
    long_run = OVERRIDE.replace(f"total_steps={STEPS}", "total_steps=300").replace(f"eval_step={EVAL_STEP}", "eval_step=30")

    def command(out: Path) -> list:
        return [sys.executable, "-m", "s3prl_stimulus", "sweep", "--cache", str(root / "caches"), "--out", str(out),
                "--train-stimuli", "voice", "all", "--folds", "1", "2", "--seeds", "9", "-o", long_run, "--device", "cpu"]

    assert subprocess.run(command(tmp_path / "whole"), capture_output=True, timeout=600).returncode == 0
    state = tmp_path / "killed" / "synthetic" / STATE_FILE
    kills = []
    for _ in range(2):
        before = state.stat().st_mtime_ns if state.exists() else None
        process = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and process.poll() is None:
            if state.exists() and state.stat().st_mtime_ns != before:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.005)
        kills.append(process.wait())
    assert kills == [-signal.SIGKILL, -signal.SIGKILL], "the sweep finished before it could be killed: give it more steps"
    done = subprocess.run(command(tmp_path / "killed"), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "resumed after step" in done.stderr and not state.exists()
    assert_same_outputs(tmp_path / "whole", tmp_path / "killed")
    assert not [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp")]
