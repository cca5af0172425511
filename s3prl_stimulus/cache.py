"""Feature cache: encode every clip once with a frozen upstream, keep what the paper's head needs.

Why a cache is exact. The upstream is frozen, and the paper's head is linear after S3PRL's featurizer:
``logits = W2 · mean_t(W1 · Σ_l a_l · h_l[t] + b1) + b2`` with ``a = softmax(featurizer.weights)``
(``h_l`` optionally layer-normalised per frame when ``upstream_feature_normalize`` is set). The mean
over frames commutes with every linear map, so ``logits = W2 · (W1 · Σ_l a_l · m_l + b1) + b2`` where
``m_l = mean_t h_l[t]`` is taken over exactly the frames S3PRL keeps for the clip
(``Featurizer.tolist``: ``round(samples / downsample_rate)``). Per clip and hidden state that mean is a
sufficient statistic for the forward pass *and* for every gradient of the head and the layer weights,
so training from the cache follows the same trajectory as training through S3PRL.

What is stored (one directory per upstream and normalisation)::

    manifest.json          key fields + their SHA-256 ("key"), clip list, layout
    chunks/chunk-00000.npz clips, frames [n] int64, means [n, L, D] float32 (+ ln_means when requested)
    chunks/chunk-00000.json SHA-256 and size of the .npz: a chunk counts as done only with a matching sidecar
    complete.json          written last, after every chunk verified: its absence means "not finished"

Each clip is encoded as it would be alone (S3PRL's features of a clip otherwise depend on its batch
mates' padding, see docs/cache.md): clips are sorted by length and only clips with the same number of
samples share a batch; CREMA-D has 115 distinct lengths, so batches stay full. Audio is streamed, chunks
are written atomically (temporary name + rename), and an interrupted extraction resumes from the
first chunk without a valid sidecar.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import difflib
import errno
import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np

from s3prl_stimulus import __version__
from s3prl_stimulus.audio import SAMPLE_RATE, normalise_waveform, read_clip_list
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import atomic_path, sha256_file, write_json_atomic

SCHEMA = 1
MANIFEST = "manifest.json"
COMPLETE = "complete.json"
CHUNKS = "chunks"
PREFETCH = 4  # batches of audio read ahead by two threads
DTYPES = ("fp32", "bf16")
NORMALISATIONS = ("train_mean_std", "none")
KEY_FIELDS = ("schema", "package_version", "upstream", "normalisation", "max_samples", "dtype", "feature_normalize",
              "clips_sha256")


# --- what to extract ----------------------------------------------------------------------------


@dataclass(frozen=True)
class UpstreamSpec:
    """An upstream as run_downstream names it: ``-u``, ``-k``, ``-g``, ``-s``, ``-l``, ``-r``."""

    name: str
    ckpt: Optional[str] = None
    model_config: Optional[str] = None
    feature_selection: str = "hidden_states"
    layer_selection: Optional[int] = None
    refresh: bool = False


@dataclass(frozen=True)
class Normalisation:
    """Waveform normalisation as ``datarc.normalisation`` names it: the fold's training mean/std, or none."""

    kind: str  # "train_mean_std" | "none"
    fold: Optional[int] = None
    mean: Optional[float] = None
    std: Optional[float] = None
    train_clips_sha256: Optional[str] = None  # the training clips the statistics were computed on

    @property
    def tag(self) -> str:
        """Directory name: ``fold<k>`` or ``none``."""
        return f"fold{self.fold}" if self.kind == "train_mean_std" else "none"

    def apply(self, samples: np.ndarray) -> np.ndarray:
        """The S3PRL path's arithmetic (``ClipDataset``): ``(x - mean) / (std + 1e-6)`` in float32.

        NumPy 2 keeps float32 with Python-float operands, so both paths round identically (tested bitwise).
        """
        if self.kind == "none":
            return samples
        return normalise_waveform(samples, self.mean, self.std)


