"""Audio input through soundfile: read a clip, scan a corpus directory, streaming waveform statistics.

CREMA-D's ``AudioWAV/`` holds 16 kHz, mono, 16-bit PCM WAV files named ``<clip>.wav``. Everything
here checks that format and refuses anything else with a one-line error that names the file and
the fix, rather than resampling silently: a wrong rate or channel count almost always means the
wrong folder or a broken download, and a silent resample would change the features.

- :func:`read_clip`: one clip as float32 in [-1, 1] (soundfile's scaling of 16-bit PCM, the same
  as librosa's, which the authors' EMO-SUPERB code used).
- :func:`truncation`: whether a WAV's data chunk declares more bytes than the file holds. Both
  libsndfile and the standard library silently read such a file as a shorter clip, so every
  reader here (and ``verify``) refuses it instead.
- :func:`scan_corpus`: reads only WAV headers, so checking all 7,442 clips takes about a second;
  the :class:`ScanReport` lists every missing, unreadable, empty, truncated, stereo, wrong-rate or
  wrong-format file with counts, before any training starts.
- :func:`check_corpus_dir`: a directory that holds no file named like a CREMA-D clip.
- :func:`waveform_stats`: mean and standard deviation of every sample of a set of clips in one
  streaming pass with float64 accumulators (the corpus is never held in memory). The paper
  normalises waveforms with these statistics over the fold's training clips:
  ``(x - mean) / (std + 1e-6)``, std being the population (ddof=0) deviation.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import wave
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import soundfile as sf

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import write_json_atomic

SAMPLE_RATE = 16000
CHANNELS = 1
SUBTYPE = "PCM_16"
SUFFIX = ".wav"
CLIP_NAME = re.compile(r"^\d{4}_[A-Z]{3}_[A-Z]{3}_[A-Z0-9]{2}$")
"""CREMA-D clip names: actor, sentence, emotion, level, e.g. ``1001_DFA_ANG_XX``."""

GET_CREMA_D = "get CREMA-D's AudioWAV folder with `s3prl-stimulus download --to DIR`"
CONVERT = "convert with `ffmpeg -i IN -ar 16000 -ac 1 -c:a pcm_s16le OUT.wav` or download CREMA-D again"
REFETCH = "download again with `s3prl-stimulus download --to DIR` (it replaces files of the wrong size)"

PROBLEMS = ("missing", "unreadable", "empty", "truncated", "stereo", "wrong_rate", "wrong_format")
"""Kinds of bad file :func:`scan_corpus` reports, in reporting order."""


def clip_path(audio_dir: str | os.PathLike, clip: str) -> Path:
    """``audio_dir/<clip>.wav``."""
    return Path(audio_dir) / f"{clip}{SUFFIX}"


# --- one clip -----------------------------------------------------------------------------------


def _format_problems(info) -> list[str]:
    """Kinds of problem (see :data:`PROBLEMS`) of a readable file's header."""
    problems = []
    if info.frames == 0:
        problems.append("empty")
    if info.channels != CHANNELS:
        problems.append("stereo")
    if info.samplerate != SAMPLE_RATE:
        problems.append("wrong_rate")
    if info.format != "WAV" or info.subtype != SUBTYPE:
        problems.append("wrong_format")
    return problems


def _describe(info) -> str:
    return f"{info.format}/{info.subtype}, {info.channels} channel(s), {info.samplerate} Hz, {info.frames} samples"


def truncation(path: str | os.PathLike) -> str | None:
    """What is cut off when ``path`` is a RIFF/WAVE file whose ``data`` chunk declares more bytes than
    follow it in the file (a partial copy or download with its header intact); None otherwise.

    Files that are not RIFF/WAVE, or have no data chunk, are left to the readers, which say what they are.
    """
    with open(path, "rb") as raw:
        return _truncation(raw)


