"""Box protocol (Wang et al. 2017), pointing game, Grad-CAM / Grad-CAM++ equations and the random control,
on hand-made boxes, maps and models with exact answers."""

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from augment.data.lesions import LesionSet
from augment.jobs.saliency import CamMaps, MapSource, RandomMaps, cam, localise, maps_to_masks, random_map
from augment.metrics.localisation import (accuracy, box_iou, box_mask, box_scores, box_table, iobb, pointing_hit,
                                          region_boxes)

RULE = {"rule": "otsu", "threshold": 0.1, "percentile": 95.0, "min_area": 1, "smooth_sigma": 0.0}


# ------------------------------------------------------------------------------------- geometry
def test_box_mask_takes_the_pixels_whose_centres_lie_inside():
    m = box_mask((1, 1, 2, 2), (4, 4))
    assert m.sum() == 4 and m[1:3, 1:3].all()
    # x is the column, y the row; centres 0.5 and 1.5: only column 1 lies in [0.6, 1.6), only row 0 in [0, 1)
    m = box_mask((0.6, 0.0, 1.0, 1.0), (2, 2))
    assert m.tolist() == [[False, True], [False, False]]


def test_region_boxes_are_the_bounding_boxes_of_8_connected_components():
    m = np.zeros((5, 5), dtype=np.uint8)
    m[0, 0] = 1
    m[2:4, 1:4] = 1
    m[4, 4] = 1  # touches (3, 3) at a corner: the same component
    assert region_boxes(m) == [(0.0, 0.0, 1.0, 1.0), (1.0, 2.0, 4.0, 3.0)]
    assert region_boxes(np.zeros((3, 3))) == []


def test_iobb_and_iou_on_box_geometry():
    assert iobb((0, 0, 2, 2), (1, 1, 2, 2)) == pytest.approx(1 / 4)
    assert box_iou((0, 0, 2, 2), (1, 1, 2, 2)) == pytest.approx(1 / 7)
    assert iobb((1, 1, 1, 1), (0, 0, 4, 4)) == 1.0  # a region inside the box
    assert iobb((5, 5, 1, 1), (0, 0, 4, 4)) == 0.0 and box_iou((5, 5, 1, 1), (0, 0, 4, 4)) == 0.0
    assert iobb((0, 0, 0, 0), (0, 0, 4, 4)) == 0.0


def test_box_scores_take_the_best_region_for_each_measure():
    m = np.zeros((8, 8))
    m[0:2, 6:8] = 1      # outside the box, first in scan order
    m[2:4, 0:2] = 1      # inside the box: IoBB 1, IoU 4/16
    m[5:8, 5:8] = 1      # outside
    assert box_scores(m, (0, 0, 4, 4)) == (1.0, pytest.approx(0.25))
    assert box_scores(np.zeros((8, 8)), (0, 0, 4, 4)) == (0.0, 0.0)


def test_pointing_game_reads_x_as_column_and_y_as_row():
    h = np.zeros((6, 6))
    h[2, 3] = 5.0        # row 2, column 3
    assert pointing_hit(h, (3, 2, 1, 1))
    assert not pointing_hit(h, (2, 3, 1, 1))
    assert pointing_hit(np.ones((6, 6)), (0, 0, 1, 1))  # a constant map points at the top-left pixel
    with pytest.raises(ValueError, match="NaN"):
        pointing_hit(np.full((2, 2), np.nan), (0, 0, 1, 1))


def test_accuracy_is_strictly_above_the_threshold():
    assert accuracy([0.1, 0.3, 0.6]) == {0.1: pytest.approx(2 / 3), 0.25: pytest.approx(2 / 3), 0.5: pytest.approx(1 / 3)}
    assert accuracy([]) == {0.1: None, 0.25: None, 0.5: None}


def test_box_table_mean_counts_each_finding_once():
    recs = [{"finding": "A", "iobb": 0.6, "iou": 0.2, "hit": True}, {"finding": "A", "iobb": 0.0, "iou": 0.0, "hit": False},
            {"finding": "B", "iobb": 0.3, "iou": 0.3, "hit": True}]
    t = box_table(recs)
    assert t["A"]["n_boxes"] == 2 and t["A"]["iobb@0.5"] == 0.5 and t["A"]["iou@0.1"] == 0.5 and t["A"]["pointing"] == 0.5
    assert t["B"]["iobb@0.5"] == 0.0 and t["B"]["iou@0.25"] == 1.0
    # unweighted over findings: (0.5 + 1.0) / 2, not 2/3 over boxes
    assert t["mean"]["iobb@0.25"] == pytest.approx(0.75) and t["mean"]["pointing"] == pytest.approx(0.75)
    assert t["mean"]["n_boxes"] == 3 and t["mean"]["n_findings"] == 2


