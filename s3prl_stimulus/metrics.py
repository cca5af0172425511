"""Corpus-level metrics on binary multi-label matrices, with bootstrap confidence intervals.

- ``binarize``: a prediction is positive for a class iff its probability exceeds 1/C, strictly.
- ``macro_f1`` / ``per_class_f1``: scikit-learn's ``f1_score`` (``average='macro'`` / ``None``,
  ``zero_division=0``) on ``[N, C]`` 0/1 matrices, computed once over the whole corpus (never per
  batch): F1_c = 2·TP / (2·TP + FP + FN), 0 when the class is absent from both truth and prediction.
- ``bootstrap_ci``: the percentile bootstrap of Ferrer & Riera's ``confidence-intervals`` toolkit
  (0.0.3), reproduced draw for draw. Bootstrap ``i`` uses a fresh ``numpy.random.RandomState(seed + i)``;
  with ``seed=0`` (the default) this is exactly the toolkit's ``random_state=i``, so the interval is
  identical to ``evaluate_with_conf_int``. Plain mode draws N clips with replacement. Conditioned mode
  (``conditions`` = speaker of each clip) draws the speakers with replacement, then, for each distinct
  drawn speaker, draws that speaker's clips with replacement from a freshly seeded generator and
  repeats them as often as the speaker was drawn. The interval is ``np.percentile`` (linear) at
  ``alpha/2`` and ``100 - alpha/2``.
- Speed: metrics that can be computed from per-class confusion counts (``macro_f1``, ``class_f1(c)``)
  are bootstrapped without materialising resampled matrices: each bootstrap becomes a row of clip
  multiplicities, and one matrix product gives every bootstrap's TP / predicted / true counts at
  once. Any other callable ``metric(y_true, y_pred)`` is evaluated on the toolkit's exact index sets.
- ``paired_bootstrap`` / ``label_sets_bootstrap``: two scorings on the same resamples; see
  :class:`PairedBootstrap` for the p-value definition.
- ``ccc``: Lin's (1989) concordance correlation coefficient with population (ddof=0) moments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import numpy as np

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError

Metric = Callable[[np.ndarray, np.ndarray], float]
CountsFn = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]

DEFAULT_THRESHOLD = 1.0 / len(CLASSES)
_BLOCK = 128  # bootstraps per vectorised block: bounds memory at _BLOCK x N float64 multiplicities


# --- binary matrices and F1 ---------------------------------------------------------------------


def binarize(probs, threshold: float = DEFAULT_THRESHOLD) -> np.ndarray:
    """0/1 int matrix: 1 where ``probs > threshold`` (strictly; the paper's threshold is 1/C)."""
    return (np.asarray(probs, dtype=np.float64) > threshold).astype(np.int64)


def _as_binary(y, name: str) -> np.ndarray:
    array = np.asarray(y)
    if array.ndim != 2 or array.shape[1] < 2:
        raise StimulusError(f"{name} must be a 2-D [clips, classes] 0/1 matrix, got shape {array.shape}")
    if not np.isin(array, (0, 1)).all():
        raise StimulusError(f"{name} must contain only 0 and 1; binarize probabilities first (metrics.binarize)")
    return array.astype(np.int8)


def _check_pair(y_true, y_pred) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _as_binary(y_true, "y_true"), _as_binary(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise StimulusError(f"y_true {y_true.shape} and y_pred {y_pred.shape} differ in shape; score the same clips and classes")
    return y_true, y_pred


def _indicators(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """[N, 3C] float64: per clip, TP indicators, predicted indicators, true indicators."""
    return np.concatenate([y_true & y_pred, y_pred, y_true], axis=1).astype(np.float64)


def _counts(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Whole-corpus TP, predicted and true counts, each [1, C] float64."""
    tp = (y_true & y_pred).sum(axis=0, dtype=np.int64)
    return tuple(c[None, :].astype(np.float64) for c in (tp, y_pred.sum(axis=0), y_true.sum(axis=0)))


def f1_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """Per-class F1 = 2·TP / (true + predicted), 0 where both are 0 (scikit-learn's arithmetic, bit for bit)."""
    denominator = true + pred
    empty = denominator == 0
    f1 = (2.0 * tp) / np.where(empty, 1.0, denominator)
    f1[empty] = 0.0
    return f1


def _macro_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    return f1_from_counts(tp, pred, true).mean(axis=-1)


def macro_f1(y_true, y_pred) -> float:
    """Corpus-level macro-F1 (unweighted mean of per-class F1) of binary [N, C] matrices."""
    return float(_macro_from_counts(*_counts(*_check_pair(y_true, y_pred)))[0])


macro_f1.from_counts = _macro_from_counts  # lets bootstraps run on counts (see module doc)


def per_class_f1(y_true, y_pred, classes: Sequence[str] = CLASSES) -> dict[str, float]:
    """Corpus-level F1 of each class, keyed by class name (``classes`` names the columns)."""
    y_true, y_pred = _check_pair(y_true, y_pred)
    if len(classes) != y_true.shape[1]:
        raise StimulusError(f"{y_true.shape[1]} label columns but {len(classes)} class names; pass one name per column")
    values = f1_from_counts(*_counts(y_true, y_pred))[0]
    return {name: float(v) for name, v in zip(classes, values)}


def class_f1(cls: str | int, classes: Sequence[str] = CLASSES) -> Metric:
    """A metric ``(y_true, y_pred) -> F1 of one class`` (by name or column), bootstrappable on counts."""
    column = classes.index(cls) if isinstance(cls, str) else int(cls)

    def from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
        return f1_from_counts(tp, pred, true)[..., column]

    def metric(y_true, y_pred) -> float:
        return float(from_counts(*_counts(*_check_pair(y_true, y_pred)))[0])

    metric.from_counts = from_counts
    metric.__name__ = f"f1_{classes[column]}"
    return metric


# --- bootstrap resampling (the toolkit's draws) -------------------------------------------------


def _reseeded(rng: np.random.RandomState, seed: int) -> np.random.RandomState:
    # rng.seed(s) is RandomState(s)'s legacy seeding without the ~0.1 ms object construction.
    rng.seed(seed)
    return rng


def _draw(rng: np.random.RandomState, seed: int, size: int) -> np.ndarray:
    """``sklearn.utils.resample(arange(size), random_state=seed)``'s draw: ``choice(size, size)``."""
    return _reseeded(rng, seed).choice(size, size=size, replace=True)


@dataclass(frozen=True)
class _Groups:
    """Clips grouped by condition (speaker), conditions in ``np.unique`` order as the toolkit uses."""

    members: list  # per condition: clip positions, ascending
    sizes: np.ndarray  # clips per condition
    padded: np.ndarray  # [conditions, largest size] members, padded with -1 (never read past size)

    @classmethod
    def of(cls, conditions: np.ndarray) -> "_Groups":
        _, inverse = np.unique(conditions, return_inverse=True)
        order = np.argsort(inverse, kind="stable")
        members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])
        sizes = np.array([len(m) for m in members])
        padded = np.full((len(members), sizes.max()), -1, dtype=np.int64)
        for row, m in enumerate(members):
            padded[row, : len(m)] = m
        return cls(members, sizes, padded)


def _drawn_groups(rng, seed: int, groups: _Groups) -> tuple[np.ndarray, np.ndarray]:
    """Distinct drawn conditions (ascending) and how many times each was drawn."""
    drawn = _draw(rng, seed, len(groups.sizes))
    return np.unique(drawn, return_counts=True)


def _conditioned_indices(rng, seed: int, groups: _Groups) -> np.ndarray:
    """The toolkit's index set in conditioned mode, element for element (order included)."""
    parts = []
    for group, times in zip(*_drawn_groups(rng, seed, groups)):
        members = groups.members[group]
        parts.append(np.repeat(members[_draw(rng, seed, len(members))], times))
    return np.concatenate(parts)


def bootstrap_indices(n: int, conditions=None, seed: int = 0) -> np.ndarray:
    """Index set of one bootstrap, identical to the toolkit's ``get_bootstrap_indices(n, conditions, seed)``."""
    rng = np.random.RandomState(0)
    if conditions is None:
        return _draw(rng, seed, n)
    return _conditioned_indices(rng, seed, _Groups.of(_check_conditions(conditions, n)))


def _conditioned_multiplicity(rng, seed: int, groups: _Groups) -> tuple[np.ndarray, np.ndarray]:
    """(clip positions, weights) whose bincount is how often each clip is in the bootstrap set.

    Every within-condition draw restarts from ``RandomState(seed)``, so conditions of equal size
    share one draw: one RNG call per distinct size, then one gather for all of them.
    """
    drawn, times = _drawn_groups(rng, seed, groups)
    drawn_sizes = groups.sizes[drawn]
    positions, weights = [], []
    for size in np.unique(drawn_sizes):
        same = drawn_sizes == size
        draw = _draw(rng, seed, int(size))
        positions.append(groups.padded[drawn[same]][:, draw].ravel())
        weights.append(np.repeat(times[same].astype(np.float64), size))
    return np.concatenate(positions), np.concatenate(weights)


def _multiplicity_blocks(n: int, conditions, num_bootstraps: int, seed: int) -> Iterator[np.ndarray]:
    """Yield [block, n] float64 matrices: row b = how many times each clip is in bootstrap b."""
    rng = np.random.RandomState(0)
    groups = None if conditions is None else _Groups.of(conditions)
    for start in range(0, num_bootstraps, _BLOCK):
        seeds = range(seed + start, seed + min(start + _BLOCK, num_bootstraps))
        offsets = np.arange(len(seeds))[:, None] * n
        if groups is None:
            draws = np.stack([_draw(rng, s, n) for s in seeds])
            flat = np.bincount((draws + offsets).ravel(), minlength=len(seeds) * n).astype(np.float64)
        else:
            pairs = [_conditioned_multiplicity(rng, s, groups) for s in seeds]
            positions = np.concatenate([p + offsets[b, 0] for b, (p, _) in enumerate(pairs)])
            flat = np.bincount(positions, weights=np.concatenate([w for _, w in pairs]), minlength=len(seeds) * n)
        yield flat.reshape(len(seeds), n)


def _check_conditions(conditions, n: int) -> np.ndarray:
    conditions = np.asarray(conditions)
    if conditions.shape != (n,):
        raise StimulusError(f"conditions must give one speaker per clip: got shape {conditions.shape} for {n} clips")
    return conditions


def _check_bootstrap_args(num_bootstraps: int, alpha: float) -> None:
    if int(num_bootstraps) < 1:
        raise StimulusError(f"num_bootstraps must be at least 1, got {num_bootstraps}")
    if not 0 < alpha < 100:
        raise StimulusError(f"alpha must be in (0, 100) percent, got {alpha} (95% intervals: alpha=5)")


def bootstrap_values(
    metric: Metric,
    pairs: Sequence[tuple[np.ndarray, np.ndarray]],
    conditions=None,
    num_bootstraps: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """[len(pairs), num_bootstraps] metric values, every (y_true, y_pred) pair scored on the same resamples.

    A counts metric whose ``from_counts`` returns k values per bootstrap gives [len(pairs), B, k].
    """
    if not pairs:
        raise StimulusError("bootstrap_values needs at least one (y_true, y_pred) pair to score")
    pairs = [_check_pair(t, p) for t, p in pairs]
    n = len(pairs[0][0])
    if any(len(t) != n for t, _ in pairs):
        raise StimulusError("every scoring in a paired bootstrap must cover the same clips")
    conditions = None if conditions is None else _check_conditions(conditions, n)
    from_counts: Optional[CountsFn] = getattr(metric, "from_counts", None)
    if from_counts is None:
        return _generic_values(metric, pairs, conditions, num_bootstraps, seed)
    indicators = [_indicators(t, p) for t, p in pairs]
    classes = pairs[0][0].shape[1]
    blocks = []
    for weights in _multiplicity_blocks(n, conditions, num_bootstraps, seed):
        row = []
        for ind in indicators:
            counts = weights @ ind  # [block, 3C]: TP, predicted, true per class, exact integers
            row.append(from_counts(*np.split(counts, [classes, 2 * classes], axis=1)))
        blocks.append(np.stack(row))
    return np.concatenate(blocks, axis=1)


def _generic_values(metric: Metric, pairs, conditions, num_bootstraps: int, seed: int) -> np.ndarray:
    """Any callable metric: evaluated on the toolkit's exact index sets, one bootstrap at a time."""
    n = len(pairs[0][0])
    rng = np.random.RandomState(0)
    groups = None if conditions is None else _Groups.of(conditions)
    values = np.zeros((len(pairs), num_bootstraps))
    for b in range(num_bootstraps):
        index = _draw(rng, seed + b, n) if groups is None else _conditioned_indices(rng, seed + b, groups)
        for k, (t, p) in enumerate(pairs):
            values[k, b] = metric(t[index], p[index])
    return values


def percentile_interval(values: np.ndarray, alpha: float = 5) -> tuple[float, float]:
    """``(alpha/2, 100 - alpha/2)`` percentiles, numpy's default linear rule (the toolkit's)."""
    return float(np.percentile(values, alpha / 2)), float(np.percentile(values, 100 - alpha / 2))


def bootstrap_ci(
    metric: Metric,
    y_true,
    y_pred,
    conditions=None,
    num_bootstraps: int = 1000,
    alpha: float = 5,
    seed: int = 0,
) -> tuple[float, tuple[float, float]]:
    """(metric on all clips, (low, high)): the toolkit's ``evaluate_with_conf_int`` interval, exactly.

    ``conditions``: speaker (or any group) of each clip for the conditioned bootstrap. ``seed``:
    bootstrap i uses ``RandomState(seed + i)``; 0 reproduces the toolkit.
    """
    _check_bootstrap_args(num_bootstraps, alpha)
    y_true, y_pred = _check_pair(y_true, y_pred)
    values = bootstrap_values(metric, [(y_true, y_pred)], conditions, num_bootstraps, seed)[0]
    return float(metric(y_true, y_pred)), percentile_interval(values, alpha)


def _f1_and_macro_from_counts(tp: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    """[..., C + 1]: per-class F1 then macro-F1, one column each, from the same counts."""
    f1 = f1_from_counts(tp, pred, true)
    return np.concatenate([f1, f1.mean(axis=-1, keepdims=True)], axis=-1)


def summary(
    y_true, y_pred, conditions=None, num_bootstraps: int = 1000, seed: int = 0, classes: Sequence[str] = CLASSES
) -> dict:
    """Macro-F1 and per-class F1 with 95% bootstrap intervals, all from the same resamples.

    Returns ``{"n_clips", "macro_f1", "ci95": [lo, hi], "per_class_f1": {class: f1},
    "per_class_ci95": {class: [lo, hi]}}``; each interval equals ``bootstrap_ci`` of that metric.
    ``num_bootstraps=0`` skips the intervals (they are then ``None``).
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    per_class = per_class_f1(y_true, y_pred, classes)
    intervals: list = [None] * (len(classes) + 1)
    if num_bootstraps:
        _check_bootstrap_args(num_bootstraps, 5)
        metric = lambda t, p: None  # noqa: E731 (only its counts form is used)
        metric.from_counts = _f1_and_macro_from_counts
        values = bootstrap_values(metric, [(y_true, y_pred)], conditions, num_bootstraps, seed)[0]
        intervals = [list(percentile_interval(values[:, k])) for k in range(values.shape[1])]
    return {
        "n_clips": int(len(y_true)),
        "macro_f1": macro_f1(y_true, y_pred),
        "ci95": intervals[-1],
        "per_class_f1": per_class,
        "per_class_ci95": dict(zip(classes, intervals[:-1])),
    }


# --- paired comparisons -------------------------------------------------------------------------


@dataclass(frozen=True)
class PairedBootstrap:
    """Two scorings compared on the same bootstrap resamples.

    ``difference`` = value_a − value_b on all clips; ``ci`` its percentile interval over the
    bootstraps' differences d_1..d_B. ``p_value`` is two-sided for "no difference":
    ``min(1, 2·(1 + min(#{d_b <= 0}, #{d_b >= 0})) / (B + 1))``, i.e. twice the share of bootstrap
    differences on the less populated side of zero, with the +1 correction that keeps a finite
    bootstrap from reporting p = 0. Identical scorings give d_b = 0 for all b, hence p = 1.
    """

    value_a: float
    value_b: float
    difference: float
    ci: tuple[float, float]
    p_value: float
    num_bootstraps: int


def _paired(metric: Metric, pair_a, pair_b, conditions, num_bootstraps, alpha, seed) -> PairedBootstrap:
    _check_bootstrap_args(num_bootstraps, alpha)
    values = bootstrap_values(metric, [pair_a, pair_b], conditions, num_bootstraps, seed)
    differences = values[0] - values[1]
    value_a, value_b = float(metric(*pair_a)), float(metric(*pair_b))
    return PairedBootstrap(
        value_a, value_b, value_a - value_b, percentile_interval(differences, alpha),
        bootstrap_p_value(differences), int(num_bootstraps),
    )


def bootstrap_p_value(differences: np.ndarray) -> float:
    """Two-sided p-value for "difference = 0" from bootstrap differences (see :class:`PairedBootstrap`)."""
    differences = np.asarray(differences)
    tail = min(int((differences <= 0).sum()), int((differences >= 0).sum()))
    return min(1.0, 2.0 * (1 + tail) / (len(differences) + 1))


def paired_bootstrap(
    metric: Metric, y_true, y_pred_a, y_pred_b, conditions=None,
    num_bootstraps: int = 1000, alpha: float = 5, seed: int = 0,
) -> PairedBootstrap:
    """Compare two systems' predictions on the same clips: metric(A) − metric(B), CI and p-value."""
    return _paired(metric, (y_true, y_pred_a), (y_true, y_pred_b), conditions, num_bootstraps, alpha, seed)


def label_sets_bootstrap(
    metric: Metric, y_true_a, y_true_b, y_pred, conditions=None,
    num_bootstraps: int = 1000, alpha: float = 5, seed: int = 0,
) -> PairedBootstrap:
    """Score one prediction set against two label sets (e.g. voice vs face): metric(A) − metric(B)."""
    return _paired(metric, (y_true_a, y_pred), (y_true_b, y_pred), conditions, num_bootstraps, alpha, seed)


# --- agreement ----------------------------------------------------------------------------------


def ccc(x, y) -> float:
    """Lin's concordance correlation coefficient, 2·cov / (var x + var y + (mean x − mean y)²), ddof=0.

    Two identical constant vectors (0/0) agree perfectly and give 1.0.
    """
    x, y = np.asarray(x, dtype=np.float64).ravel(), np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise StimulusError(f"ccc needs two non-empty vectors of equal length, got {x.size} and {y.size} values")
    mean_x, mean_y = x.mean(), y.mean()
    covariance = ((x - mean_x) * (y - mean_y)).mean()
    denominator = x.var() + y.var() + (mean_x - mean_y) ** 2
    return 1.0 if denominator == 0 else float(2.0 * covariance / denominator)
