"""The cache path equals the S3PRL path: forward (checkpoint → probabilities) and training (N steps → parameters).

One S3PRL training run per upstream (`fbank`, tiny random-weight `wavlm_local`) through the launcher,
started with `-i init.ckpt` from parameters this test chose, on a generated corpus of fold 1:
12 training clips (two positives of every class under the voice labels) all cut to 1.2 s, so the
full-batch training step (train_batch_size = 12) sees no padding and the clips' S3PRL features are
their own; dev and test clips keep their real, different lengths (cut at 3 s) and are evaluated with
eval_batch_size = 1, as the cache encodes them (alone). The run evaluates and saves at its last step.

- Forward: `states-N.ckpt` scored from the cache reproduces S3PRL's `predictions-test-step-N.csv`
  to <= 1e-5 absolute, and the same macro-F1s.
- Training: the sweep from the same `init.ckpt` with the same (full) batches for N steps ends with
  the parameters of S3PRL's `dev-best.ckpt` (= step N) to <= 1e-4 relative, while N steps move them
  by far more than that.

`fbank` applies per-utterance CMVN, so every clip's time-mean is 0 up to float rounding (|mean| ~ 1e-6):
with the paper's mean-pooling head, the projector weight gets no gradient signal on either path, only
rounding noise that Adam amplifies into ±lr steps, and the output does not depend on the clip. For
fbank the training test therefore checks that fact and the signal-driven parameters (the biases);
the tiny WavLM checks every parameter.
"""

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from s3prl_stimulus import CLASSES, STIMULI

pytestmark = [
    pytest.mark.s3prl,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed"),
]

FOLD, SEED, STEPS, N_TRAIN = 1, 7, 12, 12
DATARC = "config.downstream_expert.datarc"
FORWARD_ATOL = 1e-5
TRAINING_RTOL = 1e-4


def pick_clips(split: str, per_class: int) -> list:
    """The first ``per_class`` clips of the split positive for each class under the voice labels."""
    from s3prl_stimulus.labels import binary_labels, load_votes
    from s3prl_stimulus.partition import split_clips

    clips = split_clips(FOLD, split)
    positives = binary_labels(load_votes("paper").subset(clips).counts("voice"))
    chosen = []
    for c in range(len(CLASSES)):
        chosen += [clip for clip, row in zip(clips, positives) if row[c] and clip not in chosen][:per_class]
    return chosen


def overrides(audio_dir) -> str:
    options = {
        f"{DATARC}.audio_dir": repr(str(audio_dir)),
        f"{DATARC}.clips": "'present'",
        f"{DATARC}.num_workers": 0,
        f"{DATARC}.train_batch_size": N_TRAIN,
        f"{DATARC}.eval_batch_size": 1,
        "config.runner.total_steps": STEPS,
        "config.runner.log_step": STEPS,
        "config.runner.eval_step": STEPS,
        "config.runner.save_step": STEPS,
        "config.downstream_expert.evalrc.bootstrap_samples": 50,
    }
    return ",,".join(f"{k}={v}" for k, v in options.items())


def sweep_override() -> str:
    """The same runner/datarc settings for the sweep (no audio options: it reads the cache)."""
    return ",,".join(o for o in overrides("x").split(",,") if "audio_dir" not in o and "num_workers" not in o)


