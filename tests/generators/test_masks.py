"""Difference map -> mask: sign per finding, rules, lung restriction, small components, per finding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from generators.base import Translation
from generators.masks import (
    DARKENING,
    MaskRuleError,
    diff_to_mask,
    finding_sign,
    otsu_threshold,
    per_finding_masks,
    remove_small_components,
)

H = 32


def blob_map(value: float = 0.5, noise: float = 0.02, b: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A B x 1 x 32 x 32 map: an 8 x 8 square of ``value`` at rows/cols 8..15 plus Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    d = torch.randn(b, 1, H, H, generator=g) * noise
    blob = torch.zeros(b, 1, H, H)
    blob[..., 8:16, 8:16] = 1.0
    return d + value * blob, blob


def test_sign_per_finding() -> None:
    assert DARKENING == {"Pneumothorax", "Emphysema"}
    assert finding_sign("Edema") == 1 and finding_sign(None) == 1
    assert finding_sign("Pneumothorax") == -1 and finding_sign("emphysema") == -1
    bright, blob = blob_map(0.5)
    assert torch.equal(diff_to_mask(bright, finding="Edema", rule="fixed"), blob)
    dark, _ = blob_map(-0.5)
    assert torch.equal(diff_to_mask(dark, finding="Pneumothorax", rule="fixed"), blob)
    with pytest.raises(MaskRuleError):  # a darkening change is not an added opacity
        diff_to_mask(dark, finding="Edema", rule="fixed")
    with pytest.raises(MaskRuleError):
        diff_to_mask(bright, finding="Pneumothorax", rule="fixed")


@pytest.mark.parametrize(
    "rule,kw",
    [("fixed", {"threshold": 0.1}), ("percentile", {"percentile": 100 * (1 - 64 / 1024)}), ("otsu", {})],
)
def test_each_rule_recovers_the_blob(rule: str, kw: dict) -> None:
    d, blob = blob_map()
    mask = diff_to_mask(d, rule=rule, **kw)
    assert mask.dtype == torch.float32 and set(mask.unique().tolist()) <= {0.0, 1.0}
    assert torch.equal(mask, blob)


def test_percentile_rule_selects_the_top_share() -> None:
    d = torch.arange(H * H, dtype=torch.float32).view(1, 1, H, H) / (H * H)
    mask = diff_to_mask(d, rule="percentile", percentile=90.0, min_area=0)
    assert int(mask.sum()) == pytest.approx(0.1 * H * H, abs=1)
    assert mask[0, 0, -1, -1] == 1 and mask[0, 0, 0, 0] == 0


def test_otsu_threshold_separates_two_modes() -> None:
    v = np.concatenate([np.full(100, 0.1), np.full(20, 0.8)])
    t = otsu_threshold(v)
    assert 0.1 <= t < 0.8
    assert otsu_threshold(np.full(5, 0.3)) < 0.3  # one value: everything selected


def test_lung_restriction() -> None:
    d, blob = blob_map()
    lung = torch.zeros(H, H)
    lung[:, :12] = 1.0  # covers the blob's left half (cols 8..11)
    mask = diff_to_mask(d, rule="fixed", lung_mask=lung)
    expect = blob.clone()
    expect[..., 12:] = 0
    assert torch.equal(mask, expect)
    per_image = lung.expand(2, 1, H, H)
    assert torch.equal(diff_to_mask(d, rule="fixed", lung_mask=per_image), expect)
    with pytest.raises(MaskRuleError, match="lung_mask"):
        diff_to_mask(d, rule="fixed", lung_mask=torch.ones(3, 1, H, H))


def test_min_area_removes_small_components() -> None:
    d, blob = blob_map()
    d[0, 0, 25, 25] = 0.5  # a one-pixel speck
    d[0, 0, 28, 2:5] = 0.5  # a three-pixel line
    kept = diff_to_mask(d, rule="fixed", min_area=0)
    assert kept[0, 0, 25, 25] == 1 and kept[0, 0, 28, 2:5].sum() == 3
    cleaned = diff_to_mask(d, rule="fixed", min_area=4)
    assert torch.equal(cleaned, blob)
    diag = np.zeros((6, 6), dtype=bool)
    diag[[0, 1, 2, 3], [0, 1, 2, 3]] = True  # corner-touching pixels are one 8-connected component
    assert remove_small_components(diag, 4).sum() == 4


def test_smoothing_suppresses_isolated_noise() -> None:
    d, blob = blob_map(noise=0.0)
    d[0, 0, 26, 26] = 0.5
    assert diff_to_mask(d, rule="fixed", min_area=0)[0, 0, 26, 26] == 1
    smooth = diff_to_mask(d, rule="fixed", min_area=0, smooth_sigma=1.5)
    assert smooth[0, 0, 26, 26] == 0 and smooth[0, 0, 12, 12] == 1


def test_array_and_2d_inputs() -> None:
    d, blob = blob_map(b=1)
    arr = diff_to_mask(d.numpy(), rule="fixed")
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8 and arr.shape == (1, 1, H, H)
    assert np.array_equal(arr, blob.numpy().astype(np.uint8))
    flat = diff_to_mask(d[0, 0].numpy(), rule="fixed")
    assert flat.shape == (H, H)


def test_mask_rule_errors() -> None:
    d, _ = blob_map()
    assert issubclass(MaskRuleError, ValueError)
    with pytest.raises(MaskRuleError, match="unknown mask rule 'kmeans'"):
        diff_to_mask(d, rule="kmeans")
    with pytest.raises(MaskRuleError, match="percentile"):
        diff_to_mask(d, rule="percentile", percentile=100.0)
    with pytest.raises(MaskRuleError, match="min_area"):
        diff_to_mask(d, min_area=-1)
    with pytest.raises(MaskRuleError, match="threshold"):
        diff_to_mask(d, rule="fixed", threshold=-0.1)
    with pytest.raises(MaskRuleError, match="shape"):
        diff_to_mask(torch.zeros(2, 3, H, H))
    with pytest.raises(MaskRuleError, match=r"rule 'otsu'.*selected no pixel in any of the 2 images.*lower"):
        diff_to_mask(torch.zeros(2, 1, H, H), rule="otsu")
    with pytest.raises(MaskRuleError, match="fixed.*threshold=0.9"):
        diff_to_mask(d, rule="fixed", threshold=0.9)


class RegionTranslator:
    """An exact translator for a constructed scene: Edema brightens rows 2..9, Pneumothorax darkens
    rows 20..27; translating removes the effect of every finding absent from the target."""

    classes = ["Edema", "Pneumothorax"]
    image_size = H

    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def translate(self, x: torch.Tensor, target: torch.Tensor) -> Translation:
        self.targets.append(target.clone())
        image = x.clone()
        keep_edema = target[:, 0].view(-1, 1, 1, 1) > 0.5
        keep_ptx = target[:, 1].view(-1, 1, 1, 1) > 0.5
        image[..., 2:10, 4:12] = torch.where(keep_edema, image[..., 2:10, 4:12], image[..., 2:10, 4:12] - 0.6)
        image[..., 20:28, 4:12] = torch.where(keep_ptx, image[..., 20:28, 4:12], image[..., 20:28, 4:12] + 0.6)
        return Translation(image=image, diff_map=x - image)


def test_per_finding_masks_remove_one_finding_at_a_time() -> None:
    x = torch.zeros(3, 1, H, H)
    x[0, :, 2:10, 4:12] += 0.6  # image 0: Edema and Pneumothorax
    x[0, :, 20:28, 4:12] -= 0.6
    x[1, :, 2:10, 4:12] += 0.6  # image 1: Edema only; image 2: healthy
    labels = torch.tensor([[1.0, 1.0], [1.0, float("nan")], [0.0, 0.0]])
    tr = RegionTranslator()
    masks = per_finding_masks(tr, x, labels, ["Edema", "Pneumothorax"], rule="fixed", threshold=0.3)
    assert set(masks) == {"Edema", "Pneumothorax"}
    edema = torch.zeros(3, 1, H, H)
    edema[:2, :, 2:10, 4:12] = 1
    ptx = torch.zeros(3, 1, H, H)
    ptx[0, :, 20:28, 4:12] = 1
    assert torch.equal(masks["Edema"], edema) and torch.equal(masks["Pneumothorax"], ptx)
    # Edema removal keeps image 0's Pneumothorax; a single-finding image goes to No Finding
    assert torch.equal(tr.targets[0], torch.tensor([[0.0, 1.0], [0.0, 0.0]]))
    assert torch.equal(tr.targets[1], torch.tensor([[1.0, 0.0]]))


def test_per_finding_masks_column_order_and_errors() -> None:
    x = torch.zeros(1, 1, H, H)
    x[..., 20:28, 4:12] -= 0.6
    tr = RegionTranslator()
    masks = per_finding_masks(tr, x, torch.tensor([[1.0, 0.0]]), ["Pneumothorax", "Edema"], rule="fixed")
    assert list(masks) == ["Pneumothorax"] and masks["Pneumothorax"].sum() == 64
    assert torch.equal(tr.targets[0], torch.zeros(1, 2))
    with pytest.raises(MaskRuleError, match="not classes of this translator"):
        per_finding_masks(tr, x, torch.ones(1, 1), ["Hernia"])
    with pytest.raises(MaskRuleError, match="findings must be"):
        per_finding_masks(tr, x, torch.ones(2, 2), ["Edema", "Pneumothorax"])
    with pytest.raises(MaskRuleError, match="finding 'Edema'"):  # labelled Edema, but nothing changes
        per_finding_masks(tr, torch.zeros(1, 1, H, H) - 0.9, torch.tensor([[1.0, 0.0]]), ["Edema", "Pneumothorax"],
                          rule="fixed", threshold=0.7)
