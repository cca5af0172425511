"""Fault injection: a launcher training run killed mid-epoch and rerun with ``-a`` ends exactly as an uninterrupted one.

One tiny run (random tiny WavLM, 10 training clips in batches of 4: three batches an epoch, the last one short;
two batches accumulated per step; dev and test evaluated and a state saved every 4 steps, 12 steps in all; a head
with dropout, S3PRL's emotion ``DeepModel``, so the random-number stream must continue too) is
trained twice from the same command: once straight through, once SIGKILLed after ``states-4.ckpt`` appears,
rerun with ``-a``, SIGKILLed again after ``states-8.ckpt`` appears, and rerun with ``-a`` to the end. Steps 4
and 8 fall mid-epoch (after 8 and 16 of the epochs' 3 batches). Both runs' dev-best checkpoints are then
evaluated. Every results JSON, every predictions CSV and the checkpoints' tensors must be identical, and no
temporary file may remain. The two chains run side by side (each S3PRL start-up costs ~7 s).
"""

import importlib.util
import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from s3prl_stimulus.errors import StimulusError

e2e = [pytest.mark.s3prl, pytest.mark.slow,
       pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]


def marked(test):
    for mark in e2e:
        test = mark(test)
    return test

DATARC = "config.downstream_expert.datarc"
STEPS, EVERY, ACCUMULATE = 12, 4, 2


def dropout_config(path: Path) -> Path:
    """The packaged config with S3PRL's CNN self-attention head (three dropout layers), shrunk."""
    import yaml

    from s3prl_stimulus.integration.launcher import packaged_config

    config = yaml.safe_load(packaged_config().read_text())
    config["downstream_expert"]["modelrc"] = {"projector_dim": 16, "select": "DeepModel", "DeepModel": {
        "model_type": "CNNSelfAttention", "hidden_dim": 16, "kernel_size": 3, "padding": 1, "pooling": 2, "dropout": 0.3}}
    path.write_text(yaml.safe_dump(config))
    return path


def command(workspace: Path, expdir: Path) -> list:
    options = {
        f"{DATARC}.audio_dir": repr(str(workspace / "AudioWAV")), f"{DATARC}.clips": "'present'",
        f"{DATARC}.num_workers": 0, f"{DATARC}.train_batch_size": 4, f"{DATARC}.eval_batch_size": 4,
        "config.runner.total_steps": STEPS, "config.runner.log_step": EVERY, "config.runner.eval_step": EVERY,
        "config.runner.save_step": EVERY, "config.runner.gradient_accumulate_steps": ACCUMULATE,
        "config.downstream_expert.evalrc.bootstrap_samples": 100,
    }
    return [sys.executable, "-m", "s3prl_stimulus.run_downstream", "-m", "train", "-u", "wavlm_local",
            "-k", str(workspace / "wavlm.pt"), "-d", "emotion_stimulus", "-p", str(expdir),
            "-c", str(workspace / "config.yaml"),
            "-o", ",,".join(f"{k}={v}" for k, v in options.items())]


ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")


