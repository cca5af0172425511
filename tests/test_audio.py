"""s3prl_stimulus.audio: clip reading, corpus scan, streaming waveform statistics."""

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from s3prl_stimulus import audio
from s3prl_stimulus.errors import StimulusError

GOOD = ["1001_DFA_ANG_XX", "1001_DFA_DIS_XX", "1001_DFA_FEA_XX"]


def write_wav(path: Path, samples, rate=16000, subtype="PCM_16") -> Path:
    sf.write(path, samples, rate, subtype=subtype)
    return path


def pcm(n, seed=0, channels=None) -> np.ndarray:
    shape = (n,) if channels is None else (n, channels)
    return np.random.default_rng(seed).integers(-20000, 20000, size=shape).astype(np.int16)


@pytest.fixture()
def corpus(tmp_path) -> Path:
    """Three good clips plus one of each kind of bad file, all with CREMA-D names."""
    for i, clip in enumerate(GOOD):
        write_wav(tmp_path / f"{clip}.wav", pcm(1600 + 37 * i, seed=i))
    (tmp_path / "1002_DFA_ANG_XX.wav").write_bytes(b"not a wav file at all" * 4)  # unreadable
    (tmp_path / "1002_DFA_DIS_XX.wav").write_bytes(b"")  # 0-byte: interrupted download
    write_wav(tmp_path / "1002_DFA_FEA_XX.wav", pcm(0))  # valid header, no samples
    write_wav(tmp_path / "1002_DFA_HAP_XX.wav", pcm(800, channels=2))  # stereo
    write_wav(tmp_path / "1002_DFA_NEU_XX.wav", pcm(800), rate=8000)  # wrong rate
    write_wav(tmp_path / "1002_DFA_SAD_XX.wav", pcm(800).astype(np.float32) / 32768, subtype="FLOAT")
    return tmp_path


def test_read_clip_scales_pcm16_to_float32(tmp_path):
    samples = pcm(1234, seed=3)
    values = audio.read_clip(write_wav(tmp_path / "a.wav", samples))
    assert values.dtype == np.float32 and values.shape == (1234,)
    np.testing.assert_array_equal(values, samples.astype(np.float32) / 32768)
    np.testing.assert_array_equal(values, sf.read(tmp_path / "a.wav", dtype="float32")[0])
    # Anything the fast reader does not take goes to libsndfile, which names what the file is
    sf.write(tmp_path / "x.wav", samples, 16000, format="WAVEX", subtype="PCM_16")
    with pytest.raises(StimulusError, match="x.wav is WAVEX/PCM_16"):
        audio.read_clip(tmp_path / "x.wav")


@pytest.mark.parametrize(
    "name, fragment",
    [
        ("1009_DFA_ANG_XX", "missing"),
        ("1002_DFA_ANG_XX", "cannot read"),
        ("1002_DFA_DIS_XX", "cannot read"),
        ("1002_DFA_FEA_XX", "0 samples"),
        ("1002_DFA_HAP_XX", "2 channel(s)"),
        ("1002_DFA_NEU_XX", "8000 Hz"),
        ("1002_DFA_SAD_XX", "WAV/FLOAT"),
    ],
)
def test_read_clip_rejects_bad_files_with_the_file_and_the_fix(corpus, name, fragment):
    with pytest.raises(StimulusError) as error:
        audio.read_clip(corpus / f"{name}.wav")
    message = str(error.value)
    assert name in message and fragment in message and "\n" not in message
    assert "s3prl-stimulus download" in message or "ffmpeg" in message


def test_scan_corpus_lists_every_problem_with_counts(corpus):
    clips = GOOD + ["1009_DFA_ANG_XX", "1009_DFA_DIS_XX"] + [f"1002_DFA_{e}_XX" for e in ("ANG", "DIS", "FEA", "HAP", "NEU", "SAD")]
    report = audio.scan_corpus(corpus, clips)
    assert report.counts() == {"missing": 2, "unreadable": 1, "empty": 2, "stereo": 1, "wrong_rate": 1, "wrong_format": 1}
    assert report.problems["empty"] == ["1002_DFA_DIS_XX", "1002_DFA_FEA_XX"]
    assert report.frames == {clip: 1600 + 37 * i for i, clip in enumerate(GOOD)}
    assert len(report.bad_clips) == 8 and not report.ok
    with pytest.raises(StimulusError) as error:
        report.raise_if_bad()
    message = str(error.value)
    assert message.startswith(f"8 of 11 clips in {corpus} are bad: 2 missing (e.g. 1009_DFA_ANG_XX.wav)")
    assert "1 wrong-rate (e.g. 1002_DFA_NEU_XX.wav)" in message and "\n" not in message
    assert "missing files: get CREMA-D" in message and "other files: expected 16 kHz mono 16-bit PCM WAV, convert with `ffmpeg" in message


def test_scan_of_only_missing_files_suggests_present_subset(corpus):
    report = audio.scan_corpus(corpus, GOOD + ["1009_DFA_ANG_XX"])
    with pytest.raises(StimulusError, match=r"1 missing .*; missing files: get CREMA-D.*s3prl-stimulus download --to DIR` \(it resumes\)$"):
        report.raise_if_bad()
    with pytest.raises(StimulusError, match=r"missing files: use datarc.clips=present$"):
        report.raise_if_bad(missing_fix="use datarc.clips=present")
    audio.scan_corpus(corpus, GOOD).raise_if_bad()  # all good: no error
    assert audio.present_clips(corpus, ["1009_DFA_ANG_XX", GOOD[1]]) == [GOOD[1]]


