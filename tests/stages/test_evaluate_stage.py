import json
from pathlib import Path

import pytest

from augment.cli import main
from stage_args import GEN, TRAIN  # noqa: F401


def test_evaluate_masks_and_image_quality_with_floors(models, synthetic, tmp_path, capsys):
    out = tmp_path / "ev"
    assert main(["evaluate", *GEN, "--models", str(models), "--synthetic", str(synthetic), "--out", str(out)]) == 0
    m = json.loads((out / "metrics.json").read_text())
    masks = m["masks"]["fixed_point"]["per_class"]
    for c in ("Edema", "Hernia"):
        for key in ("dice_mean", "iou_mean", "poi_mean", "detection_auc", "healing_psnr_mean", "identity_l1_mean"):
            assert masks[c][key] is not None
        assert 0 <= masks[c]["dice_mean"] <= 1
    # the reference row heals with the phantom's own healthy render: the map is exactly the lesions,
    # so every lesion image outscores every healthy one and healing is exact (PSNR capped at 100 dB)
    ref = m["mask_reference"]["per_class"]
    for c in ("Edema", "Hernia"):
        assert ref[c]["detection_auc"] == 1.0
        assert ref[c]["healing_psnr_mean"] == 100.0 and ref[c]["identity_l1_mean"] == 0.0
        assert ref[c]["n_lesion_images"] == masks[c]["n_lesion_images"]
        # leaving the input unchanged cannot heal: finite PSNR, below the reference's capped 100 dB
        assert 10.0 < ref[c]["unchanged_psnr_mean"] < 100.0
    assert ref["Edema"]["dice_mean"] > masks["Edema"]["dice_mean"]
    fig = out / "masks_fixed_point.png"
    assert m["masks"]["fixed_point"]["figure"] == str(fig) and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    iq = m["image_quality"]
    assert iq["extractor"].startswith("domain:") and "sha256=" in iq["extractor"]
    o = iq["overall"]
    for k in ("fid", "fid_floor", "kid", "kid_floor", "precision", "recall", "is"):
        assert o[k] is not None
    # the floor (real vs real) must be far below an untrained generator's score
    assert o["fid_floor"] < o["fid"]
    text = capsys.readouterr().out
    assert "floor" in text and "Dice" in text and "reference" in text
    assert (out / "metrics.md").read_text().count("|") > 20