def fold_normalisation(audio_dir, clips: Sequence[str], fold: int) -> Normalisation:
    """The fold's training-set waveform statistics over ``clips``, as the S3PRL path computes them."""
    from s3prl_stimulus.audio import clip_path, clips_fingerprint, waveform_stats
    from s3prl_stimulus.partition import check_fold, split_clips

    fold = check_fold(fold)
    present = set(clips)
    train = [c for c in split_clips(fold, "train") if c in present]  # sorted, like datarc.clips filtering
    if not train:
        raise StimulusError(f"none of the {len(clips)} clips to extract is in fold {fold}'s training set: "
                            "extract a clip list that includes training clips, or use --normalisation none")
    stats = waveform_stats([clip_path(audio_dir, c) for c in train])
    return Normalisation("train_mean_std", fold, float(stats["mean"]), float(stats["std"]), clips_fingerprint(train))


def truncation(samples: Sequence[int], max_seconds) -> Optional[int]:
    """``datarc.max_seconds`` as samples, or None when it shortens none of these clips (no effect)."""
    if max_seconds in (None, "none", "None"):
        return None
    max_samples = int(float(max_seconds) * SAMPLE_RATE)
    if max_samples < 1:
        raise StimulusError(f"max_seconds={max_seconds} keeps no sample: use a positive number of seconds (paper: 10)")
    return max_samples if max(samples) > max_samples else None


def packaged_datarc() -> dict:
    """``downstream_expert.datarc`` of the packaged config.yaml (the paper's defaults)."""
    import yaml

    from s3prl_stimulus.run_downstream import packaged_config

    with open(packaged_config(), encoding="utf-8") as handle:
        return yaml.safe_load(handle)["downstream_expert"]["datarc"]


# --- manifest and key ---------------------------------------------------------------------------


def clips_sha256(clips: Sequence[str], samples: Sequence[int]) -> str:
    """Identifies the clip list and every clip's length (in stored order)."""
    text = "\n".join(f"{c}\t{int(n)}" for c, n in zip(clips, samples))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_key(fields: dict) -> str:
    """SHA-256 of the key fields, canonical JSON."""
    return hashlib.sha256(json.dumps({k: fields[k] for k in KEY_FIELDS}, sort_keys=True).encode()).hexdigest()


def build_manifest(upstream: dict, normalisation: Normalisation, max_samples: Optional[int], dtype: str,
                   feature_normalize: bool, clips: Sequence[str], samples: Sequence[int], chunk_clips: int,
                   upstream_ckpt: Optional[str] = None, name: Optional[str] = None) -> dict:
    """Key fields (hashed into ``key``) plus layout: clip order, lengths, chunk size."""
    fields = {
        "schema": SCHEMA,
        "package_version": __version__,
        "upstream": upstream,
        "normalisation": dataclasses.asdict(normalisation),
        "max_samples": max_samples,
        "dtype": dtype,
        "feature_normalize": bool(feature_normalize),
        "clips_sha256": clips_sha256(clips, samples),
    }
    return {**fields, "key": manifest_key(fields), "name": name or upstream["name"], "upstream_ckpt": upstream_ckpt,
            "n_clips": len(clips),
            "chunk_clips": int(chunk_clips), "clips": list(clips), "samples": [int(n) for n in samples]}


