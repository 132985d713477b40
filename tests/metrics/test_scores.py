"""Correctness of KID, IS, precision/recall, class fidelity and the per-class helper."""

from __future__ import annotations

import math

import numpy as np
import pytest

from augment.metrics.scores import (
    class_fidelity,
    inception_score,
    kid,
    mmd2_unbiased,
    per_class,
    polynomial_kernel,
    precision_recall,
)


def _gauss(n: int, d: int, shift: float = 0.0, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)) + shift


# ---------------------------------------------------------------------------------- KID


def test_polynomial_kernel_formula():
    x, y = _gauss(4, 5, seed=1), _gauss(3, 5, seed=2)
    expected = (x @ y.T / 5 + 1) ** 3
    np.testing.assert_allclose(polynomial_kernel(x, y), expected, rtol=1e-12)


def test_mmd2_unbiased_matches_explicit_double_sum():
    x, y = _gauss(6, 3, seed=3), _gauss(5, 3, shift=0.5, seed=4)

    def k(a, b):
        return (a @ b / 3 + 1) ** 3

    sxx = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    syy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    sxy = sum(k(x[i], y[j]) for i in range(6) for j in range(5)) / 30
    assert mmd2_unbiased(x, y) == pytest.approx(sxx + syy - 2 * sxy, rel=1e-10)


def test_kid_same_distribution_is_near_zero_and_shift_is_positive():
    real = _gauss(400, 16, seed=0)
    same = _gauss(400, 16, seed=1)
    shifted = _gauss(400, 16, shift=1.0, seed=2)
    k_same = kid(real, same, subsets=20, subset_size=200)
    k_shift = kid(real, shifted, subsets=20, subset_size=200)
    assert abs(k_same.mean) < 3 * k_same.std + 0.02
    assert k_shift.mean > 0.5  # (for d=16, shift 1: MMD^2 ~ 2.6)
    assert k_shift.mean > 10 * abs(k_same.mean)
    assert k_shift.subsets == 20 and k_shift.subset_size == 200


def test_kid_is_unbiased_at_small_n():
    # The unbiased estimator averages to ~0 for equal distributions even with 10 samples a set
    # (a biased V-statistic would be clearly positive).
    rng = np.random.default_rng(5)
    vals = [mmd2_unbiased(rng.normal(size=(10, 8)), rng.normal(size=(10, 8))) for _ in range(400)]
    se = np.std(vals) / math.sqrt(len(vals))
    assert abs(np.mean(vals)) < 4 * se


def test_kid_small_sets_use_whole_set_once_and_rng_reproducible():
    a, b = _gauss(30, 4, seed=0), _gauss(20, 4, shift=0.3, seed=1)
    r = kid(a, b, subsets=50, subset_size=1000)
    assert r.subsets == 1 and r.std == 0.0
    assert r.mean == pytest.approx(mmd2_unbiased(a, b))
    r1 = kid(a, b, subsets=10, subset_size=10, rng=7)
    r2 = kid(a, b, subsets=10, subset_size=10, rng=np.random.default_rng(7))
    assert r1 == r2


# ---------------------------------------------------------------------------------- IS


def test_is_constant_predictions_is_one():
    probs = np.tile([0.2, 0.5, 0.3], (100, 1))
    r = inception_score(probs, splits=5)
    assert r.mean == pytest.approx(1.0, abs=1e-12) and r.std == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("k", [2, 5, 10])
def test_is_confident_uniform_is_k(k):
    labels = np.arange(k * 20) % k  # every split of 2k consecutive rows holds each class twice
    probs = np.eye(k)[labels]
    r = inception_score(probs, splits=10)
    assert r.mean == pytest.approx(k, rel=1e-12)
    assert r.std == pytest.approx(0.0, abs=1e-9)


def test_is_between_one_and_k_and_normalize():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(200, 4)) * 2
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    r = inception_score(probs, splits=4)
    assert 1.0 < r.mean < 4.0
    with pytest.raises(ValueError, match="sum to 1"):
        inception_score(probs * 0.5)
    assert inception_score(probs * 0.5, splits=4, normalize=True).mean == pytest.approx(r.mean)


# ---------------------------------------------------------------------------------- PR


def test_pr_identical_sets_is_one():
    x = _gauss(300, 8, seed=0)
    r = precision_recall(x, x.copy(), k=3, chunk=64)
    assert r.precision == 1.0 and r.recall == 1.0


