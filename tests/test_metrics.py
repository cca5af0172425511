"""Metrics against scikit-learn, bootstrap intervals against the confidence-intervals toolkit (exactly)."""

import numpy as np
import pytest
from sklearn.metrics import f1_score

from s3prl_stimulus import CLASSES
from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.metrics import (
    binarize, bootstrap_ci, bootstrap_indices, bootstrap_p_value, ccc, class_f1, label_sets_bootstrap,
    macro_f1, paired_bootstrap, per_class_f1, summary,
)

ci = pytest.importorskip("confidence_intervals", reason="needs the test extra: pip install confidence-intervals==0.0.3")


def sk_macro(y_true, y_pred):
    return f1_score(y_true, y_pred, average="macro", zero_division=0)


def data(n=60, seed=0, speakers=7, flip=0.3):
    rng = np.random.default_rng(seed)
    y_true = (rng.random((n, 6)) < [0.3, 0.2, 0.2, 0.1, 0.5, 0.25]).astype(int)
    y_pred = np.where(rng.random((n, 6)) < flip, 1 - y_true, y_true)
    return y_true, y_pred, rng.integers(1001, 1001 + speakers, size=n)


def toolkit_interval(metric, y_true, y_pred, conditions, bootstraps, seed, samples2=None):
    """The toolkit's own resampling and percentile functions with bootstrap i seeded seed + i."""
    values = []
    for i in range(bootstraps):
        index = ci.get_bootstrap_indices(len(y_pred), conditions, random_state=seed + i)
        extra = () if samples2 is None else (samples2[index],)
        values.append(metric(y_true[index], y_pred[index], *extra))
    return ci.get_conf_int(np.array(values), 5)


# --- binarize and F1 ---------------------------------------------------------------------------


def test_binarize_is_strict_at_one_sixth():
    probs = np.array([[1 / 6, 2 / 12, 0.1666667, 0.5, 0.0, 1.0]])
    assert binarize(probs).tolist() == [[0, 0, 1, 1, 0, 1]]
    assert binarize(probs, threshold=0.5).tolist() == [[0, 0, 0, 0, 0, 1]]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_f1_equals_scikit_learn(seed):
    y_true, y_pred, _ = data(n=80, seed=seed)
    y_true[:, 3] = 0  # absent from the truth, still predicted
    y_pred[:, 5] = 0  # never predicted
    y_true[:, 1] = y_pred[:, 1] = 0  # absent everywhere: zero_division=0
    assert macro_f1(y_true, y_pred) == sk_macro(y_true, y_pred)
    expected = f1_score(y_true, y_pred, average=None, zero_division=0)
    assert per_class_f1(y_true, y_pred) == dict(zip(CLASSES, expected.tolist()))
    assert class_f1("fear")(y_true, y_pred) == expected[3] == 0.0


def test_f1_rejects_bad_matrices():
    y_true, y_pred, _ = data()
    with pytest.raises(StimulusError, match="shape"):
        macro_f1(y_true, y_pred[:-1])
    with pytest.raises(StimulusError, match="binarize"):
        macro_f1(y_true, y_pred * 0.5)
    with pytest.raises(StimulusError, match="2-D"):
        macro_f1(y_true[:, 0], y_pred[:, 0])


# --- bootstrap: identical to the toolkit -------------------------------------------------------


@pytest.mark.parametrize("by_speaker", [False, True])
@pytest.mark.parametrize("data_seed", [0, 1, 2])
def test_bootstrap_ci_equals_toolkit(by_speaker, data_seed):
    y_true, y_pred, speakers = data(n=70, seed=data_seed)
    conditions = speakers if by_speaker else None
    expected = ci.evaluate_with_conf_int(y_pred, sk_macro, labels=y_true, conditions=conditions, num_bootstraps=60)
    value, interval = bootstrap_ci(macro_f1, y_true, y_pred, conditions, num_bootstraps=60)
    assert value == expected[0]
    assert interval == tuple(expected[1])  # identical floats, not approximately


@pytest.mark.parametrize("by_speaker", [False, True])
@pytest.mark.parametrize("seed", [1, 17, 1000])
def test_seed_shifts_the_toolkits_random_states(by_speaker, seed):
    y_true, y_pred, speakers = data(n=50, seed=seed)
    conditions = speakers if by_speaker else None
    expected = toolkit_interval(sk_macro, y_true, y_pred, conditions, 60, seed)
    assert bootstrap_ci(macro_f1, y_true, y_pred, conditions, num_bootstraps=60, seed=seed)[1] == expected
    assert bootstrap_ci(macro_f1, y_true, y_pred, conditions, num_bootstraps=60, seed=seed + 500)[1] != expected


@pytest.mark.parametrize("seed", [0, 5, 123])
def test_bootstrap_indices_equal_toolkit_element_for_element(seed):
    _, _, speakers = data(n=90, seed=seed, speakers=11)
    speakers[:13] = 1001  # unequal speaker sizes
    for conditions in (None, speakers):
        ours = bootstrap_indices(90, conditions, seed)
        theirs = ci.get_bootstrap_indices(90, conditions, random_state=seed)
        np.testing.assert_array_equal(ours, theirs)


