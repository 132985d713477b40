import json

import numpy as np
import pandas as pd
import pytest

from cfg_helpers import data_cfg
from PIL import Image

from augment.cli import main


def _synthetic_folder(root, n=24, size=32, classes=("Edema", "Hernia", "Effusion")):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        c = classes[i % len(classes)]
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / "images" / f"s{i:04d}.png")
        probs = {f"p_{k}": (0.9 if k == c else 0.1) for k in classes}
        rows.append({"Image Index": f"s{i:04d}.png", "Finding Labels": c, "file": f"images/s{i:04d}.png", "mask": "",
                     **probs, "generator": "test", "seed": i})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"classes": list(classes)}))
    return root


def test_classify_baseline_writes_per_class_auc_roc_and_checkpoint(in_tmp, tiny, capsys):
    assert main(["classify", *tiny, "--out", "c"]) == 0
    m = json.loads((in_tmp / "c" / "metrics.json").read_text())
    assert m["mode"] == "baseline" and m["classes"] == ["Edema", "Hernia", "Effusion"]
    for c in m["classes"]:
        auc = m["summary"]["auc"][c]["mean"]
        assert auc is None or 0.0 <= auc <= 1.0
    assert (in_tmp / "c" / "roc.png").stat().st_size > 5000
    assert (in_tmp / "c" / "seed0" / "best.pt").is_file()
    assert "mean AUC" in capsys.readouterr().out


def test_classify_with_synthetic_and_two_seeds(in_tmp, tiny):
    syn = _synthetic_folder(in_tmp / "syn")
    assert main(["classify", *tiny, "--synthetic", str(syn), "--seeds", "0,1", "--threshold", "0.5", "--out", "c"]) == 0
    m = json.loads((in_tmp / "c" / "metrics.json").read_text())
    assert m["mode"] == "augmented" and m["seeds"] == [0, 1]
    assert all(s["n_train_synthetic"] == 24 for s in m["per_seed"])
    assert m["summary"]["mean_auc"]["n"] == 2 and m["summary"]["mean_auc"]["std"] is not None


@pytest.mark.parametrize("extra,needle", [
    (["--synthetic", "/no/such/folder"], "does not exist"),
    (["--classes", "pneumothorax"], "no positive image"),
    (["--threshold", "1.5"], "outside (0, 1)"),
])
def test_classify_bad_input(in_tmp, tiny, capsys, extra, needle):
    assert main(["classify", *tiny, *extra, "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not (in_tmp / "c").exists()


def test_classify_refuses_a_folder_that_is_not_synthetic(in_tmp, tiny, capsys):
    (in_tmp / "junk").mkdir()
    (in_tmp / "junk" / "labels.csv").write_text("a,b\n1,2\n")
    assert main(["classify", *tiny, "--synthetic", str(in_tmp / "junk"), "--out", "c"]) == 2
    assert "lacks column" in capsys.readouterr().err


def test_limit_positives_is_one_fixed_subset_for_every_model():
    from augment.data.sources import load_table
    from augment.jobs.classifier import limited_train_indices
    from augment.jobs.gan import training_rows

    table = load_table(data_cfg(n=300, image_size=32, prevalence={"Edema": 0.3}))
    cfg = {"classify": {"limit_positives": {"edema": 5}, "limit_seed": 0}}
    rows = limited_train_indices(table, cfg)
    assert (table.column("Edema")[rows] == 1).sum() == 5
    assert len(rows) == len(table.indices("train")) - ((table.column("Edema")[table.indices("train")] == 1).sum() - 5)
    assert (limited_train_indices(table, cfg) == rows).all()  # no training seed involved
    other = limited_train_indices(table, {"classify": {"limit_positives": {"Edema": 5}, "limit_seed": 1}})
    assert set(other) != set(rows)
    gan_rows = np.intersect1d(training_rows(table, ["Edema"]), rows)
    assert (table.column("Edema")[gan_rows] == 1).sum() <= 5


def test_negatives_no_finding_keeps_only_the_selected_findings_and_no_finding():
    from augment.data.sources import load_table
    from augment.errors import UserError
    from augment.jobs.classifier import selected_rows

    table = load_table(data_cfg(n=300, image_size=32, prevalence={"Edema": 0.3, "Hernia": 0.3}))
    idx = table.indices()
    assert (selected_rows(table, ["Edema"], "all")(idx) == idx).all()
    kept = selected_rows(table, ["Edema"], "no_finding")(idx)
    edema, healthy, hernia = (table.column(c)[kept] == 1 for c in ("Edema", "No Finding", "Hernia"))
    assert (edema | healthy).all() and not (hernia & ~edema).any()
    assert 0 < len(kept) < len(idx)
    with pytest.raises(UserError, match="choose all or no_finding"):
        selected_rows(table, ["Edema"], "others")


@pytest.mark.parametrize("args,needle", [
    (["classify.epochs=0"], "classify.epochs=0: use a whole number >= 1"),
    (["classify.batch_size=-3"], "classify.batch_size=-3"),
    (["--seeds", "a,b"], "seeds are integers"),
])
def test_bad_numbers_are_one_line_and_leave_nothing(in_tmp, tiny, capsys, args, needle):
    assert main(["classify", *tiny, *args, "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (in_tmp / "c").exists()
