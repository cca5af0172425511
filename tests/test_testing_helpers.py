"""s3prl_stimulus.testing: tiny upstream checkpoints load through S3PRL's hub; generated corpora match CREMA-D."""

import numpy as np
import pytest
import soundfile as sf

from s3prl_stimulus import STIMULI, testing
from s3prl_stimulus.study.corpus import load_manifest
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.labels import binary_labels, load_votes
from s3prl_stimulus.partition import load_partition

CLIPS = ["1001_DFA_ANG_XX", "1091_WSI_SAD_XX", "1050_IEO_HAP_HI"]


@pytest.fixture(scope="module")
def hub():
    pytest.importorskip("s3prl")
    from s3prl_stimulus.integration.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    import s3prl.hub

    return s3prl.hub


def hidden_states(upstream, seconds=(2.0, 1.27)):
    import torch

    generator = torch.Generator().manual_seed(0)
    wavs = [torch.randn(int(s * 16000), generator=generator) for s in seconds]
    with torch.no_grad():
        return upstream.eval()(wavs)["hidden_states"]


@pytest.mark.parametrize("extractor_mode", ["layer_norm", "default"])
def test_tiny_wavlm_loads_through_s3prl_hub(hub, tmp_path, extractor_mode):
    path = testing.make_tiny_wavlm(tmp_path / "wavlm.pt", extractor_mode=extractor_mode, layers=3, dim=24)
    assert path.stat().st_size < 400_000
    upstream = hub.wavlm_local(ckpt=str(path))
    states = hidden_states(upstream)
    assert len(states) == 3 + 1
    assert upstream.get_downsample_rates("hidden_states") == 320
    # the real 320x conv stack: 2 s of audio -> 99 frames, as with released WavLM checkpoints
    assert all(tuple(s.shape) == (2, 99, 24) for s in states)
    assert upstream.model.cfg.extractor_mode == extractor_mode
    assert upstream.model.cfg.normalize == (extractor_mode == "layer_norm")


def test_tiny_wavlm_is_deterministic_by_seed(hub, tmp_path):
    import torch

    a = torch.load(testing.make_tiny_wavlm(tmp_path / "a.pt", seed=3))
    b = torch.load(testing.make_tiny_wavlm(tmp_path / "b.pt", seed=3))
    c = torch.load(testing.make_tiny_wavlm(tmp_path / "c.pt", seed=4))
    assert a["cfg"] == b["cfg"] and a["model"].keys() == b["model"].keys()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert not all(torch.equal(a["model"][k], c["model"][k]) for k in a["model"])
    before = torch.random.get_rng_state()
    testing.make_tiny_wavlm(tmp_path / "d.pt")
    assert torch.equal(before, torch.random.get_rng_state())  # the caller's RNG stream is untouched


@pytest.mark.parametrize("maker, name", [(testing.make_tiny_hubert, "hubert_local"), (testing.make_tiny_wav2vec2, "wav2vec2_local")])
def test_tiny_hubert_and_wav2vec2_load_through_s3prl_hub(hub, tmp_path, maker, name):
    path = maker(tmp_path / f"{name}.pt", layers=2, dim=32)
    states = hidden_states(getattr(hub, name)(ckpt=str(path)))
    assert len(states) == 3 and tuple(states[-1].shape) == (2, 99, 32)


def test_bad_tiny_upstream_arguments_are_refused(tmp_path):
    with pytest.raises(StimulusError, match="extractor_mode"):
        testing.make_tiny_wavlm(tmp_path / "x.pt", extractor_mode="group")
    assert not (tmp_path / "x.pt").exists()


