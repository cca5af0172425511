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
