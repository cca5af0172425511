"""One extraction for every fold when the upstream is measured to be invariant to the fold normalisation.

Layer-normalising (WavLM Large style, ``normalize: true``) and group-norm (Base style) front ends pass the
test and get one cache serving both folds; fbank does not and gets one cache per fold; ``per_fold``
skips the test. The shared cache's means equal each fold's own to the tolerance, and a sweep on it
gives the per-fold caches' probabilities.
"""

import importlib.util
import json

import numpy as np
import pandas as pd
import pytest

from s3prl_stimulus.cache import extraction, invariance, store
from s3prl_stimulus.cache.grid import cache_for_fold
from s3prl_stimulus.cache.upstream import UpstreamSpec
from s3prl_stimulus.errors import StimulusError

pytestmark = [pytest.mark.s3prl, pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]

FOLDS = [1, 2]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """10 clips (2 per speaker block: each fold has 6 train, 2 dev, 2 test), cut to 1.5 s; tiny upstreams."""
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("invariance")
    clips = tiny_clip_subset(2, fold=None)
    make_corpus(root / "AudioWAV", clips, max_seconds=1.5)
    make_tiny_wavlm(root / "wavlm-ln.pt")  # layer-norm extractor, normalize: true (Large style)
    make_tiny_wavlm(root / "wavlm-gn.pt", extractor_mode="default")  # bias-free conv + group norm (Base style)
    return root, clips


def extract(root, out, spec, **options):
    return extraction.extract(root / "AudioWAV", root / out, spec, folds=FOLDS, clips="present", device="cpu",
                              chunk_clips=4, progress=False, **options)


def manifest(path) -> dict:
    return json.loads((path / "manifest.json").read_text())


@pytest.fixture(scope="module")
def layer_norm_caches(corpus):
    root, _ = corpus
    spec = UpstreamSpec("wavlm_local", ckpt=str(root / "wavlm-ln.pt"))
    shared = extract(root, "shared", spec, feature_normalize=True)
    per_fold = extract(root, "per-fold", spec, feature_normalize=True, per_fold=True)
    return shared, per_fold


def test_a_layer_normalising_upstream_is_encoded_once_for_every_fold(corpus, layer_norm_caches):
    root, clips = corpus
    shared, per_fold = layer_norm_caches
    assert [p.name for p in shared] == ["folds12"] and [p.name for p in per_fold] == ["fold1", "fold2"]
    record = manifest(shared[0])["invariance"]
    assert record["holds"] and record["folds"] == FOLDS and record["tolerance"] == invariance.TOLERANCE
    assert 0 <= record["max_relative_deviation"] <= invariance.TOLERANCE
    assert 4 <= len(record["sample_clips"]) <= 16 and set(record["sample_clips"]) <= set(clips)
    assert record["clip_forwards"] == len(record["sample_clips"]) * len(FOLDS)
    assert [n["fold"] for n in manifest(shared[0])["shared_folds"]] == FOLDS
    complete = json.loads((shared[0] / store.COMPLETE).read_text())
    assert complete["encoded_clips"] == len(clips)  # once, not once per fold
    assert "invariance" not in manifest(per_fold[0]) and "shared_folds" not in manifest(per_fold[0])
    one = store.load_cache(shared[0])
    for path in per_fold:  # each fold's own cache holds the shared one's values, to the test's tolerance
        own = store.load_cache(path)
        assert list(own.clips) == list(one.clips)
        for key in ("means", "ln_means"):
            a, b = getattr(one, key), getattr(own, key)
            assert invariance.relative_deviation(b, a) <= invariance.TOLERANCE
        assert np.abs(own.means - one.means).max() > 0 or path.name == "fold1"  # fold 2 was really re-encoded


