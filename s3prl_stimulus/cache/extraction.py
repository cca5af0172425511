"""``extract``: encode the chosen clips into one complete cache per waveform normalisation, resumably.

Several folds' normalisations share one cache when the upstream is measured to be invariant to them
(:mod:`s3prl_stimulus.cache.invariance`); ``per_fold`` (``--per-fold``) skips the test.

Each clip is encoded as it would be alone (S3PRL's features of a clip otherwise depend on its batch
mates' padding, see docs/cache.md): clips are sorted by length and only clips with the same number of
samples share a batch; CREMA-D has 115 distinct lengths, so batches stay full. Audio is streamed,
and an interrupted extraction resumes from the first chunk without a valid sidecar.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from s3prl_stimulus.audio import read_clip_list
from s3prl_stimulus.cache.manifest import MANIFEST, _describe_difference, build_manifest, read_manifest
from s3prl_stimulus.cache.invariance import describe as describe_invariance
from s3prl_stimulus.cache.normalisation import NORMALISATIONS, Normalisation, fold_normalisation, shared_tag, truncation
from s3prl_stimulus.cache.store import (CHUNKS, COMPLETE, _disk_error, _remove_stale_temporaries, cache_dir_for,
                                        chunk_is_valid, chunk_path, chunk_ranges, write_chunk)
from s3prl_stimulus.cache.upstream import (DTYPES, UpstreamSpec, build_upstream, check_device, default_device,
                                           encode_batch, upstream_fields)
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.hub_entries import ignored_ckpt
from s3prl_stimulus.io import write_json_atomic

PREFETCH = 4  # batches of audio read ahead by two threads


# --- what to extract ----------------------------------------------------------------------------


def packaged_datarc() -> dict:
    """``downstream_expert.datarc`` of the packaged config.yaml (the paper's defaults)."""
    import yaml

    from s3prl_stimulus.integration.launcher import packaged_config

    with open(packaged_config(), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["downstream_expert"]["datarc"]


def _check_options(dtype: str, normalisation: str, folds, chunk_clips: int, batch_clips: int) -> list:
    from s3prl_stimulus.partition import check_fold

    if dtype not in DTYPES:
        raise StimulusError(f"unknown --dtype {dtype!r}: choose fp32 or bf16")
    if normalisation not in NORMALISATIONS:
        raise StimulusError(f"unknown --normalisation {normalisation!r}: choose train_mean_std (the paper's) or none")
    if chunk_clips < 1 or batch_clips < 1:
        raise StimulusError("--chunk-clips and --batch-clips must be positive integers")
    if normalisation == "none":
        return [None]
    folds = list(folds or [])
    if not folds:
        raise StimulusError("train_mean_std normalisation needs folds: pass --folds 1 2 3 4 5 (one extraction each), "
                            "or --normalisation none")
    return sorted(dict.fromkeys(check_fold(k) for k in folds))


def sorted_by_length(frames: dict) -> tuple[list[str], list[int]]:
    """Clips ordered by (samples, name): equal lengths become neighbours."""
    order = sorted(frames, key=lambda c: (frames[c], c))
    return order, [int(frames[c]) for c in order]


def select_clips(audio_dir, clips) -> list[str]:
    """``clips`` as ``datarc.clips`` means it: ``all`` (every CREMA-D clip), ``present`` (the WAVs there) or a list."""
    from s3prl_stimulus.audio import present_clips
    from s3prl_stimulus.partition import load_partition

    known = list(load_partition().index)
    if clips in (None, "all"):
        missing = len(known) - len(present_clips(audio_dir, known))
        if missing:
            raise StimulusError(f"{missing} of {len(known)} CREMA-D clips are missing from {audio_dir}: download them "
                                "(`s3prl-stimulus download`), or extract the clips you have with --clips present")
        return known
    if clips == "present":
        chosen = present_clips(audio_dir, known)
    elif isinstance(clips, (str, os.PathLike)):
        chosen = read_clip_list(clips)
    else:
        chosen = list(clips)
    unknown = sorted(set(chosen) - set(known))
    if unknown:
        raise StimulusError(f"{len(unknown)} listed clip(s) are not CREMA-D clips, e.g. {unknown[0]!r}: "
                            "list names such as 1001_DFA_ANG_XX, one per line")
    if not chosen:
        raise StimulusError(f"no clips to extract from {audio_dir} (--clips {clips})")
    chosen = sorted(dict.fromkeys(chosen))
    _warn_left_out(clips, len(chosen), len(known))
    return chosen


def _warn_left_out(clips, n_chosen: int, n_known: int) -> None:
    """As the downstream warns for ``datarc.clips``: a cache of part of the corpus gives runs that are
    not comparable with the full corpus (their results JSONs say ``complete: false``)."""
    if n_chosen == n_known:
        return
    given = clips if isinstance(clips, (str, os.PathLike)) else f"a list of {n_chosen}"
    print(f"[extract] WARNING: --clips {given}: encoding {n_chosen} of {n_known} CREMA-D clips; "
          f"{n_known - n_chosen} clips LEFT OUT: results from this cache are not comparable with the full corpus",
          file=sys.stderr)


def scan_clips(audio_dir, clips) -> dict:
    """``{clip: samples}`` after checking every WAV header (all problems listed in one error)."""
    from s3prl_stimulus.audio import check_corpus_dir, scan_corpus

    audio_dir = check_corpus_dir(audio_dir, option="--corpus")
    report = scan_corpus(audio_dir, select_clips(audio_dir, clips))
    if not report.ok:
        raise StimulusError(f"{report.summary()}: fix or re-download those files, or leave them out with --clips FILE")
    return dict(report.frames)


# --- extraction ---------------------------------------------------------------------------------


def prepare_cache_dir(cache_dir: Path, manifest: dict) -> bool:
    """Check an existing directory against ``manifest``; return whether it is already complete.

    A directory made with another key is refused (never reused); a new one gets the manifest.
    """
    if (cache_dir / MANIFEST).is_file():
        found = read_manifest(cache_dir)
        if found["key"] != manifest["key"]:
            raise StimulusError(f"{cache_dir} holds a cache made with other settings ({_describe_difference(found, manifest)}): "
                                "pass another --out, or delete that directory to replace it")
        return (cache_dir / COMPLETE).is_file()
    if cache_dir.exists() and any(cache_dir.iterdir()):
        raise StimulusError(f"{cache_dir} exists and is not a feature cache: pass another --out or empty it")
    try:
        write_json_atomic(cache_dir / MANIFEST, manifest)
    except OSError as err:
        raise _disk_error(err, cache_dir / MANIFEST) from None
    return False


@dataclass
class Encoder:
    """A built, frozen upstream with its featurizer and manifest description."""

    spec: UpstreamSpec
    upstream: object
    featurizer: object
    fields: dict
    dtype: str
    feature_normalize: bool

    @classmethod
    def build(cls, spec: UpstreamSpec, device: str, dtype: str, feature_normalize: bool) -> "Encoder":
        upstream, featurizer = build_upstream(spec, device)
        fields = upstream_fields(spec, upstream, featurizer)
        # S3PRL layer-normalises only inside the weighted sum, which a single hidden state skips.
        return cls(spec, upstream, featurizer, fields, dtype, feature_normalize and fields["weighted_sum"])

    @property
    def device(self):
        import torch

        return next(iter(self.upstream.parameters()), torch.empty(0)).device

    def encode(self, wavs) -> dict:
        return encode_batch(self.upstream, self.featurizer, wavs, self.feature_normalize, self.dtype)


def extract(audio_dir, out, spec: UpstreamSpec, normalisation: str = "train_mean_std", folds=(1, 2, 3, 4, 5),
            clips="all", device: Optional[str] = None, dtype: str = "fp32", feature_normalize: bool = False,
            max_seconds="config", name: Optional[str] = None, chunk_clips: int = 256, batch_clips: int = 32,
            progress: bool = True, per_fold: bool = False) -> list[Path]:
    """Encode the clips into ``<out>/<name>/<fold<k>|folds<k...>|none>``.

    With several folds' normalisations, the fold-invariance test (:mod:`s3prl_stimulus.cache.invariance`)
    runs first, on a sample of the clips: when it holds, one cache (``folds<k...>``, encoded under the
    first fold's statistics) serves every fold; otherwise, or with ``per_fold``, one cache per fold.
    ``clips``: ``all`` | ``present`` | a clip-list file | a list of names. ``max_seconds``: the
    S3PRL path's ``datarc.max_seconds`` crop (``"config"``: the packaged config's). Rerunning with
    the same arguments resumes; a directory made with other settings is refused.
    """
    fold_list = _check_options(dtype, normalisation, folds, chunk_clips, batch_clips)
    ignored = ignored_ckpt(spec.name, spec.ckpt)
    if ignored:  # as the launcher warns: S3PRL would build this upstream from its own download
        print(f"[extract] WARNING: {ignored}", file=sys.stderr)
    device = check_device(device or default_device())
    frames = scan_clips(audio_dir, clips)
    order, samples = sorted_by_length(frames)
    max_samples = truncation(samples, packaged_datarc()["max_seconds"] if max_seconds == "config" else max_seconds)
    encoder = Encoder.build(spec, device, dtype, feature_normalize)
    norms = [Normalisation("none") if fold is None else fold_normalisation(audio_dir, order, fold) for fold in fold_list]
    record = None
    if len(norms) > 1 and not per_fold:
        record = measure_invariance(audio_dir, order, samples, max_samples, norms, encoder)
        print(f"[extract] {describe_invariance(record)}", file=sys.stderr, flush=True)
    if record and record["holds"]:
        manifest = build_manifest(encoder.fields, norms[0], max_samples, dtype, encoder.feature_normalize, order, samples,
                                  chunk_clips, upstream_ckpt=spec.ckpt, name=name, shared_folds=norms, invariance=record)
        cache_dir = cache_dir_for(out, name or spec.name, shared_tag(fold_list))
        return [extract_one(audio_dir, cache_dir, manifest, norms[0], encoder, batch_clips, progress)]
    written = []
    for norm in norms:
        manifest = build_manifest(encoder.fields, norm, max_samples, dtype, encoder.feature_normalize, order, samples,
                                  chunk_clips, upstream_ckpt=spec.ckpt, name=name, invariance=record)
        cache_dir = cache_dir_for(out, name or spec.name, norm.tag)
        extract_one(audio_dir, cache_dir, manifest, norm, encoder, batch_clips, progress)
        written.append(cache_dir)
    return written


def measure_invariance(audio_dir, order: Sequence[str], samples: Sequence[int], max_samples: Optional[int],
                       norms: Sequence[Normalisation], encoder: Encoder) -> dict:
    """The fold-invariance test on a sample of ``order`` (each clip encoded alone, as in the cache)."""
    import torch

    from s3prl_stimulus.cache.invariance import SAMPLE_PER_LENGTH, measure, sample_positions

    lengths = [min(n, max_samples or n) for n in samples]
    positions = sample_positions(lengths)
    sample, sample_lengths = [order[i] for i in positions], [lengths[i] for i in positions]

    def encode_sample(norm: Normalisation) -> dict:
        parts = []
        for a, b in equal_length_batches(sample_lengths, 0, len(sample), SAMPLE_PER_LENGTH):
            wavs = _read_batch(audio_dir, sample[a:b], norm, max_samples)
            parts.append(encoder.encode([torch.from_numpy(w).to(encoder.device) for w in wavs]))
        return {key: np.concatenate([p[key] for p in parts]) for key in parts[0] if key != "frames"}

    return measure(encode_sample, norms, sample)


def extract_one(audio_dir, cache_dir: Path, manifest: dict, normalisation: Normalisation, encoder: Encoder,
                batch_clips: int, progress: bool) -> Path:
    """Fill ``cache_dir`` for ``manifest``: skip verified chunks, encode the others, then mark it complete."""
    cache_dir = Path(cache_dir)
    if prepare_cache_dir(cache_dir, manifest):
        if not _bad_chunks(cache_dir, read_manifest(cache_dir)):
            return cache_dir
        (cache_dir / COMPLETE).unlink()  # a chunk went bad after completion: repair it below
    manifest = read_manifest(cache_dir)  # the first run's chunk size wins on resume
    started = time.perf_counter()
    encoded = _encode_missing_chunks(audio_dir, cache_dir, manifest, normalisation, encoder, batch_clips, progress)
    _finish(cache_dir, manifest, {"encoded_clips": encoded, "encode_seconds": round(time.perf_counter() - started, 3),
                                  "device": str(encoder.device)})
    return cache_dir


def _bad_chunks(cache_dir: Path, manifest: dict) -> list[int]:
    ranges = chunk_ranges(manifest["n_clips"], manifest["chunk_clips"])
    return [i for i, (a, b) in enumerate(ranges) if not chunk_is_valid(chunk_path(cache_dir, i), manifest["clips"][a:b])]


# --- encoding chunks ----------------------------------------------------------------------------


def _read_batch(audio_dir, clips, normalisation: Normalisation, max_samples: Optional[int]):
    from s3prl_stimulus.audio import clip_path, read_clip

    return [normalisation.apply(read_clip(clip_path(audio_dir, c))[:max_samples]) for c in clips]


def equal_length_batches(samples: Sequence[int], start: int, stop: int, max_batch: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) ranges within [start, stop) whose clips all have the same length."""
    a = start
    while a < stop:
        b = a + 1
        while b < stop and b - a < max_batch and samples[b] == samples[a]:
            b += 1
        yield a, b
        a = b


def _encode_missing_chunks(audio_dir, cache_dir: Path, manifest: dict, normalisation: Normalisation, encoder: Encoder,
                           batch_clips: int, progress: bool) -> int:
    """Encode every chunk without a valid sidecar; return how many clips were encoded."""
    import torch

    from s3prl_stimulus.progress import progress_bar

    order, max_samples = manifest["clips"], manifest["max_samples"]
    lengths = [min(n, max_samples or n) for n in manifest["samples"]]  # equal after the crop = same batch
    ranges = chunk_ranges(len(order), manifest["chunk_clips"])
    (cache_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_dir / CHUNKS)
    todo = _bad_chunks(cache_dir, manifest)
    done = len(order) - sum(ranges[i][1] - ranges[i][0] for i in todo)
    bar = progress_bar(len(order), f"extract {manifest['upstream']['name']} {normalisation.tag}", "clip", progress,
                       initial=done)
    batches = [(i, a, b) for i in todo for a, b in equal_length_batches(lengths, *ranges[i], batch_clips)]
    read = lambda a, b: _read_batch(audio_dir, order[a:b], normalisation, max_samples)  # noqa: E731
    parts: dict = {i: [] for i in todo}
    with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
        ahead = [pool.submit(read, a, b) for _, a, b in batches[:PREFETCH]]  # streamed: a few batches in memory
        for n, (i, a, b) in enumerate(batches):
            wavs = ahead[n].result()
            ahead[n] = None
            if n + PREFETCH < len(batches):
                ahead.append(pool.submit(read, *batches[n + PREFETCH][1:]))
            parts[i].append(encoder.encode([torch.from_numpy(w).to(encoder.device) for w in wavs]))
            if b == ranges[i][1]:
                _write_encoded_chunk(cache_dir, i, order[ranges[i][0]:b], parts.pop(i))
            bar.update(b - a)
    bar.close()
    return len(order) - done


def _write_encoded_chunk(cache_dir: Path, index: int, clips: Sequence[str], parts: list) -> None:
    arrays = {"clips": np.asarray(clips, dtype=str)}
    for key in parts[0]:
        arrays[key] = np.concatenate([p[key] for p in parts])
    if not np.isfinite(arrays["means"]).all():
        bad = clips[int(np.flatnonzero(~np.isfinite(arrays["means"]).reshape(len(clips), -1).all(axis=1))[0])]
        raise StimulusError(f"the upstream gave non-finite features for clip {bad}: check that file (silent or corrupt?) "
                            "and leave it out with --clips FILE")
    write_chunk(chunk_path(cache_dir, index), arrays)


def _finish(cache_dir: Path, manifest: dict, timing: Optional[dict] = None) -> None:
    """Verify every chunk, then mark the cache complete (the only marker a reader trusts)."""
    bad = _bad_chunks(cache_dir, manifest)
    if bad:
        raise StimulusError(f"{len(bad)} chunk(s) of {cache_dir} failed verification after writing (e.g. "
                            f"{chunk_path(cache_dir, bad[0]).name}): check the disk and rerun the same command")
    n_chunks = len(chunk_ranges(manifest["n_clips"], manifest["chunk_clips"]))
    try:
        write_json_atomic(cache_dir / COMPLETE, {"key": manifest["key"], "n_chunks": n_chunks, "n_clips": manifest["n_clips"],
                                                 **(timing or {})})
    except OSError as err:
        raise _disk_error(err, cache_dir / COMPLETE) from None