def _truncation(raw) -> str | None:
    """:func:`truncation` of an open binary file (read from its start)."""
    size = os.fstat(raw.fileno()).st_size
    raw.seek(0)
    if raw.read(12)[8:12] != b"WAVE":
        return None
    offset = 12
    while offset + 8 <= size:
        raw.seek(offset)
        header = raw.read(8)
        declared = int.from_bytes(header[4:8], "little")
        if header[:4] == b"data":
            held = size - offset - 8
            return None if declared <= held else f"its data chunk declares {declared} bytes of samples but the file holds {held}"
        offset += 8 + declared + (declared & 1)  # RIFF chunks are padded to an even size
    return None


def _truncated_error(path, problem: str) -> StimulusError:
    return StimulusError(f"audio file {path} is truncated ({problem}): {REFETCH}, or leave the clip out "
                         "with a clip list (datarc.clips / --clips FILE)")


def read_clip(path: str | os.PathLike) -> np.ndarray:
    """Samples of a 16 kHz mono 16-bit PCM WAV as a 1-D float32 array in [-1, 1].

    Any other file (missing, unreadable, empty, truncated, several channels, another rate or
    encoding) is a :class:`StimulusError` naming the file and the fix.
    """
    path = Path(path)
    if not path.is_file():
        raise StimulusError(f"audio file {path} is missing: {GET_CREMA_D}")
    pcm = _read_plain_pcm16(path)
    if pcm is None:
        pcm = _read_with_soundfile(path)
    # int16 -> float32 times 2**-15 is exact and equals soundfile's own float32 scaling.
    samples = pcm.astype(np.float32)
    samples *= np.float32(1.0 / 32768)
    return samples


def _read_plain_pcm16(path: Path) -> np.ndarray | None:
    """The expected format through the standard library's ``wave`` (~2.5x faster than libsndfile per
    clip, which matters on S3PRL's training hot path); None for anything else, left to soundfile.

    A truncated file of any format is refused here, on the handle already open (cheaper than a second open).
    """
    try:
        with open(path, "rb") as raw:
            problem = _truncation(raw)
            if problem:
                raise _truncated_error(path, problem)
            raw.seek(0)
            header = raw.read(22)
            # Plain PCM only (format tag 1 in the leading fmt chunk), the one layout the corpus check
            # accepts; newer Pythons' wave also reads WAVE_FORMAT_EXTENSIBLE, which it refuses.
            if header[:4] != b"RIFF" or header[8:16] != b"WAVEfmt " or header[20:22] != b"\x01\x00":
                return None
            raw.seek(0)
            with wave.open(raw, "rb") as handle:
                expected = (handle.getframerate(), handle.getnchannels(), handle.getsampwidth()) == (SAMPLE_RATE, 1, 2)
                if not expected or handle.getnframes() == 0:
                    return None
                return np.frombuffer(handle.readframes(handle.getnframes()), dtype="<i2")
    except (wave.Error, EOFError, OSError, ValueError):
        return None


def _read_with_soundfile(path: Path) -> np.ndarray:
    """Read through libsndfile, which also describes whatever else the file is in the error."""
    try:
        with sf.SoundFile(path) as handle:
            problems = _format_problems(handle)
            if problems:
                raise StimulusError(
                    f"audio file {path} is {_describe(handle)}; expected 16 kHz mono 16-bit PCM WAV with samples: {CONVERT}"
                )
            return handle.read(dtype="int16", always_2d=False)
    except sf.SoundFileError as err:
        raise StimulusError(f"cannot read audio file {path} ({err}): {CONVERT}") from None


# --- a whole corpus -----------------------------------------------------------------------------