def test_the_sweep_serves_every_fold_from_the_shared_cache_with_the_per_fold_results(corpus, layer_norm_caches, tmp_path):
    from s3prl_stimulus.cache.sweeping import sweep

    shared, per_fold = layer_norm_caches
    manifests = {p: manifest(p) for p in shared}
    assert {cache_for_fold(manifests, k, "train_mean_std") for k in FOLDS} == {shared[0]}
    with pytest.raises(StimulusError, match="--folds 3"):
        cache_for_fold(manifests, 3, "train_mean_std")
    override = ("config.runner.total_steps=6,,config.runner.eval_step=3,,config.downstream_expert.datarc.train_batch_size=4,,"
                "config.downstream_expert.evalrc.bootstrap_samples=10,,config.downstream_expert.modelrc.projector_dim=8")
    outputs = {}
    for name, caches in (("shared", shared), ("per-fold", per_fold)):
        sweep([p.parent for p in caches][:1], tmp_path / name, train_stimuli=["voice"], folds=FOLDS, seeds=[3],
              override=override, device="cpu", progress=False)
        outputs[name] = {k: pd.read_csv(tmp_path / name / "wavlm_local" / "voice" / f"fold{k}" / "seed3" /
                                        "predictions-test-dev-best.csv") for k in FOLDS}
    for k in FOLDS:
        a, b = outputs["shared"][k], outputs["per-fold"][k]
        assert list(a["clip"]) == list(b["clip"])
        probs = ["angry", "sad", "disgust", "fear", "neutral", "happy"]
        np.testing.assert_allclose(a[probs].to_numpy(), b[probs].to_numpy(), rtol=0, atol=1e-5)


def test_the_shared_cache_is_refused_for_other_training_clips(corpus, layer_norm_caches, tmp_path):
    from s3prl_stimulus.cache.grid import check_normalisation

    shared, _ = layer_norm_caches
    cache = store.load_cache(shared[0])
    from s3prl_stimulus.partition import split_clips

    train = [c for c in split_clips(2, "train") if c in set(cache.clips)]
    check_normalisation(cache, 2, train)  # the clips it was computed on: accepted
    with pytest.raises(StimulusError, match="another set of fold-2 training clips"):
        check_normalisation(cache, 2, train[:-1])


def test_a_group_norm_front_end_passes_too(corpus):
    root, _ = corpus
    [path] = extract(root, "group-norm", UpstreamSpec("wavlm_local", ckpt=str(root / "wavlm-gn.pt")))
    record = manifest(path)["invariance"]
    assert path.name == "folds12" and record["holds"] and record["max_relative_deviation"] <= invariance.TOLERANCE


def test_fbank_fails_the_test_and_falls_back_to_one_cache_per_fold(corpus, capsys):
    root, clips = corpus
    paths = extract(root, "fbank", UpstreamSpec("fbank"))
    assert [p.name for p in paths] == ["fold1", "fold2"]
    for path in paths:
        record = manifest(path)["invariance"]
        assert not record["holds"] and record["max_relative_deviation"] > 100 * invariance.TOLERANCE
        assert json.loads((path / store.COMPLETE).read_text())["encoded_clips"] == len(clips)
    assert "one cache per fold" in capsys.readouterr().err


def test_relative_deviation_is_per_hidden_state():
    reference = np.zeros((2, 2, 3), dtype=np.float32)
    reference[:, 0] = 1000.0  # a large hidden state must not hide a small one's change
    reference[:, 1] = 1.0
    other = reference.copy()
    other[0, 1, 0] += 1e-3
    assert invariance.relative_deviation(reference, other) == pytest.approx(1e-3, rel=1e-3)
    lengths = [10] * 6 + [20] * 3 + [30] * 10
    assert invariance.sample_positions(lengths) == [0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 15, 16, 17, 18]
    assert invariance.sample_positions([5, 7]) == [0, 1]


def test_a_shared_cache_is_read_once_into_one_table_for_every_fold(corpus, layer_norm_caches):
    from s3prl_stimulus.cache import sweeping

    root, clips = corpus
    shared, per_fold = layer_norm_caches
    for caches, n_rows in ((shared, len(clips)), (per_fold, 2 * len(clips))):
        prepared = sweeping.prepare([caches[0].parent], (["voice"], FOLDS, [1]), None, None, None, None, "cpu", False)
        assert prepared.grid.features.shape[0] == n_rows  # folds served by one cache share its rows
        assert set(prepared.chosen.values()) == set(caches)
