"""A cache's manifest: what the cache was made from, and the key that decides whether a directory may be reused.

``manifest.json`` holds the key fields (schema, package version, the upstream's description,
waveform normalisation, crop, dtype, feature normalisation, and a SHA-256 over the clip list with
every clip's length), their SHA-256 as ``key``, and the layout (clip order, lengths, chunk size).
``extract`` resumes only a directory whose manifest has the same key and refuses any other, saying
which fields differ.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Optional, Sequence

from s3prl_stimulus import __version__
from s3prl_stimulus.cache.normalisation import Normalisation
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.identity import UpstreamIdentity

SCHEMA = 1
MANIFEST = "manifest.json"
KEY_FIELDS = ("schema", "package_version", "upstream", "normalisation", "max_samples", "dtype", "feature_normalize",
              "clips_sha256")
OPTIONAL_KEY_FIELDS = ("shared_folds",)
"""Key fields only some manifests have (so older caches keep their keys): ``shared_folds`` lists every fold's
normalisation a fold-invariant cache serves (:mod:`s3prl_stimulus.cache.invariance`)."""


def clips_sha256(clips: Sequence[str], samples: Sequence[int]) -> str:
    """Identifies the clip list and every clip's length (in stored order)."""
    text = "\n".join(f"{c}\t{int(n)}" for c, n in zip(clips, samples))
    return hashlib.sha256(text.encode()).hexdigest()


def manifest_key(fields: dict) -> str:
    """SHA-256 of the key fields, canonical JSON."""
    keyed = {k: fields[k] for k in KEY_FIELDS}
    keyed.update({k: fields[k] for k in OPTIONAL_KEY_FIELDS if fields.get(k) is not None})
    return hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()


def build_manifest(upstream: dict, normalisation: Normalisation, max_samples: Optional[int], dtype: str,
                   feature_normalize: bool, clips: Sequence[str], samples: Sequence[int], chunk_clips: int,
                   upstream_ckpt: Optional[str] = None, name: Optional[str] = None, shared_folds: Optional[list] = None,
                   invariance: Optional[dict] = None) -> dict:
    """Key fields (hashed into ``key``) plus layout: clip order, lengths, chunk size.

    ``shared_folds``: the normalisations of every fold this cache serves (encoded under ``normalisation``,
    the first of them) when the fold-invariance test held; ``invariance``: that test's record (not keyed:
    a resumed extraction keeps the first measurement).
    """
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
    if shared_folds:
        fields["shared_folds"] = [dataclasses.asdict(n) for n in shared_folds]
    extra = {"invariance": invariance} if invariance else {}
    return {**fields, "key": manifest_key(fields), **extra, "name": name or upstream["name"], "upstream_ckpt": upstream_ckpt,
            "n_clips": len(clips),
            "chunk_clips": int(chunk_clips), "clips": list(clips), "samples": [int(n) for n in samples]}


def _describe_difference(found: dict, wanted: dict) -> str:
    """Which key fields differ, worded for a user (first few)."""
    parts = []
    for field in KEY_FIELDS + OPTIONAL_KEY_FIELDS:
        a, b = found.get(field), wanted.get(field)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            inner = [f"{field}.{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
            parts.extend(inner)
        elif field == "clips_sha256":
            parts.append("clip list or clip lengths")
        elif field == "shared_folds":
            parts.append("one cache for every fold vs one per fold (--per-fold)")
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


def upstream_identity(manifest: dict) -> UpstreamIdentity:
    """The identity of the upstream whose features the cache holds (its fingerprint was taken at extraction)."""
    return UpstreamIdentity.of(manifest["upstream"]["name"], manifest.get("upstream_ckpt"),
                               manifest["upstream"]["weights_sha256"])
