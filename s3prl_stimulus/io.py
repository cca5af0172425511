"""Atomic file output: results are written to a temporary name beside the target, then renamed,
so an interrupted or failed run never leaves a half-written file under its final name.

The temporary file is created private (``mkstemp``: mode 0600) so nobody reads it half-written; before
the rename it gets the mode a plain ``open()`` would have given it (0666 less the umask), so results,
caches and reports shared on a cluster are as readable as S3PRL's own checkpoints."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
import threading
from pathlib import Path
from typing import Iterator


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
    """The process's umask, read without changing it where the kernel reports it (Linux >= 4.7)."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    with _UMASK_LOCK:  # os.umask can only be read by setting it: set it straight back
        mask = os.umask(0o077)
        os.umask(mask)
    return mask


def new_file_mode() -> int:
    """The mode ``open(path, "w")`` gives a new file: 0666 less the umask."""
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp$")
"""Names :func:`atomic_path` gives its temporary files (``mkstemp``: ``.<target>.<8 random characters>.tmp``)."""


def remove_stale_temporaries(directory: str | os.PathLike) -> list:
    """Delete the temporary files that writes killed mid-way (SIGKILL, power loss) left in ``directory``.

    ``atomic_path`` removes its temporary file on any error, but nothing runs after a SIGKILL. Call it only
    when no other process writes into ``directory`` (a run's own expdir, before the run starts). Returns the
    names removed.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = sorted(p for p in directory.iterdir() if TEMPORARY.match(p.name) and p.is_file())
    for path in stale:
        path.unlink(missing_ok=True)
    return [p.name for p in stale]


def check_writable_dir(path: str | os.PathLike, option: str) -> Path:
    """``path`` if a directory can be written or created there (nothing is created); else a one-line error.

    Called before any work, so a wrong ``--out`` fails in a second rather than after hours of training.
    """
    path = Path(path)
    existing = path
    while not os.path.lexists(existing) and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise _error(f"{option} {path}: {existing} is not a directory; choose another {option}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise _error(f"{option} {path}: cannot write in {existing} (permission denied or read-only file system); "
                     f"choose a writable {option}")
    return path


def _error(message: str) -> Exception:
    from s3prl_stimulus.errors import StimulusError

    return StimulusError(message)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike, obj) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_csv_atomic(path: str | os.PathLike, frame, **to_csv_kwargs) -> None:
    """Write a pandas DataFrame as CSV atomically (``index=False`` unless given)."""
    to_csv_kwargs.setdefault("index", False)
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, **to_csv_kwargs)


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, read in 4 MiB blocks (corpus clips, cache chunks, checkpoints, packaged data)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()
