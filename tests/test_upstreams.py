"""Every paper upstream on the supported stack, offline: S3PRL 0.4.18's own hub code builds each of the 15.

For each of the 14 self-supervised upstreams a tiny random-weight checkpoint in its released format
(`s3prl_stimulus.testing_upstreams`) is loaded (a) by its exact hub name, from where S3PRL's download cache
looks for the released URL, and (b) by its local entry with the file as `-k`; two clips of different lengths
go through it, and the hidden states must have the released model's count and frame rate (widths are shrunk).
FBANK needs no file. Five upstreams (fbank, a transformer, an RNN, DeCoAR 2, modified CPC) then train 2 steps
and evaluate through the launcher, by hub name with nothing downloadable.
"""

import datetime
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS, cached_weights_path, paper_upstream

pytestmark = [
    pytest.mark.s3prl,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed"),
]

REPO = Path(__file__).resolve().parents[1]
NAMES = [u.name for u in PAPER_UPSTREAMS]
WITH_WEIGHTS = [u.name for u in PAPER_UPSTREAMS if u.url]
CLIP_SECONDS = (2.0, 1.27)
THROUGH_LAUNCHER = ["fbank", "wavlm_large", "apc", "decoar2", "modified_cpc"]


@pytest.fixture(scope="session")
def hub():
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    import s3prl.hub

    return s3prl.hub


@pytest.fixture(scope="session")
def tiny(tmp_path_factory, hub) -> dict:
    from s3prl_stimulus.testing_upstreams import make_paper_checkpoint

    root = tmp_path_factory.mktemp("tiny_upstreams")
    return {name: make_paper_checkpoint(name, root / f"{name}.pt") for name in WITH_WEIGHTS}


@pytest.fixture(scope="session")
def home(tmp_path_factory, tiny) -> Path:
    """A home directory whose S3PRL download cache holds each tiny checkpoint as its released URL's file."""
    home = tmp_path_factory.mktemp("home")
    for name, path in tiny.items():
        target = cached_weights_path(paper_upstream(name).url, home / ".cache" / "s3prl" / "download")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    return home


@pytest.fixture
def offline_cache(home, hub, monkeypatch) -> Path:
    """S3PRL's download cache pointed at ``home``'s; any download attempt fails the test."""
    from s3prl.util import download

    def refuse(url, *args, **kwargs):
        raise AssertionError(f"S3PRL tried to download {url}")

    cache = home / ".cache" / "s3prl" / "download"
    monkeypatch.setattr(download, "_download_dir", cache)
    monkeypatch.setattr(download, "_download_url_to_file", refuse)
    monkeypatch.setattr(download, "_download_url_to_file_requests", refuse)
    return cache


def clips():
    import torch

    generator = torch.Generator().manual_seed(0)
    return [0.1 * torch.randn(int(seconds * 16000), generator=generator) for seconds in CLIP_SECONDS]


def assert_released_shape(upstream, name):
    """Hidden states: the released model's count and frame rate, the tiny checkpoint's width."""
    import torch

    from s3prl_stimulus.testing_upstreams import tiny_dim

    facts = paper_upstream(name)
    wavs = clips()
    with torch.no_grad():
        states = upstream.eval()(wavs)["hidden_states"]
        alone = upstream(wavs[1:])["hidden_states"]
    assert len(states) == facts.hidden_states
    assert upstream.get_downsample_rates("hidden_states") == facts.rate
    longest = len(wavs[0]) / facts.rate
    for batched, short in zip(states, alone):
        assert batched.shape[0] == 2 and batched.shape[2] == tiny_dim(name)
        assert abs(batched.shape[1] - longest) <= 2, (batched.shape, longest)  # edge frames of conv/STFT windows
        assert abs(short.shape[1] - len(wavs[1]) / facts.rate) <= 2
        assert torch.isfinite(batched).all()
    assert not torch.equal(states[-1][0, :10], states[-1][1, :10])  # two clips, two different outputs


# ---------------------------------------------------------------- the table agrees with S3PRL and the recipe


