"""Mask metrics against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from augment.metrics.masks import (
    detection_auc,
    detection_scores,
    dice,
    froc,
    healing_l1,
    identity_l1,
    iou,
    lung_containment,
    mask_report,
    mean_std,
    poi,
    psnr,
    sensitivity_at_fp,
)


def square(r0: int, r1: int, c0: int, c1: int, n: int = 8) -> np.ndarray:
    m = np.zeros((n, n))
    m[r0:r1, c0:c1] = 1
    return m


def test_overlap_metrics_hand_values() -> None:
    gt = square(0, 2, 0, 2)  # 4 px
    pred = square(0, 1, 0, 2)  # 2 px, inside
    assert dice(gt, gt)[0] == 1.0 and iou(gt, gt)[0] == 1.0
    disjoint = square(5, 7, 5, 7)
    assert dice(disjoint, gt)[0] == 0.0 and iou(disjoint, gt)[0] == 0.0 and poi(disjoint, gt)[0] == 0.0
    assert dice(pred, gt)[0] == pytest.approx(2 * 2 / (2 + 4))
    assert iou(pred, gt)[0] == pytest.approx(2 / 4)
    assert poi(pred, gt)[0] == pytest.approx(1.0)  # every predicted pixel is inside the lesion
    spill = square(0, 2, 0, 4)  # 8 px, 4 inside
    assert poi(spill, gt)[0] == pytest.approx(0.5)
    empty = np.zeros((8, 8))
    assert dice(empty, empty)[0] == 1.0 and iou(empty, empty)[0] == 1.0
    assert poi(empty, gt)[0] == 0.0


def test_batched_tensors_and_shape_errors() -> None:
    gt = torch.from_numpy(np.stack([square(0, 2, 0, 2), square(4, 6, 4, 6)]))[:, None]
    pred = gt.clone()
    pred[1] = 0
    assert dice(pred, gt).tolist() == [1.0, 0.0]
    with pytest.raises(ValueError):
        dice(pred[:1], gt)


def test_detection_auc() -> None:
    maps = np.zeros((4, 8, 8))
    maps[0, 3, 3], maps[1, 1, 1], maps[2, 0, 0], maps[3, 7, 7] = 0.9, 0.8, 0.2, 0.1
    assert detection_scores(maps).tolist() == pytest.approx([0.9, 0.8, 0.2, 0.1])
    assert detection_auc(maps, [1, 1, 0, 0]) == 1.0
    assert detection_auc(maps, [0, 0, 1, 1]) == 0.0
    assert detection_auc(maps, [1, 0, 1, 0]) == pytest.approx(0.75)
    with pytest.raises(ValueError, match="both"):
        detection_auc(maps, [1, 1, 1, 1])


def froc_case() -> tuple[np.ndarray, np.ndarray]:
    """Two images with one lesion each and one healthy image (maps 16 x 16)."""
    maps = np.zeros((3, 16, 16))
    gt = np.zeros((3, 16, 16))
    gt[0, 2:5, 2:5] = 1
    maps[0, 2:5, 2:5] = 0.9  # lesion hit at 0.9
    maps[0, 10:13, 10:13] = 0.8  # FP at 0.8
    gt[1, 2:5, 2:5] = 1
    maps[1, 2:5, 2:5] = 0.5  # lesion found only below 0.5
    maps[1, 10:13, 10:13] = 0.95  # FP at 0.95
    maps[2, 2:5, 2:5] = 0.7  # healthy: FP at 0.7
    maps[2, 10:13, 10:13] = 0.55  # and one at 0.55: finding the 0.5 lesion costs 4 FP
    return maps, gt


def test_froc_and_sensitivity_at_one_fp_per_image() -> None:
    maps, gt = froc_case()
    curve = froc(maps, gt, thresholds=[0.4, 0.6, 0.85, 1.0])
    # > 0.4: both lesions, 4 FP / 3 images; > 0.6: one lesion, 3 FP; > 0.85: one lesion, 1 FP; > 1: none
    assert curve["sensitivity"].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert curve["fp_per_image"].tolist() == pytest.approx([4 / 3, 1.0, 1 / 3, 0.0])
    assert sensitivity_at_fp(maps, gt, thresholds=[0.4, 0.6, 0.85, 1.0]) == 0.5
    assert sensitivity_at_fp(maps, gt) == 0.5  # the default threshold sweep finds the same point
    assert sensitivity_at_fp(maps, gt, fp_per_image=1.5) == 1.0


def test_froc_counts_a_candidate_by_its_centroid() -> None:
    gt = np.zeros((1, 8, 8))
    gt[0, 3, 0:2] = 1  # lesion: two pixels at the left
    bar = np.zeros((1, 8, 8))
    bar[0, 3, 0:7] = 1.0  # overlaps the lesion, but its centroid (3, 3) lies outside
    curve = froc(bar, gt, thresholds=[0.5])
    assert curve["sensitivity"].tolist() == [0.0] and curve["fp_per_image"].tolist() == [1.0]
    small = np.zeros((1, 8, 8))
    small[0, 3, 0:3] = 1.0  # centroid (3, 1): inside
    assert froc(small, gt, thresholds=[0.5])["sensitivity"].tolist() == [1.0]
    assert froc(small, gt, thresholds=[0.5], min_area=4)["sensitivity"].tolist() == [0.0]  # too small
    with pytest.raises(ValueError, match="lesion"):
        froc(small, np.zeros((1, 8, 8)))


def test_psnr_and_healing_l1() -> None:
    a = np.zeros((2, 4, 4))
    assert psnr(a, a).tolist() == [100.0, 100.0]  # identical: capped
    assert np.isinf(psnr(a, a, max_db=None)).all()
    b = a + 0.2  # MSE 0.04 on a data range of 2: 10 log10(4 / 0.04) = 20 dB
    assert psnr(b, a)[0] == pytest.approx(20.0)
    assert healing_l1(b, a).tolist() == pytest.approx([0.2, 0.2])
    with pytest.raises(ValueError):
        healing_l1(a, np.zeros((2, 4, 5)))


def test_identity_l1_only_on_normals() -> None:
    diff = np.zeros((3, 4, 4))
    diff[0] = 0.5  # abnormal image: large change, not counted
    diff[1] = -0.1
    assert identity_l1(diff, [0, 1, 1]).tolist() == pytest.approx([0.1, 0.0])
    assert identity_l1(diff, [0, 0, 0]).size == 0


def test_lung_containment() -> None:
    lung = square(0, 8, 0, 4)
    pred = np.stack([square(0, 1, 2, 6), np.zeros((8, 8))])  # 4 px, 2 inside; empty
    out = lung_containment(pred, lung)
    assert out[0] == pytest.approx(0.5) and math.isnan(out[1])
    assert mean_std(out) == (pytest.approx(0.5), 0.0)


def test_mask_report_aggregates_over_lesion_images() -> None:
    maps, gt = froc_case()
    pred = np.stack([gt[0], np.zeros((16, 16)), np.ones((16, 16))])  # perfect, missed, (healthy: ignored)
    healed = np.zeros((3, 16, 16))
    healthy = healed.copy()
    healthy[1] = 0.2
    rep = mask_report(
        pred, gt, maps, labels=[[1, 0], [0, 1], [0, float("nan")]], translated=healed, healthy=healthy,
        is_normal=[0, 0, 1], lung_masks=gt[0],
    )
    assert rep["n_images"] == 3 and rep["n_lesion_images"] == 2
    assert rep["dice_mean"] == pytest.approx(0.5) and rep["dice_std"] == pytest.approx(0.5)
    assert rep["iou_mean"] == pytest.approx(0.5) and rep["poi_mean"] == pytest.approx(0.5)
    assert rep["detection_auc"] == pytest.approx(1.0)  # 0.9, 0.95 vs 0.7
    assert rep["sensitivity_at_1fp"] == 0.5
    # healing and lung containment over the two lesion images only (the healthy one is identity's)
    assert rep["healing_l1_mean"] == pytest.approx(0.2 / 2)
    assert rep["healing_psnr_mean"] == pytest.approx((100 + 20) / 2)
    assert rep["identity_l1_mean"] == pytest.approx(np.abs(maps[2]).mean())
    assert rep["lung_containment_mean"] == pytest.approx(1.0)  # the healthy image's all-ones mask is not counted
    healthy_only = mask_report(np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), np.zeros((1, 4, 4)), [[0]], None, None, None)
    assert healthy_only["dice_mean"] is None and healthy_only["detection_auc"] is None
    assert healthy_only["sensitivity_at_1fp"] is None and "healing_l1_mean" not in healthy_only