# -------------------------------------------------------------------------------------- Grad-CAM
class _Linear(nn.Module):
    """Activations = the input (one channel); logit = sum(v * A): dS/dA = v exactly."""

    def __init__(self, v):
        super().__init__()
        self.v = nn.Parameter(torch.tensor(v, dtype=torch.float32)[None, None])

    def forward_features(self, x):
        return x

    def forward_head(self, a):
        return (a * self.v).sum((1, 2, 3))[:, None]


A = torch.tensor([[1.0, 2.0], [3.0, 4.0]])[None, None]
V = [[1.0, -1.0], [2.0, 0.0]]


def test_gradcam_equation_on_a_linear_model():
    # w = mean(v) = 0.5 -> L = ReLU(0.5 A)
    out = cam(_Linear(V), A, 0)
    assert torch.allclose(out[0], 0.5 * A[0, 0])
    # negative evidence everywhere: ReLU leaves nothing
    assert cam(_Linear([[-1.0, -1.0], [-1.0, -1.0]]), A, 0).abs().max() == 0


def test_gradcam_pp_equation_on_a_linear_model():
    # g = v; sum A g^3 = 1 - 2 + 24 + 0 = 23; alpha = g^2 / (2 g^2 + 23) = [[1/25, 1/25], [4/31, 0]]
    # w = sum alpha ReLU(g) = 1/25 + 8/31
    w = 1 / 25 + 8 / 31
    out = cam(_Linear(V), A, 0, variant="gradcam_pp")
    assert torch.allclose(out[0], w * A[0, 0], atol=1e-6)
    with pytest.raises(ValueError, match="variant"):
        cam(_Linear(V), A, 0, variant="scorecam")


def _resnet(seed=0):
    from classifiers.model import create_classifier

    return create_classifier("resnet18", num_classes=3, init_seed=seed).eval()


def test_gradcam_last_stage_is_layer4_and_maps_do_not_depend_on_the_batch():
    m = _resnet()
    x = torch.randn(3, 1, 64, 64, generator=torch.Generator().manual_seed(0))
    a = cam(m, x, 1)
    assert a.shape == (3, 64, 64) and (a >= 0).all()
    assert torch.allclose(a, cam(m, x, 1, layer="layer4"))
    assert torch.allclose(a[1:2], cam(m, x[1:2], 1), atol=1e-6)
    assert not torch.allclose(cam(m, x, 1, layer="layer3"), a)
    with pytest.raises(ValueError, match="no module"):
        cam(m, x, 1, layer="layer9")


def test_gradcam_equals_captums_layergradcam():
    captum = pytest.importorskip("captum.attr")
    m = _resnet(1)
    x = torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(1))
    ref = captum.LayerGradCam(m, m.layer3).attribute(x, target=2, relu_attributions=True)
    ref = captum.LayerAttribution.interpolate(ref, (64, 64), interpolate_mode="bilinear")[:, 0]
    assert torch.allclose(cam(m, x, 2, layer="layer3"), ref, atol=1e-6)


def test_cam_source_knows_only_the_classifiers_classes():
    src = CamMaps(_resnet(), ["Effusion", "Mass", "Nodule"], variant="gradcam_pp")
    assert src.knows("Mass") and not src.knows("Edema")
    imgs = np.random.default_rng(0).integers(0, 255, (2, 64, 64), dtype=np.uint8)
    assert src.maps(imgs, "Nodule", np.arange(2)).shape == (2, 64, 64)


# ------------------------------------------------------------------------------------- random maps
def test_random_maps_are_seeded_per_image_and_smooth():
    a = random_map(0, 7, (32, 32), 4)
    assert a.dtype == np.float32 and a.min() == 0.0 and a.max() == 1.0
    assert a.tobytes() == random_map(0, 7, (32, 32), 4).tobytes()
    assert not np.array_equal(a, random_map(0, 8, (32, 32), 4)) and not np.array_equal(a, random_map(1, 7, (32, 32), 4))
    # smooth: neighbouring pixels differ far less than the range
    assert np.abs(np.diff(a, axis=1)).max() < 0.3
    src = RandomMaps(seed=3, cell_px=8)
    imgs = np.zeros((3, 32, 32), np.uint8)
    both = src.maps(imgs, "Mass", np.array([5, 9, 11]))
    assert np.array_equal(both[1], src.maps(imgs[:1], "Nodule", np.array([9]))[0])
    g = torch.get_rng_state()
    src.maps(imgs, "Mass", np.array([1]))
    assert torch.equal(g, torch.get_rng_state())  # the global RNG is never touched