def test_the_table_lists_the_recipes_upstreams_in_order():
    listed = [line.strip() for line in (REPO / "recipes" / "upstreams.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert listed == NAMES and len(NAMES) == 15


@pytest.mark.parametrize("name", NAMES)
def test_each_url_is_the_file_s3prl_downloads_and_caches(name, hub, offline_cache):
    from s3prl_stimulus.study.recipe.weights import weights_of

    facts = paper_upstream(name)
    expected = None if facts.url is None else (facts.url, cached_weights_path(facts.url))
    assert weights_of(name, hub) == expected
    if facts.local:
        assert callable(getattr(hub, facts.local))


def test_cached_path_is_s3prls_own_naming(hub, offline_cache):
    from s3prl.util.download import _urls_to_filepaths

    for name in WITH_WEIGHTS:
        url = paper_upstream(name).url
        assert Path(_urls_to_filepaths(url, download=False)) == cached_weights_path(url).resolve()


# ---------------------------------------------------------------- each upstream builds and forwards


@pytest.mark.parametrize("name", NAMES)
def test_builds_by_hub_name_from_the_download_cache_offline(name, hub, offline_cache):
    upstream = getattr(hub, name)()
    assert_released_shape(upstream, name)
    if name == "decoar2":  # S3PRL fixes its architecture: built at the released size
        assert round(sum(p.numel() for p in upstream.parameters()) / 1e6, 1) == paper_upstream(name).parameters_m


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_builds_by_local_entry_with_the_file(name, hub, tiny):
    local = paper_upstream(name).local
    assert_released_shape(getattr(hub, local)(ckpt=str(tiny[name])), name)


@pytest.mark.parametrize("name", WITH_WEIGHTS)
def test_tiny_checkpoints_are_small(name, tiny):
    assert tiny[name].stat().st_size < 1_000_000


# ---------------------------------------------------------------- loading real files


def test_gpu_saved_weights_load_on_a_machine_without_cuda(hub, tiny):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA is available: GPU-saved weights load as saved")
    for name in ("wavlm_large", "decoar2"):  # their experts call torch.load(ckpt) without map_location
        with pytest.raises(RuntimeError, match="deserialize object on a CUDA device"):
            torch.load.__wrapped__(tiny[name])  # torch's own load, as S3PRL calls it
        state = torch.load(tiny[name])
        tensors = state["model"].values()
        assert all(t.device.type == "cpu" for t in tensors)


def test_numpy_numbers_and_namespaces_in_a_checkpoint_are_allowed(hub, tiny, tmp_path):
    import argparse

    import torch

    state = torch.load(tiny["apc"])
    state.update(global_step=np.int64(1000), best_loss=np.float64(0.25), stats=np.zeros(3, np.float32),
                 args=argparse.Namespace(lr=1e-3))
    torch.save(state, tmp_path / "apc.ckpt")
    assert_released_shape(hub.apc_local(ckpt=str(tmp_path / "apc.ckpt")), "apc")


def test_a_refused_class_is_one_line_naming_the_file_and_the_class(hub, tiny, tmp_path):
    import pickle

    import torch

    from s3prl_stimulus.errors import StimulusError

    state = torch.load(tiny["apc"])
    state["trained_on"] = datetime.date(2020, 5, 1)
    torch.save(state, tmp_path / "apc.ckpt")
    with pytest.raises(StimulusError) as caught:
        hub.apc_local(ckpt=str(tmp_path / "apc.ckpt"))
    message = str(caught.value)
    assert "\n" not in message and str(tmp_path / "apc.ckpt") in message and "datetime.date" in message
    assert "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1" in message
    assert isinstance(caught.value, pickle.UnpicklingError)  # callers catching torch's error still do


# ---------------------------------------------------------------- training and evaluation through the launcher


@pytest.fixture(scope="session")
def corpus(tmp_path_factory):
    from s3prl_stimulus.testing import make_corpus, tiny_clip_subset

    root = tmp_path_factory.mktemp("launcher_corpus")
    make_corpus(root, tiny_clip_subset(6, fold=1), max_seconds=1.0)
    return root


TRAIN_THEN_EVALUATE = """
import sys
from s3prl_stimulus.integration.launcher import main
cut = sys.argv.index("--then")
train, evaluate = sys.argv[1:cut], sys.argv[cut + 1:]  # before main() replaces sys.argv
sys.exit(main(train) or main(evaluate))
"""


def launch(home, cwd, train: list, evaluate: list) -> subprocess.CompletedProcess:
    """The launcher's ``main`` with ``train``'s arguments, then with ``evaluate``'s, in one process (S3PRL's
    start-up, ~10 s, once). A proxy nobody listens on makes any download attempt fail at once."""
    env = dict(os.environ, HOME=str(home), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", HF_HUB_OFFLINE="1",
               HTTP_PROXY="http://127.0.0.1:9", HTTPS_PROXY="http://127.0.0.1:9", NO_PROXY="")
    command = [sys.executable, "-c", TRAIN_THEN_EVALUATE, *map(str, train), "--then", *map(str, evaluate)]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="session")
def launcher_runs(home, corpus, tmp_path_factory) -> dict:
    """Per upstream: train 2 steps, then evaluate dev-best; two upstreams at a time (each process is
    single-threaded; CI has two cores)."""
    root = tmp_path_factory.mktemp("launcher_runs")

    def pipeline(name):
        expdir = root / name
        train = ["-m", "train", "-d", "emotion_stimulus", "-u", name, "-p", expdir, "-o", overrides(corpus)]
        return expdir, launch(home, root, train, ["-m", "evaluate", "-e", expdir / "dev-best.ckpt"])

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(zip(THROUGH_LAUNCHER, pool.map(pipeline, THROUGH_LAUNCHER)))


def overrides(corpus: Path) -> str:
    datarc = "config.downstream_expert.datarc"
    options = {f"{datarc}.audio_dir": repr(str(corpus)), f"{datarc}.clips": "'present'", f"{datarc}.num_workers": 0,
               f"{datarc}.train_batch_size": 4, f"{datarc}.eval_batch_size": 6, "config.runner.total_steps": 2,
               "config.runner.log_step": 2, "config.runner.eval_step": 2, "config.runner.save_step": 2,
               "config.downstream_expert.evalrc.bootstrap_samples": 20}
    return ",,".join(f"{k}={v}" for k, v in options.items())


@pytest.mark.parametrize("name", THROUGH_LAUNCHER)
def test_trains_two_steps_and_evaluates_through_the_launcher_by_hub_name(name, launcher_runs):
    expdir, run = launcher_runs[name]
    assert run.returncode == 0, run.stderr[-3000:]
    assert "Downloading:" not in run.stderr
    assert (expdir / "results-test-step-2.json").is_file()  # training evaluated at its last step
    result = json.loads((expdir / "results-test-dev-best.json").read_text())
    assert (result["upstream"], result["step"], result["n_clips"]) == (name, 2, 6)
    probabilities = pd.read_csv(expdir / "predictions-test-dev-best.csv").iloc[:, 2:8].to_numpy()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-9)
    hidden_states = paper_upstream(name).hidden_states
    if hidden_states > 1:  # the featurizer's layer weights: one per hidden state of the released model
        assert len(json.loads((expdir / "layer_weights.json").read_text())["weights"]) == hidden_states
    else:
        assert not (expdir / "layer_weights.json").exists()
