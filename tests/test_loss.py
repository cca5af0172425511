"""Class-balanced weights and soft-target cross-entropy against straightforward loop computations."""

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
import torch

from s3prl_stimulus.errors import StimulusError
from s3prl_stimulus.loss import (ClassBalancedSoftCrossEntropy, class_balanced_weights, soft_cross_entropy,
                                 soft_cross_entropy_and_gradient)


def random_labels(n, seed=0, rates=(0.2, 0.15, 0.15, 0.1, 0.4, 0.2)):
    return (np.random.default_rng(seed).random((n, 6)) < rates).astype(int)


def loop_weights(labels):
    """Cui et al. (2019) term by term in plain Python floats."""
    n_clips = len(labels)
    beta = (n_clips - 1) / n_clips
    raw = []
    for c in range(len(labels[0])):
        n_c = sum(int(row[c]) for row in labels)
        raw.append((1 - beta) / (1 - beta**n_c))
    return [w * len(raw) / sum(raw) for w in raw]


def loop_loss(logits, targets, weights=None):
    total = 0.0
    for z, t in zip(logits.tolist(), targets.tolist()):
        log_norm = math.log(sum(math.exp(v) for v in z))
        ce = -sum(tc * (zc - log_norm) for tc, zc in zip(t, z))
        scale = 1.0 if weights is None else sum(w * tc for w, tc in zip(weights, t))
        total += scale * ce
    return total / len(logits)


@pytest.mark.parametrize("n, seed", [(40, 0), (500, 1), (5000, 2)])
def test_weights_equal_loop_and_sum_to_c(n, seed):
    labels = random_labels(n, seed)
    weights = class_balanced_weights(labels)
    assert weights.dtype == np.float64 and weights.shape == (6,)
    np.testing.assert_allclose(weights, loop_weights(labels.tolist()), rtol=1e-9)
    assert weights.sum() == pytest.approx(6.0, abs=1e-12)
    counts = labels.sum(axis=0)
    assert weights[np.argmin(counts)] == weights.max() and weights[np.argmax(counts)] == weights.min()


def test_weights_are_accurate_when_beta_is_close_to_one():
    labels = random_labels(4466, seed=3)
    labels[:, 3] = 0
    labels[:3, 3] = 1  # a very rare class next to common ones
    getcontext().prec = 50
    beta = Decimal(4465) / Decimal(4466)
    raw = [(1 - beta) / (1 - beta ** int(k)) for k in labels.sum(axis=0)]
    exact = [float(w * 6 / sum(raw)) for w in raw]
    np.testing.assert_allclose(class_balanced_weights(labels), exact, rtol=1e-14)


def test_weights_single_clip_and_equal_counts():
    np.testing.assert_allclose(class_balanced_weights(np.ones((1, 6), dtype=int)), np.ones(6))
    np.testing.assert_allclose(class_balanced_weights(np.eye(6, dtype=int)), np.ones(6))


def test_weights_refuse_a_class_without_positives():
    labels = random_labels(50)
    labels[:, 2] = 0
    with pytest.raises(StimulusError, match="class disgust has no positive clip among the 50"):
        class_balanced_weights(labels)
    with pytest.raises(StimulusError, match="binary"):
        class_balanced_weights(labels * 0.5)
    with pytest.raises(StimulusError, match="non-empty"):
        class_balanced_weights(np.zeros((0, 6)))


def batch(seed=0, size=7):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(size, 6, generator=generator, dtype=torch.float64) * 2
    targets = torch.softmax(torch.randn(size, 6, generator=generator, dtype=torch.float64), dim=-1) * 0.94 + 0.01
    return logits, targets


@pytest.mark.parametrize("seed", [0, 1])
def test_soft_cross_entropy_equals_loop(seed):
    logits, targets = batch(seed)
    weights = class_balanced_weights(random_labels(300, seed))
    assert soft_cross_entropy(logits, targets).item() == pytest.approx(loop_loss(logits, targets), rel=1e-12)
    weighted = soft_cross_entropy(logits, targets, weights).item()
    assert weighted == pytest.approx(loop_loss(logits, targets, weights.tolist()), rel=1e-12)
    assert weighted != pytest.approx(soft_cross_entropy(logits, targets).item(), rel=1e-3)


def test_plain_soft_cross_entropy_matches_torch():
    logits, targets = batch(2)
    expected = torch.nn.functional.cross_entropy(logits, targets)
    assert torch.allclose(soft_cross_entropy(logits, targets), expected, rtol=1e-12)
    with pytest.raises(StimulusError, match="batch, classes"):
        soft_cross_entropy(logits, targets[:, :5])


def test_module_holds_weights_as_buffer_and_backpropagates():
    labels = random_labels(200, 4)
    module = ClassBalancedSoftCrossEntropy.from_labels(labels)
    assert "class_weights" in dict(module.named_buffers()) and "class_weights" in module.state_dict()
    assert list(module.parameters()) == []
    np.testing.assert_allclose(module.class_weights.numpy(), class_balanced_weights(labels), rtol=1e-6)
    logits, targets = batch(5)
    logits = logits.float().requires_grad_()
    loss = module(logits, targets.float())
    expected = loop_loss(logits.detach().double(), targets, module.class_weights.double().tolist())
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0
    plain = ClassBalancedSoftCrossEntropy()
    assert plain(logits.detach(), targets.float()).item() == pytest.approx(loop_loss(logits.detach().double(), targets), rel=1e-5)


@pytest.mark.parametrize("per_clip_weights", [False, True])
def test_closed_form_gradient_equals_autograd(per_clip_weights):
    """The sweep's closed-form loss gradient: autograd's, with padding rows (zero targets) and per-clip weight rows."""
    rng = torch.Generator().manual_seed(3)
    logits = torch.randn(40, 6, generator=rng, dtype=torch.float64) * 3
    targets = torch.softmax(torch.randn(40, 6, generator=rng, dtype=torch.float64), -1) * 0.94 + 0.01
    targets[-5:] = 0  # padding rows of a short batch
    weights = torch.rand(40, 6, generator=rng, dtype=torch.float64) * 4 if per_clip_weights else torch.rand(6, dtype=torch.float64)
    leaf = logits.clone().requires_grad_(True)
    expected = soft_cross_entropy(leaf, targets, weights)
    expected.backward()
    loss, grad = soft_cross_entropy_and_gradient(logits, targets, weights)
    assert float(loss) == pytest.approx(float(expected.detach()), rel=1e-14)
    torch.testing.assert_close(grad, leaf.grad, rtol=1e-12, atol=1e-15)
    assert float(grad[-5:].abs().max()) == 0.0
    assert float(grad.abs().max()) > 1e-3