def _describe_difference(found: dict, wanted: dict) -> str:
    """Which key fields differ, worded for a user (first few)."""
    parts = []
    for field in KEY_FIELDS:
        a, b = found.get(field), wanted.get(field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = [f"{field}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts.extend(inner)
        elif field == "clips_sha256":
            parts.append("clip list or clip lengths")
        else:
            parts.append(f"{field}: {a!r} vs {b!r}")
    return "; ".join(parts[:4]) + ("; …" if len(parts) > 4 else "")


def read_manifest(cache_dir) -> dict:
    path = Path(cache_dir) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise StimulusError(f"{cache_dir} is not a feature cache (no {MANIFEST}): create it with `s3prl-stimulus extract`") from None
    except (OSError, ValueError) as err:
        raise StimulusError(f"cache manifest {path} is unreadable ({err}): delete {cache_dir} and extract again") from None
    if manifest.get("schema") != SCHEMA or manifest.get("key") != manifest_key_or_none(manifest):
        raise StimulusError(f"cache manifest {path} is from another cache format or was edited: delete {cache_dir} and extract again")
    return manifest


def manifest_key_or_none(manifest: dict) -> Optional[str]:
    try:
        return manifest_key(manifest)
    except KeyError:
        return None


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


# --- the upstream -------------------------------------------------------------------------------


def import_hub():
    """``s3prl.hub``, after making the current torch/torchaudio stack able to import it."""
    from s3prl_stimulus.compat import prepare_s3prl_stack

    prepare_s3prl_stack()
    import s3prl.hub as hub

    return hub


def check_upstream_name(hub, name: str) -> None:
    known = [a for a in dir(hub) if not a.startswith("_")]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise StimulusError(f"unknown upstream {name!r}{hint}: use a name S3PRL's hub knows, e.g. fbank, wavlm_large, wavlm_local -k FILE")


def build_upstream(spec: UpstreamSpec, device: str):
    """(upstream, featurizer) built the way S3PRL's runner builds them, frozen, in eval mode."""
    hub = import_hub()
    check_upstream_name(hub, spec.name)
    if spec.name.endswith("_local") and (spec.ckpt is None or not Path(spec.ckpt).is_file()):
        raise StimulusError(f"upstream {spec.name} needs a local checkpoint: pass -k FILE (got {spec.ckpt!r})")
    from s3prl.upstream.interfaces import Featurizer

    upstream = getattr(hub, spec.name)(ckpt=spec.ckpt, model_config=spec.model_config, refresh=spec.refresh)
    upstream = upstream.to(device).eval()
    for parameter in upstream.parameters():
        parameter.requires_grad_(False)
    featurizer = Featurizer(upstream, feature_selection=spec.feature_selection, upstream_device=device,
                            layer_selection=spec.layer_selection, normalize=False).to(device)
    return upstream, featurizer


def weights_sha256(module) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): identifies the checkpoint."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(dtype=__import__("torch").uint8).numpy().tobytes())
    return digest.hexdigest()


def _file_hash_or_none(path) -> Optional[str]:
    return sha256_file(Path(path)) if path and Path(path).is_file() else None


def upstream_fields(spec: UpstreamSpec, upstream, featurizer) -> dict:
    """The manifest's description of the upstream (part of the key)."""
    return {
        "name": spec.name,
        "weights_sha256": weights_sha256(upstream),
        "model_config_sha256": _file_hash_or_none(spec.model_config),
        "feature_selection": featurizer.feature_selection,
        "layer_selection": spec.layer_selection,
        "n_hidden": int(getattr(featurizer, "layer_num", 1)) if hasattr(featurizer, "weights") else 1,
        "weighted_sum": hasattr(featurizer, "weights"),
        "dim": int(featurizer.output_dim),
        "downsample_rate": int(featurizer.downsample_rate),
    }


# --- encoding -----------------------------------------------------------------------------------


def kept_frames(n_samples: int, n_output_frames: int, downsample_rate: int) -> int:
    """Frames S3PRL's ``Featurizer.tolist`` keeps for a clip: ``f[:round(samples / rate)]``."""
    return min(round(n_samples / downsample_rate), n_output_frames)


def hidden_states(upstream, featurizer, wavs) -> list:
    """The featurizer's selected hidden states, each ``[B, T, D]`` (one entry when no weighted sum)."""
    selected = featurizer._select_feature(upstream(wavs))
    return list(selected) if isinstance(selected, (list, tuple)) else [selected]


def encode_batch(upstream, featurizer, wavs, feature_normalize: bool, dtype: str) -> dict:
    """Per-clip means of every hidden state over the frames S3PRL keeps (float32, on the CPU).

    ``wavs`` all have the same length, so no clip sees padding: each result is the clip's own.
    """
    import torch
    import torch.nn.functional as F

    device = wavs[0].device
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=dtype == "bf16"):
        states = hidden_states(upstream, featurizer, wavs)
    frames = kept_frames(len(wavs[0]), states[0].shape[1], featurizer.downsample_rate)
    if frames < 1:
        raise StimulusError(f"a clip of {len(wavs[0])} samples gives no feature frame with this upstream: "
                            "leave such clips out with a clip list")
    stacked = torch.stack([s[:, :frames].float() for s in states], dim=1)  # [B, L, T, D]
    out = {"frames": np.full(len(wavs), frames, dtype=np.int64),
           "means": stacked.mean(dim=2).cpu().numpy()}
    if feature_normalize:
        normalised = F.layer_norm(stacked, (stacked.shape[-1],))
        out["ln_means"] = normalised.mean(dim=2).cpu().numpy()
    return out


