"""``torch.load`` for S3PRL's checkpoints on torch >= 2.6 and on machines without CUDA.

Two things stop released upstream checkpoints from loading on today's stacks (docs/s3prl_stack.md):

- torch >= 2.6 unpickles with ``weights_only=True`` by default, which refuses every class it does not know.
  S3PRL's experts call ``torch.load(ckpt)`` without ``weights_only``, and training checkpoints carry a few
  plain-data classes besides tensors. :data:`SAFE_GLOBALS` allow-lists exactly those; anything else is
  still refused, now in one line naming the file and the class (:class:`RefusedCheckpoint`).
- S3PRL's WavLM and DeCoAR 2 experts load without ``map_location``, so tensors saved on a GPU fail to
  deserialize where torch sees no CUDA. Without CUDA, a load that names no ``map_location`` maps to the CPU
  (with CUDA nothing changes).

:func:`install` applies both; ``prepare_s3prl_stack`` calls it before S3PRL runs.
"""

from __future__ import annotations

import argparse
import functools
import pickle
import re

from s3prl_stimulus.errors import StimulusError

UNSAFE_OVERRIDE = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1"


class RefusedCheckpoint(StimulusError, pickle.UnpicklingError):
    """A checkpoint holds a pickled class outside the allow-list (still an ``UnpicklingError`` for callers)."""


def safe_globals() -> list:
    """The classes S3PRL's checkpoints need besides tensors, each a plain-data container:

    - ``argparse.Namespace``: the run's arguments, stored under ``Args`` by S3PRL's downstream and
      pretraining runners (``-e``, ``-a``, ``-i``; TERA/Mockingjay states) and by fairseq-era trainers;
    - numpy scalars and dtypes (``numpy.core`` spelling of numpy 1 files, ``numpy._core`` of numpy 2):
      step counters and losses that training loops save as numpy numbers;
    - numpy arrays (``_reconstruct``, ``ndarray``): statistics kept next to the weights.
    """
    import numpy as np

    core = np._core if hasattr(np, "_core") else np.core
    # numpy >= 1.25 pickles a dtype through its class (numpy.dtypes.Float64DType, ...); older ones through np.dtype
    numbers = list(dict.fromkeys([np.dtype, *(type(np.dtype(code)) for code in "?bhilqBHILQefdg")]))
    allowed = [argparse.Namespace, np.ndarray, *numbers]
    for function in (core.multiarray.scalar, core.multiarray._reconstruct):
        allowed += [function, (function, f"numpy.core.multiarray.{function.__name__}")]
    return allowed


def allow_checkpoint_classes() -> bool:
    """Add :func:`safe_globals` to ``torch.load``'s allow-list; False when nothing was missing."""
    import torch.serialization

    add_safe_globals = getattr(torch.serialization, "add_safe_globals", None)
    if add_safe_globals is None:  # torch < 2.4 unpickles everything anyway
        return False
    present = torch.serialization.get_safe_globals()
    missing = [entry for entry in safe_globals() if entry not in present]
    if missing:
        add_safe_globals(missing)
    return bool(missing)


def install() -> bool:
    """Wrap ``torch.load`` once (CPU mapping without CUDA, one-line refusals); False if already wrapped."""
    import torch

    if getattr(torch.load, "_s3prl_stimulus", False):
        return False
    torch.load = _checkpoint_loader(torch.load)
    return True


def _checkpoint_loader(original):
    import torch

    @functools.wraps(original)
    def load(f, map_location=None, *args, **kwargs):
        if map_location is None and not torch.cuda.is_available():
            map_location = "cpu"  # GPU-saved tensors cannot deserialize here otherwise; with CUDA, keep torch's default
        try:
            return original(f, map_location, *args, **kwargs)
        except RefusedCheckpoint:
            raise
        except pickle.UnpicklingError as error:
            raise RefusedCheckpoint(refusal_message(getattr(f, "name", f), str(error))) from None

    load._s3prl_stimulus = True
    return load


def refusal_message(path, torch_message: str) -> str:
    """One line: which file, which class torch refused, how to go on."""
    found = re.search(r"GLOBAL ([\w.]+)", torch_message)
    what = f"the pickled class {found.group(1)}" if found else f"its content ({_first_line(torch_message)})"
    return (f"checkpoint {path}: torch.load(weights_only=True) refuses {what}, which s3prl-stimulus does not "
            f"allow-list: if you trust the file's source, run once with {UNSAFE_OVERRIDE} (it unpickles anything), "
            "or re-save its tensors and plain values without that class")


def _first_line(text: str) -> str:
    line = next((part.strip() for part in text.splitlines() if "Unsupported" in part), text.strip().splitlines()[0])
    return " ".join(line.split())[:200]
