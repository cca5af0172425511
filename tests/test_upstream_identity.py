"""A head scored on features of other upstream weights is refused, never silently reported.

Two tiny random WavLMs (`a.pt` seed 0, `b.pt` seed 1) of identical shape: a head trained on `b` loads
into `a` without any shape error, so only the weights' fingerprint tells them apart. One S3PRL run
trains on `b` through the launcher; caches are extracted with `a` and with `b`. Every path that puts a
checkpoint's head on an upstream (S3PRL `-e` and `-i`, `sweep --evaluate` and `sweep --init`) must
refuse `a`, naming both sides, and record the fingerprint in what it writes; a checkpoint that records
no identity needs an explicit option, and its results say "upstream unverified".

S3PRL's `-i` is driven in-process through S3PRL's own `Runner._get_downstream` (the code that builds
the expert and strictly loads the checkpoint's `Downstream` into it), saving the ~7 s start-up.
"""

import argparse
import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from s3prl_stimulus.errors import StimulusError

pytestmark = [
    pytest.mark.s3prl,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed"),
]

FOLD, STEPS, CLIPS_PER_SPLIT = 1, 2, 10
EXPERT = "config.downstream_expert"
ALLOW_S3PRL = f"{EXPERT}.evalrc.allow_unverified_upstream=True"


def s3prl_overrides(audio_dir) -> str:
    options = {
        f"{EXPERT}.datarc.audio_dir": repr(str(audio_dir)),
        f"{EXPERT}.datarc.clips": "'present'",
        f"{EXPERT}.datarc.num_workers": 0,
        f"{EXPERT}.datarc.train_batch_size": 10,
        f"{EXPERT}.datarc.eval_batch_size": 10,
        f"{EXPERT}.evalrc.bootstrap_samples": 20,
    } | sweep_options()
    return ",,".join(f"{k}={v}" for k, v in options.items())


def sweep_options() -> dict:
    runner = {f"config.runner.{k}": STEPS for k in ("total_steps", "log_step", "eval_step", "save_step")}
    return runner | {f"{EXPERT}.evalrc.bootstrap_samples": 20}


def launch(cwd, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "s3prl_stimulus.run_downstream", *map(str, args)],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def cli(*args) -> tuple[int, str, str]:
    from s3prl_stimulus.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def one_line_error(stderr: str) -> str:
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("error: "), stderr[-2000:]
    return last


def manifest_sha(cache_root: Path) -> str:
    from s3prl_stimulus.cache.manifest import read_manifest

    return read_manifest(cache_root / "wavlm_local" / f"fold{FOLD}")["upstream"]["weights_sha256"]


def saved_identity(checkpoint: Path) -> dict:
    """The identity a checkpoint records, read under torch's weights_only rules (Namespace allowed)."""
    with torch.serialization.safe_globals([argparse.Namespace]):
        saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return saved["Downstream"]["_extra_state"]["upstream_identity"]


def strip_identity(checkpoint: Path, to: Path) -> Path:
    """The same checkpoint as an older version (or another codebase) writes it: no identity."""
    saved = torch.load(checkpoint, map_location="cpu", weights_only=False)
    saved["Downstream"].pop("_extra_state", None)
    torch.save(saved, to)
    return to


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """Upstreams a/b, a corpus, an S3PRL run trained on b, and caches extracted with a and with b."""
    from s3prl_stimulus.cache import extraction
    from s3prl_stimulus.cache.upstream import UpstreamSpec
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("identity")
    a, b = make_tiny_wavlm(root / "a.pt", seed=0), make_tiny_wavlm(root / "b.pt", seed=1)
    make_corpus(root / "AudioWAV", tiny_clip_subset(CLIPS_PER_SPLIT, fold=FOLD), max_seconds=1.5)
    train = launch(root, "-m", "train", "-u", "wavlm_local", "-k", b, "-d", "emotion_stimulus", "-p", root / "exp",
                   "-o", s3prl_overrides(root / "AudioWAV"))
    assert train.returncode == 0, train.stderr[-3000:]
    for name, ckpt in (("cache_a", a), ("cache_b", b)):
        extraction.extract(root / "AudioWAV", root / name, UpstreamSpec("wavlm_local", ckpt=str(ckpt)), folds=[FOLD],
                           clips="present", device="cpu", progress=False)
    return root


def test_both_paths_record_one_fingerprint_of_the_upstream_weights(work):
    sha_a, sha_b = manifest_sha(work / "cache_a"), manifest_sha(work / "cache_b")
    assert sha_a != sha_b and len(sha_b) == 64
    expected = {"upstream": "wavlm_local", "upstream_ckpt": str(work / "b.pt"), "weights_sha256": sha_b,
                "verified": True, "reason": None}
    assert saved_identity(work / "exp" / "dev-best.ckpt") == expected  # the S3PRL path computed the cache's hash
    assert saved_identity(work / "exp" / f"states-{STEPS}.ckpt") == expected
    for split in ("dev", "test"):
        result = json.loads((work / "exp" / f"results-{split}-step-{STEPS}.json").read_text())
        assert result["upstream_identity"] == expected and result["schema"] == 1