def test_maps_to_masks_normalises_saliency_and_returns_empty_masks_when_nothing_is_selected():
    maps = np.zeros((2, 8, 8), np.float32)
    maps[0, 1:3, 1:3] = 50.0
    maps[1, 5:7, 5:7] = 0.002
    fixed = {**RULE, "rule": "fixed", "threshold": 0.5}
    got = maps_to_masks(maps, fixed, normalise=True)
    assert got[0, 1:3, 1:3].all() and got[1, 5:7, 5:7].all() and got.sum() == 8
    assert maps_to_masks(maps, fixed, normalise=False)[1].sum() == 0   # raw 0.002 < 0.5
    assert maps_to_masks(np.zeros((2, 8, 8)), RULE, normalise=True).sum() == 0


# ------------------------------------------------------------------------------------------ localise
class _Oracle(MapSource):
    """Maps = the image's boxes of the finding (``flip``: the mirror image, far from the box)."""

    normalise = True

    def __init__(self, ls, name, flip=False):
        self.ls, self.name, self.flip = ls, name, flip

    def maps(self, images, finding, keys):
        out = np.zeros(images.shape, np.float32)
        for j, k in enumerate(keys):
            for _, b in self.ls.boxes[(self.ls.boxes["image"] == k) & (self.ls.boxes["label"] == finding)].iterrows():
                out[j] += box_mask((b.x, b.y, b.w, b.h), images.shape[1:])
            if finding in self.ls.masks:
                out[j] += self.ls.masks[finding][k]
        return out[:, ::-1, ::-1].copy() if self.flip else out


def _set():
    boxes = pd.DataFrame([(0, "Effusion", 1.0, 1.0, 4.0, 4.0), (1, "Nodule", 9.0, 10.0, 3.0, 3.0)],
                         columns=["image", "label", "x", "y", "w", "h"])
    gt = np.zeros((3, 16, 16), dtype=bool)
    gt[0, 1:5, 1:5] = True
    return LesionSet(name="toy", root=None, files=["a", "b", "c"], images=np.zeros((3, 16, 16), np.uint8),
                     labels=[("Effusion",), ("Nodule",), ("No Finding",)], patient_ids=["1", "2", "3"], boxes=boxes,
                     masks={"Effusion": gt}, size=16)


def test_localise_scores_a_perfect_source_1_and_a_mirrored_one_0(tmp_path):
    ls = _set()
    r = localise(ls, [_Oracle(ls, "oracle"), _Oracle(ls, "mirror", flip=True), RandomMaps(0, 4)], RULE,
                 n_examples=2, figure=tmp_path / "fig.png")
    good, bad = r["boxes"]["oracle"], r["boxes"]["mirror"]
    for f in ("Effusion", "Nodule", "mean"):
        assert good[f]["iobb@0.5"] == 1.0 and good[f]["iou@0.5"] == 1.0 and good[f]["pointing"] == 1.0
        assert bad[f]["iobb@0.1"] == 0.0 and bad[f]["pointing"] == 0.0
    m = r["masks"]["oracle"]["Effusion"]
    assert m["dice_mean"] == 1.0 and m["poi_mean"] == 1.0 and m["detection_auc"] == 1.0
    assert m["n_lesion_images"] == 1 and m["n_normal_images"] == 1
    assert r["masks"]["mirror"]["Effusion"]["dice_mean"] == 0.0
    assert set(r["boxes"]) == {"oracle", "mirror", "random"} and r["speed"]["random"]["maps"] > 0
    assert (tmp_path / "fig.png").read_bytes()[:4] == b"\x89PNG"


def test_localise_marks_findings_a_classifier_lacks_as_not_scored():
    ls = _set()
    r = localise(ls, [CamMaps(_resnet(), ["Effusion", "Mass", "Edema"])], RULE, n_examples=0)
    assert "Effusion" in r["boxes"]["gradcam"] and "Nodule" not in r["boxes"]["gradcam"]
    assert r["not_scored"] == {"gradcam": ["Nodule"]}


def test_cam_masks_give_one_mask_per_present_finding_like_per_finding_masks():
    from augment.jobs.saliency import cam_masks

    m = _resnet()
    x = torch.rand(3, 1, 64, 64, generator=torch.Generator().manual_seed(2)) * 2 - 1
    findings = torch.tensor([[1.0, 0.0], [0.0, float("nan")], [1.0, 1.0]])
    with torch.no_grad():  # generate's shard workers run under no_grad: the CAM enables grad itself
        out = cam_masks(m, ["Effusion", "Mass", "Nodule"], x, findings, ["Nodule", "Effusion"], RULE, variant="gradcam_pp")
    assert set(out) == {"Nodule", "Effusion"}
    assert out["Nodule"].shape == (3, 1, 64, 64) and out["Nodule"][1].sum() == 0 and out["Effusion"][:2].sum() == 0
    ref = maps_to_masks(cam(m, x, 2, variant="gradcam_pp").numpy(), RULE, normalise=True)[[0, 2]]
    assert ref.any() and torch.equal(out["Nodule"][[0, 2], 0], torch.from_numpy(ref.astype(np.float32)))
    with pytest.raises(ValueError, match="not outputs"):
        cam_masks(m, ["Effusion", "Mass", "Nodule"], x, findings, ["Nodule", "Edema"], RULE)


