"""Sample-quality scores beyond FID: KID, IS, precision/recall, class fidelity, per-class helper.

Inputs are feature arrays ``N x d`` (from :func:`augment.metrics.fid.features`, any extractor) or
classifier probabilities ``N x C``; nothing here touches images or networks. All arithmetic is
float64. Randomness (KID subsets) comes from a local ``numpy.random.Generator``; global RNGs are
never seeded.

* KID (Binkowski et al. 2018): unbiased MMD^2 with the polynomial kernel
  ``k(x, y) = (x.y / d + 1)^3``, averaged over random subsets; unbiased at any n >= 2, so unlike
  FID it can be compared across sample sizes and is reliable for small per-class sets.
* IS (Salimans et al. 2016): ``exp(E_x KL(p(y|x) || p(y)))`` over splits, from any classifier's
  class probabilities (rows summing to 1; pass ``normalize=True`` for multi-label sigmoids).
* Precision / recall (Kynkaanniemi et al. 2019): the share of synthetic samples inside the real
  k-NN manifold (union of balls reaching each real sample's k-th nearest real neighbour) and vice
  versa; distances are computed in row chunks, so memory is O(chunk x N).
* Class fidelity: the share of synthetic images labelled class c that the domain classifier
  assigns to c.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, TypeVar

import numpy as np
from scipy.special import rel_entr

log = logging.getLogger(__name__)

__all__ = [
    "ISResult",
    "KIDResult",
    "PRResult",
    "class_fidelity",
    "inception_score",
    "kid",
    "mmd2_unbiased",
    "per_class",
    "polynomial_kernel",
    "precision_recall",
]

T = TypeVar("T")


# --------------------------------------------------------------------------------------------
# KID
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class KIDResult:
    """Kernel Inception Distance over subsets.

    Attributes:
        mean: mean unbiased MMD^2 over subsets (can be slightly negative when the sets match).
        std: standard deviation over subsets.
        subsets: number of subsets.
        subset_size: samples per set in each subset.
    """

    mean: float
    std: float
    subsets: int
    subset_size: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for metrics.json."""
        return {"kid": self.mean, "kid_std": self.std, "kid_subsets": self.subsets,
                "kid_subset_size": self.subset_size}


def polynomial_kernel(x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None,
                      coef0: float = 1.0) -> np.ndarray:
    """``(gamma * x @ y.T + coef0) ** degree`` with ``gamma = 1 / d`` by default.

    Args:
        x: ``N x d``.
        y: ``M x d``.
        degree: polynomial degree.
        gamma: scale of the inner product; default ``1 / d``.
        coef0: additive constant.

    Returns:
        ``N x M`` kernel matrix (float64).
    """
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    g = 1.0 / x.shape[1] if gamma is None else gamma
    return (g * (x @ y.T) + coef0) ** degree


def mmd2_unbiased(x: np.ndarray, y: np.ndarray, *, degree: int = 3, gamma: float | None = None,
                  coef0: float = 1.0) -> float:
    """Unbiased MMD^2 estimate between samples ``x`` (m x d) and ``y`` (n x d), m, n >= 2.

    ``sum_{i!=j} k(x_i, x_j) / (m (m-1)) + sum_{i!=j} k(y_i, y_j) / (n (n-1)) - 2 mean k(x_i, y_j)``.
    """
    m, n = x.shape[0], y.shape[0]
    if m < 2 or n < 2:
        raise ValueError(f"unbiased MMD needs at least 2 samples per set, got {m} and {n}")
    kw = {"degree": degree, "gamma": gamma, "coef0": coef0}
    kxx = polynomial_kernel(x, x, **kw)
    kyy = polynomial_kernel(y, y, **kw)
    kxy = polynomial_kernel(x, y, **kw)
    sxx = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    syy = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return float(sxx + syy - 2.0 * kxy.mean())


