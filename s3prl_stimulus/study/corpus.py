"""CREMA-D's ``AudioWAV`` corpus: download it and verify it against the packaged manifest.

The 7,442 clips are stored with Git LFS in CREMA-D's GitHub repository; their bytes are served at
``media.githubusercontent.com`` (``raw.githubusercontent.com`` serves ~130-byte LFS pointer
stubs instead, a classic way to end up with "WAV" files that are text). The packaged manifest
``audiowav_manifest.csv.gz`` gives every clip's size and SHA-256, taken from those LFS pointers, so a
download is checked byte for byte without trusting the server.

Downloading (:func:`download_corpus`) is parallel (threads), resumable and never leaves a
half-written file under its final name: bytes go to ``.<clip>.wav.part`` beside the target, a
rerun continues a partial file with an HTTP ``Range`` request, and only a file whose size and
SHA-256 match is renamed to ``<clip>.wav``. Files already present and correct are skipped; wrong
ones are fetched again.

Verification (:func:`verify_corpus`) checks presence, size, a data chunk as long as its header declares
(:func:`s3prl_stimulus.audio.truncation`, as every clip reader), checksum and format (16 kHz, mono,
16-bit PCM WAV) and *flags* clips without dropping them: clips whose audio is (near) silent,
measured on the file (RMS below :data:`SILENCE_DBFS`), and clips with problems reported by others
(:data:`KNOWN_ISSUES`). CREMA-D publishes no errata list; what is known comes from its users:

- ``1076_MTI_SAD_XX``: the clip most often excluded from CREMA-D audio pipelines, described as
  having no audio (silent / near-empty). Public SER and audio-visual preprocessing scripts skip it
  by name, some citing the dataset authors.
- ``1076_MTI_NEU_XX``: described as near-empty alongside 1076_MTI_SAD_XX; its video has only a few
  frames.
- ``1064_TIE_SAD_XX``: described as having "no duration"; its video has ~18 frames.
- ``1064_IEO_DIS_MD``: the source recording is a long take with every emotion of the sentence
  (its video has over 1,000 frames); the AudioWAV file is 4.1 s by the manifest.

Sources (third-party, not CREMA-D's own word): several public CREMA-D data-ingest
and preprocessing repositories list exactly these four clips as broken upstream (one data README
verified its audio byte-identical to the official LFS objects and keeps the clips, flagged);
CREMA-D issue #13 (github.com/CheyneyComputerScience/CREMA-D/issues/13) reports blank files among
the ``AudioMP3`` copies, with the maintainer recommending the WAVs. Because the reports concern
the video/MP3 renderings as much as the WAVs, ``verify`` measures silence itself and reports both.
"""

from __future__ import annotations

import concurrent.futures
import http.client
import math
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import pandas as pd

from s3prl_stimulus.audio import read_clip_list, truncation
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import sha256_file
from s3prl_stimulus.progress import duration
from s3prl_stimulus.resources import packaged_file

DEFAULT_BASE_URL = "https://media.githubusercontent.com/media/CheyneyComputerScience/CREMA-D/master/AudioWAV/"
SAMPLE_RATE = 16000
CHANNELS = 1
SUBTYPE = "PCM_16"
SILENCE_DBFS = -60.0
"""A clip whose RMS level is below this (dB relative to full scale) is flagged as silent; speech in
CREMA-D sits tens of dB above it."""

KNOWN_ISSUES = {
    "1076_MTI_SAD_XX": "reported silent / no audio by CREMA-D users",
    "1076_MTI_NEU_XX": "reported near-empty by CREMA-D users (video has a few frames)",
    "1064_TIE_SAD_XX": "reported to have no duration by CREMA-D users (video ~18 frames)",
    "1064_IEO_DIS_MD": "source take reported to contain every emotion of the sentence (video >1,000 frames)",
}
"""Clips reported broken by CREMA-D users (see the module docstring for sources). Flagged, never dropped."""

