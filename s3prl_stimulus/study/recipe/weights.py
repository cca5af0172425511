"""Preflight: whether each upstream's weights can be had on this machine (a local file, S3PRL's download
cache, or a server that answers) before any job needs them."""

from __future__ import annotations

import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.integration.hub_entries import LOCAL_ENTRY, WAVEFORM_FEATURES as FEATURE_UPSTREAMS
from s3prl_stimulus.study.recipe.settings import Settings, Upstream

CONNECT_TIMEOUT_S = 3.0
"""Preflight: how long to wait for a connection to a weights server before calling the machine offline."""


class _Probed(BaseException):
    """Raised from inside S3PRL's downloader to stop a hub function once it names its weights file."""


def weights_of(name: str, hub=None) -> Optional[tuple[str, Path]]:
    """(URL, local cache file) of the first file S3PRL's hub function ``name`` would download; None when it
    needs none. Nothing is downloaded: S3PRL's downloader is replaced for the call and stops it."""
    if hub is None:
        from s3prl_stimulus.cache.upstream import import_hub

        hub = import_hub()
    import s3prl.util.download as download

    seen = []

    def record(filepath, url, *args, **kwargs):
        seen.append((str(url), Path(filepath)))
        raise _Probed

    original, download._download = download._download, record
    try:
        getattr(hub, name)()
    except _Probed:
        pass
    except Exception as err:  # an upstream that fails before naming a file: report it, do not guess
        if not seen:
            raise StimulusError(f"upstream {name}: S3PRL failed before naming its weights ({type(err).__name__}: "
                                f"{str(err)[:200]})") from None
    finally:
        download._download = original
    return seen[0] if seen else None


def reachable(url: str, timeout: float = CONNECT_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout`` seconds (nothing is sent)."""
    parts = urllib.parse.urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout):
            return True
    except (OSError, ValueError):
        return False


@dataclass(frozen=True)
class Preflight:
    upstream: Upstream
    ok: bool
    message: str


def preflight(upstreams: Sequence[Upstream], hub=None, connect: Callable[[str], bool] = reachable) -> list[Preflight]:
    """Whether each upstream can be built here: local files exist; downloadable weights are cached by S3PRL
    or their server answers. Imports S3PRL's hub only when some upstream would download."""
    checks, probe = [], []
    for upstream in upstreams:
        if upstream.local_ckpt:
            ok = Path(upstream.ckpt).is_file()
            found = f"local checkpoint {upstream.ckpt}, read by S3PRL's {upstream.name}"
            checks.append(Preflight(upstream, ok, found if ok else f"{upstream.label}: checkpoint {upstream.ckpt} does "
                                    "not exist: fix the path in the upstream list"))
        elif upstream.name in FEATURE_UPSTREAMS:
            checks.append(Preflight(upstream, True, "computed from the waveform: nothing to download"))
        elif upstream.name.endswith("_local"):
            checks.append(Preflight(upstream, False, f"{upstream.label}: {upstream.name} needs a checkpoint file: "
                                                     f"list it as {upstream.name}:/path/to/model.pt"))
        elif upstream.ckpt:  # a URL given as -k
            checks.append(_download_check(upstream, upstream.ckpt, None, connect, f"{upstream.name}:/path/to/model.pt"))
        else:
            probe.append(upstream)
    if probe:
        for upstream in probe:
            try:
                found = weights_of(upstream.name, hub)
            except StimulusError as err:
                checks.append(Preflight(upstream, False, str(err)))
                continue
            if found is None:
                checks.append(Preflight(upstream, True, "needs no download"))
            else:
                checks.append(_download_check(upstream, *found, connect, _local_spelling(upstream.name)))
    order = {u.label: i for i, u in enumerate(upstreams)}
    return sorted(checks, key=lambda c: order[c.upstream.label])


def _local_spelling(name: str) -> str:
    """How to list ``name``'s model from a file: ``wavlm_large:/path/to/model.pt``, which the recipe runs as
    S3PRL's ``wavlm_local``; for upstreams outside the paper's table, the ``*_local`` entry of the model family."""
    if name in LOCAL_ENTRY:
        return f"{name}:/path/to/model.pt (run as S3PRL's {LOCAL_ENTRY[name]}:/path/to/model.pt)"
    return "FAMILY_local:/path/to/model.pt (the hub entry of its model family that reads a file, e.g. wavlm_local)"


def _download_check(upstream: Upstream, url: str, cached: Optional[Path], connect, local: str) -> Preflight:
    if cached is not None and cached.is_file():
        return Preflight(upstream, True, f"weights cached at {cached}")
    host = urllib.parse.urlsplit(url).hostname
    if connect(url):
        return Preflight(upstream, True, f"weights will be downloaded from {host} at first use ({url})")
    where = f" to {cached}" if cached is not None else ""
    return Preflight(upstream, False, (
        f"{upstream.label}: needs its weights from {url}, which are not in S3PRL's download cache, and {host} "
        "cannot be "
        f"reached from this machine (offline?): run once where the network is reachable, or copy the file{where}, or "
        f"list a local checkpoint as {local}"))


def preflight_blocks(settings: Settings, report: Callable[[str], None] = print, hub=None,
                     connect: Callable[[str], bool] = reachable) -> dict:
    """Run the preflight, print its findings, return {upstream label: why its jobs cannot start}."""
    blocked = {}
    for check in preflight(settings.upstreams, hub=hub, connect=connect):
        if not check.ok:
            blocked[check.upstream.label] = f"preflight: {check.message}"
            report(f"preflight: {check.message}")
    return blocked
