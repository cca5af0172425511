"""Feature cache: what `extract` stores equals what S3PRL's featurizer sees; key, resume and bad input."""

import argparse
import errno
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from s3prl_stimulus.cache import extraction, store
from s3prl_stimulus.cache.manifest import KEY_FIELDS, MANIFEST, manifest_key, read_manifest
from s3prl_stimulus.cache.normalisation import fold_normalisation
from s3prl_stimulus.cache.upstream import UpstreamSpec, build_upstream
from s3prl_stimulus.errors import StimulusError

pytestmark = [pytest.mark.s3prl, pytest.mark.skipif(importlib.util.find_spec("s3prl") is None, reason="S3PRL is not installed")]

FOLD = 1


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """12 real clip names of fold 1 (4 per split), cut to 1.5 s: most clips share one length, a few are shorter."""
    from s3prl_stimulus.testing import make_corpus, make_tiny_wavlm, tiny_clip_subset

    root = tmp_path_factory.mktemp("cache")
    clips = tiny_clip_subset(4, fold=FOLD, seed=3)
    make_corpus(root / "AudioWAV", clips, max_seconds=1.5)
    make_tiny_wavlm(root / "wavlm.pt")  # Large-style pre-LN: hidden states are not layer-normalised already
    return root, clips


@pytest.fixture(scope="module")
def wavlm_cache(corpus):
    root, _ = corpus
    spec = UpstreamSpec("wavlm_local", ckpt=str(root / "wavlm.pt"))
    [path] = extraction.extract(root / "AudioWAV", root / "out", spec, folds=[FOLD], clips="present", device="cpu",
                                feature_normalize=True, chunk_clips=5, batch_clips=4, progress=False)
    return spec, path


def s3prl_alone(upstream, featurizer, wav: np.ndarray, weights: torch.Tensor, normalize: bool):
    """S3PRL's own upstream + Featurizer on one clip (batch of one): the kept frames after the weighted sum."""
    featurizer.normalize = normalize
    with torch.no_grad():
        featurizer.weights.copy_(weights)
        wavs = [torch.from_numpy(wav)]
        return featurizer(wavs, upstream(wavs))[0]


def test_cached_means_are_the_time_means_of_what_s3prl_featurizes(corpus, wavlm_cache):
    root, _ = corpus
    spec, path = wavlm_cache
    loaded = store.load_cache(path)
    norm = loaded.normalisation
    assert norm.kind == "train_mean_std" and norm.fold == FOLD and loaded.means.shape[1:] == (3, 32)
    upstream, featurizer = build_upstream(spec, "cpu")
    weights = torch.tensor([0.3, -1.0, 0.8])
    softmax = torch.softmax(weights, dim=0).numpy()
    for i in (0, len(loaded.clips) - 1):  # the shortest and a longest clip
        from s3prl_stimulus.audio import clip_path, read_clip

        wav = norm.apply(read_clip(clip_path(root / "AudioWAV", loaded.clips[i])))
        for normalize, means in ((False, loaded.means), (True, loaded.ln_means)):
            frames = s3prl_alone(upstream, featurizer, wav, weights, normalize)
            assert len(frames) == loaded.frames[i] == min(round(len(wav) / 320), len(frames))
            expected = frames.mean(dim=0).numpy()
            np.testing.assert_allclose(np.einsum("l,ld->d", softmax, means[i]), expected, rtol=1e-5, atol=1e-6)
    assert np.abs(loaded.ln_means - loaded.means).max() > 0.1  # the normalised variant is really different


def test_equal_length_batches_give_each_clip_its_own_features(corpus, wavlm_cache):
    root, _ = corpus
    spec, path = wavlm_cache
    batched = store.load_cache(path)
    samples = batched.manifest["samples"]
    assert max(np.unique(samples, return_counts=True)[1]) >= 3  # some batches really held several clips
    [single] = extraction.extract(root / "AudioWAV", root / "one-by-one", spec, folds=[FOLD], clips="present", device="cpu",
                                  feature_normalize=True, batch_clips=1, progress=False)
    np.testing.assert_allclose(store.load_cache(single).means, batched.means, rtol=1e-4, atol=1e-5)
    assert samples == sorted(samples)  # length-sorted