PART_SUFFIX = ".part"
LFS_POINTER_PREFIX = b"version https://git-lfs"
RETRY_BACKOFF_S = 0.5
"""First pause before a retry; it doubles per attempt, up to 8 s."""
UNREACHABLE_AFTER = 8
"""Connection failures in a row, without the host answering once in between, after which the whole
download stops: the host is unreachable (offline machine, wrong URL, firewall), and retrying each of
7,442 clips with back-off would only print thousands of failure lines an hour later."""
PROGRESS_EVERY_S = 30.0
"""Seconds between progress lines when stderr is not a terminal (logs, SLURM), where no bar is drawn."""
_CHUNK = 1 << 16
_PERMANENT_HTTP = {400, 401, 403, 404, 405, 410, 451}
_USER_AGENT = "s3prl-stimulus (CREMA-D downloader; python-urllib)"


# --- manifest and clip selection ----------------------------------------------------------------


def load_manifest(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """Manifest indexed by clip (no ``.wav``) with ``bytes`` (int) and ``sha256`` (hex).

    ``path``: a CSV with columns ``clip`` (or CREMA-D's ``FileName``), ``bytes``, ``sha256``; default
    the packaged manifest of the 7,442 CREMA-D clips.
    """
    source = packaged_file("audiowav_manifest.csv.gz") if path is None else Path(path)
    try:
        frame = pd.read_csv(source, dtype={"clip": str, "FileName": str, "sha256": str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as err:
        raise StimulusError(f"cannot read manifest {source}: {err}; give a CSV with clip,bytes,sha256 columns") from None
    if "clip" not in frame.columns and "FileName" in frame.columns:
        frame = frame.rename(columns={"FileName": "clip"})
    missing = {"clip", "bytes", "sha256"} - set(frame.columns)
    if missing:
        raise StimulusError(f"manifest {source} lacks column(s) {', '.join(sorted(missing))}: expected clip,bytes,sha256")
    frame["clip"] = frame["clip"].str.strip().str.replace(r"\.wav$", "", regex=True)
    if frame["clip"].duplicated().any():
        raise StimulusError(f"manifest {source} lists clip {frame['clip'][frame['clip'].duplicated()].iloc[0]!r} twice")
    frame["sha256"] = frame["sha256"].str.strip().str.lower()
    frame["bytes"] = frame["bytes"].astype(np.int64)
    return frame.set_index("clip")[["bytes", "sha256"]]


def parse_clip_list(spec: str) -> list[str]:
    """Clip names from ``spec``: a file with one name per line, or a comma-separated list.

    Names may carry ``.wav``; blank lines and ``#`` comments are ignored.
    """
    if Path(spec).is_file():
        clips = read_clip_list(spec)
    else:
        clips = [Path(item.strip()).name.removesuffix(".wav") for item in spec.split(",") if item.strip()]
    if not clips:
        raise StimulusError(f"no clip names in {spec!r}: give a comma-separated list or a file with one clip per line")
    return list(dict.fromkeys(clips))


def select_clips(manifest: pd.DataFrame, clips: Optional[Sequence[str]] = None) -> pd.DataFrame:
    """Rows of ``manifest`` for ``clips`` (all when None); unknown names are an error."""
    if clips is None:
        return manifest
    names = [str(c).removesuffix(".wav") for c in clips]
    unknown = [c for c in names if c not in manifest.index]
    if unknown:
        raise StimulusError(
            f"{len(unknown)} clip(s) not in the manifest, e.g. {unknown[0]!r}: use CREMA-D names like 1001_DFA_ANG_XX"
        )
    return manifest.loc[list(dict.fromkeys(names))]


# --- file checks --------------------------------------------------------------------------------


def file_problem(path: Path, size: int, sha256: str, checksum: bool = True) -> Optional[str]:
    """None when ``path`` has the manifest's size (and SHA-256); else what is wrong, in words."""
    if not path.is_file():
        return "missing"
    actual = path.stat().st_size
    if actual != size:
        return f"size {actual} bytes, expected {size}"
    if checksum:
        digest = sha256_file(path)
        if digest != sha256:
            return f"sha256 {digest[:12]}…, expected {sha256[:12]}…"
    return None


def clip_path(corpus: Path, clip: str) -> Path:
    return Path(corpus) / f"{clip}.wav"


def part_path(corpus: Path, clip: str) -> Path:
    return Path(corpus) / f".{clip}.wav{PART_SUFFIX}"


# --- download -----------------------------------------------------------------------------------

DOWNLOAD_STATUSES = ("present", "downloaded", "resumed", "replaced", "failed")


@dataclass(frozen=True)
class DownloadOutcome:
    clip: str
    status: str  # one of DOWNLOAD_STATUSES
    detail: str = ""


@dataclass
class DownloadSummary:
    corpus: Path
    base_url: str
    outcomes: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)

    @property
    def failures(self) -> list:
        return [o for o in self.outcomes if o.status == "failed"]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        return {
            "corpus": str(self.corpus),
            "base_url": self.base_url,
            "n_clips": len(self.outcomes),
            "counts": {s: self.count(s) for s in DOWNLOAD_STATUSES},
            "failures": [{"clip": o.clip, "error": o.detail} for o in self.failures],
        }


class _Retryable(Exception):
    """A transfer problem worth another try (network fault, 5xx, interrupted body, bad bytes)."""


class _Permanent(Exception):
    """A transfer problem that another try will not fix (404, 403, ...)."""


class _Unreachable(_Retryable):
    """No answer from the host at all (refused, unresolvable, timed out): counts towards UNREACHABLE_AFTER."""


class _RangeRejected(_Retryable):
    """HTTP 416: the server will not continue our partial file; the next try starts from scratch."""


def clip_url(base_url: str, clip: str) -> str:
    return base_url.rstrip("/") + "/" + urllib.parse.quote(f"{clip}.wav")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": _USER_AGENT}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    try:
        return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=timeout)
    except urllib.error.HTTPError as err:
        err.close()
        if err.code == 416:
            raise _RangeRejected(f"HTTP 416 for a resumed transfer from byte {offset}") from None
        message = f"HTTP {err.code} {err.reason} ({url})"
        raise (_Permanent if err.code in _PERMANENT_HTTP else _Retryable)(message) from None
    except (urllib.error.URLError, OSError) as err:
        raise _Unreachable(f"{getattr(err, 'reason', err)!s} ({url})") from None
    except http.client.HTTPException as err:  # the host answered, badly
        raise _Retryable(f"{err!r} ({url})") from None


def _transfer(url: str, part: Path, size: int, timeout: float, advance: Callable[[int], None], stop: threading.Event) -> bool:
    """Fetch ``url`` into ``part``, continuing it with a Range request when it holds a prefix.

    Returns True when the transfer resumed a partial file. Raises _Retryable when the body ends
    early (the partial file is kept for the next try), _Permanent for errors like 404.
    """
    offset = part.stat().st_size if part.exists() else 0
    try:
        response = _open(url, offset, timeout)
    except _RangeRejected:
        advance(-offset)
        part.unlink()  # our partial file does not fit the server's: start over on the next try
        raise
    with response:
        status = getattr(response, "status", 200)
        resumed = bool(offset) and status == 206
        if offset and not resumed:  # server ignored Range: it sends the whole file
            advance(-offset)
            offset = 0
        if resumed and not str(response.headers.get("Content-Range", "")).startswith(f"bytes {offset}-"):
            advance(-offset)
            part.unlink()
            raise _Retryable(f"server answered a resume from byte {offset} with {response.headers.get('Content-Range')!r}")
        with open(part, "ab" if resumed else "wb") as handle:
            try:
                while not stop.is_set():
                    chunk = response.read(_CHUNK)
                    if not chunk:
                        break
                    handle.write(chunk)
                    advance(len(chunk))
            except (OSError, http.client.HTTPException) as err:  # reset, timeout, IncompleteRead
                raise _Retryable(f"transfer interrupted: {err!r}") from None
    if stop.is_set():
        raise _Permanent("interrupted")
    received = part.stat().st_size
    if received < size:
        raise _Retryable(f"transfer interrupted after {received} of {size} bytes")
    return resumed


def _bad_content(part: Path, size: int, sha256: str) -> Optional[str]:
    problem = file_problem(part, size, sha256)
    if problem is None:
        return None
    with open(part, "rb") as handle:
        head = handle.read(len(LFS_POINTER_PREFIX))
    if head == LFS_POINTER_PREFIX:
        return "server sent a Git LFS pointer, not audio: use the media.githubusercontent.com base URL"
    return f"downloaded file fails verification ({problem})"


class _HostWatch:
    """Counts connection failures in a row across all transfers; any answer from the host resets it."""

    def __init__(self, limit: int = UNREACHABLE_AFTER):
        self.limit = limit
        self.failures = 0
        self.last_error = ""
        self.unreachable = False
        self.lock = threading.Lock()

    def answered(self) -> None:
        with self.lock:
            self.failures = 0

    def failed(self, error: str) -> bool:
        """Record a connection failure; True once the host counts as unreachable."""
        with self.lock:
            self.failures += 1
            self.last_error = error
            self.unreachable = self.unreachable or self.failures >= self.limit
            return self.unreachable


def _fetch_clip(clip: str, size: int, sha256: str, corpus: Path, base_url: str, retries: int, timeout: float,
                advance: Callable[[int], None], stop: threading.Event, host: _HostWatch) -> DownloadOutcome:
    final = clip_path(corpus, clip)
    existing = file_problem(final, size, sha256) if final.exists() else "missing"
    part = part_path(corpus, clip)
    if existing is None:
        part.unlink(missing_ok=True)  # a leftover from an earlier interrupted run of a clip now complete
        advance(size)
        return DownloadOutcome(clip, "present")
    url = clip_url(base_url, clip)
    if part.exists():
        if part.stat().st_size >= size:  # as large as the target yet unverified: not a usable prefix
            part.unlink()
        else:
            advance(part.stat().st_size)
    last_error = "not attempted"
    for attempt in range(retries + 1):
        if stop.is_set():
            return DownloadOutcome(clip, "failed", "interrupted")
        if attempt:
            time.sleep(min(RETRY_BACKOFF_S * 2 ** (attempt - 1), 8.0))
        try:
            resumed = _transfer(url, part, size, timeout, advance, stop)
        except _Unreachable as err:
            last_error = str(err)
            if host.failed(last_error):
                stop.set()
            continue
        except _Permanent as err:
            host.answered()
            return DownloadOutcome(clip, "failed", str(err))
        except _Retryable as err:
            host.answered()
            last_error = str(err)
            continue
        host.answered()
        problem = _bad_content(part, size, sha256)
        if problem is None:
            os.replace(part, final)  # verified bytes only ever appear under the final name
            status = "replaced" if existing != "missing" else ("resumed" if resumed else "downloaded")
            return DownloadOutcome(clip, status, f"was: {existing}" if existing != "missing" else "")
        advance(-part.stat().st_size)
        part.unlink()  # wrong bytes (possibly a stale prefix): the next try starts from scratch
        last_error = problem
    return DownloadOutcome(clip, "failed", f"{last_error} (after {retries + 1} attempt(s))")


def download_corpus(
    dest: str | os.PathLike,
    clips: Optional[Sequence[str]] = None,
    *,
    base_url: str = DEFAULT_BASE_URL,
    workers: int = 8,
    manifest: str | os.PathLike | None = None,
    retries: int = 3,
    timeout: float = 60.0,
    progress: Optional[bool] = None,
) -> DownloadSummary:
    """Fetch the manifest's clips (or ``clips``) into ``dest`` as ``<clip>.wav``; see the module doc.

    ``progress``: tqdm bar over bytes (None: a bar on a terminal, else a progress line on stderr every
    PROGRESS_EVERY_S seconds; False: silent). Never raises for a clip's transfer failure: failures are in the
    summary (``summary.ok`` is False). Raises :class:`StimulusError` once the host proves unreachable
    (UNREACHABLE_AFTER connection failures in a row); verified clips and partial transfers are kept.
    """
    if int(workers) < 1:
        raise StimulusError(f"--workers must be at least 1, got {workers}")
    if urllib.parse.urlparse(base_url).scheme not in ("http", "https"):
        raise StimulusError(f"base URL {base_url!r} is not an http(s) URL: pass e.g. {DEFAULT_BASE_URL}")
    table = select_clips(load_manifest(manifest), clips)
    corpus = Path(dest)
    if corpus.exists() and not corpus.is_dir():
        raise StimulusError(f"{corpus} exists and is not a directory: pass a directory to download into")
    corpus.mkdir(parents=True, exist_ok=True)
    summary = DownloadSummary(corpus, base_url)

    from tqdm import tqdm

    lock, stop, host = threading.Lock(), threading.Event(), _HostWatch()
    total_bytes = int(table["bytes"].sum())
    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024,
               desc="CREMA-D AudioWAV", disable=(None if progress is None else not progress), smoothing=0.1)
    lines = _ProgressLines(len(table), total_bytes) if progress is None and bar.disable else None

    def advance(n: int) -> None:
        with lock:
            bar.update(n)
            if lines:
                lines.advance(n)

    executor = concurrent.futures.ThreadPoolExecutor(max_workers=int(workers))
    try:
        futures = [
            executor.submit(_fetch_clip, clip, int(row.bytes), row.sha256, corpus, base_url, retries, timeout, advance,
                            stop, host)
            for clip, row in table.iterrows()
        ]
        for future in concurrent.futures.as_completed(futures):
            summary.outcomes.append(future.result())
            if lines:
                with lock:
                    lines.clip_done()
    except BaseException:
        stop.set()  # workers stop at their next chunk; partial files stay for the next run
        executor.shutdown(wait=True, cancel_futures=True)
        raise
    finally:
        executor.shutdown(wait=True)
        bar.close()
    if host.unreachable:
        host_name = urllib.parse.urlparse(base_url).netloc
        raise StimulusError(
            f"cannot reach {host_name}: {host.limit} connections in a row failed ({host.last_error}); check the "
            f"network or proxy, pass --base-url with a reachable mirror, or copy CREMA-D's AudioWAV folder into {corpus} "
            f"and run `s3prl-stimulus verify --corpus {corpus}` (verified clips and partial transfers are kept)")
    if lines:
        lines.write(final=True)
    summary.outcomes.sort(key=lambda o: o.clip)
    return summary