def kid(f_real: np.ndarray, f_fake: np.ndarray, *, subsets: int = 100, subset_size: int = 1000,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0,
        rng: np.random.Generator | int | None = 0) -> KIDResult:
    """Kernel Inception Distance: unbiased polynomial-kernel MMD^2 over random subsets.

    Each subset draws ``min(subset_size, N)`` samples without replacement from each set. When
    both sets are no larger than ``subset_size`` every subset is the whole set, so one subset is
    computed (std 0).

    Args:
        f_real: real features ``N1 x d``.
        f_fake: synthetic features ``N2 x d``.
        subsets: number of subsets.
        subset_size: samples per set per subset.
        degree: kernel degree (3 in the KID paper).
        gamma: kernel scale, default ``1 / d``.
        coef0: kernel constant (1).
        rng: a generator or a seed for a new local one (default 0: reproducible).

    Returns:
        Mean and std over subsets.
    """
    x = np.asarray(f_real, dtype=np.float64)
    y = np.asarray(f_fake, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features N1 x d and N2 x d, got {x.shape} and {y.shape}")
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)
    m = min(subset_size, x.shape[0])
    n = min(subset_size, y.shape[0])
    whole = m == x.shape[0] and n == y.shape[0]
    count = 1 if whole else subsets
    vals = np.empty(count)
    for s in range(count):
        xs = x if m == x.shape[0] else x[gen.choice(x.shape[0], m, replace=False)]
        ys = y if n == y.shape[0] else y[gen.choice(y.shape[0], n, replace=False)]
        vals[s] = mmd2_unbiased(xs, ys, degree=degree, gamma=gamma, coef0=coef0)
    return KIDResult(mean=float(vals.mean()), std=float(vals.std()), subsets=count, subset_size=min(m, n))


# --------------------------------------------------------------------------------------------
# Inception score
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ISResult:
    """Inception score over splits.

    Attributes:
        mean: mean over splits of ``exp(mean KL(p(y|x) || p(y)))``; 1 <= IS <= C.
        std: standard deviation over splits.
        splits: number of splits.
    """

    mean: float
    std: float
    splits: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for metrics.json."""
        return {"is": self.mean, "is_std": self.std, "is_splits": self.splits}


def inception_score(probs: np.ndarray, *, splits: int = 10, normalize: bool = False) -> ISResult:
    """Inception score from class probabilities: ``exp(E_x KL(p(y|x) || p(y)))`` per split.

    ``p(y)`` is the mean of ``p(y|x)`` within each split (``np.array_split``: every sample is
    used). 0 log 0 is taken as 0.

    Args:
        probs: ``N x C`` class probabilities, rows summing to 1.
        splits: number of splits (at most N).
        normalize: divide each row by its sum first (for multi-label sigmoid outputs).

    Returns:
        Mean and std over splits.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2 or p.shape[0] < 1:
        raise ValueError(f"need probabilities N x C, got shape {p.shape}")
    if np.any(p < 0) or not np.all(np.isfinite(p)):
        raise ValueError("probabilities must be finite and non-negative")
    if normalize:
        s = p.sum(axis=1, keepdims=True)
        if np.any(s <= 0):
            raise ValueError("a row of probabilities sums to 0; cannot normalise")
        p = p / s
    elif not np.allclose(p.sum(axis=1), 1.0, atol=1e-3):
        raise ValueError("rows must sum to 1 (softmax outputs); pass normalize=True for multi-label sigmoids")
    if not 1 <= splits <= p.shape[0]:
        raise ValueError(f"splits must be in [1, N={p.shape[0]}], got {splits}")
    scores = []
    for part in np.array_split(p, splits):
        py = part.mean(axis=0, keepdims=True)
        kl = rel_entr(part, py).sum(axis=1)
        scores.append(math.exp(kl.mean()))
    arr = np.asarray(scores)
    return ISResult(mean=float(arr.mean()), std=float(arr.std()), splits=splits)


