"""Random seeds, checked once for every entry point.

S3PRL seeds Python, numpy and torch with ``args.seed``; numpy accepts only 0 <= seed < 2**32, so any
other value would die in a numpy traceback after the whole start-up. The feature-cache sweep uses the
same seeds (``numpy.random.default_rng([seed, fold])``), so both paths take the same range.
"""

from __future__ import annotations

from s3prl_stimulus.errors import StimulusError

SEED_LIMIT = 2**32


def check_seed(value, option: str = "--seed") -> int:
    """``value`` as an int in [0, 2**32), or a one-line error naming ``option``."""
    try:
        seed = int(str(value).strip())
    except ValueError:
        raise StimulusError(f"{option} {value!r}: give a whole number from 0 to {SEED_LIMIT - 1}, e.g. 1337") from None
    if not 0 <= seed < SEED_LIMIT:
        raise StimulusError(f"{option} {seed}: seeds must be from 0 to {SEED_LIMIT - 1} (numpy's range); e.g. 1337")
    return seed


# --- random-number streams a resumed run must continue ------------------------------------------


def rng_states() -> dict:
    """The process's Python, numpy and torch (CPU and every initialised CUDA device) random-number states.

    Plain ints, lists and uint8 tensors only, so a checkpoint holding them still loads with
    ``torch.load(weights_only=True)`` (numpy's own state holds an ndarray, which it refuses).
    """
    import random

    import numpy as np
    import torch

    kind, key, position, has_gauss, gauss = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": [kind, key.tolist(), int(position), int(has_gauss), float(gauss)],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }


def restore_rng_states(states: dict) -> None:
    """Put back what :func:`rng_states` returned (CUDA only when this process has as many devices)."""
    import random

    import numpy as np
    import torch

    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, key, position, has_gauss, cached = states["numpy"]
    np.random.set_state((kind, np.array(key, dtype=np.uint32), position, has_gauss, cached))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available() and torch.cuda.device_count() == len(states["cuda"]):
        torch.cuda.set_rng_state_all(states["cuda"])
