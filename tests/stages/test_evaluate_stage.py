import json

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
