"""End to end through the launcher: S3PRL's run_downstream trains, evaluates and resumes emotion_stimulus.

Small generated corpus (real CREMA-D clip names, so labels come from the packaged votes), fold 1,
10 clips per split cut to 1.5 s, a few steps with `fbank` and with a tiny random-weight WavLM.
Each S3PRL process costs ~7 s of start-up, so runs are shared through session fixtures.
"""

import contextlib
import importlib.util
import io
import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch

from s3prl_stimulus import CLASSES, STIMULI, audio, labels, metrics, partition
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.loss import class_balanced_weights

pytestmark = [
    pytest.mark.s3prl,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed"),
]

FOLD = 1
CLIPS_PER_SPLIT = 10  # the fewest that give every class a positive voice-labelled training clip
DATARC = "config.downstream_expert.datarc"


def overrides(audio_dir, **extra) -> str:
    """S3PRL -o string: tiny run (4 steps, eval and save every 2), single-process data loading."""
    options = {
        f"{DATARC}.audio_dir": repr(str(audio_dir)),
        f"{DATARC}.clips": "'present'",
        f"{DATARC}.num_workers": 0,
        f"{DATARC}.train_batch_size": 4,
        f"{DATARC}.eval_batch_size": 4,
        "config.runner.total_steps": 4,
        "config.runner.log_step": 2,
        "config.runner.eval_step": 2,
        "config.runner.save_step": 2,
        "config.downstream_expert.evalrc.bootstrap_samples": 200,
    }
    options.update(extra)
    return ",,".join(f"{k}={v}" for k, v in options.items())