def test_sweep_evaluate_refuses_a_cache_of_other_upstream_weights(work, tmp_path):
    code, _, err = cli("sweep", "--cache", work / "cache_a", "--out", tmp_path / "out",
                       "--evaluate", work / "exp" / "dev-best.ckpt", "--device", "cpu")
    assert code == 2
    line = one_line_error(err)
    for side in (manifest_sha(work / "cache_a")[:12], str(work / "a.pt"), manifest_sha(work / "cache_b")[:12],
                 str(work / "b.pt")):
        assert side in line, line
    assert "extract" in line  # the fix: a cache of the checkpoint's upstream
    assert not (tmp_path / "out").exists()


def test_sweep_evaluate_on_the_training_upstream_writes_a_verified_identity(work, tmp_path):
    code, out, _ = cli("sweep", "--cache", work / "cache_b", "--out", tmp_path,
                       "--evaluate", work / "exp" / "dev-best.ckpt", "--device", "cpu")
    assert code == 0 and "unverified" not in out
    result = json.loads((tmp_path / "results-test-dev-best.json").read_text())
    assert result["upstream_identity"] == saved_identity(work / "exp" / "dev-best.ckpt")
    assert result["upstream_identity"]["verified"] is True and result["upstream_ckpt"] == str(work / "b.pt")


def test_sweep_init_refuses_a_checkpoint_of_other_upstream_weights(work, tmp_path):
    from s3prl_stimulus.cache.sweeping import sweep

    with pytest.raises(StimulusError) as error:
        sweep([work / "cache_a"], tmp_path / "out", train_stimuli=["voice"], folds=[FOLD], seeds=[7], device="cpu",
              override=",,".join(f"{k}={v}" for k, v in sweep_options().items()),
              init=str(work / "exp" / "dev-best.ckpt"), progress=False)
    message = str(error.value)
    assert "\n" not in message and manifest_sha(work / "cache_a")[:12] in message
    assert manifest_sha(work / "cache_b")[:12] in message and "--init" in message
    assert not (tmp_path / "out").exists()


def test_s3prl_evaluate_refuses_a_checkpoint_of_other_upstream_weights(work):
    """`-e` takes `-u`/`-k` from the checkpoint; here the upstream file is swapped under it."""
    run = launch(work, "-m", "evaluate", "-e", work / "exp" / "dev-best.ckpt",
                 "-o", f"args.upstream_ckpt={str(work / 'a.pt')!r}")
    assert run.returncode == 2, run.stderr[-3000:]
    line = one_line_error(run.stderr)
    for side in (manifest_sha(work / "cache_a")[:12], str(work / "a.pt"), manifest_sha(work / "cache_b")[:12],
                 str(work / "b.pt")):
        assert side in line, line
    assert not (work / "exp" / "results-test-dev-best.json").exists()


# --- S3PRL's own Runner builds the expert in-process -----------------------------------------------


def runner_with_expert(work, expdir, upstream_ckpt, init_ckpt=None, allow=False, trainable=False):
    """A Runner whose expert S3PRL's own ``Runner._get_downstream`` built (strictly loading ``init_ckpt`` into it)."""
    import yaml

    from s3prl_stimulus.integration.compat import prepare_s3prl_stack
    from s3prl_stimulus.integration.launcher import packaged_config
    from s3prl_stimulus.integration.registration import install_alias

    prepare_s3prl_stack()
    install_alias()
    from s3prl import hub
    from s3prl.downstream.runner import ModelEntry, Runner
    from s3prl.upstream.interfaces import Featurizer

    config = yaml.safe_load(packaged_config().read_text())
    expert = config["downstream_expert"]
    expert["datarc"].update(audio_dir=str(work / "AudioWAV"), clips="present", num_workers=0)
    expert["evalrc"]["allow_unverified_upstream"] = allow
    upstream = hub.wavlm_local(ckpt=str(upstream_ckpt))
    runner = object.__new__(Runner)  # S3PRL's own _get_downstream/_init_model, without the rest of its set-up
    runner.args = argparse.Namespace(downstream="emotion_stimulus", upstream="wavlm_local", upstream_ckpt=str(upstream_ckpt),
                                     device="cpu", seed=7, mode="evaluate", init_ckpt=init_ckpt and str(init_ckpt),
                                     expdir=str(expdir), upstream_trainable=trainable)
    runner.config = {"downstream_expert": expert}
    runner.init_ckpt = torch.load(init_ckpt, map_location="cpu", weights_only=False) if init_ckpt else {}
    runner.upstream = ModelEntry(upstream, "Upstream", trainable, [])
    runner.featurizer = ModelEntry(Featurizer(upstream, upstream_device="cpu"), "Featurizer", True, [])
    runner.downstream = runner._get_downstream()
    return runner


