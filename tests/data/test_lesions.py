"""Loaders of ../shared/data/cxr-lesions: the real sets (skipped when absent) and bad input on tiny copies."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from augment.data.lesions import LESION_SETS, load_lesion_set
from augment.errors import UserError
CXR_LESIONS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr-lesions"


@pytest.fixture
def cxr_lesions() -> Path:
    if not (CXR_LESIONS / "nih_bbox" / "boxes.csv").is_file():
        pytest.skip("../shared/data/cxr-lesions is not beside the project")
    return CXR_LESIONS


def test_nih_bbox_images_labels_and_boxes_scaled_to_the_size(cxr_lesions):
    ls = load_lesion_set("nih_bbox", cxr_lesions, size=64, limit=5)
    assert ls.images.shape == (5, 64, 64) and ls.images.dtype == np.uint8
    assert ls.labels[0] == ("Cardiomegaly", "Edema", "Infiltration") and ls.patient_ids[0] == "32"
    csv = pd.read_csv(cxr_lesions / "nih_bbox" / "boxes.csv")
    first = csv[csv["file"] == ls.files[0]].iloc[0]
    b = ls.boxes[ls.boxes["image"] == 0].iloc[0]
    assert b["label"] == first["label"]
    assert np.allclose(b[["x", "y", "w", "h"]].to_numpy(float), first[["x", "y", "w", "h"]].to_numpy(float) / 2)
    assert set(ls.boxes["image"]) <= set(range(5)) and not ls.masks and ls.lungs is None


def test_covidqu_masks_boxes_and_near_duplicate_groups(cxr_lesions):
    full = load_lesion_set("covidqu_infection", cxr_lesions, limit=None)
    assert len(full) == 1120 and full.masks["Pneumonia"].shape == (1120, 128, 128)
    normal = full.normal()
    assert normal.sum() == 220 and not full.masks["Pneumonia"][normal].any()
    assert full.masks["Pneumonia"][~normal].reshape(900, -1).any(1).all()
    # every box lies on its image's mask
    for _, b in full.boxes.head(50).iterrows():
        assert full.masks["Pneumonia"][b["image"], int(b["y"]):int(b["y"] + b["h"]), int(b["x"]):int(b["x"] + b["w"])].any()
    pairs = pd.read_csv(cxr_lesions / "covidqu_infection" / "overlaps.csv")
    index = {f: i for i, f in enumerate(full.files)}
    inside = pairs[pairs["other"].isin(index)]
    assert len(inside) > 0
    for a, o in zip(inside["file"], inside["other"]):
        assert full.groups[index[a]] == full.groups[index[o]]
    assert full.overlaps_real.sum() == pairs.loc[pairs["other"].str.startswith("cxr-real/"), "file"].nunique()
    assert len(set(full.groups)) < len(full)
    small = load_lesion_set("covidqu_infection", cxr_lesions, size=32, limit=3)
    assert len(small) == 6 and small.normal().sum() == 3 and small.masks["Pneumonia"].shape == (6, 32, 32)


def test_jsrt_nodules_read_cxr_real_images_and_lung_masks(cxr_lesions, cxr_real):
    ls = load_lesion_set("jsrt_nodules", cxr_lesions, cxr_real, limit=2)
    assert len(ls) == 4 and ls.files[0].startswith("images/jsrt/")
    assert ls.lungs is not None and ls.lungs.shape == (4, 128, 128) and ls.lungs.mean() > 0.1
    b = ls.boxes.iloc[0]
    assert ls.lungs[b["image"], int(b["y"] + b["h"] / 2), int(b["x"] + b["w"] / 2)]  # a nodule centre is in the lungs
    with pytest.raises(UserError, match="real_root"):
        load_lesion_set("jsrt_nodules", cxr_lesions, None)


# ------------------------------------------------------------------------------------ bad input
def make_nih(root: Path, boxes: list[tuple] | None = None) -> Path:
    """A tiny nih_bbox folder: three 16 px images with one box each."""
    d = root / "nih_bbox"
    (d / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    files = [f"images/{k:08d}_000.png" for k in range(3)]
    for f in files:
        Image.fromarray(rng.integers(0, 255, (16, 16), dtype=np.uint8)).save(d / f)
    pd.DataFrame({"file": files, "labels": ["Effusion", "Nodule|Mass", "Effusion"],
                  "patient_id": ["1", "2", "3"]}).to_csv(d / "labels.csv", index=False)
    boxes = boxes or [(files[0], "Effusion", 1, 1, 4, 4), (files[1], "Nodule", 8, 8, 3, 3), (files[2], "Effusion", 0, 0, 16, 16)]
    pd.DataFrame(boxes, columns=["file", "label", "x", "y", "w", "h"]).to_csv(d / "boxes.csv", index=False)
    return root


def test_a_tiny_copy_loads(tmp_path):
    ls = load_lesion_set("nih_bbox", make_nih(tmp_path), size=16)
    assert len(ls) == 3 and ls.findings == ["Effusion", "Nodule"] and ls.labels[1] == ("Nodule", "Mass")


def test_missing_image_files_are_refused(tmp_path):
    root = make_nih(tmp_path)
    (root / "nih_bbox" / "images" / "00000001_000.png").unlink()
    with pytest.raises(UserError, match=r"1 image file\(s\) listed in .*labels.csv are missing.*00000001_000.png"):
        load_lesion_set("nih_bbox", root)


def test_boxes_on_images_that_are_missing_are_refused(tmp_path):
    root = make_nih(tmp_path, [("images/00000000_000.png", "Effusion", 1, 1, 4, 4), ("images/gone.png", "Mass", 1, 1, 4, 4)])
    with pytest.raises(UserError, match=r"boxes.csv are missing.*gone.png"):
        load_lesion_set("nih_bbox", root)


@pytest.mark.parametrize("box", [(14, 1, 4, 4), (-1, 0, 4, 4), (1, 1, 0, 4), (1, 13.5, 2, 3)])
def test_a_box_outside_its_image_is_refused(tmp_path, box):
    root = make_nih(tmp_path, [("images/00000000_000.png", "Effusion", *box)])
    with pytest.raises(UserError, match=r"boxes.csv line 2: box .* of images/00000000_000.png lies outside its 16 x 16 image"):
        load_lesion_set("nih_bbox", root)


def test_unknown_set_and_missing_folder_are_refused(tmp_path):
    with pytest.raises(UserError, match="unknown lesion set"):
        load_lesion_set("chexlocalize", tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        load_lesion_set("nih_bbox", tmp_path)
    assert LESION_SETS == ("nih_bbox", "covidqu_infection", "jsrt_nodules")


def test_covidqu_missing_mask_is_refused(tmp_path, cxr_lesions):
    d = tmp_path / "covidqu_infection"
    d.mkdir()
    lab = pd.read_csv(cxr_lesions / "covidqu_infection" / "labels.csv").head(2)
    for f in lab["file"]:
        (d / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(cxr_lesions / "covidqu_infection" / f, d / f)
    lab.to_csv(d / "labels.csv", index=False)
    pd.read_csv(cxr_lesions / "covidqu_infection" / "boxes.csv").head(0).to_csv(d / "boxes.csv", index=False)
    with pytest.raises(UserError, match="restore the masks/ folder"):
        load_lesion_set("covidqu_infection", tmp_path)


def test_subset_keeps_each_images_boxes(tmp_path):
    from augment.data.lesions import subset

    ls = load_lesion_set("nih_bbox", make_nih(tmp_path), size=16)
    sub = subset(ls, np.array([2, 1]))
    assert sub.files == [ls.files[2], ls.files[1]] and np.array_equal(sub.images[0], ls.images[2])
    assert sub.boxes["image"].tolist() == [0, 1] and sub.boxes["label"].tolist() == ["Effusion", "Nodule"]
    assert sub.boxes.iloc[0]["w"] == 16 and sub.labels[1] == ("Nodule", "Mass")