def test_waveform_normalisation_is_bitwise_the_s3prl_path_s(corpus):
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import ClipDataset

    root, clips = corpus
    norm = fold_normalisation(root / "AudioWAV", clips, FOLD)
    config = argparse.Namespace(audio_dir=root / "AudioWAV", max_seconds=None)
    dataset = ClipDataset(config, clips, np.zeros((len(clips), 6), np.float32), {"mean": norm.mean, "std": norm.std})
    from s3prl_stimulus.audio import clip_path, read_clip

    for i, clip in enumerate(clips[:3]):
        ours = norm.apply(read_clip(clip_path(root / "AudioWAV", clip)))
        assert ours.dtype == np.float32 and np.array_equal(ours, dataset[i][0])


def test_manifest_key_covers_every_setting_and_a_mismatch_is_refused(corpus, wavlm_cache):
    root, _ = corpus
    spec, path = wavlm_cache
    manifest = read_manifest(path)
    assert set(KEY_FIELDS) <= set(manifest) and manifest["key"] == manifest_key(manifest)
    assert manifest["upstream"]["weights_sha256"] and manifest["normalisation"]["mean"] is not None
    # same --out, other fold statistics: the fold2 directory is new; same directory with other stats is refused
    other = json.loads((path / MANIFEST).read_text())
    other["normalisation"]["mean"] += 1e-3
    other["key"] = manifest_key(other)
    with pytest.raises(StimulusError, match=r"other settings \(normalisation.mean"):
        extraction.prepare_cache_dir(path, other)
    with pytest.raises(StimulusError, match="other settings.*upstream.weights_sha256"):
        extraction.extract(root / "AudioWAV", root / "out", UpstreamSpec("wavlm_local", ckpt=str(make_other_wavlm(root))),
                           folds=[FOLD], clips="present", device="cpu", feature_normalize=True, progress=False,
                           name="wavlm_local")


def make_other_wavlm(root: Path) -> Path:
    from s3prl_stimulus.testing import make_tiny_wavlm

    return make_tiny_wavlm(root / "other.pt", seed=1)


@pytest.fixture()
def fbank_out(corpus, tmp_path):
    root, _ = corpus
    return root / "AudioWAV", tmp_path / "out", UpstreamSpec("fbank")