def launch(cwd, *args) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    run = subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", *map(str, args)],
                         cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def init_checkpoint(path: Path, manifest: dict, train_clips: list) -> Path:
    """Starting parameters both paths load: the downstream's head drawn under seed 7, random layer weights,
    recorded as made for the cache's upstream (both paths check that before loading a head)."""
    from s3prl_stimulus.cache.head import HEAD_PREFIX, initial_head_state
    from s3prl_stimulus.cache.manifest import upstream_identity
    from s3prl_stimulus.cache.sweep_config import load_config
    from s3prl_stimulus.integration.identity import EXTRA_STATE_KEY, checkpoint_state
    from s3prl_stimulus.labels import binary_labels, load_votes
    from s3prl_stimulus.loss import class_balanced_weights

    up = manifest["upstream"]
    dim, n_hidden = up["dim"], up["n_hidden"] if up["weighted_sum"] else 1

    config = load_config()
    head = initial_head_state(SEED, dim, config["downstream_expert"]["modelrc"])
    weights = class_balanced_weights(binary_labels(load_votes("paper").subset(train_clips).counts("voice")))
    downstream = {"objective.class_weights": torch.as_tensor(weights, dtype=torch.float32),
                  **{HEAD_PREFIX + k: v for k, v in head.items()},
                  "best_dev_loss": torch.tensor(float("inf")), "best_dev_macro_f1": torch.tensor(float("-inf")),
                  EXTRA_STATE_KEY: checkpoint_state(upstream_identity(manifest))}
    featurizer = {"weights": 0.1 * torch.randn(n_hidden, generator=torch.Generator().manual_seed(3))} if n_hidden > 1 else {}
    torch.save({"Featurizer": featurizer, "Downstream": downstream,
                "Args": argparse.Namespace(downstream="emotion_stimulus")}, path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from s3prl_stimulus.testing import make_corpus

    root = tmp_path_factory.mktemp("equivalence")
    train = pick_clips("train", 2)
    assert len(train) == N_TRAIN
    make_corpus(root / "AudioWAV", train, max_seconds=1.2)  # equal lengths: a padding-free training batch
    make_corpus(root / "AudioWAV", pick_clips("dev", 1) + pick_clips("test", 1), max_seconds=3.0)
    return root, train


@pytest.fixture(scope="module", params=["fbank", "wavlm_local"])
def paths(request, corpus):
    """(root, S3PRL expdir, cache root, init.ckpt) for one upstream: S3PRL trained, cache extracted."""
    from s3prl_stimulus.cache import extraction
    from s3prl_stimulus.cache.manifest import read_manifest
    from s3prl_stimulus.cache.upstream import UpstreamSpec
    from s3prl_stimulus.testing import make_tiny_wavlm

    root, train = corpus
    upstream = request.param
    work = root / upstream
    work.mkdir()
    ckpt = make_tiny_wavlm(work / "wavlm.pt") if upstream == "wavlm_local" else None
    spec = UpstreamSpec(upstream, ckpt=None if ckpt is None else str(ckpt))
    [cache_dir] = extraction.extract(root / "AudioWAV", work / "cache", spec, folds=[FOLD], clips="present", device="cpu",
                                     progress=False)
    init = init_checkpoint(work / "init.ckpt", read_manifest(cache_dir), train)
    args = ["-m", "train", "-u", upstream, "-d", "emotion_stimulus", "-p", work / "s3prl", "-i", init, "--seed", SEED,
            "-o", overrides(root / "AudioWAV")]
    launch(work, *(args + (["-k", ckpt] if ckpt else [])))
    return work, work / "s3prl", work / "cache", init


def test_s3prl_checkpoint_scored_from_the_cache_gives_its_s3prl_probabilities(paths):
    from s3prl_stimulus.cache.sweeping import evaluate_checkpoint

    work, expdir, cache_root, _ = paths
    frame, result = evaluate_checkpoint([cache_root], expdir / f"states-{STEPS}.ckpt", device="cpu", out=work / "scored")
    reference = pd.read_csv(expdir / f"predictions-test-step-{STEPS}.csv")
    assert list(frame["clip"]) == list(reference["clip"]) and len(frame) == 6
    difference = np.abs(frame[list(CLASSES)].to_numpy() - reference[list(CLASSES)].to_numpy()).max()
    assert difference <= FORWARD_ATOL, difference
    # not vacuous: the trained head's probabilities are far from uniform
    assert np.abs(reference[list(CLASSES)].to_numpy() - 1 / 6).max() > 1e-3
    s3prl_result = json.loads((expdir / f"results-test-step-{STEPS}.json").read_text())
    for stimulus in STIMULI:
        assert result["test_stimuli"][stimulus]["macro_f1"] == s3prl_result["test_stimuli"][stimulus]["macro_f1"]
        assert result["test_stimuli"][stimulus]["loss"] == pytest.approx(s3prl_result["test_stimuli"][stimulus]["loss"], abs=1e-5)
    assert result["path"] == "cache" and result["step"] == STEPS
    assert (work / "scored" / f"results-test-states-{STEPS}.json").is_file()


def test_training_from_the_same_init_and_batches_ends_with_the_s3prl_parameters(paths):
    from s3prl_stimulus.cache.store import load_cache
    from s3prl_stimulus.cache.sweep_outputs import read_checkpoint
    from s3prl_stimulus.cache.sweeping import sweep

    work, expdir, cache_root, init = paths
    upstream = work.name
    sweep([cache_root], work / "sweep", train_stimuli=["voice"], folds=[FOLD], seeds=[SEED], override=sweep_override(),
          device="cpu", init=str(init), progress=False)
    ours = read_checkpoint(work / "sweep" / upstream / "voice" / f"fold{FOLD}" / f"seed{SEED}" / "dev-best.ckpt")
    theirs = read_checkpoint(expdir / "dev-best.ckpt")
    start = read_checkpoint(init)
    assert ours["Step"] == theirs["Step"] == STEPS
    names = ["head.projector.bias", "head.model.post_net.linear.bias"]
    if upstream == "fbank":
        # CMVN'd fbank: clip means are rounding noise, so weights other than biases follow noise on both paths
        assert np.abs(load_cache(cache_root / upstream / f"fold{FOLD}").means).max() < 1e-5
        s3prl_probs = pd.read_csv(expdir / f"predictions-test-step-{STEPS}.csv")[list(CLASSES)].to_numpy()
        assert np.ptp(s3prl_probs, axis=0).max() < 1e-4  # the S3PRL path's output ignores the clip too
    else:
        names += ["head.projector.weight", "head.model.post_net.linear.weight"]
    pairs = [(k, ours["Downstream"][k], theirs["Downstream"][k], start["Downstream"][k]) for k in names]
    pairs += [("weights", ours["Featurizer"][k], theirs["Featurizer"][k], start["Featurizer"][k]) for k in theirs["Featurizer"]]
    assert len(pairs) == (2 if upstream == "fbank" else 5)
    for name, a, b, a0 in pairs:
        scale = b.abs().max().item()
        error = (a - b).abs().max().item() / scale
        moved = (b - a0).abs().max().item() / scale
        assert error <= TRAINING_RTOL, (name, error)
        assert moved > 10 * TRAINING_RTOL, (name, moved)  # N steps really changed it


@pytest.mark.parametrize("paths", ["wavlm_local"], indirect=True)
def test_cache_trained_checkpoint_evaluated_through_s3prl_gives_the_cache_probabilities(paths):
    """The reverse direction: the sweep's dev-best.ckpt loads into S3PRL (`-m evaluate -i`)."""
    work, expdir, cache_root, init = paths
    run_dir = work / "sweep" / work.name / "voice" / f"fold{FOLD}" / f"seed{SEED}"
    if not (run_dir / "dev-best.ckpt").is_file():  # this test alone: train the sweep first
        from s3prl_stimulus.cache.sweeping import sweep

        sweep([cache_root], work / "sweep", train_stimuli=["voice"], folds=[FOLD], seeds=[SEED],
              override=sweep_override(), device="cpu", init=str(init), progress=False)
    audio_dir = work.parent / "AudioWAV"
    launch(work, "-m", "evaluate", "-i", run_dir / "dev-best.ckpt", "-u", "wavlm_local", "-k", work / "wavlm.pt",
           "-d", "emotion_stimulus", "-p", work / "s3prl-eval", "-o", overrides(audio_dir))
    ours = pd.read_csv(run_dir / "predictions-test-dev-best.csv")
    theirs = pd.read_csv(work / "s3prl-eval" / "predictions-test-dev-best.csv")
    assert list(ours["clip"]) == list(theirs["clip"])
    assert np.abs(ours[list(CLASSES)].to_numpy() - theirs[list(CLASSES)].to_numpy()).max() <= FORWARD_ATOL
    assert json.loads((work / "s3prl-eval" / "results-test-dev-best.json").read_text())["step"] == STEPS
