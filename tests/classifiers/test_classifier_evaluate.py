"""classifiers.evaluate: AUCs against hand computation, undefined classes, thresholds, predict()."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from classifiers.evaluate import MAX_ROC_POINTS, choose_thresholds, evaluate, predict
from classifiers.model import create_classifier

nan = np.nan


def test_auc_matches_hand_computation_and_skips_nan() -> None:
    probs = np.array(
        [
            [0.10, 0.90, 0.2, 0.3],
            [0.40, 0.10, 0.3, 0.6],
            [0.35, 0.50, 0.4, 0.9],
            [0.80, 0.95, 0.5, 0.8],
        ]
    )
    labels = np.array(
        [
            [0, 1, 0, 1],
            [0, nan, 0, 1],
            [1, 0, 0, 1],
            [1, 0, 0, nan],
        ]
    )
    out = evaluate(probs, labels, ["A", "B", "C", "D"])
    # A: positives {0.35, 0.8} vs negatives {0.1, 0.4}: pairs won 1 + 2 = 3 of 4.
    assert out["auc"]["A"] == pytest.approx(0.75)
    # B: NaN row skipped; positive 0.9 beats 0.5, loses to 0.95.
    assert out["auc"]["B"] == pytest.approx(0.5)
    assert out["per_class"]["B"]["n_pos"] == 1 and out["per_class"]["B"]["n_neg"] == 2
    assert out["auc"]["C"] is None and out["per_class"]["C"]["undefined"] == "no positives"
    assert out["auc"]["D"] is None and out["per_class"]["D"]["undefined"] == "no negatives"
    assert out["mean_auc"] == pytest.approx((0.75 + 0.5) / 2)
    assert out["n"] == 4


def test_auc_ties_count_half() -> None:
    out = evaluate(np.array([[0.5], [0.5], [0.2]]), np.array([[1], [0], [0]]), ["A"])
    assert out["auc"]["A"] == pytest.approx((0.5 + 1.0) / 2)


def test_all_undefined_gives_none_mean_without_crash() -> None:
    out = evaluate(np.full((3, 2), 0.4), np.array([[nan, 0], [nan, 0], [nan, 0]]), ["A", "B"])
    assert out["mean_auc"] is None
    assert out["per_class"]["A"]["undefined"] == "no labelled samples"
    assert out["per_class"]["A"]["f1"] is None
    assert out["per_class"]["B"]["undefined"] == "no positives"
    assert out["per_class"]["B"]["accuracy"] == 1.0  # all predicted negative at 0.5


def test_threshold_metrics_by_hand() -> None:
    probs = np.array([[0.9], [0.6], [0.4], [0.2], [0.7]])
    labels = np.array([[1], [0], [1], [0], [nan]])
    out = evaluate(probs, labels, ["A"], thresholds=[0.5])["per_class"]["A"]
    # Labelled rows at 0.5: TP=1 (0.9), FP=1 (0.6), FN=1 (0.4), TN=1 (0.2).
    assert out["precision"] == pytest.approx(0.5)
    assert out["recall"] == pytest.approx(0.5)
    assert out["f1"] == pytest.approx(0.5)
    assert out["accuracy"] == pytest.approx(0.5)
    low = evaluate(probs, labels, ["A"], thresholds=0.3)["per_class"]["A"]
    assert low["recall"] == pytest.approx(1.0) and low["precision"] == pytest.approx(2 / 3)


def test_choose_thresholds_maximises_f1() -> None:
    probs = np.array([[0.9, 0.5], [0.6, 0.5], [0.4, 0.5], [0.2, 0.5], [0.35, 0.5]])
    labels = np.array([[1, 0], [0, 0], [1, 0], [0, 0], [1, 0]])
    thr = choose_thresholds(probs, labels)
    assert thr[1] == 0.5  # no positives: undefined
    # Predict positive at >= 0.35: TP=3, FP=1 -> F1 = 6/7, the best achievable here.
    assert thr[0] == pytest.approx(0.35)
    f1 = evaluate(probs, labels, ["A", "B"], thresholds=thr)["per_class"]["A"]["f1"]
    assert f1 == pytest.approx(6 / 7)
    for t in (0.2, 0.4, 0.6, 0.9):
        assert evaluate(probs, labels, ["A", "B"], thresholds=[t, 0.5])["per_class"]["A"]["f1"] <= f1


def test_roc_curve_is_decimated() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random((5000, 1)) < 0.3).astype(float)
    probs = np.clip(labels * 0.2 + rng.random((5000, 1)), 0, 1)
    roc = evaluate(probs, labels, ["A"])["per_class"]["A"]["roc"]
    assert 10 < len(roc["fpr"]) <= MAX_ROC_POINTS and len(roc["fpr"]) == len(roc["tpr"])
    assert (roc["fpr"][0], roc["tpr"][0]) == (0.0, 0.0)
    assert (roc["fpr"][-1], roc["tpr"][-1]) == (1.0, 1.0)
    assert np.all(np.diff(roc["fpr"]) >= 0)


def test_shape_errors() -> None:
    with pytest.raises(ValueError, match="N x C"):
        evaluate(np.zeros((3, 2)), np.zeros((3, 3)), ["A", "B"])
    with pytest.raises(ValueError, match="class names"):
        evaluate(np.zeros((3, 2)), np.zeros((3, 2)), ["A"])


def test_predict_probs_features_labels_in_order(squares) -> None:
    ds = squares(10, seed=3, nan_frac=0.2)
    model = create_classifier("tiny", num_classes=2, init_seed=0)
    model.train()
    pred = predict(model, ds, batch_size=4)
    assert model.training  # mode restored
    assert pred.probs.shape == (10, 2) and pred.probs.dtype == np.float32
    assert pred.features.shape == (10, model.num_features)
    np.testing.assert_array_equal(pred.labels, ds.labels)  # NaN in the same places, same order
    model.eval()
    x = torch.from_numpy(ds.images[:, None]).float() / 127.5 - 1
    with torch.no_grad():
        expected = torch.sigmoid(model(x)).numpy()
        feats = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
    np.testing.assert_allclose(pred.probs, expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(pred.features, feats, rtol=1e-5, atol=1e-5)
    # Features are what the head consumes: the head applied to them gives the logits.
    logits = model.get_classifier()(torch.from_numpy(pred.features)).detach()
    np.testing.assert_allclose(torch.sigmoid(logits).numpy(), pred.probs, rtol=1e-4, atol=1e-5)
