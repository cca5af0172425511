"""Whether an upstream's cached means are the same under every fold's waveform normalisation, measured.

The fold normalisation is affine, ``x' = (x - m_k) / (s_k + 1e-6)`` with ``s_k > 0``. An upstream that
layer-normalises the waveform first (``normalize: true``: WavLM/HuBERT/wav2vec 2.0/data2vec Large,
XLS-R), or whose first stage is a bias-free convolution followed by per-channel group norm (the Base
models' extractor), removes it up to its normalisation epsilon; others (fbank, MFCC, ...) do not. Rather
than trusting a list, ``extract`` measures it on the corpus: it encodes a sample of clips under every
requested fold's statistics and compares the cached quantities (means, and layer-normalised means when
stored) with the first fold's. The test holds when, for every hidden state, the largest absolute
difference is at most :data:`TOLERANCE` times that hidden state's largest absolute mean. Then one cache,
encoded under the first fold's statistics, serves every fold; otherwise each fold gets its own cache.
The test and its measured deviation are recorded in the manifest (``invariance``).
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

TOLERANCE = 1e-5  # relative, per hidden state; float32 upstreams measure ~1e-7 (docs/cache.md)
SAMPLE_LENGTHS, SAMPLE_PER_LENGTH = 4, 4  # clips of 4 lengths spread over the corpus, up to 4 of each (one batch)
TEST = ("encode the sample under each fold's waveform statistics; per hidden state, max |difference| / "
        "max |mean of the first fold's| over the sample")


def sample_positions(lengths: Sequence[int], n_lengths: int = SAMPLE_LENGTHS, per_length: int = SAMPLE_PER_LENGTH) -> list[int]:
    """Positions in the length-sorted clip order: at ``n_lengths`` evenly spaced anchors, up to ``per_length``
    clips of the anchor's length (so each length is one batch, as extraction encodes them). Deterministic."""
    chosen: list[int] = []
    for anchor in sorted({int(round(x)) for x in np.linspace(0, len(lengths) - 1, min(n_lengths, len(lengths)))}):
        start = anchor
        while start > 0 and lengths[start - 1] == lengths[anchor] and anchor - start < per_length - 1:
            start -= 1
        chosen.extend(i for i in range(start, min(start + per_length, len(lengths))) if lengths[i] == lengths[anchor])
    return sorted(set(chosen))


def relative_deviation(reference: np.ndarray, other: np.ndarray) -> float:
    """Largest, over hidden states, of max |other - reference| / max |reference| (arrays ``[n, L, D]``)."""
    difference = np.abs(other.astype(np.float64) - reference).max(axis=(0, 2))
    scale = np.abs(reference.astype(np.float64)).max(axis=(0, 2))
    return float(np.max(difference / np.maximum(scale, np.finfo(np.float32).tiny)))


def measure(encode_sample, normalisations: Sequence, clips: Sequence[str]) -> dict:
    """Encode the sample under each normalisation (``encode_sample(norm) -> {key: [n, L, D]}``) and compare.

    Returns the manifest record: the test, tolerance, folds, sample, measured deviation, whether it holds,
    and the clip-forwards it cost.
    """
    reference = encode_sample(normalisations[0])
    deviation = 0.0
    for norm in normalisations[1:]:
        other = encode_sample(norm)
        for key in ("means", "ln_means"):
            if key in reference:
                deviation = max(deviation, relative_deviation(reference[key], other[key]))
    return {"test": TEST, "tolerance": TOLERANCE, "folds": [n.fold for n in normalisations],
            "sample_clips": list(clips), "max_relative_deviation": deviation,
            "holds": bool(np.isfinite(deviation) and deviation <= TOLERANCE),
            "clip_forwards": len(clips) * len(normalisations)}


def describe(record: dict) -> str:
    verdict = "one cache serves every fold" if record["holds"] else "one cache per fold"
    return (f"fold-normalisation invariance over {len(record['sample_clips'])} clips x folds "
            f"{', '.join(map(str, record['folds']))}: max relative deviation {record['max_relative_deviation']:.1e} "
            f"{'<=' if record['holds'] else '>'} {record['tolerance']:.0e}: {verdict}")
