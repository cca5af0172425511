"""A training run killed at any moment leaves nothing that a rerun with ``-a`` trips on.

S3PRL 0.4.18 writes its checkpoints in place (``torch.save(states, "EXPDIR/states-N.ckpt")``): a run
killed while writing leaves a truncated ``states-N.ckpt``, the one ``-a`` resumes from. The launcher
therefore makes every ``*.ckpt`` that ``torch.save`` writes to a path atomic (:func:`atomic_checkpoint_saves`:
a temporary file beside it, renamed when complete), and before a training run starts it deletes the
temporary files that a killed write of the previous attempt left in the expdir
(:func:`clear_interrupted_writes`).

What remains: with ``max_keep: 1`` S3PRL deletes the previous ``states-*.ckpt`` just before writing the
next one, so a kill in that moment leaves none and ``-a`` starts the run again from step 0 (the same
outputs, later).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

from s3prl_stimulus.io import atomic_path, remove_stale_temporaries

_MARK = "_s3prl_stimulus_atomic"


def atomic_checkpoint_saves() -> None:
    """Route ``torch.save(obj, "X.ckpt")`` (a path ending in ``.ckpt``) through :func:`atomic_path`. Idempotent."""
    import torch

    original = torch.save
    if getattr(original, _MARK, False):
        return

    @functools.wraps(original)
    def save(obj, f, *args, **kwargs):
        if isinstance(f, (str, os.PathLike)) and os.fspath(f).endswith(".ckpt"):
            with atomic_path(f) as tmp:
                return original(obj, tmp, *args, **kwargs)
        return original(obj, f, *args, **kwargs)

    setattr(save, _MARK, True)
    torch.save = save


def clear_interrupted_writes(expdir) -> list:
    """Delete the temporary files of writes killed mid-way in ``expdir`` (a training run's own directory,
    before the run starts: nothing else writes there then); returns their names."""
    return remove_stale_temporaries(Path(expdir))
