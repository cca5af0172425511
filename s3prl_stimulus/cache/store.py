"""A cache directory on disk: chunk files with their checksums, the completion marker, and reading a cache back.

What is stored (one directory per upstream and normalisation)::

    manifest.json          key fields + their SHA-256 ("key"), clip list, layout
    chunks/chunk-00000.npz clips, frames [n] int64, means [n, L, D] float32 (+ ln_means when requested)
    chunks/chunk-00000.json SHA-256 and size of the .npz: a chunk counts as done only with a matching sidecar
    complete.json          written last, after every chunk verified: its absence means "not finished"

Chunks are written atomically (temporary name + rename), and every chunk's checksum is verified
again whenever a cache is loaded.
"""

from __future__ import annotations

import errno
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from s3prl_stimulus import __version__
from s3prl_stimulus.cache.manifest import read_manifest
from s3prl_stimulus.cache.normalisation import Normalisation
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import atomic_path, sha256_file, write_json_atomic

COMPLETE = "complete.json"
CHUNKS = "chunks"


# --- chunks -------------------------------------------------------------------------------------


def chunk_path(cache_dir, index: int) -> Path:
    return Path(cache_dir) / CHUNKS / f"chunk-{index:05d}.npz"


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def _disk_error(err: OSError, path: Path) -> StimulusError:
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return StimulusError(f"disk full while writing {path}: free space on {path.parent} (or pass another --out) "
                             "and rerun the same command; finished chunks are kept")
    return StimulusError(f"cannot write {path} ({err.strerror or err}): check the permissions of {path.parent} and rerun")


def write_chunk(path: Path, arrays: dict) -> None:
    """Write ``arrays`` as one .npz atomically, then its checksum sidecar (also atomically)."""
    try:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as handle:
                np.savez(handle, **arrays)
                handle.flush()
                os.fsync(handle.fileno())
            info = {"sha256": sha256_file(tmp), "bytes": tmp.stat().st_size, "n_clips": int(len(arrays["clips"]))}
        write_json_atomic(_sidecar(path), info)
    except OSError as err:
        raise _disk_error(err, path) from None


def chunk_is_valid(path: Path, expected_clips: Sequence[str] | None = None) -> bool:
    """A chunk is done iff its sidecar exists and the file's size and SHA-256 match it."""
    sidecar = _sidecar(path)
    try:
        info = json.loads(sidecar.read_text(encoding="utf-8"))
        if path.stat().st_size != info["bytes"] or sha256_file(path) != info["sha256"]:
            return False
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return expected_clips is None or info.get("n_clips") == len(expected_clips)