@dataclass
class ScanReport:
    """What :func:`scan_corpus` found: per problem kind, the clips that have it; frames of good clips."""

    audio_dir: Path
    n_clips: int
    problems: dict = field(default_factory=lambda: {kind: [] for kind in PROBLEMS})
    frames: dict = field(default_factory=dict)  # clip -> number of samples, for good clips

    @property
    def ok(self) -> bool:
        return not any(self.problems.values())

    @property
    def bad_clips(self) -> list[str]:
        return sorted({clip for clips in self.problems.values() for clip in clips})

    def counts(self) -> dict:
        return {kind: len(clips) for kind, clips in self.problems.items() if clips}

    def summary(self) -> str:
        """One line: counts per problem with an example file each."""
        parts = [f"{len(clips)} {kind.replace('_', '-')} (e.g. {clips[0]}{SUFFIX})"
                 for kind, clips in self.problems.items() if clips]
        return f"{len(self.bad_clips)} of {self.n_clips} clips in {self.audio_dir} are bad: " + ", ".join(parts)

    def raise_if_bad(self, missing_fix: str = f"{GET_CREMA_D} (it resumes)") -> None:
        """One-line :class:`StimulusError` listing every problem; ``missing_fix``: advice for missing files."""
        if self.ok:
            return
        fixes = [f"missing files: {missing_fix}"] if self.problems["missing"] else []
        if self.problems["truncated"]:
            fixes.append(f"truncated files: {REFETCH}")
        if any(clips for kind, clips in self.problems.items() if kind not in ("missing", "truncated")):
            fixes.append(f"other files: expected 16 kHz mono 16-bit PCM WAV, {CONVERT}")
        raise StimulusError(f"{self.summary()}; {'; '.join(fixes)}")


def scan_corpus(audio_dir: str | os.PathLike, clips: Iterable[str]) -> ScanReport:
    """Check ``audio_dir/<clip>.wav`` for every clip by reading WAV headers only (fast)."""
    audio_dir = Path(audio_dir)
    clips = list(clips)
    present = _wav_names(audio_dir)
    report = ScanReport(audio_dir, len(clips))
    for clip in clips:
        if clip not in present:
            report.problems["missing"].append(clip)
            continue
        path = clip_path(audio_dir, clip)
        if path.stat().st_size == 0:
            report.problems["empty"].append(clip)
            continue
        try:
            info = sf.info(str(path))
        except (sf.SoundFileError, RuntimeError):
            report.problems["unreadable"].append(clip)
            continue
        if truncation(path):  # libsndfile reports the frames present, as if the clip were shorter
            report.problems["truncated"].append(clip)
            continue
        problems = _format_problems(info)
        for kind in problems:
            report.problems[kind].append(clip)
        if not problems:
            report.frames[clip] = int(info.frames)
    return report


def _wav_names(audio_dir: Path) -> set[str]:
    """Stems of the ``*.wav`` files in ``audio_dir`` (one directory listing instead of a stat per clip)."""
    with os.scandir(audio_dir) as entries:
        return {e.name[: -len(SUFFIX)] for e in entries if e.name.endswith(SUFFIX)}


def check_corpus_dir(audio_dir: str | os.PathLike | None, option: str = "audio_dir") -> Path:
    """``audio_dir`` as a Path after checking it is a directory holding CREMA-D-named WAVs.

    ``option`` names the setting in the error message (e.g. ``datarc.audio_dir``).
    """
    if audio_dir is None or str(audio_dir).strip() in ("", "None", "null"):
        raise StimulusError(f"{option} is not set: {GET_CREMA_D} and set {option}=DIR/AudioWAV")
    path = Path(audio_dir).expanduser()
    if not path.is_dir():
        raise StimulusError(f"{option} {path} is not a directory: {GET_CREMA_D} and point {option} at its AudioWAV folder")
    if not any(CLIP_NAME.match(name) for name in _wav_names(path)):
        hint = f" (did you mean {path / 'AudioWAV'}?)" if (path / "AudioWAV").is_dir() else ""
        raise StimulusError(
            f"{option} {path} holds no CREMA-D clips named like 1001_DFA_ANG_XX.wav{hint}: "
            f"point it at CREMA-D's AudioWAV folder ({GET_CREMA_D})"
        )
    return path