@pytest.mark.parametrize("args,needle", [
    (["--synthetic", "/no/such/dir"], "does not exist"),
    (["data.image_size=64"], "trained at 32 px"),
    (["--classes", "edema,mass"], "was not trained on Mass"),
])
def test_evaluate_bad_input(models, tmp_path, capsys, args, needle):
    assert main(["evaluate", *GEN, "--models", str(models), *args, "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_evaluate_refuses_a_set_with_too_few_images(models, synthetic, tmp_path, capsys):
    import shutil

    import pandas as pd

    small = tmp_path / "small"
    shutil.copytree(synthetic, small)
    df = pd.read_csv(small / "labels.csv")
    df.head(1).to_csv(small / "labels.csv", index=False)
    assert main(["evaluate", *GEN, "--models", str(models), "--synthetic", str(small), "--out", str(tmp_path / "e")]) == 2
    assert "at least 2" in capsys.readouterr().err


# ----------------------------------------------------------------------- localisation on real lesions
CXR_LESIONS = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "cxr-lesions"
CXR_REAL = CXR_LESIONS.parent / "cxr-real"
FINDINGS = ["Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax"]
LOC = ["progress=false", "evaluate.localisation_size=32", "evaluate.limit=4", "evaluate.gradcam_layer=layer2"]


def _tiny_classifier(path: Path, size: int = 32) -> Path:
    """A tiny timm classifier trained for 15 steps on random 32 px images (seconds): the smoke test
    only needs a model whose gradients flow, not a good one."""
    import torch

    from classifiers.model import create_classifier, save_checkpoint

    cfg = {"model_name": "tiny", "num_classes": len(FINDINGS), "in_chans": 1}
    model = create_classifier(**cfg, init_seed=0)
    g = torch.Generator().manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(15):
        x = torch.rand(8, 1, size, size, generator=g) * 2 - 1
        y = (torch.rand(8, len(FINDINGS), generator=g) < 0.3).float()
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()
    return save_checkpoint(path, model.eval(), model_cfg=cfg, classes=FINDINGS, image_size=size, metrics={})


@pytest.fixture
def lesions():
    if not (CXR_LESIONS / "nih_bbox" / "boxes.csv").is_file():
        pytest.skip("../shared/data/cxr-lesions is not beside the project")
    return CXR_LESIONS


def test_evaluate_localisation_smoke_tables_for_every_source(models, lesions, tmp_path, capsys):
    ck = _tiny_classifier(tmp_path / "clf" / "best.pt")
    out = tmp_path / "loc"
    assert main(["evaluate", *GEN, *LOC, "--models", str(models), "--out", str(out),
                 "--localisation", "nih_bbox,covidqu_infection", f"evaluate.lesions_root={lesions}",
                 f"evaluate.classifier={ck}", "evaluate.sources=[random,gradcam,gradcam_pp,lung_atlas]",
                 f"evaluate.real_root={CXR_REAL}"]) == 0
    m = json.loads((out / "metrics.json").read_text())
    loc = m["localisation"]
    assert loc["sources"] == ["random", "gradcam", "gradcam_pp", "lung_atlas", "fixed_point"] and loc["classifier"] == str(ck)
    nih = loc["nih_bbox"]
    assert nih["n_images"] == 4 and nih["size"] == 32
    for src in loc["sources"]:
        table = nih["boxes"][src]
        assert table["mean"]["n_boxes"] == nih["n_boxes"]
        for k in ("iobb@0.1", "iobb@0.25", "iobb@0.5", "iou@0.25", "pointing"):
            assert 0.0 <= table["mean"][k] <= 1.0
        # at a higher threshold never more boxes are found
        assert table["mean"]["iobb@0.1"] >= table["mean"]["iobb@0.25"] >= table["mean"]["iobb@0.5"]
        cov = loc["covidqu_infection"]["masks"][src]["Pneumonia"]
        assert 0.0 <= cov["dice_mean"] <= 1.0 and 0.0 <= cov["detection_auc"] <= 1.0
        assert cov["n_lesion_images"] == 4 and cov["n_normal_images"] == 4
        assert loc["covidqu_infection"]["boxes"][src]["Pneumonia"]["n_boxes"] >= 4
    assert m["masks"]["fixed_point"]  # the phantom mask table is still there
    for name in ("nih_bbox", "covidqu_infection"):
        assert (out / f"localisation_{name}.png").read_bytes()[:4] == b"\x89PNG"
    text = capsys.readouterr().out
    assert "Box localisation: nih_bbox" in text and "Lesion masks: covidqu_infection" in text and "gradcam_pp" in text
    assert "Box localisation: nih_bbox" in (out / "metrics.md").read_text()


def _nih_copy(root: Path, box=(1, 1, 4, 4), drop_image: bool = False) -> Path:
    import numpy as np
    import pandas as pd
    from PIL import Image

    d = root / "nih_bbox"
    (d / "images").mkdir(parents=True)
    files = ["images/a.png", "images/b.png"]
    for f in files:
        Image.fromarray(np.full((32, 32), 90, np.uint8)).save(d / f)
    if drop_image:
        (d / files[1]).unlink()
    pd.DataFrame({"file": files, "labels": ["Effusion", "Mass"], "patient_id": ["1", "2"]}).to_csv(d / "labels.csv", index=False)
    pd.DataFrame([(files[0], "Effusion", *box), (files[1], "Mass", 2, 2, 5, 5)],
                 columns=["file", "label", "x", "y", "w", "h"]).to_csv(d / "boxes.csv", index=False)
    return root


@pytest.mark.parametrize("extra,needle", [
    (["evaluate.sources=[random,gradcam]"], "mask source gradcam needs a trained classifier"),
    (["evaluate.localisation=[nih_bbox,chexlocalize]"], "unknown set(s) chexlocalize"),
    (["evaluate.sources=[random,scorecam]"], "unknown mask source(s) scorecam"),
    (["evaluate.sources=[random,lung_atlas]", "evaluate.real_root=/no/such/cxr-real"], "masks.csv, which does not exist"),
    (["evaluate.classifier=/no/such/best.pt"], "cannot load the classifier for gradcam"),
    (["BOX"], "lies outside its 32 x 32 image"),
    (["MISSING"], "are missing"),
])
def test_evaluate_localisation_bad_input(in_tmp, capsys, extra, needle):
    root = _nih_copy(in_tmp / "lesions", box=(30, 1, 4, 4) if extra == ["BOX"] else (1, 1, 4, 4),
                     drop_image=extra == ["MISSING"])
    extra = ["evaluate.sources=[random]"] if extra[0] in ("BOX", "MISSING") else extra
    assert main(["evaluate", *LOC, "evaluate.localisation=[nih_bbox]", f"evaluate.lesions_root={root}", *extra,
                 "--out", str(in_tmp / "e")]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (in_tmp / "e").exists()  # nothing half-written


def test_evaluate_localisation_refuses_a_classifier_of_another_size(in_tmp, capsys):
    ck = _tiny_classifier(in_tmp / "clf.pt", size=32)
    root = _nih_copy(in_tmp / "lesions")
    assert main(["evaluate", *LOC, "evaluate.localisation_size=64", "evaluate.localisation=[nih_bbox]",
                 f"evaluate.lesions_root={root}", f"evaluate.classifier={ck}", "--out", str(in_tmp / "e")]) == 2
    assert "trained at 32 px but evaluate.localisation_size=64" in capsys.readouterr().err


def test_evaluate_localisation_random_and_gradcam_without_models(in_tmp, capsys):
    """No train run at all: the random control and Grad-CAM of a classifier checkpoint on a tiny copy."""
    ck = _tiny_classifier(in_tmp / "clf.pt")
    root = _nih_copy(in_tmp / "lesions")
    out = in_tmp / "e"
    assert main(["evaluate", *LOC, "evaluate.localisation=[nih_bbox]", f"evaluate.lesions_root={root}",
                 f"evaluate.classifier={ck}", "--out", str(out)]) == 0
    loc = json.loads((out / "metrics.json").read_text())["localisation"]
    assert loc["sources"] == ["random", "gradcam", "gradcam_pp"] and loc["translators"] == {}
    assert set(loc["nih_bbox"]["boxes"]["gradcam"]) == {"Effusion", "Mass", "mean"}
    assert "data" not in json.loads((out / "metrics.json").read_text())  # the phantom table was not built