class _ProgressLines:
    """Progress as plain lines (clips, MB, rate, ETA) for logs and SLURM, where a tqdm bar is not drawn."""

    def __init__(self, n_clips: int, total_bytes: int, every_s: float | None = None):
        self.n_clips, self.total_bytes = n_clips, total_bytes
        self.every_s = PROGRESS_EVERY_S if every_s is None else every_s
        self.clips = self.bytes = 0
        self.started = self.last = time.monotonic()

    def advance(self, n: int) -> None:
        self.bytes += n
        if time.monotonic() - self.last >= self.every_s:
            self.write()

    def clip_done(self) -> None:
        self.clips += 1
        if time.monotonic() - self.last >= self.every_s:
            self.write()

    def write(self, final: bool = False) -> None:
        self.last = time.monotonic()
        elapsed = max(self.last - self.started, 1e-9)
        rate = self.bytes / elapsed
        left = max(self.total_bytes - self.bytes, 0)
        eta = "done" if final else (f"ETA {duration(left / rate)}" if rate > 0 else "ETA unknown")
        print(f"download: {self.clips}/{self.n_clips} clips, {self.bytes / 1e6:.1f}/{self.total_bytes / 1e6:.1f} MB, "
              f"{rate / 1e6:.2f} MB/s, {eta}", file=sys.stderr, flush=True)