def test_localise_with_lung_masks_reports_containment_and_detection_without_pixel_ground_truth():
    ls = _set()
    ls.masks = {}
    ls.lungs = np.zeros((3, 16, 16), dtype=bool)
    ls.lungs[:, :, :8] = True  # the Effusion box (columns 1-4) is inside, the Nodule box (columns 9-11) outside
    r = localise(ls, [_Oracle(ls, "oracle")], RULE, n_examples=0)
    assert r["masks"]["oracle"]["Effusion"]["lung_containment_mean"] == 1.0
    assert r["masks"]["oracle"]["Nodule"]["lung_containment_mean"] == 0.0
    assert r["masks"]["oracle"]["Effusion"]["detection_auc"] == 1.0 and r["masks"]["oracle"]["Nodule"]["n_normal_images"] == 1
    assert "dice_mean" not in r["masks"]["oracle"]["Effusion"]


# ------------------------------------------------------------------------------------- lung atlas
def _fake_real_root(tmp_path, masks):
    """A cxr-real-shaped folder with ``masks`` (name -> bool array) as JSRT lung masks, plus one heart mask
    and one non-JSRT lung mask that the atlas must ignore."""
    from PIL import Image

    rows = []
    (tmp_path / "masks").mkdir()
    for name, m in {**masks, "heart": np.ones((16, 16), bool), "other": np.ones((16, 16), bool)}.items():
        Image.fromarray(m.astype(np.uint8) * 255).save(tmp_path / "masks" / f"{name}.png")
        file = f"images/covid_x/{name}.png" if name == "other" else f"images/jsrt/{name}.png"
        rows.append({"file": file, "mask_file": f"masks/{name}.png", "structure": "heart" if name == "heart" else "lungs"})
    pd.DataFrame(rows).to_csv(tmp_path / "masks.csv", index=False)
    return tmp_path


def test_lung_atlas_is_the_mean_of_the_jsrt_lung_masks_and_the_same_map_for_every_image(tmp_path):
    from augment.data.lesions import lung_atlas
    from augment.jobs.saliency import LungAtlasMaps, build_sources

    left, right = np.zeros((16, 16), bool), np.zeros((16, 16), bool)
    left[:, :8], right[:, 4:12] = True, True
    root = _fake_real_root(tmp_path, {"a": left, "b": right})
    atlas, n = lung_atlas(root, size=16)
    assert n == 2  # the heart mask and the non-JSRT lung mask are not averaged
    assert atlas.dtype == np.float32
    assert np.allclose(atlas[:, :4], 0.5) and np.allclose(atlas[:, 4:8], 1.0) and np.allclose(atlas[:, 8:12], 0.5)
    assert np.allclose(atlas[:, 12:], 0.0)
    src = build_sources(["lung_atlas"], seed=0, size=16, real_root=root)[0]
    assert isinstance(src, LungAtlasMaps) and src.name == "lung_atlas" and src.n_masks == 2
    imgs = np.random.default_rng(0).integers(0, 255, (3, 16, 16), dtype=np.uint8)
    maps = src.maps(imgs, "Mass", np.arange(3))
    assert maps.shape == (3, 16, 16) and all(np.array_equal(m, atlas) for m in maps)
    # the mask rule on the atlas gives the population lung field: its core, not its edge
    assert maps_to_masks(maps[:1], RULE, src.normalise)[0][:, 4:8].all()


def test_lung_atlas_without_its_masks_is_one_clear_error(tmp_path):
    from augment.data.lesions import lung_atlas
    from augment.errors import UserError
    from augment.jobs.saliency import build_sources

    with pytest.raises(UserError, match="needs the cxr-real lung masks"):
        build_sources(["lung_atlas"], seed=0, size=16, real_root=None)
    with pytest.raises(UserError, match="masks.csv, which does not exist"):
        lung_atlas(tmp_path, size=16)
    root = _fake_real_root(tmp_path, {})
    with pytest.raises(UserError, match="no lung masks for images under images/jsrt/"):
        lung_atlas(root, size=16)