def test_killed_extraction_resumes_without_recomputing_finished_chunks(fbank_out, monkeypatch):
    audio_dir, out, spec = fbank_out
    real_write = extraction._write_encoded_chunk
    written = []

    def write_two_then_die(cache_dir, index, clips, parts):
        if len(written) == 2:
            (Path(cache_dir) / store.CHUNKS / ".chunk-00002.npz.x.tmp").write_bytes(b"half")  # what SIGKILL leaves
            raise KeyboardInterrupt
        written.append(index)
        real_write(cache_dir, index, clips, parts)

    monkeypatch.setattr(extraction, "_write_encoded_chunk", write_two_then_die)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", chunk_clips=3, progress=False)
    path = out / "fbank" / f"fold{FOLD}"
    with pytest.raises(StimulusError, match="unfinished.*rerun the same"):
        store.load_cache(path)
    resumed = []
    monkeypatch.setattr(extraction, "_write_encoded_chunk", lambda d, i, c, p: (resumed.append(i), real_write(d, i, c, p)))
    extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", chunk_clips=3, progress=False)
    assert written == [0, 1] and resumed == [2, 3]
    assert not list((path / store.CHUNKS).glob(".*.tmp"))
    loaded = store.load_cache(path)
    assert len(loaded.clips) == 12 and np.isfinite(loaded.means).all()
    resumed.clear()
    extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", chunk_clips=3, progress=False)
    assert resumed == []  # complete: nothing recomputed


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_corrupt_or_truncated_chunk_is_refused_then_repaired(fbank_out, damage):
    audio_dir, out, spec = fbank_out
    [path] = extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", chunk_clips=4, progress=False)
    before = store.load_cache(path).means.copy()
    chunk = store.chunk_path(path, 1)
    data = bytearray(chunk.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    chunk.write_bytes(bytes(data))
    with pytest.raises(StimulusError, match=r"chunk-00001.npz is corrupt or truncated.*rerun"):
        store.load_cache(path)
    extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", chunk_clips=4, progress=False)
    np.testing.assert_array_equal(store.load_cache(path).means, before)


def test_disk_full_is_a_clear_error_and_leaves_no_finished_looking_output(fbank_out, monkeypatch):
    audio_dir, out, spec = fbank_out

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", no_space)
    with pytest.raises(StimulusError, match="disk full while writing .*chunk-00000.npz.*rerun the same command"):
        extraction.extract(audio_dir, out, spec, folds=[FOLD], clips="present", device="cpu", progress=False)
    path = out / "fbank" / f"fold{FOLD}"
    assert not (path / store.COMPLETE).exists() and not list((path / store.CHUNKS).iterdir())


def test_bad_requests_are_one_line_errors(fbank_out, tmp_path):
    audio_dir, out, spec = fbank_out
    cases = [
        (dict(spec=UpstreamSpec("wavlm_larg")), "unknown upstream 'wavlm_larg' \\(did you mean wavlm_large"),
        (dict(spec=UpstreamSpec("wavlm_local", ckpt=str(tmp_path / "no.pt"))), "needs a local checkpoint"),
        (dict(clips="all"), "CREMA-D clips are missing .*--clips present"),
        (dict(dtype="fp16"), "unknown --dtype"),
        (dict(folds=[6]), "unknown fold"),
        (dict(device="cuda"), "no CUDA GPU: pass --device cpu"),
    ]
    for change, message in cases:
        options = dict(spec=spec, folds=[FOLD], clips="present", device="cpu", progress=False) | change
        with pytest.raises(StimulusError, match=message) as error:
            extraction.extract(audio_dir, out, options.pop("spec"), **options)
        assert "\n" not in str(error.value)
    (tmp_path / "notacache" / "none").mkdir(parents=True)
    (tmp_path / "notacache" / "none" / "x.txt").write_text("x")
    with pytest.raises(StimulusError, match="is not a feature cache"):
        extraction.extract(audio_dir, tmp_path, spec, folds=[FOLD], clips="present", device="cpu", name="notacache",
                           normalisation="none", progress=False)


def test_bf16_extraction_runs_and_stays_close_to_fp32(fbank_out, corpus, wavlm_cache):
    root, _ = corpus
    spec, path = wavlm_cache
    [bf16] = extraction.extract(root / "AudioWAV", root / "bf16", spec, folds=[FOLD], clips="present", device="cpu",
                                dtype="bf16", progress=False)
    reference, ours = store.load_cache(path), store.load_cache(bf16)
    assert ours.manifest["dtype"] == "bf16" and ours.manifest["key"] != reference.manifest["key"]
    assert ours.means.dtype == np.float32
    scale = np.abs(reference.means).max()
    assert 0 < np.abs(ours.means - reference.means).max() < 0.05 * scale


def test_extract_cli_writes_caches_and_reports_errors_in_one_line(fbank_out, capsys):
    from s3prl_stimulus.cli import main

    audio_dir, out, _ = fbank_out
    base = ["extract", "--corpus", str(audio_dir), "--out", str(out), "--clips", "present", "--device", "cpu", "--no-progress"]
    assert main(base + ["-u", "fbank", "--normalisation", "none", "--name", "plain-fbank"]) == 0
    assert "cache complete: " in capsys.readouterr().out
    loaded = store.load_cache(out / "plain-fbank" / "none")
    assert loaded.normalisation.kind == "none" and loaded.means.shape == (12, 1, 240) and loaded.manifest["name"] == "plain-fbank"
    assert main(base + ["-u", "fbank", "--max-seconds", "ten"]) == 2
    assert capsys.readouterr().err.splitlines()[-1].startswith("error: --max-seconds 'ten'")


def test_extract_warns_like_the_downstream_when_clips_are_left_out(fbank_out, tmp_path, capsys):
    audio_dir, _, _ = fbank_out
    chosen = extraction.select_clips(audio_dir, "present")
    warning = capsys.readouterr().err
    assert len(chosen) == 12
    assert "[extract] WARNING: --clips present: encoding 12 of 7442 CREMA-D clips; 7430 clips LEFT OUT" in warning
    assert "not comparable with the full corpus" in warning
    listing = tmp_path / "clips.txt"
    listing.write_text("\n".join(chosen[:5]))
    assert extraction.select_clips(audio_dir, str(listing)) == chosen[:5]
    assert f"--clips {listing}: encoding 5 of 7442 CREMA-D clips; 7437 clips LEFT OUT" in capsys.readouterr().err
    extraction.select_clips(audio_dir, chosen[:3])
    assert "--clips a list of 3: encoding 3 of 7442" in capsys.readouterr().err


def test_extract_warns_when_k_goes_to_an_entry_that_drops_it(fbank_out, capsys):
    audio_dir, out, _ = fbank_out
    extraction.extract(audio_dir, out, UpstreamSpec("fbank", ckpt="/models/unused.pt"), normalisation="none",
                       clips="present", device="cpu", progress=False)
    assert ("[extract] WARNING: -k /models/unused.pt is ignored: fbank is computed from the waveform and has no "
            "weights; drop -k") in capsys.readouterr().err


def test_sigkill_mid_extraction_then_the_same_command_gives_the_uninterrupted_cache(corpus, tmp_path):
    """Fault injection with a real kill: what is on disk then is all a rerun has."""
    import json
    import signal
    import subprocess
    import sys
    import time

    root, _ = corpus

    def command(out: Path) -> list:
        return [sys.executable, "-m", "s3prl_stimulus", "extract", "--corpus", str(root / "AudioWAV"), "--out", str(out),
                "-u", "wavlm_local", "-k", str(root / "wavlm.pt"), "--folds", str(FOLD), "--clips", "present",
                "--device", "cpu", "--chunk-clips", "1", "--batch-clips", "1"]

    assert subprocess.run(command(tmp_path / "whole"), capture_output=True, timeout=600).returncode == 0
    chunks = tmp_path / "killed" / "wavlm_local" / f"fold{FOLD}" / store.CHUNKS
    process = subprocess.Popen(command(tmp_path / "killed"), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def chunks_written() -> int:
        return len(list(chunks.glob("*.json"))) if chunks.exists() else 0

    while process.poll() is None and chunks_written() < 2:
        time.sleep(0.002)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL, "extraction finished before it could be killed"
    assert 2 <= chunks_written() < 12
    assert subprocess.run(command(tmp_path / "killed"), capture_output=True, timeout=600).returncode == 0
    whole = store.load_cache(tmp_path / "whole" / "wavlm_local" / f"fold{FOLD}")
    killed = store.load_cache(tmp_path / "killed" / "wavlm_local" / f"fold{FOLD}")
    assert list(killed.clips) == list(whole.clips) and killed.manifest == whole.manifest
    np.testing.assert_array_equal(killed.means, whole.means)
    a, b = (json.loads((p / "wavlm_local" / f"fold{FOLD}" / "complete.json").read_text())
            for p in (tmp_path / "whole", tmp_path / "killed"))
    assert a["key"] == b["key"]  # (its timings differ between any two extractions)
    assert not [p for p in (tmp_path / "killed").rglob("*") if p.name.endswith(".tmp")]