def test_check_corpus_dir(tmp_path, corpus):
    assert audio.check_corpus_dir(corpus) == corpus
    with pytest.raises(StimulusError, match="audio_dir is not set: get CREMA-D.*s3prl-stimulus download"):
        audio.check_corpus_dir(None)
    with pytest.raises(StimulusError, match="is not a directory"):
        audio.check_corpus_dir(tmp_path / "nowhere")
    other = tmp_path / "root"
    (other / "AudioWAV").mkdir(parents=True)
    write_wav(other / "speech.wav", pcm(100))
    with pytest.raises(StimulusError, match=r"no CREMA-D clips named like .*did you mean .*AudioWAV"):
        audio.check_corpus_dir(other, option="datarc.audio_dir")


def test_waveform_stats_match_the_concatenated_corpus(corpus):
    paths = [corpus / f"{clip}.wav" for clip in GOOD]
    stats = audio.waveform_stats(paths)
    everything = np.concatenate([audio.read_clip(p).astype(np.float64) for p in paths])
    assert stats["n_clips"] == 3 and stats["n_samples"] == everything.size == 3 * 1600 + 37 * 3
    assert stats["mean"] == pytest.approx(everything.mean(), rel=1e-12, abs=1e-15)
    assert stats["std"] == pytest.approx(everything.std(), rel=1e-12)
    # The authors' formula: sqrt(E[x^2] - E[x]^2) with population moments.
    assert stats["std"] == pytest.approx(np.sqrt(np.mean(everything**2) - everything.mean() ** 2), rel=1e-9)
    with pytest.raises(StimulusError, match="zero clips"):
        audio.waveform_stats([])
    with pytest.raises(StimulusError, match="stereo|2 channel"):
        audio.waveform_stats(paths + [corpus / "1002_DFA_HAP_XX.wav"])


def test_waveform_stats_json_round_trip_and_mismatch(tmp_path):
    path = tmp_path / "stats.json"
    stats = {"mean": -1.5e-4, "std": 0.07, "n_samples": 10, "n_clips": 2, "fold": 3, "clips_sha256": "ab"}
    audio.save_waveform_stats(path, stats)
    assert audio.load_waveform_stats(path, expect={"fold": 3}) == stats
    with pytest.raises(StimulusError, match=r"computed with fold=3, this run has 4: use a fresh expdir"):
        audio.load_waveform_stats(path, expect={"fold": 4})
    path.write_text("{broken")
    with pytest.raises(StimulusError, match="delete it to recompute"):
        audio.load_waveform_stats(path)
    assert audio.clips_fingerprint(["b", "a"]) == audio.clips_fingerprint(["a", "b"]) != audio.clips_fingerprint(["a"])


def test_read_clip_list(tmp_path):
    listing = tmp_path / "clips.txt"
    listing.write_text("# my subset\n1001_DFA_ANG_XX.wav\n\n1001_DFA_DIS_XX  # second\n1001_DFA_ANG_XX\n")
    assert audio.read_clip_list(listing) == ["1001_DFA_ANG_XX", "1001_DFA_DIS_XX"]
    with pytest.raises(StimulusError, match="datarc.clips=.*nowhere.txt is neither all, present nor a clip-list file"):
        audio.read_clip_list(tmp_path / "nowhere.txt", option="datarc.clips")


def half_of(path: Path) -> Path:
    """``path`` cut to half its bytes, header unchanged: what an interrupted copy leaves."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def test_truncated_wav_is_refused_by_every_path_that_reads_clips(corpus, tmp_path):
    from types import SimpleNamespace

    from s3prl_stimulus.cache.extraction import scan_clips
    from s3prl_stimulus.downstream.emotion_stimulus.dataset import check_audio
    from s3prl_stimulus.study.corpus import check_clip

    cut = half_of(corpus / f"{GOOD[1]}.wav")
    size = cut.stat().st_size
    with pytest.raises(StimulusError) as error:
        audio.read_clip(cut)  # libsndfile and wave alike would return the first half as a shorter clip
    message = str(error.value)
    assert GOOD[1] in message and "truncated" in message and "s3prl-stimulus download" in message and "\n" not in message
    declared, held = 2 * (1600 + 37), size - 44  # sf.write: 44-byte header, then the data chunk
    assert f"its data chunk declares {declared} bytes of samples but the file holds {held}" in message
    assert audio.truncation(corpus / f"{GOOD[0]}.wav") is None
    with pytest.raises(StimulusError, match=f"{GOOD[1]}.wav is truncated"):
        audio.waveform_stats([corpus / f"{c}.wav" for c in GOOD])
    report = audio.scan_corpus(corpus, GOOD)
    assert report.counts() == {"truncated": 1} and report.problems["truncated"] == [GOOD[1]]
    assert set(report.frames) == {GOOD[0], GOOD[2]}
    with pytest.raises(StimulusError, match=rf"1 truncated \(e.g. {GOOD[1]}.wav\).*truncated files: download again"):
        report.raise_if_bad()
    with pytest.raises(StimulusError, match=rf"1 of 3 clips .* 1 truncated \(e.g. {GOOD[1]}.wav\)"):
        check_audio(SimpleNamespace(audio_dir=corpus), {"train": GOOD, "dev": [], "test": []})  # the downstream
    listing = tmp_path / "clips.txt"
    listing.write_text("\n".join(GOOD))
    with pytest.raises(StimulusError, match=rf"1 truncated \(e.g. {GOOD[1]}.wav\)"):
        scan_clips(corpus, str(listing))  # extract
    # verify, even where the manifest's size is the cut file's: the header says more was there
    check = check_clip(corpus, GOOD[1], size, "0" * 64)
    assert (check.status, check.detail) == ("truncated", audio.truncation(cut)) and audio.truncation(cut) in message