def read_clip_list(path: str | os.PathLike, option: str = "--clips") -> list[str]:
    """Clip names from a text file, one per line (``.wav`` optional; blank lines and ``#`` comments
    ignored), in file order without repeats. ``option`` names the setting in the error."""
    path = Path(path)
    if not path.is_file():
        raise StimulusError(f"{option}={path} is neither all, present nor a clip-list file: "
                            "give a text file with one CREMA-D clip name per line")
    items = [line.split("#", 1)[0].strip() for line in path.read_text(encoding="utf-8").splitlines()]
    return list(dict.fromkeys(Path(item).name.removesuffix(".wav") for item in items if item))


def present_clips(audio_dir: str | os.PathLike, clips: Iterable[str]) -> list[str]:
    """The ``clips`` whose WAV file exists in ``audio_dir`` (order kept)."""
    present = _wav_names(Path(audio_dir))
    return [c for c in clips if c in present]


# --- waveform statistics ------------------------------------------------------------------------


STD_EPSILON = 1e-6  # the authors' (EMO-SUPERB's) guard in (x - mean) / (std + 1e-6)


def normalise_waveform(samples: np.ndarray, mean: float, std: float) -> np.ndarray:
    """The paper's waveform normalisation ``(x - mean) / (std + 1e-6)``, float32 in, float32 out.

    One definition for the S3PRL path and the feature cache, so both round identically
    (NumPy 2 keeps float32 with Python-float operands).
    """
    return ((samples - mean) / (std + STD_EPSILON)).astype(np.float32, copy=False)


def waveform_stats(paths: Sequence[str | os.PathLike]) -> dict:
    """Mean and population std of every sample of ``paths`` in one streaming pass.

    Per clip, the mean and sum of squared deviations are computed in float64 and merged with
    Chan et al.'s parallel update, which equals E[x²] − E[x]² in exact arithmetic without its
    cancellation. Only one clip is in memory at a time.
    """
    count, mean, squares = 0, 0.0, 0.0
    for path in paths:
        samples = read_clip(path).astype(np.float64)
        n = samples.size
        clip_mean = float(samples.mean())
        clip_squares = float(np.square(samples - clip_mean).sum())
        total = count + n
        delta = clip_mean - mean
        mean += delta * n / total
        squares += clip_squares + delta * delta * count * n / total
        count = total
    if count == 0:
        raise StimulusError("cannot compute waveform statistics of zero clips: give at least one training clip")
    return {"mean": mean, "std": math.sqrt(squares / count), "n_samples": count, "n_clips": len(paths)}


def clips_fingerprint(clips: Iterable[str]) -> str:
    """SHA-256 of the sorted clip names: identifies the clip set statistics were computed on."""
    return hashlib.sha256("\n".join(sorted(clips)).encode()).hexdigest()


def save_waveform_stats(path: str | os.PathLike, stats: dict) -> None:
    """Write statistics (plus any metadata keys) as JSON, atomically."""
    write_json_atomic(path, stats)


def load_waveform_stats(path: str | os.PathLike, expect: dict | None = None) -> dict:
    """Read statistics written by :func:`save_waveform_stats`; ``expect``: metadata that must match."""
    path = Path(path)
    try:
        stats = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise StimulusError(f"cannot read waveform statistics {path} ({err}): delete it to recompute") from None
    bad = [k for k in ("mean", "std", "n_samples", "n_clips") if not isinstance(stats.get(k), (int, float))]
    if bad or not math.isfinite(stats["mean"]) or not stats["std"] > 0:
        raise StimulusError(f"waveform statistics {path} lack a finite mean and positive std: delete it to recompute")
    for key, value in (expect or {}).items():
        if stats.get(key) != value:
            raise StimulusError(
                f"waveform statistics {path} were computed with {key}={stats.get(key)!r}, this run has {value!r}: "
                "use a fresh expdir, or delete the file to recompute"
            )
    return stats