def equal_length_batches(samples: Sequence[int], start: int, stop: int, max_batch: int) -> Iterator[tuple[int, int]]:
    """Consecutive [a, b) ranges within [start, stop) whose clips all have the same length."""
    a = start
    while a < stop:
        b = a + 1
        while b < stop and b - a < max_batch and samples[b] == samples[a]:
            b += 1
        yield a, b
        a = b


# --- extraction ---------------------------------------------------------------------------------


def check_device(device: str) -> str:
    import torch

    try:
        parsed = torch.device(device)
    except RuntimeError:
        raise StimulusError(f"unknown device {device!r}: use cpu, cuda or cuda:N") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise StimulusError(f"device {device} requested but torch sees no CUDA GPU: pass --device cpu")
    return device


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


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
    return sorted(dict.fromkeys(chosen))


def scan_clips(audio_dir, clips) -> dict:
    """``{clip: samples}`` after checking every WAV header (all problems listed in one error)."""
    from s3prl_stimulus.audio import check_corpus_dir, scan_corpus

    audio_dir = check_corpus_dir(audio_dir, option="--corpus")
    report = scan_corpus(audio_dir, select_clips(audio_dir, clips))
    if not report.ok:
        raise StimulusError(f"{report.summary()}: fix or re-download those files, or leave them out with --clips FILE")
    return dict(report.frames)


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
            progress: bool = True) -> list[Path]:
    """Encode the clips into ``<out>/<name>/<fold<k>|none>`` (one cache per fold's normalisation).

    ``clips``: ``all`` | ``present`` | a clip-list file | a list of names. ``max_seconds``: the
    S3PRL path's ``datarc.max_seconds`` crop (``"config"``: the packaged config's). Rerunning with
    the same arguments resumes; a directory made with other settings is refused.
    """
    fold_list = _check_options(dtype, normalisation, folds, chunk_clips, batch_clips)
    device = check_device(device or default_device())
    frames = scan_clips(audio_dir, clips)
    order, samples = sorted_by_length(frames)
    max_samples = truncation(samples, packaged_datarc()["max_seconds"] if max_seconds == "config" else max_seconds)
    encoder = Encoder.build(spec, device, dtype, feature_normalize)
    written = []
    for fold in fold_list:
        norm = Normalisation("none") if fold is None else fold_normalisation(audio_dir, order, fold)
        manifest = build_manifest(encoder.fields, norm, max_samples, dtype, encoder.feature_normalize, order, samples,
                                  chunk_clips, upstream_ckpt=spec.ckpt, name=name)
        cache_dir = cache_dir_for(out, name or spec.name, norm.tag)
        extract_one(audio_dir, cache_dir, manifest, norm, encoder, batch_clips, progress)
        written.append(cache_dir)
    return written


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


def _read_batch(audio_dir, clips, normalisation: Normalisation, max_samples: Optional[int]):
    from s3prl_stimulus.audio import clip_path, read_clip

    return [normalisation.apply(read_clip(clip_path(audio_dir, c))[:max_samples]) for c in clips]


def _encode_missing_chunks(audio_dir, cache_dir: Path, manifest: dict, normalisation: Normalisation, encoder: Encoder,
                           batch_clips: int, progress: bool) -> int:
    """Encode every chunk without a valid sidecar; return how many clips were encoded."""
    import torch
    from tqdm import tqdm

    order, max_samples = manifest["clips"], manifest["max_samples"]
    lengths = [min(n, max_samples or n) for n in manifest["samples"]]  # equal after the crop = same batch
    ranges = chunk_ranges(len(order), manifest["chunk_clips"])
    (cache_dir / CHUNKS).mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(cache_dir / CHUNKS)
    todo = _bad_chunks(cache_dir, manifest)
    done = len(order) - sum(ranges[i][1] - ranges[i][0] for i in todo)
    bar = tqdm(total=len(order), initial=done, unit="clip", dynamic_ncols=True, disable=not progress,
               desc=f"extract {manifest['upstream']['name']} {normalisation.tag}")
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
    return (f"cache complete: {cache_dir} ({manifest['n_clips']} clips, {layers} hidden state(s) x {up['dim']}, "
            f"normalisation {norm.tag}, {manifest['dtype']}, {size / 1e6:.2f} MB; {rate})")
