"""Which S3PRL 0.4.18 hub entries read ``-k`` (``upstream_ckpt``) and which drop it.

S3PRL passes ``-k`` to the hub function as ``ckpt``. The entries of the paper's pretrained models
(``wavlm_large``, ``xls_r_1b``, ...) overwrite ``kwargs["ckpt"]`` with their own download URL, and the
waveform features (``fbank``, ...) have no weights at all, so ``-u wavlm_large -k /models/wavlm.pt``
silently downloads (or fails offline mid-run) instead of reading the file. A local file is read by its
model family's local entry, which :data:`LOCAL_ENTRY` names for each of the paper's upstreams. Both
tables were read from the ``hubconf.py`` files of S3PRL 0.4.18's upstreams (``tests/test_compat.py``
checks them against the installed S3PRL): e.g. ``vq_apc`` is ``apc_url`` with another URL, so its file is
read by ``apc_local``; ``modified_cpc`` lives in ``upstream/cpc`` and its file is read by ``cpc_local``.

Imports no third-party module: the launcher consults it before S3PRL is imported. The local entries come from the paper-upstream table (:mod:`.upstreams`), the one place they are written.
"""

from __future__ import annotations

from typing import Optional

from s3prl_stimulus.integration.upstreams import PAPER_UPSTREAMS

LOCAL_ENTRY = {u.name: u.local for u in PAPER_UPSTREAMS if u.local}
"""The paper's pretrained upstreams (S3PRL names) -> the hub entry that loads the same model from ``-k FILE``."""

WAVEFORM_FEATURES = frozenset({"fbank", "fbank_no_cmvn", "mel", "mfcc", "linear", "spectrogram"})
"""Upstreams computed from the waveform alone: no weights, nothing to download, ``-k`` unused."""

IGNORES_CKPT = frozenset(LOCAL_ENTRY) | WAVEFORM_FEATURES
"""Hub entries that drop ``-k``."""


def local_entry(name: str) -> Optional[str]:
    """The hub entry that reads ``name``'s model from a file, or None when this table does not know one."""
    return LOCAL_ENTRY.get(name)


def ignored_ckpt(name: str, ckpt: Optional[str]) -> Optional[str]:
    """One line saying that ``-k ckpt`` will be ignored by hub entry ``name`` and what to run instead; None when
    ``-k`` is absent or ``name`` reads it."""
    if not ckpt or name not in IGNORES_CKPT:
        return None
    if name in WAVEFORM_FEATURES:
        return f"-k {ckpt} is ignored: {name} is computed from the waveform and has no weights; drop -k"
    return (f"-k {ckpt} is ignored: S3PRL's {name} always loads its own download ({name} replaces -k with its URL); "
            f"to use the file, run -u {LOCAL_ENTRY[name]} -k {ckpt}")


def fetch_failure(error: BaseException, name: Optional[str]) -> Optional[str]:
    """One line for a failed download of upstream ``name``'s weights (no network, proxy, server down), or None
    when ``error`` is not a network failure. S3PRL downloads with urllib, then falls back to requests, so
    either library's error ends up here; a raw traceback from deep inside the hub helps nobody."""
    if not _is_network_error(error):
        return None
    local = LOCAL_ENTRY.get(name or "")
    instead = (f"-u {local} -k FILE" if local else "its local entry (NAME_local) with -k FILE")
    reason = " ".join(f"{type(error).__name__}: {error}".split())[:200]
    return (f"the weights of upstream {name} could not be fetched ({reason}); check the network or proxy, or "
            f"download the checkpoint elsewhere, copy it here and run {instead} (docs/recipes.md#upstreams)")


def _is_network_error(error: BaseException) -> bool:
    import socket
    import urllib.error

    network = (urllib.error.URLError, ConnectionError, socket.timeout, socket.gaierror)
    try:
        import requests

        network += (requests.exceptions.RequestException,)
    except ImportError:
        pass
    current: Optional[BaseException] = error
    while current is not None:
        if isinstance(current, network):
            return True
        current = current.__cause__ or current.__context__
    return False
