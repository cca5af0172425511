"""The authors' released models: import, both evaluation paths, report, Fig. 2.

Twenty checkpoints are written here in the authors' exact format (S3PRL's ``emo`` downstream: ``Args``,
``Config`` with ``test_fold``, ``Downstream`` with ``projector.*``, ``model.post_net.linear.*`` and
``best_score``, ``Featurizer``, ``Step``, an AdamW ``Optimizer`` state), one per test_fold N = 1..20, for a
tiny random-weight WavLM (3 hidden states of width 32) standing in for WavLM Large, on a generated corpus
with six clips of each split of every fold. All twenty are imported; six (N = 1..5, the five voice folds, and
N = 16, face fold 1) are evaluated end to end. The README's three commands run on them: ``import-authors``,
the recipe's ``evaluate --path authors`` (S3PRL's ``-m evaluate -e`` per checkpoint), ``report``; and
``sweep --evaluate`` from a feature cache scores them too. Every probability must equal the authors' head
computed by hand from their raw state dict (softmax of the layer weights, weighted sum of the upstream's
hidden states, projector, mean over frames, post-net, softmax).
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

import numpy as np
import pandas as pd
import pytest
import torch

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError

pytestmark = [
    pytest.mark.s3prl,
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed"),
]

BLOCKS = ("voice", "av", "all", "face")  # the authors' test_fold blocks 1-5, 6-10, 11-15, 16-20
DIM, HIDDEN, CLIPS_PER_SPLIT = 32, 3, 6
ATOL = 1e-5
LABEL = "wavlm_large (authors)"
EVALUATED = (1, 2, 3, 4, 5, 16)


def authors_checkpoint(path: Path, n: int, seed: int = 0, dim: int = DIM, hidden: int = HIDDEN) -> Path:
    """One checkpoint as the authors' S3PRL ``emo`` runs saved it."""
    g = torch.Generator().manual_seed(100 + n + seed)
    downstream = {
        "projector.weight": torch.randn(256, dim, generator=g) * 0.2, "projector.bias": torch.randn(256, generator=g) * 0.1,
        "model.post_net.linear.weight": torch.randn(6, 256, generator=g) * 0.2,
        "model.post_net.linear.bias": torch.randn(6, generator=g) * 0.1, "best_score": torch.tensor([0.61]),
    }
    params = [torch.nn.Parameter(v.clone()) for k, v in downstream.items() if k != "best_score"]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    sum(p.sum() for p in params).backward()
    optimizer.step()
    args = argparse.Namespace(mode="train", downstream="emo", upstream="wavlm_large", upstream_ckpt=None, seed=1337,
                              expdir=f"result/downstream/wavlm_large_CREMA-D_fold{n}_multimodal", device="cuda",
                              upstream_feature_selection="hidden_states", upstream_layer_selection=None,
                              upstream_feature_normalize=False, upstream_trainable=False, local_rank=None)
    config = {"runner": {"total_steps": 30000, "eval_step": 1000},
              "downstream_expert": {"datarc": {"root": "CREMA-D/AudioWAV", "test_fold": f"fold{n}", "pre_load": True,
                                               "train_batch_size": 32, "eval_batch_size": 32, "num_workers": 12},
                                    "modelrc": {"projector_dim": 256, "select": "UtteranceLevel",
                                                "UtteranceLevel": {"pooling": "MeanPooling"}}}}
    state = {"Optimizer": optimizer.state_dict(), "Step": 4000 + n, "Epoch": 7, "Args": args, "Config": config,
             "Featurizer": {"weights": torch.randn(hidden, generator=g)}, "Downstream": downstream}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, path)
    return path


def authors_tree(root: Path, ns=range(1, 21)) -> Path:
    for n in ns:
        authors_checkpoint(root / f"wavlm_large_CREMA-D_fold{n}_multimodal" / "dev-best.ckpt", n)
    return root


def cli(*args) -> tuple[int, str, str]:
    from s3prl_stimulus.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_module(cwd, *args) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=900)