def test_pr_disjoint_sets_is_zero():
    x = _gauss(200, 8, seed=0)
    y = _gauss(200, 8, shift=50.0, seed=1)
    r = precision_recall(x, y, k=3, chunk=50)
    assert r.precision == 0.0 and r.recall == 0.0


def test_pr_same_distribution_high_and_mode_collapse_low_recall():
    real = _gauss(500, 4, seed=0)
    same = _gauss(500, 4, seed=1)
    r = precision_recall(real, same)
    assert r.precision > 0.8 and r.recall > 0.8
    collapsed = _gauss(500, 4, seed=2) * 0.05  # all samples near the mode: precise, no coverage
    rc = precision_recall(real, collapsed)
    assert rc.precision > 0.95 and rc.recall < 0.2


def test_pr_chunking_does_not_change_result():
    real, fake = _gauss(257, 5, seed=0), _gauss(190, 5, shift=0.4, seed=1)
    a = precision_recall(real, fake, k=5, chunk=7)
    b = precision_recall(real, fake, k=5, chunk=10_000)
    assert a == b


def test_pr_knn_radius_against_brute_force():
    real, fake = _gauss(60, 3, seed=3), _gauss(40, 3, shift=0.7, seed=4)
    d_rr = np.linalg.norm(real[:, None] - real[None], axis=-1)
    radii = np.sort(d_rr, axis=1)[:, 3]  # column 0 is the point itself; 3rd neighbour
    d_fr = np.linalg.norm(fake[:, None] - real[None], axis=-1)
    precision = np.mean(np.any(d_fr <= radii[None], axis=1))
    assert precision_recall(real, fake, k=3).precision == pytest.approx(precision)


# ---------------------------------------------------------------------------------- class fidelity


def test_class_fidelity_hand_made():
    probs = np.array([
        [0.9, 0.1, 0.0],   # labelled 0: hit
        [0.4, 0.6, 0.0],   # labelled 0: threshold miss, argmax miss
        [0.5, 0.2, 0.3],   # labelled 0: threshold hit (>=), argmax hit
        [0.1, 0.7, 0.8],   # labelled 1: threshold hit, argmax miss (2 wins)
        [0.0, 0.3, 0.7],   # labelled 2: hit both
    ])
    labels = np.array([0, 0, 0, 1, 2])
    thr = class_fidelity(probs, labels, classes=["a", "b", "c"])
    assert thr == {"a": pytest.approx(2 / 3), "b": 1.0, "c": 1.0, "overall": pytest.approx(4 / 5)}
    am = class_fidelity(probs, labels, classes=["a", "b", "c"], rule="argmax")
    assert am == {"a": pytest.approx(2 / 3), "b": 0.0, "c": 1.0, "overall": pytest.approx(3 / 5)}


def test_class_fidelity_multi_hot_nan_and_absent_class():
    probs = np.array([[0.8, 0.6, 0.1], [0.2, 0.9, 0.1]])
    labels = np.array([[1.0, 1.0, np.nan], [0.0, 1.0, 0.0]])
    out = class_fidelity(probs, labels)
    assert out == {"0": 1.0, "1": 1.0, "2": None, "overall": 1.0}
    out = class_fidelity(probs, labels, threshold=0.7)
    assert out["0"] == 1.0 and out["1"] == 0.5 and out["overall"] == pytest.approx(2 / 3)


# ---------------------------------------------------------------------------------- per_class


def test_per_class_two_set_metric():
    rng = np.random.default_rng(0)
    real = rng.normal(size=(60, 3))
    fake = rng.normal(size=(45, 3))
    real_labels = np.arange(60) % 3
    fake_labels = np.array([0] * 20 + [1] * 24 + [2] * 1)
    out = per_class(lambda r, f: (len(r), len(f)), real, fake, real_labels=real_labels,
                    fake_labels=fake_labels, classes=["a", "b", "c"])
    assert out == {"a": (20, 20), "b": (20, 24), "c": None, "overall": (60, 45)}


def test_per_class_single_set_metric_with_is():
    probs = np.eye(2)[np.arange(40) % 2]
    labels = np.arange(40) % 2
    out = per_class(lambda p: inception_score(p, splits=2).mean, None, probs, real_labels=None,
                    fake_labels=labels, classes=["x", "y"])
    assert out["x"] == pytest.approx(1.0) and out["y"] == pytest.approx(1.0)
    assert out["overall"] == pytest.approx(2.0)
