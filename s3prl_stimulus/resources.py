"""Packaged data files, verified by SHA-256 before use.

The vote tables, folds and audio manifest ship inside the package (see ``data/NOTICE.md`` for
provenance and licences), so nothing is downloaded to build labels. A checksum mismatch means the
installation was altered or corrupted: reinstall rather than silently train on different labels.
"""

from __future__ import annotations

import functools
from pathlib import Path

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.io import sha256_file

DATA_DIR = Path(__file__).resolve().parent / "data"

SHA256 = {
    "audiowav_manifest.csv.gz": "84850d3d9db35399806fdefdc38f95bb74c6720b7d496a5d5471ff3bac1491c4",
    "paper_results.json": "3c5e057ddc3fcfea372010141869e23c140b2602be72244b9a6bf40e4dc0e22a",
    "folds.csv.gz": "2b07e9b16cd21ac834bd97fc95e10446e6511d921f1595baf8baecfdae992174",
    "votes_crema_d.csv.gz": "5ef38a35c2a4b69c699627597288271812de0dabaec371d5df10141fcdc737ef",
    "votes_paper.csv.gz": "559a71d86c77ba54926fd7367462ca3ee491315698e4b99b61a97315ac29d643",
}


@functools.lru_cache(maxsize=None)
def packaged_file(name: str) -> Path:
    """Path of a packaged data file after checking that it exists and matches its checksum."""
    if name not in SHA256:
        raise StimulusError(f"no packaged data file named {name!r}; known: {', '.join(sorted(SHA256))}")
    path = DATA_DIR / name
    if not path.is_file():
        raise StimulusError(f"packaged data file {path} is missing: reinstall s3prl-stimulus (pip install --force-reinstall s3prl-stimulus)")
    digest = sha256_file(path)
    if digest != SHA256[name]:
        raise StimulusError(
            f"packaged data file {path} fails its checksum (sha256 {digest[:12]}…, expected {SHA256[name][:12]}…): "
            "it was altered or corrupted; reinstall s3prl-stimulus"
        )
    return path