def launch(cwd, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def ok(run: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def results(expdir: Path, split: str, tag: str) -> dict:
    return json.loads((expdir / f"results-{split}-{tag}.json").read_text())


@pytest.fixture(scope="session")
def workspace(tmp_path_factory):
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("e2e")
    clips = tiny_clip_subset(CLIPS_PER_SPLIT, fold=FOLD)
    make_corpus(root / "AudioWAV", clips, max_seconds=1.5)
    make_tiny_wavlm(root / "wavlm.pt")
    return root


@pytest.fixture(scope="session")
def fbank(workspace):
    """fbank: train (steps 2, 4), evaluate dev-best, then `-a` resume to step 6. Facts of the first
    two phases are read before the resume changes the expdir."""
    expdir = workspace / "fbank"
    run = {"train": ok(launch(workspace, "-m", "train", "-u", "fbank", "-d", "emotion_stimulus", "-p", expdir,
                              "-o", overrides(workspace / "AudioWAV")))}
    run["dev_best_step"] = torch.load(expdir / "dev-best.ckpt", map_location="cpu")["Step"]
    run["step2"] = (expdir / "results-dev-step-2.json").read_bytes()
    run["evaluate"] = ok(launch(workspace, "-m", "evaluate", "-e", expdir / "dev-best.ckpt"))
    run["resume"] = ok(launch(workspace, "-m", "train", "-a", "-p", expdir, "-o", "config.runner.total_steps=6"))
    return expdir, run


@pytest.fixture(scope="session")
def wavlm(workspace):
    expdir = workspace / "wavlm"
    ok(launch(workspace, "-m", "train", "-u", "wavlm_local", "-k", workspace / "wavlm.pt", "-d", "emotion_stimulus",
              "-p", expdir, "-o", overrides(workspace / "AudioWAV")))
    ok(launch(workspace, "-m", "evaluate", "-e", expdir / "dev-best.ckpt"))
    return expdir


def test_training_evaluates_dev_and_test_at_every_eval_step(fbank, workspace):
    expdir, run = fbank
    for split in ("dev", "test"):
        for step in (2, 4):
            result = results(expdir, split, f"step-{step}")
            assert {k: result[k] for k in ("schema", "path", "upstream", "fold", "train_stimulus", "votes", "seed",
                                           "step", "checkpoint", "split", "n_clips")} == {
                "schema": 1, "path": "s3prl", "upstream": "fbank", "fold": FOLD, "train_stimulus": "voice",
                "votes": "paper", "seed": 1337, "step": step, "checkpoint": None, "split": split, "n_clips": CLIPS_PER_SPLIT}
            assert list(result["test_stimuli"]) == list(STIMULI)
            # clips=present on 10 clips per split: the JSON says how many the partition has, and that this is not all
            assert (result["partition_clips"], result["complete"]) == (len(partition.split_clips(FOLD, split)), False)
    assert list(expdir.glob("events.out.tfevents.*")), "no TensorBoard scalars"
    assert "WARNING: datarc.clips=present" in run["train"].stderr and "LEFT OUT" in run["train"].stderr
    # The paper's normalisation statistics: every sample of the fold's training clips.
    train = sorted(set(partition.split_clips(FOLD, "train")) & {p.stem for p in (workspace / "AudioWAV").glob("*.wav")})
    stats = json.loads((expdir / "waveform_stats.json").read_text())
    expected = audio.waveform_stats([workspace / "AudioWAV" / f"{c}.wav" for c in train])
    assert stats["n_clips"] == CLIPS_PER_SPLIT and stats["mean"] == pytest.approx(expected["mean"], rel=1e-12)
    assert stats["std"] == pytest.approx(expected["std"], rel=1e-12)


def test_dev_best_is_the_step_with_the_lowest_dev_loss_on_the_training_stimulus(fbank):
    expdir, run = fbank
    losses = {step: results(expdir, "dev", f"step-{step}")["test_stimuli"]["voice"]["loss"] for step in (2, 4)}
    assert run["dev_best_step"] == min(losses, key=lambda s: (losses[s], s))


@pytest.mark.parametrize("name", ["fbank", "wavlm"])
def test_evaluate_scores_every_label_set_as_recomputed_from_the_predictions(name, request, workspace):
    expdir = request.getfixturevalue(name)
    expdir = expdir[0] if isinstance(expdir, tuple) else expdir
    result = results(expdir, "test", "dev-best")
    assert result["checkpoint"].endswith("dev-best.ckpt") and result["split"] == "test"
    assert result["step"] in (2, 4) and list(result["test_stimuli"]) == list(STIMULI)
    frame = pd.read_csv(expdir / "predictions-test-dev-best.csv")
    clips = frame["clip"].tolist()
    assert clips == sorted(set(partition.split_clips(FOLD, "test")) & set(clips)) and len(clips) == CLIPS_PER_SPLIT
    assert (frame["speaker"].to_numpy() == partition.speakers_of(clips)).all()
    probs = frame[list(CLASSES)].to_numpy()
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    predicted = metrics.binarize(probs)
    votes = labels.load_votes("paper")
    train = sorted(set(partition.split_clips(FOLD, "train")) & {p.stem for p in (workspace / "AudioWAV").glob("*.wav")})
    weights = class_balanced_weights(labels.binary_labels(votes.subset(train).counts("voice")))
    for stimulus, score in result["test_stimuli"].items():
        truth = frame[[f"{stimulus}_{c}" for c in CLASSES]].to_numpy()
        np.testing.assert_array_equal(truth, labels.binary_labels(votes.subset(clips).counts(stimulus)))
        assert score["macro_f1"] == metrics.macro_f1(truth, predicted)
        assert score["per_class_f1"] == metrics.per_class_f1(truth, predicted)
        _, ci = metrics.bootstrap_ci(metrics.macro_f1, truth, predicted, num_bootstraps=200)  # by clip (default)
        assert score["ci95"] == list(ci) and score["n_clips"] == CLIPS_PER_SPLIT
        targets = labels.soft_targets(votes.subset(clips).counts(stimulus))
        loss = np.mean((targets @ weights) * -(targets * np.log(probs)).sum(axis=1))
        assert score["loss"] == pytest.approx(loss, rel=1e-6)
        # `s3prl-stimulus score` on the predictions file gives the same numbers
        scored = score_cli(expdir / "predictions-test-dev-best.csv", stimulus)
        assert (scored["macro_f1"], scored["ci95"], scored["per_class_f1"]) == \
            (score["macro_f1"], score["ci95"], score["per_class_f1"])


def score_cli(predictions: Path, stimulus: str) -> dict:
    from s3prl_stimulus.cli import main

    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main(["score", str(predictions), "--test-stimulus", stimulus, "--bootstraps", "200", "--format", "json"]) == 0
    return json.loads(buffer.getvalue())


def test_layer_weights_are_the_softmax_of_the_dev_best_featurizer(wavlm, fbank):
    record = json.loads((wavlm / "layer_weights.json").read_text())
    weights = np.array(record["weights"])
    assert len(weights) == 3  # tiny WavLM: 2 layers + the CNN output
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    saved = torch.load(wavlm / "dev-best.ckpt", map_location="cpu")["Featurizer"]["weights"]
    np.testing.assert_allclose(weights, torch.softmax(saved.double(), 0).numpy(), rtol=1e-12)
    assert record["upstream"] == "wavlm_local" and record["checkpoint"].endswith("dev-best.ckpt")
    assert not (fbank[0] / "layer_weights.json").exists()  # one hidden state: no weighted sum


def test_auto_resume_continues_from_the_last_state(fbank):
    expdir, run = fbank
    assert "Resume from" in run["resume"].stdout + run["resume"].stderr
    assert str(expdir / "states-4.ckpt") in run["resume"].stdout + run["resume"].stderr
    assert torch.load(expdir / "states-6.ckpt", map_location="cpu")["Step"] == 6
    assert results(expdir, "dev", "step-6")["step"] == 6
    assert (expdir / "results-dev-step-2.json").read_bytes() == run["step2"]  # steps 1-4 were not rerun
    assert not list(expdir.glob("*step-5*")) and not list(expdir.glob("*-step-8*"))


# --- bad input ----------------------------------------------------------------------------------


def assert_one_line_error(run, *fragments):
    assert run.returncode == 2, run.stderr[-2000:]
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), run.stderr[-2000:]
    for fragment in fragments:
        assert fragment in last, last


def assert_no_outputs(expdir: Path):
    written = [p.name for p in expdir.glob("*") if p.name.startswith(("results-", "predictions-", "waveform_stats", "layer_weights"))]
    assert written == [] and not list(expdir.glob("*.ckpt"))


def test_bad_wavs_are_listed_with_counts_before_training(workspace, tmp_path):
    corpus = tmp_path / "AudioWAV"
    shutil.copytree(workspace / "AudioWAV", corpus)
    test_clips = sorted(p.stem for p in corpus.glob("*.wav") if p.stem in set(partition.split_clips(FOLD, "test")))
    stereo, slow, gone = test_clips[:3]
    sf.write(corpus / f"{stereo}.wav", np.zeros((800, 2), np.int16), 16000, subtype="PCM_16")
    sf.write(corpus / f"{slow}.wav", np.zeros(800, np.int16), 8000, subtype="PCM_16")
    (corpus / f"{gone}.wav").unlink()
    clip_list = tmp_path / "clips.txt"
    clip_list.write_text("\n".join(p.stem for p in (workspace / "AudioWAV").glob("*.wav")))
    expdir = tmp_path / "exp"
    run = launch(tmp_path, "-m", "train", "-u", "fbank", "-d", "emotion_stimulus", "-p", expdir,
                 "-o", overrides(corpus, **{f"{DATARC}.clips": repr(str(clip_list))}))
    assert_one_line_error(run, f"3 of {3 * CLIPS_PER_SPLIT} clips in {corpus} are bad", f"1 missing (e.g. {gone}.wav)",
                          f"1 stereo (e.g. {stereo}.wav)", f"1 wrong-rate (e.g. {slow}.wav)")
    assert "train:" not in run.stderr  # failed while building the expert, before the first step
    assert_no_outputs(expdir)


# --- the expert in-process (no S3PRL start-up): configuration errors and dev-best by macro-F1 ----


def expert_config(workspace, **datarc):
    import yaml

    from s3prl_stimulus.integration.launcher import packaged_config

    config = yaml.safe_load(packaged_config().read_text())["downstream_expert"]
    config["datarc"].update({"audio_dir": str(workspace / "AudioWAV"), "clips": "present", "num_workers": 0}, **datarc)
    return config


def build_expert(workspace, expdir, config, init_ckpt=None, upstream_dim=8):
    from s3prl_stimulus.downstream.emotion_stimulus.expert import DownstreamExpert

    return DownstreamExpert(upstream_dim=upstream_dim, upstream_rate=160, downstream_expert=config, expdir=str(expdir),
                            upstream="fbank", upstream_ckpt=None, seed=7, mode="evaluate" if init_ckpt else "train",
                            init_ckpt=init_ckpt and str(init_ckpt))


@pytest.mark.parametrize(
    "datarc, fragment",
    [
        ({"audio_dir": None}, "audio_dir is not set: get CREMA-D's AudioWAV folder with `s3prl-stimulus download --to DIR`"),
        ({"train_stimulus": "smell"}, "unknown stimulus 'smell'"),
        ({"test_stimuli": ["voice", "touch"]}, "unknown stimulus 'touch'"),
        ({"fold": 6}, "unknown fold 6"),
        ({"votes": "nowhere.csv"}, "votes source 'nowhere.csv' is neither"),
        ({"normalisation": "peak"}, "unknown config.downstream_expert.datarc.normalisation='peak'"),
        ({"train_stimuli": "face"}, "unknown key(s) ['train_stimuli']"),
        ({"upstream_label": ""}, "datarc.upstream_label='' must be a name"),
    ],
)
def test_bad_configuration_is_a_one_line_error_before_anything_is_written(workspace, tmp_path, datarc, fragment):
    with pytest.raises(StimulusError) as error:
        build_expert(workspace, tmp_path, expert_config(workspace, **datarc))
    assert fragment in str(error.value) and "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == []


def test_corpus_dir_without_crema_d_names(workspace, tmp_path):
    (tmp_path / "wavs").mkdir()
    sf.write(tmp_path / "wavs" / "speech.wav", np.zeros(160, np.int16), 16000, subtype="PCM_16")
    with pytest.raises(StimulusError, match="holds no CREMA-D clips named like 1001_DFA_ANG_XX.wav"):
        build_expert(workspace, tmp_path, expert_config(workspace, audio_dir=str(tmp_path / "wavs")))


def test_checkpoint_from_another_task_or_head_is_refused(fbank, workspace, tmp_path):
    """`-i CKPT` keeps this run's downstream and config: the expert checks the checkpoint itself.
    (With `-e`, S3PRL takes the downstream from the checkpoint and never builds this expert.)"""
    checkpoint = torch.load(fbank[0] / "dev-best.ckpt", map_location="cpu", weights_only=False)
    # Built outside S3PRL's Runner, the expert never sees the upstream: loading a head needs the explicit option.
    with pytest.raises(StimulusError, match=r"built outside S3PRL's Runner.*allow_unverified_upstream=True"):
        build_expert(workspace, tmp_path / "ok", expert_config(workspace), fbank[0] / "dev-best.ckpt", upstream_dim=240)
    allowed = expert_config(workspace)
    allowed["evalrc"]["allow_unverified_upstream"] = True
    expert = build_expert(workspace, tmp_path / "ok", allowed, fbank[0] / "dev-best.ckpt", upstream_dim=240)
    assert not expert.identity.verified and expert.identity.weights_sha256 is None
    checkpoint["Args"].downstream = "emotion"
    torch.save(checkpoint, tmp_path / "emotion.ckpt")
    with pytest.raises(StimulusError, match=r"emotion.ckpt was trained for downstream 'emotion', not emotion_stimulus: pass"):
        build_expert(workspace, tmp_path / "a", expert_config(workspace), tmp_path / "emotion.ckpt", upstream_dim=240)
    with pytest.raises(StimulusError, match=r"different head or upstream size .*evaluate it with `-e` alone"):
        build_expert(workspace, tmp_path / "b", expert_config(workspace), fbank[0] / "dev-best.ckpt", upstream_dim=768)
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    with pytest.raises(StimulusError, match=r"cannot load checkpoint .*junk.ckpt"):
        build_expert(workspace, tmp_path / "c", expert_config(workspace), tmp_path / "junk.ckpt", upstream_dim=240)
    assert all(not (tmp_path / d).exists() or not list((tmp_path / d).iterdir()) for d in "abc")  # nothing written


class Logger:
    def __init__(self):
        self.scalars = {}

    def add_scalar(self, name, value, global_step):
        self.scalars[(name, global_step)] = value


def test_dev_best_by_macro_f1_switch(workspace, tmp_path):
    config = expert_config(workspace)
    config["evalrc"].update(select_by="macro_f1", bootstrap_samples=10, bootstrap_by_speaker=True)
    expert = build_expert(workspace, tmp_path, config)
    linear = expert.head.model.post_net.linear  # UtteranceLevel's final Linear(256 -> 6)

    def evaluate(step, bias):
        """Zero weights: every clip gets softmax(bias); returns what log_records asks the runner to save."""
        records = defaultdict(list)
        with torch.no_grad():
            linear.weight.zero_()
            linear.bias.copy_(torch.tensor(bias))
            for wavs, targets, clips in expert.get_dataloader("dev"):
                expert("dev", [torch.randn(3, 8) for _ in wavs], targets, clips, records=records)
        save = expert.log_records("dev", records=records, logger=Logger(), global_step=step)
        return save, results(tmp_path, "dev", f"step-{step}")["test_stimuli"]["voice"]

    near_uniform = [0.0] * 5 + [0.01]  # predicts happy only
    broad = [1.0] * 5 + [-5.0]  # predicts the five other classes
    assert evaluate(2, near_uniform)[0] == ["dev-best.ckpt"]  # the first evaluation always improves
    save, score = evaluate(4, broad)
    first = results(tmp_path, "dev", "step-2")["test_stimuli"]["voice"]
    assert score["macro_f1"] > first["macro_f1"] and score["loss"] > first["loss"]  # better F1, worse loss
    assert save == ["dev-best.ckpt"]  # chosen by macro-F1, as switched
    assert evaluate(6, near_uniform)[0] == []
    assert expert.best_dev_macro_f1.item() == score["macro_f1"] and expert.best_dev_loss.item() == first["loss"]
    assert results(tmp_path, "dev", "step-6")["seed"] == 7
    frame = pd.read_csv(tmp_path / "predictions-dev-step-4.csv")  # speaker-conditioned CIs, as switched
    truth = frame[[f"voice_{c}" for c in CLASSES]].to_numpy()
    _, ci = metrics.bootstrap_ci(metrics.macro_f1, truth, metrics.binarize(frame[list(CLASSES)].to_numpy()),
                                 conditions=frame["speaker"].to_numpy(), num_bootstraps=10)
    assert score["ci95"] == list(ci)


@pytest.mark.parametrize("label, shown", [("mine", "mine"), (None, "fbank"), ("absent", "fbank")])
def test_results_carry_the_upstream_label(workspace, tmp_path, label, shown):
    """The recipe's LABEL (datarc.upstream_label) names the runs in the report; configs saved before the key
    existed (absent) still load."""
    config = expert_config(workspace, upstream_label=label)
    if label == "absent":
        del config["datarc"]["upstream_label"]
    config["evalrc"].update(bootstrap_samples=10)
    expert = build_expert(workspace, tmp_path, config)
    records = defaultdict(list)
    with torch.no_grad():
        for wavs, targets, clips in expert.get_dataloader("test"):
            expert("test", [torch.randn(3, 8) for _ in wavs], targets, clips, records=records)
    expert.log_records("test", records=records, logger=Logger(), global_step=2)
    assert results(tmp_path, "test", "step-2")["upstream_label"] == shown


@pytest.fixture()
def registered_s3prl():
    """`s3prl-stimulus register` into the installed S3PRL, undone afterwards."""
    from s3prl_stimulus.integration.registration import register, s3prl_downstream_dir, unregister

    registration = register()
    try:
        yield s3prl_downstream_dir().parent
    finally:
        if registration.action != "unchanged":
            unregister()


def test_plain_s3prl_run_downstream_after_register(workspace, registered_s3prl, tmp_path):
    """S3PRL's own run_downstream.py file, run from its folder, finds the downstream through the link
    and its default `-c ./downstream/emotion_stimulus/config.yaml` (shims applied: CI's torchaudio needs them)."""
    from s3prl_stimulus.testing import plain_run_downstream_command

    expdir = tmp_path / "plain"
    command = plain_run_downstream_command(
        ["-m", "train", "-d", "emotion_stimulus", "-u", "fbank", "-p", str(expdir), "--device", "cpu",
         "-o", overrides(workspace / "AudioWAV", **{"config.runner.total_steps": 2})])
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    ok(subprocess.run(command, cwd=registered_s3prl, env=env, capture_output=True, text=True, timeout=300))
    result = results(expdir, "test", "step-2")
    assert result["path"] == "s3prl" and sorted(result["test_stimuli"]) == sorted(STIMULI)
    assert result["upstream_identity"]["verified"] is True  # the expert found S3PRL's Runner and its upstream
    assert (expdir / "dev-best.ckpt").is_file()