# --- verify -------------------------------------------------------------------------------------

PROBLEM_STATUSES = ("missing", "size", "truncated", "checksum", "unreadable", "format")


@dataclass(frozen=True)
class ClipCheck:
    clip: str
    status: str  # "ok" or one of PROBLEM_STATUSES
    detail: str = ""
    flags: tuple = ()
    seconds: Optional[float] = None
    rms_dbfs: Optional[float] = None


@dataclass
class VerifyReport:
    corpus: Path
    checks: list
    extra_files: list
    partial_files: list
    checksum: bool

    @property
    def problems(self) -> list:
        return [c for c in self.checks if c.status != "ok"]

    @property
    def flagged(self) -> list:
        return [c for c in self.checks if c.flags]

    @property
    def usable(self) -> bool:
        """Every selected clip present, of the manifest's size (and checksum) and in the expected format."""
        return not self.problems

    def counts(self) -> dict:
        return {s: sum(c.status == s for c in self.checks) for s in ("ok",) + PROBLEM_STATUSES}

    def as_dict(self) -> dict:
        return {
            "corpus": str(self.corpus),
            "usable": self.usable,
            "n_clips": len(self.checks),
            "checksums_checked": self.checksum,
            "counts": self.counts(),
            "problems": [{"clip": c.clip, "status": c.status, "detail": c.detail} for c in self.problems],
            "flagged": [
                {"clip": c.clip, "flags": list(c.flags), "status": c.status, "seconds": c.seconds, "rms_dbfs": c.rms_dbfs}
                for c in self.flagged
            ],
            "extra_files": self.extra_files,
            "partial_files": self.partial_files,
        }