# --------------------------------------------------------------------------------------------
# Precision / recall
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PRResult:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    Attributes:
        precision: share of synthetic samples inside the real manifold (fidelity).
        recall: share of real samples inside the synthetic manifold (coverage of the real data).
        k: neighbourhood size.
    """

    precision: float
    recall: float
    k: int

    def as_dict(self) -> dict[str, float | int]:
        """Plain dict for metrics.json."""
        return {"precision": self.precision, "recall": self.recall, "pr_k": self.k}


def _sq_dists(a: np.ndarray, b: np.ndarray, b_sq: np.ndarray) -> np.ndarray:
    d = (a * a).sum(axis=1)[:, None] + b_sq[None, :] - 2.0 * (a @ b.T)
    return np.maximum(d, 0.0, out=d)


def _knn_radii2(x: np.ndarray, k: int, chunk: int) -> np.ndarray:
    """Squared distance from each row to its k-th nearest other row."""
    x_sq = (x * x).sum(axis=1)
    out = np.empty(x.shape[0])
    for i in range(0, x.shape[0], chunk):
        d = _sq_dists(x[i:i + chunk], x, x_sq)
        d[np.arange(d.shape[0]), np.arange(i, i + d.shape[0])] = np.inf  # not its own neighbour
        out[i:i + chunk] = np.partition(d, k - 1, axis=1)[:, k - 1]
    return out


def _coverage(manifold: np.ndarray, radii2: np.ndarray, queries: np.ndarray, chunk: int) -> float:
    """Share of ``queries`` within some ball (centre ``manifold[j]``, squared radius ``radii2[j]``)."""
    m_sq = (manifold * manifold).sum(axis=1)
    inside = 0
    for i in range(0, queries.shape[0], chunk):
        d = _sq_dists(queries[i:i + chunk], manifold, m_sq)
        inside += int(np.any(d <= radii2[None, :], axis=1).sum())
    return inside / queries.shape[0]


def precision_recall(f_real: np.ndarray, f_fake: np.ndarray, *, k: int = 3, chunk: int = 1024) -> PRResult:
    """Improved precision and recall with k-nearest-neighbour manifolds.

    A sample lies in a set's manifold when it is within the distance from some member of the set
    to that member's k-th nearest neighbour in the set (Euclidean, in feature space).

    Args:
        f_real: real features ``N1 x d``, N1 > k.
        f_fake: synthetic features ``N2 x d``, N2 > k.
        k: neighbourhood size (3 in the paper).
        chunk: rows per distance block (memory O(chunk x N)).

    Returns:
        Precision and recall.
    """
    x = np.asarray(f_real, dtype=np.float64)
    y = np.asarray(f_fake, dtype=np.float64)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"need features N1 x d and N2 x d, got {x.shape} and {y.shape}")
    if min(x.shape[0], y.shape[0]) <= k:
        raise ValueError(f"precision/recall with k={k} needs more than {k} samples per set, "
                         f"got {x.shape[0]} and {y.shape[0]}")
    precision = _coverage(x, _knn_radii2(x, k, chunk), y, chunk)
    recall = _coverage(y, _knn_radii2(y, k, chunk), x, chunk)
    return PRResult(precision=precision, recall=recall, k=k)


# --------------------------------------------------------------------------------------------
# Class fidelity
# --------------------------------------------------------------------------------------------


def _positives(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Boolean ``N x C`` of positive labels from class indices (N,) or multi-hot (N x C, NaN = no)."""
    lab = np.asarray(labels)
    if lab.ndim == 1:
        if not np.issubdtype(lab.dtype, np.integer):
            raise ValueError("1-d labels must be integer class indices")
        if lab.size and (lab.min() < 0 or lab.max() >= num_classes):
            raise ValueError(f"class index out of range [0, {num_classes})")
        out = np.zeros((lab.shape[0], num_classes), dtype=bool)
        out[np.arange(lab.shape[0]), lab] = True
        return out
    if lab.ndim == 2 and lab.shape[1] == num_classes:
        return np.nan_to_num(lab.astype(np.float64), nan=0.0) > 0.5
    raise ValueError(f"labels must be class indices (N,) or multi-hot (N x {num_classes}), got {lab.shape}")