def test_corpus_has_crema_d_names_lengths_and_format(tmp_path):
    paths = testing.make_corpus(tmp_path / "AudioWAV", CLIPS, seed=1)
    assert [p.name for p in paths] == [f"{c}.wav" for c in CLIPS]
    manifest = load_manifest()
    assert testing.clip_samples("1001_DFA_ANG_XX") == (72862 - 44) // 2 == 36409  # CREMA-D's file size
    for clip, path in zip(CLIPS, paths):
        info = sf.info(path)
        assert (info.samplerate, info.channels, info.subtype, info.format) == (16000, 1, "PCM_16", "WAV")
        assert info.frames == (manifest.loc[clip, "bytes"] - 44) // 2
        assert path.stat().st_size == manifest.loc[clip, "bytes"]  # same 44-byte header layout as CREMA-D
    assert sorted(p.name for p in (tmp_path / "AudioWAV").iterdir()) == sorted(f"{c}.wav" for c in CLIPS)


def test_corpus_matches_the_real_clip_length(tmp_path, shared_dir):
    real = sf.info(shared_dir / "crema_d" / "audio" / "1001_DFA_ANG_XX.wav")
    fake = sf.info(testing.make_corpus(tmp_path, ["1001_DFA_ANG_XX"])[0])
    assert (fake.frames, fake.samplerate, fake.channels) == (real.frames, real.samplerate, real.channels)


def test_corpus_is_deterministic_per_seed_and_clip(tmp_path):
    one = testing.make_corpus(tmp_path / "a", CLIPS, seed=5)
    two = testing.make_corpus(tmp_path / "b", CLIPS[::-1][:2], seed=5)  # other order and company
    other = testing.make_corpus(tmp_path / "c", CLIPS, seed=6)
    assert one[2].read_bytes() == two[0].read_bytes() and one[1].read_bytes() == two[1].read_bytes()
    assert one[0].read_bytes() != other[0].read_bytes()
    audio, _ = sf.read(one[0])
    assert 0.01 < audio.std() < 0.5 and abs(audio.mean()) < 0.01  # noise, not silence or clipping


def test_corpus_max_seconds_and_bad_names(tmp_path):
    short = testing.make_corpus(tmp_path, CLIPS, max_seconds=1.5)
    assert [sf.info(p).frames for p in short] == [24000, 24000, 24000]
    with pytest.raises(StimulusError, match="not a CREMA-D clip"):
        testing.make_corpus(tmp_path / "bad", ["1001_DFA_ANG_XX", "9999_XXX_ANG_XX"])
    assert not (tmp_path / "bad").exists()  # names checked before anything is written


def test_tiny_clip_subset_covers_the_splits_of_a_fold():
    partition = load_partition()
    clips = testing.tiny_clip_subset(6, fold=2, seed=0)
    assert len(clips) == len(set(clips)) == 18 and clips == sorted(clips)
    splits = partition.loc[clips, "fold2"]
    assert splits.value_counts().to_dict() == {"Train": 6, "Development": 6, "Test": 6}
    votes = load_votes("paper")
    for split in ("Train", "Development", "Test"):  # six clips: every acted emotion once ...
        members = list(splits.index[splits == split])
        assert {c.split("_")[2] for c in members} == {"ANG", "DIS", "FEA", "HAP", "NEU", "SAD"}
        for stimulus in STIMULI:  # ... and a positive of every class in every label set
            assert binary_labels(votes.subset(members).counts(stimulus)).sum(axis=0).min() >= 1, (split, stimulus)
    assert testing.tiny_clip_subset(6, fold=2, seed=0) == clips
    assert testing.tiny_clip_subset(6, fold=2, seed=1) != clips


def test_tiny_clip_subset_for_every_fold():
    partition = load_partition()
    clips = testing.tiny_clip_subset(2, fold=None)
    assert len(clips) == 10
    for k in range(1, 6):
        counts = partition.loc[clips, f"fold{k}"].value_counts().to_dict()
        assert counts == {"Train": 6, "Development": 2, "Test": 2}
    with pytest.raises(StimulusError):
        testing.tiny_clip_subset(0)
    with pytest.raises(StimulusError):
        testing.tiny_clip_subset(2, fold=6)
    assert np.all(np.isin(clips, partition.index))