def read_chunk(path: Path, expected_clips: Sequence[str], cache_dir) -> dict:
    """Arrays of a finished chunk; a corrupt or truncated one is an error that says how to repair it."""
    if not chunk_is_valid(path, expected_clips):
        raise StimulusError(f"cache chunk {path} is corrupt or truncated (checksum mismatch): rerun the "
                            f"`s3prl-stimulus extract` that made {cache_dir} to recompute it")
    with np.load(path, allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    if list(arrays["clips"]) != list(expected_clips):
        raise StimulusError(f"cache chunk {path} holds other clips than its manifest lists: delete {cache_dir} and extract again")
    return arrays


def chunk_ranges(n_clips: int, chunk_clips: int) -> list[tuple[int, int]]:
    return [(start, min(start + chunk_clips, n_clips)) for start in range(0, n_clips, chunk_clips)]


def _remove_stale_temporaries(chunk_dir: Path) -> None:
    """Temporary files left by a killed writer (atomic_path cleans up everything but SIGKILL)."""
    for tmp in chunk_dir.glob(".*.tmp"):
        tmp.unlink(missing_ok=True)


# --- reading ------------------------------------------------------------------------------------


@dataclass
class FeatureCache:
    """A complete cache in memory: per clip (stored, length-sorted order) its frame count and means."""

    path: Path
    manifest: dict
    clips: np.ndarray  # [N] str
    frames: np.ndarray  # [N] int64
    means: np.ndarray  # [N, L, D] float32
    ln_means: Optional[np.ndarray]  # [N, L, D] float32, when extracted with feature normalisation

    @property
    def upstream(self) -> str:
        return self.manifest["upstream"]["name"]

    @property
    def normalisation(self) -> Normalisation:
        return Normalisation(**self.manifest["normalisation"])

    @property
    def weighted_sum(self) -> bool:
        return bool(self.manifest["upstream"]["weighted_sum"])

    def features(self, feature_normalize: bool) -> np.ndarray:
        """The means the featurizer's weighted sum sees (layer-normalised ones when asked)."""
        if not feature_normalize or not self.weighted_sum:
            return self.means
        if self.ln_means is None:
            raise StimulusError(f"cache {self.path} has no layer-normalised means: extract it again with "
                                "--upstream_feature_normalize into another --out")
        return self.ln_means

    def index_of(self, clips: Sequence[str]) -> np.ndarray:
        lookup = {c: i for i, c in enumerate(self.clips)}
        missing = [c for c in clips if c not in lookup]
        if missing:
            raise StimulusError(f"cache {self.path} lacks {len(missing)} requested clip(s), e.g. {missing[0]!r}: "
                                "extract a cache over those clips")
        return np.asarray([lookup[c] for c in clips], dtype=np.int64)


def check_complete(cache_dir) -> dict:
    """The manifest of a complete cache; an unfinished one is an error that says how to finish it."""
    cache_dir = Path(cache_dir)
    manifest = read_manifest(cache_dir)
    try:
        complete = json.loads((cache_dir / COMPLETE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise StimulusError(f"cache {cache_dir} is unfinished (extraction interrupted or still running): rerun the same "
                            "`s3prl-stimulus extract` command to resume it") from None
    if complete.get("key") != manifest["key"]:
        raise StimulusError(f"cache {cache_dir} has a completion marker for another manifest: delete it and extract again")
    if manifest.get("package_version") != __version__:
        raise StimulusError(f"cache {cache_dir} was made by s3prl-stimulus {manifest.get('package_version')}, this is "
                            f"{__version__}: extract again (the cache key covers the package version)")
    return manifest


def load_cache(cache_dir) -> FeatureCache:
    """Read a complete cache, verifying every chunk's checksum."""
    cache_dir = Path(cache_dir)
    manifest = check_complete(cache_dir)
    clips = manifest["clips"]
    ranges = chunk_ranges(len(clips), manifest["chunk_clips"])
    up = manifest["upstream"]
    n_hidden = up["n_hidden"] if up["weighted_sum"] else 1
    shape = (len(clips), n_hidden, up["dim"])
    means = np.empty(shape, dtype=np.float32)
    ln_means = np.empty(shape, dtype=np.float32) if manifest["feature_normalize"] else None
    frames = np.empty(len(clips), dtype=np.int64)
    for i, (a, b) in enumerate(ranges):
        arrays = read_chunk(chunk_path(cache_dir, i), clips[a:b], cache_dir)
        if arrays["means"].shape[1:] != shape[1:]:
            raise StimulusError(f"cache chunk {chunk_path(cache_dir, i)} has means of shape {arrays['means'].shape}, "
                                f"the manifest says {shape[1:]}: delete {cache_dir} and extract again")
        means[a:b] = arrays["means"]
        frames[a:b] = arrays["frames"]
        if ln_means is not None:
            ln_means[a:b] = arrays["ln_means"]
    return FeatureCache(cache_dir, manifest, np.asarray(clips), frames, means, ln_means)


def cache_dir_for(root, upstream_dir_name: str, normalisation_tag: str) -> Path:
    """``<root>/<upstream>/<fold<k>|none>``: where ``extract`` writes and ``sweep`` looks."""
    return Path(root) / upstream_dir_name / normalisation_tag


def describe_cache(cache_dir) -> str:
    """One line about a complete cache: where, what, how big, how fast it was encoded."""
    cache_dir = Path(cache_dir)
    manifest = check_complete(cache_dir)
    complete = json.loads((cache_dir / COMPLETE).read_text(encoding="utf-8"))
    up, norm = manifest["upstream"], Normalisation(**manifest["normalisation"])
    size = sum(p.stat().st_size for p in (cache_dir / CHUNKS).glob("*.npz"))
    layers = up["n_hidden"] if up["weighted_sum"] else 1
    encoded, seconds = complete.get("encoded_clips", 0), complete.get("encode_seconds", 0.0)
    rate = f"{encoded} clips encoded at {encoded / seconds:.0f} clips/s" if encoded and seconds else "nothing to encode"
    shared = manifest.get("shared_folds")
    served = (f"normalisation of folds {', '.join(str(n['fold']) for n in shared)} (invariant: max relative deviation "
              f"{manifest['invariance']['max_relative_deviation']:.1e})") if shared else f"normalisation {norm.tag}"
    return (f"cache complete: {cache_dir} ({manifest['n_clips']} clips, {layers} hidden state(s) x {up['dim']}, "
            f"{served}, {manifest['dtype']}, {size / 1e6:.2f} MB; {rate})")