def run_path(out: Path, n: int) -> Path:
    stimulus, fold = BLOCKS[(n - 1) // 5], (n - 1) % 5 + 1
    return out / "wavlm_large" / stimulus / f"fold{fold}" / "seed1337"


def load(path: Path) -> dict:
    with torch.serialization.safe_globals([argparse.Namespace]):
        return torch.load(path, map_location="cpu", weights_only=True)


# --- the hand-computed reference ------------------------------------------------------------------


class Reference:
    """The authors' head by hand on the tiny upstream's hidden states of each fold's test clips."""

    def __init__(self, audio_dir: Path, upstream_ckpt: Path):
        from s3prl import hub

        self.audio_dir, self.upstream = audio_dir, hub.wavlm_local(ckpt=str(upstream_ckpt)).eval()
        self.present = sorted(p.stem for p in audio_dir.glob("*.wav"))

    def clips(self, fold: int, split: str) -> list:
        from s3prl_stimulus.partition import split_clips

        return [c for c in split_clips(fold, split) if c in self.present]

    @torch.no_grad()
    def hidden_states(self, fold: int) -> dict:
        """clip -> [layers, frames, D]: waveform normalised by the fold's training mean/std, S3PRL's frame count."""
        from s3prl_stimulus.audio import read_clip

        train = np.concatenate([read_clip(self.audio_dir / f"{c}.wav").astype(np.float64)
                                for c in self.clips(fold, "train")])
        mean, std = train.mean(), train.std()
        states = {}
        for clip in self.clips(fold, "test"):
            wav = read_clip(self.audio_dir / f"{clip}.wav")
            x = torch.from_numpy(((wav - mean) / (std + 1e-6)).astype(np.float32))
            hidden = self.upstream([x])["hidden_states"]
            frames = round(len(x) / 320)  # S3PRL's Featurizer keeps round(samples / downsample rate) frames
            states[clip] = torch.stack([h[0, :frames] for h in hidden]).double()
        return states

    def probabilities(self, checkpoint: dict, fold: int, states: dict) -> pd.DataFrame:
        d = {k: v.double() for k, v in checkpoint["Downstream"].items()}
        layer = torch.softmax(checkpoint["Featurizer"]["weights"].double(), dim=0)
        rows = {}
        for clip, hidden in states.items():
            summed = (layer[:, None, None] * hidden).sum(dim=0)  # [T, D]
            projected = summed @ d["projector.weight"].T + d["projector.bias"]
            logits = projected.mean(dim=0) @ d["model.post_net.linear.weight"].T + d["model.post_net.linear.bias"]
            rows[clip] = torch.softmax(logits, dim=0).numpy()
        return pd.DataFrame.from_dict(rows, orient="index", columns=list(CLASSES)).sort_index()


def predictions(path: Path) -> pd.DataFrame:
    return pd.read_csv(path).set_index("clip")[list(CLASSES)].sort_index()


# --- fixtures -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """Corpus, tiny upstream, the authors' 20 checkpoints; imported and evaluated as the README says."""
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("authors")
    wavlm = make_tiny_wavlm(root / "WavLM-Large.pt", layers=HIDDEN - 1, dim=DIM)
    make_corpus(root / "AudioWAV", tiny_clip_subset(CLIPS_PER_SPLIT, fold=None), max_seconds=1.5)
    authors_tree(root / "result" / "downstream", EVALUATED)
    # 1. import (the README's first command)
    code, out, err = cli("import-authors", root / "result" / "downstream", "--out", root / "exp" / "authors",
                         "--upstream-ckpt", wavlm, "--corpus", root / "AudioWAV", "--clips", "present")
    assert code == 0, err
    # 2. evaluate every imported checkpoint through S3PRL (the README's second command)
    evaluate = run_module(root, "s3prl_stimulus.study.recipe", "evaluate", "--path", "authors", "--root", root / "exp",
                          "--corpus", root / "AudioWAV", "--clips", "present",
                          "--override", "config.downstream_expert.datarc.num_workers=0,,"
                                        "config.downstream_expert.datarc.eval_batch_size=1")
    assert evaluate.returncode == 0, evaluate.stdout[-3000:] + evaluate.stderr[-3000:]
    return {"root": root, "wavlm": wavlm, "import_out": out, "evaluate": evaluate,
            "reference": Reference(root / "AudioWAV", wavlm)}


# --- import ---------------------------------------------------------------------------------------


def theirs(root: Path, n: int) -> dict:
    return torch.load(root / f"wavlm_large_CREMA-D_fold{n}_multimodal" / "dev-best.ckpt", weights_only=False)


def test_import_of_all_twenty_maps_test_fold_to_stimulus_and_fold_and_keeps_the_parameters(tmp_path):
    import hashlib

    source = authors_tree(tmp_path / "result" / "downstream")
    code, out, err = cli("import-authors", source, "--out", tmp_path / "exp")
    assert code == 0, err
    assert len(sorted((tmp_path / "exp").rglob("dev-best.ckpt"))) == 20 and "20 checkpoint(s) imported" in out
    for n in range(1, 21):
        ours = load(run_path(tmp_path / "exp", n) / "dev-best.ckpt")
        original = theirs(source, n)
        datarc = ours["Config"]["downstream_expert"]["datarc"]
        assert (datarc["train_stimulus"], datarc["fold"]) == (BLOCKS[(n - 1) // 5], (n - 1) % 5 + 1)
        assert datarc["upstream_label"] == LABEL and datarc["clips"] == "all"
        for key in ("projector.weight", "projector.bias", "model.post_net.linear.weight", "model.post_net.linear.bias"):
            assert torch.equal(ours["Downstream"]["head." + key], original["Downstream"][key])
        assert torch.equal(ours["Featurizer"]["weights"], original["Featurizer"]["weights"])
        assert ours["Step"] == 4000 + n and ours["Args"].downstream == "emotion_stimulus"
        assert (ours["Args"].upstream, ours["Args"].upstream_ckpt) == ("wavlm_large", None)  # theirs, downloaded
        extra = ours["Downstream"]["_extra_state"]
        identity = extra["upstream_identity"]
        assert identity["verified"] is False and identity["weights_sha256"] is None
        assert identity["reason"].startswith("upstream unverified: imported from the authors' checkpoint")
        path = source / f"wavlm_large_CREMA-D_fold{n}_multimodal" / "dev-best.ckpt"
        assert extra["imported_from"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
        assert extra["imported_from"]["source"] == str(path.resolve()) and extra["imported_from"]["test_fold"] == n
        sidecar = json.loads((run_path(tmp_path / "exp", n) / "import.json").read_text())
        assert sidecar["sha256"] == extra["imported_from"]["sha256"] and sidecar["upstream_label"] == LABEL


def test_class_weights_are_the_ones_the_expert_computes_for_the_fold(tmp_path):
    from s3prl_stimulus.labels import binary_labels, load_votes
    from s3prl_stimulus.loss import class_balanced_weights
    from s3prl_stimulus.partition import split_clips

    source = authors_checkpoint(tmp_path / "dev-best.ckpt", 17)  # face, fold 2
    assert cli("import-authors", source, "--out", tmp_path / "exp")[0] == 0
    ours = load(run_path(tmp_path / "exp", 17) / "dev-best.ckpt")
    counts = load_votes("paper").subset(split_clips(2, "train")).counts("face")
    expected = class_balanced_weights(binary_labels(counts))
    assert np.allclose(ours["Downstream"]["objective.class_weights"].numpy(), expected, atol=1e-6)
    assert not np.allclose(expected, expected[0])  # the weights differ per class: a wrong fold would show


def test_the_evaluated_imports_name_the_local_weights(study):
    ours = load(run_path(study["root"] / "exp" / "authors", 16) / "dev-best.ckpt")
    assert (ours["Args"].upstream, ours["Args"].upstream_ckpt) == ("wavlm_local", str(study["wavlm"].resolve()))
    assert ours["Downstream"]["_extra_state"]["upstream_identity"]["upstream_ckpt"] == str(study["wavlm"].resolve())


def test_rerunning_the_import_is_a_no_op_and_other_sources_need_overwrite(study, tmp_path):
    root = study["root"]
    target = run_path(root / "exp" / "authors", 3) / "dev-best.ckpt"
    before = target.stat().st_mtime_ns
    code, _, err = cli("import-authors", root / "result" / "downstream", "--out", root / "exp" / "authors",
                       "--upstream-ckpt", study["wavlm"], "--corpus", root / "AudioWAV", "--clips", "present")
    assert code == 0, err
    assert target.stat().st_mtime_ns == before  # identical import: nothing rewritten
    other = authors_checkpoint(tmp_path / "other" / "wavlm_large_CREMA-D_fold3_multimodal" / "dev-best.ckpt", 3, seed=9)
    code, _, err = cli("import-authors", other, "--out", root / "exp" / "authors", "--upstream-ckpt", study["wavlm"],
                       "--corpus", root / "AudioWAV", "--clips", "present")
    assert code == 2 and "--overwrite" in err.strip().splitlines()[-1]
    assert target.stat().st_mtime_ns == before


@pytest.mark.parametrize("damage,message", [
    ("downstream", "was trained for downstream 'emotion'"),
    ("missing_key", "missing keys ['model.post_net.linear.bias']"),
    ("shape", "model.post_net.linear.weight of shape (4, 256)"),
    ("fold", "test_fold 'fold21', outside fold1..fold20"),
    ("folder", "sits in folder wavlm_large_CREMA-D_fold9_multimodal"),
    ("extra_key", "unexpected keys ['model.pre_net.weight']"),
    ("not_checkpoint", "has no 'Args' entry"),
])
def test_anything_not_in_their_format_is_refused_in_one_line_and_writes_nothing(tmp_path, damage, message):
    folder = "wavlm_large_CREMA-D_fold9_multimodal" if damage == "folder" else "wavlm_large_CREMA-D_fold2_multimodal"
    path = authors_checkpoint(tmp_path / "src" / folder / "dev-best.ckpt", 2)
    state = torch.load(path, weights_only=False)
    if damage == "downstream":
        state["Args"].downstream = "emotion"
    elif damage == "missing_key":
        del state["Downstream"]["model.post_net.linear.bias"]
    elif damage == "shape":
        state["Downstream"]["model.post_net.linear.weight"] = torch.zeros(4, 256)
    elif damage == "fold":
        state["Config"]["downstream_expert"]["datarc"]["test_fold"] = "fold21"
    elif damage == "extra_key":
        state["Downstream"]["model.pre_net.weight"] = torch.zeros(3)
    elif damage == "not_checkpoint":
        state = {"model": state["Downstream"]}
    torch.save(state, path)
    code, _, err = cli("import-authors", tmp_path / "src", "--out", tmp_path / "out")
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_one_test_fold_twice_in_a_tree_is_refused(tmp_path):
    authors_checkpoint(tmp_path / "src" / "a" / "dev-best.ckpt", 4)
    authors_checkpoint(tmp_path / "src" / "b" / "dev-best.ckpt", 4, seed=1)
    code, _, err = cli("import-authors", tmp_path / "src", "--out", tmp_path / "out")
    assert code == 2 and "both test_fold fold4" in err and not (tmp_path / "out" / "wavlm_large").exists()


def test_a_missing_source_or_weights_file_is_refused(tmp_path):
    code, _, err = cli("import-authors", tmp_path / "nothing", "--out", tmp_path / "out")
    assert code == 2 and "does not exist" in err
    authors_checkpoint(tmp_path / "src" / "dev-best.ckpt", 1)
    code, _, err = cli("import-authors", tmp_path / "src", "--out", tmp_path / "out", "--upstream-ckpt", tmp_path / "no.pt")
    assert code == 2 and "--upstream-ckpt" in err


# --- evaluation: S3PRL path -----------------------------------------------------------------------


def test_s3prl_evaluate_gives_the_hand_computed_probabilities_and_says_unverified(study):
    out, reference, source = study["root"] / "exp" / "authors", study["reference"], study["root"] / "result" / "downstream"
    states = {fold: reference.hidden_states(fold) for fold in (1, 3, 5)}
    for n in (1, 3, 5, 16):
        stimulus, fold = BLOCKS[(n - 1) // 5], (n - 1) % 5 + 1
        run, original = run_path(out, n), theirs(source, n)
        expected = reference.probabilities(original, fold, states[fold])
        got = predictions(run / "predictions-test-dev-best.csv")
        assert list(got.index) == list(expected.index) and len(got) == CLIPS_PER_SPLIT
        assert np.abs(got.to_numpy() - expected.to_numpy()).max() <= ATOL
        result = json.loads((run / "results-test-dev-best.json").read_text())
        assert result["path"] == "s3prl" and result["upstream_label"] == LABEL
        assert (result["fold"], result["train_stimulus"], result["seed"]) == (fold, stimulus, 1337)
        identity = result["upstream_identity"]
        assert identity["verified"] is False and "imported from the authors' checkpoint" in identity["reason"]
        assert len(identity["weights_sha256"]) == 64  # the features' upstream is fingerprinted; theirs is not
        weights = json.loads((run / "layer_weights.json").read_text())["weights"]
        assert np.allclose(weights, torch.softmax(original["Featurizer"]["weights"].double(), 0).numpy(), atol=1e-12)


def test_the_recipe_skips_evaluated_imports_and_imports_with_authors(study, tmp_path):
    assert "stage evaluate: 0 run(s) already finished (skipped), 6 job(s) done, 0 failed" in study["evaluate"].stdout
    root = study["root"]
    again = run_module(root, "s3prl_stimulus.study.recipe", "evaluate", "--path", "authors", "--root", root / "exp",
                       "--corpus", root / "AudioWAV", "--clips", "present")
    assert again.returncode == 0 and "6 run(s) already finished (skipped), 0 job(s) done" in again.stdout
    imported = run_module(root, "s3prl_stimulus.study.recipe", "train", "--path", "authors", "--root", tmp_path,
                          "--corpus", root / "AudioWAV", "--authors", root / "result" / "downstream",
                          "--upstreams", f"wavlm_large:{study['wavlm']}")
    assert imported.returncode == 0, imported.stdout + imported.stderr
    ours = load(run_path(tmp_path / "authors", 4) / "dev-best.ckpt")
    assert (ours["Args"].upstream, ours["Args"].upstream_ckpt) == ("wavlm_local", str(study["wavlm"].resolve()))
    assert len(list((tmp_path / "authors").rglob("dev-best.ckpt"))) == len(EVALUATED)


# --- evaluation: cache path -----------------------------------------------------------------------


def test_sweep_evaluate_from_a_cache_gives_the_same_probabilities(study, tmp_path):
    from s3prl_stimulus.cache import extraction
    from s3prl_stimulus.cache.upstream import UpstreamSpec

    root = study["root"]
    extraction.extract(root / "AudioWAV", tmp_path / "features", UpstreamSpec("wavlm_local", ckpt=str(study["wavlm"])),
                       folds=[1, 2], clips="present", device="cpu", progress=False)
    for n in (2, 16):
        fold = (n - 1) % 5 + 1
        checkpoint = run_path(root / "exp" / "authors", n) / "dev-best.ckpt"
        code, out, err = cli("sweep", "--cache", tmp_path / "features", "--out", tmp_path / f"n{n}",
                             "--evaluate", checkpoint, "--device", "cpu")
        assert code == 0, err
        assert "upstream unverified: imported from the authors' checkpoint" in out
        original = theirs(root / "result" / "downstream", n)
        got = predictions(tmp_path / f"n{n}" / "predictions-test-dev-best.csv")
        expected = study["reference"].probabilities(original, fold, study["reference"].hidden_states(fold))
        assert np.abs(got.to_numpy() - expected.to_numpy()).max() <= ATOL
        s3prl = predictions(run_path(root / "exp" / "authors", n) / "predictions-test-dev-best.csv")
        assert np.abs(got.to_numpy() - s3prl.to_numpy()).max() <= ATOL
        result = json.loads((tmp_path / f"n{n}" / "results-test-dev-best.json").read_text())
        assert result["path"] == "cache" and result["upstream_label"] == LABEL
        assert result["upstream_identity"]["verified"] is False
        assert json.loads((tmp_path / f"n{n}" / "layer_weights.json").read_text())["fold"] == fold


def test_an_imported_checkpoint_on_another_upstream_is_refused(study, tmp_path):
    """The user named wavlm_local with one file at import; a cache of other weights is another upstream."""
    from s3prl_stimulus.cache import extraction
    from s3prl_stimulus.cache.upstream import UpstreamSpec
    from s3prl_stimulus.testing import make_tiny_wavlm

    other = make_tiny_wavlm(tmp_path / "other.pt", layers=HIDDEN - 1, dim=DIM, seed=5)
    extraction.extract(study["root"] / "AudioWAV", tmp_path / "features", UpstreamSpec("wavlm_local", ckpt=str(other)),
                       folds=[1], clips="present", device="cpu", progress=False)
    code, _, err = cli("sweep", "--cache", tmp_path / "features", "--out", tmp_path / "x", "--evaluate",
                       run_path(study["root"] / "exp" / "authors", 1) / "dev-best.ckpt", "--device", "cpu")
    line = err.strip().splitlines()[-1]
    assert code == 2 and "was imported for upstream wavlm_local -k" in line and str(other) in line
    assert not (tmp_path / "x").exists()


# --- report and Fig. 2 ----------------------------------------------------------------------------


def test_report_shows_the_authors_models_as_their_own_system_with_fig2(study, tmp_path):
    from s3prl_stimulus.metrics import binarize, macro_f1
    from s3prl_stimulus.study.reports import ScoreSettings, build_report
    from s3prl_stimulus.study.reports.figures import layer_weight_means

    root = study["root"]
    code, out, err = cli("report", root / "exp" / "authors", "--out", tmp_path / "report", "--bootstraps", "50")
    assert code == 0, err
    assert f"report: {len(EVALUATED)} runs, 1 upstream(s)" in out and "upstream unverified" in out
    index = (tmp_path / "report" / "index.md").read_text()
    assert LABEL in index and (tmp_path / "report" / "fig2_layer_weights_wavlm_large_authors.png").is_file()
    # Table IV cell voice -> face: the pooled macro-F1 of the five voice models' predictions on face labels
    frames = [pd.read_csv(run_path(root / "exp" / "authors", n) / "predictions-test-dev-best.csv") for n in range(1, 6)]
    pooled = pd.concat(frames)
    expected = macro_f1(pooled[[f"face_{c}" for c in CLASSES]].to_numpy(), binarize(pooled[list(CLASSES)].to_numpy()))
    table = pd.read_csv(tmp_path / "report" / "table4_cross_wavlm_large_authors.csv").set_index("train_stimulus")
    assert abs(table.loc["voice", "face_macro_f1"] - expected) <= 1e-6 and table.loc["voice", "face_n_folds"] == 5
    # Fig. 2: mean over the five folds of softmax(their layer weights), per train stimulus
    built = build_report(root / "exp" / "authors", settings=ScoreSettings(20, 5.0, False, 0))
    means = layer_weight_means(built, LABEL)
    assert set(means) == {"voice", "face"}
    for stimulus, ns in (("voice", range(1, 6)), ("face", [16])):
        weights = [torch.softmax(theirs(root / "result" / "downstream", n)["Featurizer"]["weights"].double(), 0)
                   for n in ns]
        assert np.allclose(means[stimulus][0], torch.stack(weights).mean(0).numpy(), atol=1e-12)
        assert means[stimulus][2] == len(ns)


def test_an_import_with_the_corpus_evaluates_with_a_bare_evaluate_e(study, tmp_path):
    """`-m evaluate -e CKPT` alone: S3PRL takes upstream, config (corpus, label) and expdir from the checkpoint."""
    root = study["root"]
    source = root / "result" / "downstream" / "wavlm_large_CREMA-D_fold16_multimodal" / "dev-best.ckpt"
    assert cli("import-authors", source, "--out", tmp_path, "--upstream-ckpt", study["wavlm"], "--corpus",
               root / "AudioWAV", "--clips", "present")[0] == 0
    run = run_path(tmp_path, 16)
    evaluate = run_module(root, "s3prl_stimulus.run_downstream", "-m", "evaluate", "-e", run / "dev-best.ckpt")
    assert evaluate.returncode == 0, evaluate.stderr[-3000:]
    result = json.loads((run / "results-test-dev-best.json").read_text())
    assert result["upstream_label"] == LABEL and result["upstream_identity"]["verified"] is False
    got = predictions(run / "predictions-test-dev-best.csv")  # eval batches of 32 here, of 1 in the recipe run
    expected = predictions(run_path(root / "exp" / "authors", 16) / "predictions-test-dev-best.csv")
    assert list(got.index) == list(expected.index)
    assert np.abs(got.to_numpy() - expected.to_numpy()).max() <= 1e-4