def _rms_dbfs(samples: np.ndarray) -> float:
    if samples.size == 0:
        return -math.inf
    rms = float(np.sqrt(np.mean(np.square(samples.astype(np.float64) / 32768.0))))
    return 20.0 * math.log10(rms) if rms > 0 else -math.inf


def _format_problem(info) -> Optional[str]:
    wrong = []
    if info.format != "WAV":
        wrong.append(f"container {info.format}")
    if info.samplerate != SAMPLE_RATE:
        wrong.append(f"{info.samplerate} Hz")
    if info.channels != CHANNELS:
        wrong.append(f"{info.channels} channels")
    if info.subtype != SUBTYPE:
        wrong.append(f"subtype {info.subtype}")
    if not wrong:
        return None
    return ", ".join(wrong) + f"; expected WAV {SAMPLE_RATE} Hz mono {SUBTYPE}"


def check_clip(corpus: Path, clip: str, size: int, sha256: str, checksum: bool = True) -> ClipCheck:
    """Presence, size, format, checksum and silence of one clip."""
    import soundfile

    path = clip_path(corpus, clip)
    known = (f"known issue: {KNOWN_ISSUES[clip]}",) if clip in KNOWN_ISSUES else ()
    if not path.is_file():
        return ClipCheck(clip, "missing", f"{path.name} not found", known)
    actual = path.stat().st_size
    if actual != size:
        return ClipCheck(clip, "size", f"size {actual} bytes, expected {size}", known)
    cut = truncation(path)  # the readers' own check: a manifest of truncated sizes must not pass either
    if cut:
        return ClipCheck(clip, "truncated", cut, known)
    try:
        info = soundfile.info(str(path))
        samples, _ = soundfile.read(str(path), dtype="int16", always_2d=True)
    except (RuntimeError, soundfile.LibsndfileError, OSError) as err:
        return ClipCheck(clip, "unreadable", f"not a readable WAV: {err}", known)
    seconds, level = info.frames / info.samplerate, _rms_dbfs(samples)
    flags = known + ((f"silent: RMS {level:.1f} dBFS < {SILENCE_DBFS:.0f} dBFS",) if level < SILENCE_DBFS else ())
    rounded = None if math.isinf(level) else round(level, 2)
    problem = _format_problem(info)
    if problem:
        return ClipCheck(clip, "format", problem, flags, round(seconds, 4), rounded)
    if checksum:
        digest = sha256_file(path)
        if digest != sha256:
            return ClipCheck(clip, "checksum", f"sha256 {digest[:12]}…, expected {sha256[:12]}…", flags, round(seconds, 4), rounded)
    return ClipCheck(clip, "ok", "", flags, round(seconds, 4), rounded)