def test_s3prl_init_refuses_a_checkpoint_of_other_upstream_weights(work, tmp_path):
    with pytest.raises(StimulusError) as error:
        runner_with_expert(work, tmp_path / "a", work / "a.pt", init_ckpt=work / "exp" / "dev-best.ckpt")
    message = str(error.value)
    assert "\n" not in message and manifest_sha(work / "cache_a")[:12] in message
    assert manifest_sha(work / "cache_b")[:12] in message and "-k" in message
    expert = runner_with_expert(work, tmp_path / "b", work / "b.pt", init_ckpt=work / "exp" / "dev-best.ckpt").downstream.model
    assert expert.identity.verified and expert.identity.weights_sha256 == manifest_sha(work / "cache_b")


def test_checkpoint_without_identity_needs_the_option_and_its_results_say_unverified(work, tmp_path):
    old = strip_identity(work / "exp" / "dev-best.ckpt", tmp_path / "old.ckpt")
    # sweep --evaluate: refused without the option, scored and marked with it
    code, _, err = cli("sweep", "--cache", work / "cache_b", "--out", tmp_path / "x", "--evaluate", old, "--device", "cpu")
    assert code == 2 and "--allow-unverified-upstream" in one_line_error(err) and not (tmp_path / "x").exists()
    code, out, _ = cli("sweep", "--cache", work / "cache_b", "--out", tmp_path / "y", "--evaluate", old, "--device", "cpu",
                       "--allow-unverified-upstream")
    identity = json.loads((tmp_path / "y" / "results-test-old.json").read_text())["upstream_identity"]
    assert code == 0 and "upstream unverified" in out
    assert identity["verified"] is False and identity["reason"].startswith("upstream unverified: ")
    assert identity["weights_sha256"] == manifest_sha(work / "cache_b")  # the features' upstream is still known
    # sweep --init: the runs it trains, and their checkpoints, stay unverified
    from s3prl_stimulus.cache.sweeping import sweep

    sweep([work / "cache_b"], tmp_path / "z", train_stimuli=["voice"], folds=[FOLD], seeds=[7], device="cpu",
          override=",,".join(f"{k}={v}" for k, v in sweep_options().items()), init=str(old), progress=False,
          allow_unverified_upstream=True)
    run = tmp_path / "z" / "wavlm_local" / "voice" / f"fold{FOLD}" / "seed7"
    assert json.loads((run / "results-test-dev-best.json").read_text())["upstream_identity"]["verified"] is False
    assert saved_identity(run / "dev-best.ckpt")["verified"] is False
    # S3PRL -i: refused without the option; with it, S3PRL's strict load accepts the older checkpoint
    with pytest.raises(StimulusError, match="allow_unverified_upstream=True"):
        runner_with_expert(work, tmp_path / "s", work / "b.pt", init_ckpt=old)
    expert = runner_with_expert(work, tmp_path / "t", work / "b.pt", init_ckpt=old, allow=True).downstream.model
    assert not expert.identity.verified and expert.identity.reason.startswith("upstream unverified: ")
    assert expert.state_dict()["_extra_state"]["upstream_identity"]["verified"] is False


def test_s3prl_evaluate_of_a_checkpoint_without_identity_with_the_option(work, tmp_path):
    """`-e` takes the config from the checkpoint; `-o` adds the option on top (refusal without it: above, via `-i`)."""
    old = strip_identity(work / "exp" / "dev-best.ckpt", tmp_path / "old.ckpt")
    run = launch(work, "-m", "evaluate", "-e", old, "-o", f"args.expdir={str(tmp_path / 'e')!r},,{ALLOW_S3PRL}")
    assert run.returncode == 0, run.stderr[-3000:]
    identity = json.loads((tmp_path / "e" / "results-test-old.json").read_text())["upstream_identity"]
    assert identity["verified"] is False and "records no upstream identity" in identity["reason"]
    assert "upstream unverified" in run.stderr


def test_a_trainable_upstream_is_fingerprinted_as_it_is_saved(work, tmp_path):
    """With `-f` the runner saves the fine-tuned upstream, so the fingerprint is taken at each save."""
    runner = runner_with_expert(work, tmp_path, work / "b.pt", trainable=True)
    expert = runner.downstream.model
    before = expert.state_dict()["_extra_state"]["upstream_identity"]["weights_sha256"]
    assert before == manifest_sha(work / "cache_b")
    with torch.no_grad():  # what a training step does to a trainable upstream
        next(runner.upstream.model.parameters()).add_(1.0)
    after = expert.state_dict()["_extra_state"]["upstream_identity"]["weights_sha256"]
    assert after != before and len(after) == 64