def class_fidelity(probs: np.ndarray, labels: np.ndarray, *, classes: Sequence[str] | None = None,
                   rule: Literal["threshold", "argmax"] = "threshold",
                   threshold: float = 0.5) -> dict[str, float | None]:
    """Share of synthetic images labelled class c that the domain classifier assigns to c.

    The default rule is ``threshold``: image i labelled c counts when ``probs[i, c] >= threshold``
    (0.5). It suits the project's multi-label sigmoid classifiers, where an image may show
    several findings and the argmax would count a correct second finding as a miss. ``argmax``
    counts it when c is the most probable class (for softmax classifiers). A multi-hot label
    contributes one (image, class) pair per positive class.

    Args:
        probs: classifier probabilities ``N x C``.
        labels: intended classes: indices (N,) or multi-hot ``N x C`` (NaN = not labelled).
        classes: class names (default "0", "1", ...).
        rule: ``"threshold"`` or ``"argmax"``.
        threshold: probability needed under ``rule="threshold"``.

    Returns:
        ``{class name: share or None (no image labelled c), "overall": share over all pairs}``.
    """
    p = np.asarray(probs, dtype=np.float64)
    if p.ndim != 2:
        raise ValueError(f"probs must be N x C, got shape {p.shape}")
    c = p.shape[1]
    names = list(classes) if classes is not None else [str(i) for i in range(c)]
    if len(names) != c:
        raise ValueError(f"{len(names)} class names for {c} probability columns")
    pos = _positives(labels, c)
    if pos.shape[0] != p.shape[0]:
        raise ValueError(f"{pos.shape[0]} labels for {p.shape[0]} probability rows")
    if rule == "threshold":
        hit = p >= threshold
    elif rule == "argmax":
        hit = np.zeros_like(pos)
        hit[np.arange(p.shape[0]), p.argmax(axis=1)] = True
    else:
        raise ValueError(f"rule must be 'threshold' or 'argmax', got {rule!r}")
    out: dict[str, float | None] = {}
    for j, name in enumerate(names):
        n = int(pos[:, j].sum())
        out[name] = float((hit[:, j] & pos[:, j]).sum() / n) if n else None
    total = int(pos.sum())
    out["overall"] = float((hit & pos).sum() / total) if total else None
    return out


# --------------------------------------------------------------------------------------------
# Per class
# --------------------------------------------------------------------------------------------


def per_class(metric: Callable[..., T], real: np.ndarray | None, fake: np.ndarray, *,
              real_labels: np.ndarray | None, fake_labels: np.ndarray,
              classes: Sequence[str], min_samples: int = 2) -> dict[str, T | None]:
    """A metric per class and over everything.

    For class c, ``metric(real[real has c], fake[fake has c])`` (or ``metric(fake[fake has c])``
    when ``real`` is None, e.g. IS). A class with fewer than ``min_samples`` in either set is
    reported as None (and logged), not computed on too few samples.

    Args:
        metric: e.g. ``lambda r, f: kid(r, f).mean`` or ``lambda f: inception_score(p).mean``.
        real: real features/probabilities, or None for single-set metrics.
        fake: synthetic features/probabilities.
        real_labels: real class indices (N,) or multi-hot ``N x C``; None when ``real`` is None.
        fake_labels: synthetic labels, same forms.
        classes: class names, in label column order.
        min_samples: smallest set a metric is computed on.

    Returns:
        ``{class name: value or None, "overall": value}``.
    """
    c = len(classes)
    fpos = _positives(fake_labels, c)
    if fpos.shape[0] != len(fake):
        raise ValueError(f"{fpos.shape[0]} synthetic labels for {len(fake)} rows")
    rpos = None
    if real is not None:
        if real_labels is None:
            raise ValueError("real_labels are needed with real")
        rpos = _positives(real_labels, c)
        if rpos.shape[0] != len(real):
            raise ValueError(f"{rpos.shape[0]} real labels for {len(real)} rows")
    out: dict[str, T | None] = {}
    for j, name in enumerate(classes):
        f_c = fake[fpos[:, j]]
        if real is None:
            if len(f_c) < min_samples:
                log.info("per_class: %s skipped (%d synthetic samples < %d)", name, len(f_c), min_samples)
                out[name] = None
                continue
            out[name] = metric(f_c)
        else:
            r_c = real[rpos[:, j]]  # type: ignore[index]
            if min(len(r_c), len(f_c)) < min_samples:
                log.info("per_class: %s skipped (%d real, %d synthetic < %d)", name, len(r_c), len(f_c),
                         min_samples)
                out[name] = None
                continue
            out[name] = metric(r_c, f_c)
    out["overall"] = metric(fake) if real is None else metric(real, fake)
    return out