def verify_corpus(
    corpus: str | os.PathLike,
    clips: Optional[Sequence[str]] = None,
    *,
    manifest: str | os.PathLike | None = None,
    checksum: bool = True,
    workers: int = 4,
) -> VerifyReport:
    """Check every manifest clip (or ``clips``) under ``corpus``; see :class:`VerifyReport`."""
    corpus = Path(corpus)
    if not corpus.is_dir():
        raise StimulusError(f"corpus directory {corpus} does not exist: pass the AudioWAV folder (s3prl-stimulus download --to DIR)")
    if int(workers) < 1:
        raise StimulusError(f"--workers must be at least 1, got {workers}")
    full = load_manifest(manifest)
    table = select_clips(full, clips)
    with concurrent.futures.ThreadPoolExecutor(max_workers=int(workers)) as pool:
        checks = list(pool.map(lambda item: check_clip(corpus, item[0], int(item[1].bytes), item[1].sha256, checksum),
                               table.iterrows()))
    names = {p.name for p in corpus.iterdir() if p.is_file()}
    partial = sorted(n for n in names if n.startswith(".") and n.endswith(PART_SUFFIX))
    extra = sorted(n for n in names if n.endswith(".wav") and n.removesuffix(".wav") not in full.index)
    return VerifyReport(corpus, checks, extra, partial, checksum)