def finish(args: list, cwd: Path) -> str:
    run = subprocess.run(args, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout + run.stderr


def kill_when(args: list, cwd: Path, appears: Path, log: Path) -> str:
    """Start ``args``; SIGKILL it as soon as ``appears`` exists (polled every 10 ms); its output."""
    with open(log, "w") as out:
        process = subprocess.Popen(args, cwd=cwd, env=ENV, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 300
        while not appears.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        process.send_signal(signal.SIGKILL)
        process.wait()
    assert appears.exists(), log.read_text()[-3000:]
    return log.read_text()


def evaluate(expdir: Path, cwd: Path) -> str:
    return finish([sys.executable, "-m", "s3prl_stimulus.run_downstream", "-m", "evaluate",
                   "-e", str(expdir / "dev-best.ckpt")], cwd)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("resume")
    make_corpus(root / "AudioWAV", tiny_clip_subset(10, fold=1), max_seconds=1.5)
    make_tiny_wavlm(root / "wavlm.pt")
    dropout_config(root / "config.yaml")
    straight, killed = root / "straight", root / "killed"
    logs = {}

    def uninterrupted():
        logs["straight"] = finish(command(root, straight), root)
        evaluate(straight, root)

    def interrupted():
        train = command(root, killed)
        logs["first"] = kill_when(train, root, killed / "states-4.ckpt", root / "first.log")
        logs["second"] = kill_when(train + ["-a"], root, killed / "states-8.ckpt", root / "second.log")
        # what a kill during an atomic write leaves behind: the rerun must clear it
        (killed / ".states-12.ckpt.k1ll3d00.tmp").write_bytes(b"half a checkpoint")
        (killed / ".results-dev-step-12.json.k1ll3d00.tmp").write_text("{")
        logs["third"] = finish(train + ["-a"], root)
        evaluate(killed, root)

    threads = [threading.Thread(target=t) for t in (uninterrupted, interrupted)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert {"straight", "third"} <= set(logs), logs
    return straight, killed, logs


@marked
def test_the_reruns_resumed_mid_epoch_from_the_states_the_kills_left(runs):
    straight, killed, logs = runs
    assert f"Resume from {killed / 'states-4.ckpt'}" in logs["second"]
    assert f"Resume from {killed / 'states-8.ckpt'}" in logs["third"]
    # steps 4 and 8 are mid-epoch: the expert says which batches of that epoch it leaves out
    assert "resuming at step 4 in epoch 2: skipping its first 2 of 3 training batches" in logs["second"]
    assert "resuming at step 8 in epoch 5: skipping its first 1 of 3 training batches" in logs["third"]
    assert torch.load(killed / "states-12.ckpt", map_location="cpu", weights_only=False)["Step"] == STEPS


def outputs(expdir: Path) -> dict:
    return {p.name: p for p in sorted(expdir.iterdir()) if p.name.startswith(("results-", "predictions-"))}


@marked
def test_every_result_and_prediction_equals_the_uninterrupted_run(runs):
    straight, killed, _ = runs
    expected, got = outputs(straight), outputs(killed)
    names = {f"{kind}-{split}-{tag}.{ext}" for kind, ext in (("results", "json"), ("predictions", "csv"))
             for split in ("dev", "test") for tag in ("step-4", "step-8", "step-12")} | {
        "results-test-dev-best.json", "predictions-test-dev-best.csv"}
    assert set(expected) == set(got) == names
    for name in sorted(names):
        if name.endswith(".csv"):
            assert got[name].read_bytes() == expected[name].read_bytes(), name
        else:  # every number equal; only the evaluated checkpoint's path names the other expdir
            assert json.loads(got[name].read_text().replace(str(killed), str(straight))) == \
                json.loads(expected[name].read_text()), name
    final = json.loads(got["results-test-dev-best.json"].read_text())
    assert final["checkpoint"] == str(killed / "dev-best.ckpt") and final["step"] in (4, 8, 12)


@marked
def test_checkpoints_hold_identical_tensors(runs):
    straight, killed, _ = runs
    for name in ("dev-best.ckpt", f"states-{STEPS}.ckpt"):
        a = torch.load(straight / name, map_location="cpu", weights_only=False)
        b = torch.load(killed / name, map_location="cpu", weights_only=False)
        assert (a["Step"], a["Epoch"]) == (b["Step"], b["Epoch"])
        for part in ("Downstream", "Featurizer", "Optimizer"):
            flat_a, flat_b = flatten(a[part]), flatten(b[part])
            assert flat_a.keys() == flat_b.keys() and flat_a, part
            for key, tensor in flat_a.items():
                assert torch.equal(tensor, flat_b[key]), f"{name} {part} {key}"


def flatten(state, prefix="") -> dict:
    """Every tensor of a nested state (dicts, lists) by its path."""
    if isinstance(state, torch.Tensor):
        return {prefix: state}
    items = state.items() if hasattr(state, "items") else enumerate(state) if isinstance(state, (list, tuple)) else ()
    return {k: v for key, value in items for k, v in flatten(value, f"{prefix}/{key}").items()}


@marked
def test_no_temporary_file_remains(runs):
    straight, killed, logs = runs
    for expdir in (straight, killed):
        left = [p.name for p in expdir.rglob("*") if p.name.endswith((".tmp", ".part"))]
        assert left == [], left
    assert "removed 2 leftover temporary file(s) of an interrupted write" in logs["third"]


# --- the pieces, in-process -----------------------------------------------------------------------


def loader_batches(loader) -> list:
    return [clips for _, _, clips in loader]


class Clips(torch.utils.data.Dataset):
    def __init__(self, n):
        self.n = n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return np.zeros(1, np.float32), np.zeros(6, np.float32), f"clip{i}"


BATCHES = SimpleNamespace(train_batch_size=4, eval_batch_size=4, num_workers=0)


def test_an_epochs_order_depends_only_on_seed_and_epoch():
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import make_loader, train_order

    torch.manual_seed(0)
    first = train_order(10, seed=1337, epoch=3)
    torch.manual_seed(1)
    torch.rand(100)  # the global stream moved on: the order must not
    assert train_order(10, seed=1337, epoch=3) == first and sorted(first) == list(range(10))
    assert train_order(10, seed=1337, epoch=4) != first and train_order(10, seed=7, epoch=3) != first
    before = torch.get_rng_state()
    whole = loader_batches(make_loader(Clips(10), BATCHES, train=True, epoch=3, seed=1337))
    assert torch.equal(torch.get_rng_state(), before)  # the training loader draws nothing from the global stream
    assert whole == [[f"clip{i}" for i in first[k:k + 4]] for k in (0, 4, 8)]  # the last batch is short (2)
    for skip in (1, 2, 3):  # a resumed epoch: the batches not yet trained on, the short one included
        assert loader_batches(make_loader(Clips(10), BATCHES, train=True, epoch=3, seed=1337, skip_batches=skip)) == whole[skip:]


def test_each_ddp_process_takes_its_own_equal_share(monkeypatch):
    from s3prl_stimulus.downstream.emotion_stimulus import dataset

    monkeypatch.setattr(dataset.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dataset.dist, "get_world_size", lambda: 2)
    shares = []
    for rank in (0, 1):
        monkeypatch.setattr(dataset.dist, "get_rank", lambda rank=rank: rank)
        shares.append(dataset.train_order(11, seed=5, epoch=2))
    assert len(shares[0]) == len(shares[1]) == 6 and set(shares[0] + shares[1]) == set(range(11))
    assert dataset.batches_per_epoch(11, BATCHES) == 2  # 6 clips a process, in batches of 4


@pytest.mark.parametrize("step, epoch, accumulate, per_epoch, skipped", [
    (4, 2, 2, 3, 2),  # 8 batches: epochs 0 and 1 (6), then 2 of epoch 2
    (8, 5, 2, 3, 1),  # 16 batches, accumulation across the end of epoch 4
    (3, 0, 1, 3, 3),  # saved on an epoch's last batch: the resumed epoch is empty, the next one starts
    (141, 0, 1, 141, 141),
])
def test_the_batches_a_checkpoint_already_trained_on(step, epoch, accumulate, per_epoch, skipped):
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import ResumePoint

    point = ResumePoint(step, epoch, accumulate, "states.ckpt")
    assert point.batches_done(epoch + 1, per_epoch) == 0  # not the checkpoint's epoch
    assert point.batches_done(epoch, per_epoch) == skipped
    assert point.batches_done(epoch, per_epoch) == 0  # only the first epoch after resuming


@pytest.mark.parametrize("step, epoch, per_epoch", [(4, 2, 2), (4, 0, 3), (6, 2, 3)])
def test_a_checkpoint_of_other_batches_cannot_continue_exactly(step, epoch, per_epoch):
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import ResumePoint

    with pytest.raises(StimulusError, match=r"^cannot continue /x/states-\d+.ckpt exactly: .*resume with the settings"):
        ResumePoint(step, epoch, 1, f"/x/states-{step}.ckpt").batches_done(epoch, per_epoch)


def test_random_number_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    from s3prl_stimulus.seeds import restore_rng_states, rng_states

    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    random.random(), np.random.normal(), torch.rand(3)  # numpy caches a gaussian: part of its state
    torch.save({"rng": rng_states()}, tmp_path / "x.ckpt")
    expected = (random.random(), np.random.normal(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    restore_rng_states(torch.load(tmp_path / "x.ckpt", weights_only=True)["rng"])
    got = (random.random(), np.random.normal(), torch.rand(3))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])


def test_the_expert_saves_and_restores_the_random_streams_only_when_resuming(capsys):
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import ResumePoint
    from s3prl_stimulus.downstream.emotion_stimulus.expert import RNG_KEY, DownstreamExpert

    expert = DownstreamExpert.__new__(DownstreamExpert)  # only the extra-state methods, no corpus
    torch.nn.Module.__init__(expert)
    expert.resume, expert.identity_now = None, lambda: SimpleNamespace(record=lambda: {"upstream": "fbank"})
    torch.manual_seed(11)
    state = expert.get_extra_state()
    following = torch.rand(2)
    expert.set_extra_state(state)  # training from scratch or evaluating: the streams are left alone
    assert not torch.equal(torch.rand(2), following)
    expert.resume = ResumePoint(4, 1, 1, "states-4.ckpt")
    expert.set_extra_state(state)
    assert torch.equal(torch.rand(2), following) and state["upstream_identity"] == {"upstream": "fbank"}
    assert RNG_KEY in state and capsys.readouterr().err == ""
    expert.set_extra_state({"upstream_identity": {}})  # a checkpoint older than the random states: said
    assert "states-4.ckpt holds no random-number states (saved by an older version)" in capsys.readouterr().err


def test_checkpoints_are_written_atomically(tmp_path, monkeypatch):
    from s3prl_stimulus.integration.interruptions import atomic_checkpoint_saves

    monkeypatch.setattr(torch, "save", torch.save)  # undone after the test

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("killed mid-write")

    atomic_checkpoint_saves()
    atomic_checkpoint_saves()  # idempotent: one wrapper
    assert torch.save.__wrapped__.__module__.startswith("torch")
    with pytest.raises(RuntimeError):
        torch.save({"Step": 8, "weights": torch.ones(1000), "z": Unpicklable()}, tmp_path / "states-8.ckpt")
    assert list(tmp_path.iterdir()) == []  # neither a truncated checkpoint nor its temporary file
    torch.save({"Step": 8}, str(tmp_path / "states-8.ckpt"))
    assert torch.load(tmp_path / "states-8.ckpt")["Step"] == 8 and len(list(tmp_path.iterdir())) == 1


def test_only_the_temporary_files_of_atomic_writes_are_cleared(tmp_path):
    from s3prl_stimulus.io import atomic_path
    from s3prl_stimulus.integration.interruptions import clear_interrupted_writes

    with atomic_path(tmp_path / "results-dev-step-4.json") as tmp:  # a killed write leaves this name behind
        tmp.write_text("{}")
        (tmp_path / tmp.name.replace("results", "states")).write_text("killed")
    kept = ["states-4.ckpt", ".hidden", "notes.tmp", ".a.b.tmp", ".x.1234567.tmp", "results-dev-step-4.json"]
    for name in kept[:-1]:
        (tmp_path / name).write_text("x")
    stale = [p.name for p in tmp_path.iterdir() if p.name.startswith(".states-")]
    assert clear_interrupted_writes(tmp_path) == stale and len(stale) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(kept)
    assert clear_interrupted_writes(tmp_path / "absent") == []