def test_alpha_and_other_metrics_equal_toolkit():
    y_true, y_pred, speakers = data(n=60, seed=4)
    sad = class_f1("sad")
    sk_sad = lambda t, p: f1_score(t[:, 1], p[:, 1], zero_division=0)  # noqa: E731
    expected = ci.evaluate_with_conf_int(y_pred, sk_sad, labels=y_true, conditions=speakers, num_bootstraps=50, alpha=10)
    assert bootstrap_ci(sad, y_true, y_pred, speakers, num_bootstraps=50, alpha=10) == (expected[0], tuple(expected[1]))
    # any callable without a counts form goes through the toolkit's exact index sets
    micro = lambda t, p: f1_score(t, p, average="micro", zero_division=0)  # noqa: E731
    for conditions in (None, speakers):
        expected = ci.evaluate_with_conf_int(y_pred, micro, labels=y_true, conditions=conditions, num_bootstraps=30)
        assert bootstrap_ci(micro, y_true, y_pred, conditions, num_bootstraps=30) == (expected[0], tuple(expected[1]))


def test_summary_intervals_equal_bootstrap_ci():
    y_true, y_pred, speakers = data(n=60, seed=6)
    result = summary(y_true, y_pred, speakers, num_bootstraps=50, seed=3)
    assert result["n_clips"] == 60
    assert (result["macro_f1"], tuple(result["ci95"])) == bootstrap_ci(macro_f1, y_true, y_pred, speakers, 50, seed=3)
    for name in ("angry", "happy"):
        value, interval = bootstrap_ci(class_f1(name), y_true, y_pred, speakers, 50, seed=3)
        assert result["per_class_f1"][name] == value and tuple(result["per_class_ci95"][name]) == interval
    assert summary(y_true, y_pred, num_bootstraps=0)["ci95"] is None


def test_bootstrap_argument_errors():
    y_true, y_pred, speakers = data(n=20)
    with pytest.raises(StimulusError, match="one speaker per clip"):
        bootstrap_ci(macro_f1, y_true, y_pred, speakers[:-1], num_bootstraps=5)
    with pytest.raises(StimulusError, match="num_bootstraps"):
        bootstrap_ci(macro_f1, y_true, y_pred, num_bootstraps=0)
    with pytest.raises(StimulusError, match="alpha"):
        bootstrap_ci(macro_f1, y_true, y_pred, num_bootstraps=5, alpha=0)


# --- paired comparisons ------------------------------------------------------------------------


def test_paired_identical_systems_differ_by_zero():
    y_true, y_pred, speakers = data(n=60, seed=7)
    result = paired_bootstrap(macro_f1, y_true, y_pred, y_pred.copy(), speakers, num_bootstraps=50)
    assert result.difference == 0.0 and result.ci == (0.0, 0.0) and result.p_value == 1.0
    assert result.value_a == result.value_b == macro_f1(y_true, y_pred)


@pytest.mark.parametrize("by_speaker", [False, True])
def test_paired_interval_equals_toolkit_difference(by_speaker):
    y_true, y_a, speakers = data(n=60, seed=8, flip=0.2)
    _, y_b, _ = data(n=60, seed=9, flip=0.35)
    conditions = speakers if by_speaker else None
    diff = lambda t, a, b: sk_macro(t, a) - sk_macro(t, b)  # noqa: E731
    expected = ci.evaluate_with_conf_int(y_a, diff, labels=y_true, conditions=conditions, num_bootstraps=50, samples2=y_b)
    result = paired_bootstrap(macro_f1, y_true, y_a, y_b, conditions, num_bootstraps=50)
    assert (result.difference, result.ci) == (expected[0], tuple(expected[1]))
    assert result.value_a == sk_macro(y_true, y_a) and result.value_b == sk_macro(y_true, y_b)


def test_paired_clearly_better_system_has_small_p():
    y_true, noisy, _ = data(n=200, seed=10, flip=0.4)
    result = paired_bootstrap(macro_f1, y_true, y_true, noisy, num_bootstraps=99)
    assert result.difference > 0.3 and result.ci[0] > 0
    assert result.p_value == pytest.approx(2 / 100)  # no bootstrap difference <= 0
    reverse = paired_bootstrap(macro_f1, y_true, noisy, y_true, num_bootstraps=99)
    assert reverse.difference == -result.difference and reverse.p_value == result.p_value


def test_label_sets_use_the_same_resamples():
    y_a, y_pred, speakers = data(n=60, seed=11)
    y_b, _, _ = data(n=60, seed=12)
    diff = lambda t_a, p, t_b: sk_macro(t_a, p) - sk_macro(t_b, p)  # noqa: E731
    expected = ci.evaluate_with_conf_int(y_pred, diff, labels=y_a, conditions=speakers, num_bootstraps=40, samples2=y_b)
    result = label_sets_bootstrap(macro_f1, y_a, y_b, y_pred, speakers, num_bootstraps=40)
    assert (result.difference, result.ci) == (expected[0], tuple(expected[1]))


def test_p_value_definition():
    assert bootstrap_p_value(np.array([0.1, 0.2, 0.3, -0.1])) == pytest.approx(2 * 2 / 5)
    assert bootstrap_p_value(np.array([0.1] * 9)) == pytest.approx(2 / 10)
    assert bootstrap_p_value(np.zeros(9)) == 1.0


# --- CCC ---------------------------------------------------------------------------------------


def test_ccc_hand_computation_and_known_cases():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 4.0, 5.0])
    # means 2.5, 3.25; population variances 1.25, 1.6875; covariance 1.375
    assert ccc(x, y) == pytest.approx(2 * 1.375 / (1.25 + 1.6875 + 0.75**2))
    assert ccc(x, x) == 1.0
    assert ccc(x, -x) == pytest.approx(-2 * 1.25 / (2 * 1.25 + 25))
    assert ccc(x, x + 1) == pytest.approx(2.5 / (2.5 + 1))  # perfectly correlated but shifted: < 1
    assert ccc([0.2, 0.2], [0.2, 0.2]) == 1.0
    with pytest.raises(StimulusError, match="equal length"):
        ccc(x, y[:3])
