import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from augment.data.labels import NO_FINDING, VOCABULARY
from augment.data.sources import load_table, nih_boxes
from augment.data.splits import split_by_patient
from augment.data.table import XrayDataset
from augment.errors import UserError
from cfg_helpers import data_cfg


def _png(path: Path, value: int, size: int = 40) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.full((size, size + 8), value, dtype=np.uint8)  # not square: the loader centre-crops
    Image.fromarray(arr).save(path)


def _folder(tmp_path: Path, n: int = 12) -> Path:
    rows = []
    for i in range(n):
        f = f"img/{i:03d}.png"
        _png(tmp_path / f, 10 * i)
        rows.append({"file": f, "labels": "Edema|Mass" if i % 3 == 0 else ("No Finding" if i % 3 == 1 else "Hernia"),
                     "patient_id": f"p{i // 2}"})
    pd.DataFrame(rows).to_csv(tmp_path / "labels.csv", index=False)
    return tmp_path


def test_folder_source_reads_labels_patients_and_resizes(tmp_path):
    root = _folder(tmp_path)
    table = load_table(data_cfg("folder", root=str(root), image_size=32, cache=False))
    assert table.images.shape == (12, 32, 32) and table.images.dtype == np.uint8
    assert table.column("Edema").sum() == 4 and table.column(NO_FINDING).sum() == 4
    ds = XrayDataset(table, classes=["Edema", "Hernia"])
    item = ds[0]
    assert item["image"].shape == (1, 32, 32) and item["labels"].tolist() == [1.0, 0.0]
    assert int(item["image"][0, 0, 0]) == 0


def test_folder_source_errors_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="data.root"):
        load_table(data_cfg("folder", root=None))
    with pytest.raises(UserError, match="does not exist"):
        load_table(data_cfg("folder", root=str(tmp_path / "nope")))
    with pytest.raises(UserError, match="labels.csv"):
        load_table(data_cfg("folder", root=str(tmp_path)))
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "labels.csv", index=False)
    with pytest.raises(UserError, match="lacks column"):
        load_table(data_cfg("folder", root=str(tmp_path)))
    with pytest.raises(UserError, match="unknown data source"):
        load_table({**data_cfg("folder"), "name": "dicomland"})


def test_a_missing_key_fails_loudly_and_every_source_yaml_has_the_common_keys(tmp_path):
    """No defaults in code: a data node without a key is refused, naming the key."""
    root = _folder(tmp_path)
    full = data_cfg("folder", root=str(root), image_size=32, cache=False)
    for key in ("image_size", "split", "cache", "drop_unlabelled", "on_error", "masks_csv"):
        with pytest.raises(KeyError, match=key):
            load_table({k: v for k, v in full.items() if k != key})
    with pytest.raises(KeyError, match="seed"):
        load_table({**full, "split": {"val": 0.1, "test": 0.2, "official": True}})
    for source in ("phantom", "folder", "nih", "nih64", "chexpert", "medmnist"):
        node = data_cfg(source)
        assert {"name", "image_size", "cache", "cache_dir", "split"} <= set(node), source
        assert set(node["split"]) == {"val", "test", "seed", "official"}, source


@pytest.mark.parametrize("size", [16, 48, 512, 1024])
def test_image_sizes_outside_32_to_256_or_not_powers_of_two_are_refused(tmp_path, size):
    with pytest.raises(UserError, match="power of two from 32 to 256"):
        load_table(data_cfg("folder", root=str(_folder(tmp_path)), image_size=size, cache=False))


def test_the_largest_supported_size_loads(tmp_path):
    table = load_table(data_cfg("folder", root=str(_folder(tmp_path, n=3)), image_size=256, cache=False))
    assert table.images.shape == (3, 256, 256)


def test_paths_escaping_root_are_rejected(tmp_path):
    root = _folder(tmp_path / "d")
    _png(tmp_path / "outside.png", 3)
    df = pd.read_csv(root / "labels.csv")
    df.loc[0, "file"] = "../outside.png"
    df.to_csv(root / "labels.csv", index=False)
    with pytest.raises(UserError, match="escapes data.root"):
        load_table(data_cfg("folder", root=str(root), image_size=32, cache=False))


def test_corrupt_images_are_skipped_with_a_count_or_fail(tmp_path, caplog):
    root = _folder(tmp_path)
    (root / "img/001.png").write_bytes(b"not a png")
    table = load_table(data_cfg("folder", root=str(root), image_size=32, cache=False))
    assert len(table) == 11
    assert "skipped 1 unreadable image" in caplog.text and "img/001.png" in caplog.text
    with pytest.raises(UserError, match="unreadable"):
        load_table(data_cfg("folder", root=str(root), image_size=32, cache=False, on_error="fail"))


def test_on_error_fail_holds_on_a_cache_hit(tmp_path):
    root = _folder(tmp_path / "d")
    (root / "img/001.png").write_bytes(b"not a png")
    cache_dir = str(tmp_path / "cache")
    assert len(load_table(data_cfg("folder", root=str(root), image_size=32, cache_dir=cache_dir))) == 11  # skip, cached
    with pytest.raises(UserError, match=r"1 unreadable image\(s\), e.g. img/001.png"):
        load_table(data_cfg("folder", root=str(root), image_size=32, cache_dir=cache_dir, on_error="fail"))


def test_cache_is_reused_and_invalidated_when_files_change(tmp_path):
    root = _folder(tmp_path / "d")
    cfg = data_cfg("folder", root=str(root), image_size=32, cache_dir=str(tmp_path / "cache"))
    first = load_table(cfg)
    assert isinstance(first.images, np.memmap)
    entries = list((tmp_path / "cache").iterdir())
    assert len(entries) == 1
    again = load_table(cfg)
    assert again.fingerprint == first.fingerprint and len(list((tmp_path / "cache").iterdir())) == 1
    _png(root / "img/005.png", 200, size=48)  # content and size change -> new key
    os.utime(root / "img/005.png", (1e9, 1e9))
    changed = load_table(cfg)
    assert changed.fingerprint != first.fingerprint
    assert int(changed.images[5, 0, 0]) == 200
    other_size = load_table({**cfg, "image_size": 64})
    assert other_size.images.shape[-1] == 64 and other_size.fingerprint != changed.fingerprint


def test_splits_never_share_a_patient():
    pids = np.array([f"p{i % 37}" for i in range(500)])
    splits = split_by_patient(pids, val=0.1, test=0.2, seed=3)
    for p in np.unique(pids):
        assert len(set(splits[pids == p])) == 1
    assert set(splits) == {"train", "val", "test"}
    assert (split_by_patient(pids, seed=3) == splits).all()
    assert not (split_by_patient(pids, seed=4) == splits).all()


def test_official_train_val_rows_never_reach_test():
    pids = np.array([f"p{i}" for i in range(100)])
    fixed = np.array(["train_val"] * 70 + ["test"] * 30)
    s = split_by_patient(pids, fixed=fixed, val=0.1, test=0.2)
    assert (s[70:] == "test").all() and set(s[:70]) == {"train", "val"}


def test_shared_real_data_patient_split_and_classes(cxr_real):
    table = load_table(data_cfg("folder", root=str(cxr_real), image_size=32,
                        split={"val": 0.1, "test": 0.2, "seed": 0, "official": True}))
    assert len(table) > 7000
    for name in ("Edema", "Hernia", "Pneumonia"):
        assert table.column(name).sum() > 0
    df = pd.DataFrame({"p": table.patient_ids, "s": table.splits})
    per_patient = df.groupby("p")["s"].nunique()
    assert (per_patient == 1).all(), "a patient crosses splits"
    assert "lungs" in table.anatomy and table.anatomy_known["lungs"].sum() > 400
    kermany = load_table(data_cfg("folder", root=str(cxr_real), image_size=32,
                          include=["images/kermany_pneumonia/"]))
    assert len(kermany) == 5190 and set(kermany.labelled_classes()) == {"Pneumonia", NO_FINDING}


def test_native64_path_replace(cxr_real):
    table = load_table(data_cfg("folder", root=str(cxr_real), image_size=64,
                        include=["images/nih_kcr2019_64px/"],
                        path_replace={"images/nih_kcr2019_64px/": "images_native64/nih_kcr2019_64px/"}))
    assert len(table) == 975 and all(f.startswith("images_native64/") for f in table.files)


def test_nih_source_on_the_real_reference_files(cxr_real, tmp_path):
    ref = cxr_real / "reference"
    table = load_table(data_cfg("nih", root=str(ref), image_size=32,
                        image_dirs=[str(cxr_real / "images/nih_fullres"), str(cxr_real / "images/nih_kcr2019_64px")]))
    assert len(table) == 26 + 975
    entry = pd.read_csv(ref / "Data_Entry_2017_v2020.csv.gz")
    row = entry[entry["Image Index"] == "00000001_001.png"].iloc[0]
    k = list(table.files).index(next(f for f in table.files if f.endswith("00000001_001.png")))
    assert row["Finding Labels"] == "Cardiomegaly|Emphysema"
    assert table.labels[k, VOCABULARY.index("Cardiomegaly")] == 1 and table.labels[k, VOCABULARY.index("Emphysema")] == 1
    test_list = set((ref / "nih_test_list_derived.txt").read_text().split())
    for f, s in zip(table.files, table.splits):
        if Path(f).name in test_list:
            assert s == "test"
        else:
            assert s in {"train", "val"}
    df = pd.DataFrame({"p": table.patient_ids, "s": table.splits})
    assert (df.groupby("p")["s"].nunique() == 1).all()
    boxes = nih_boxes(ref)
    assert len(boxes) == 984 and "Infiltration" in set(boxes["Finding Label"])


def test_nih_layout_with_images_subfolders(tmp_path):
    (tmp_path / "images_001" / "images").mkdir(parents=True)
    names = ["00000001_000.png", "00000002_000.png", "00000003_000.png"]
    for i, n in enumerate(names):
        _png(tmp_path / "images_001" / "images" / n, 50 * i)
    with gzip.open(tmp_path / "Data_Entry_2017.csv.gz", "wt") as fh:
        fh.write("Image Index,Finding Labels,Patient ID\n")
        fh.write(f"{names[0]},Hernia,1\n{names[1]},No Finding,2\n{names[2]},Edema|Effusion,3\n00000009_000.png,Mass,9\n")
    (tmp_path / "train_val_list.txt").write_text("\n".join(names[:2]))
    (tmp_path / "test_list.txt").write_text(names[2])
    table = load_table(data_cfg("nih", root=str(tmp_path), image_size=32, cache=False))
    assert len(table) == 3
    assert table.splits[list(table.files).index(next(f for f in table.files if names[2] in f))] == "test"


def test_chexpert_uncertain_policies(tmp_path):
    rows = []
    for i in range(6):
        rel = f"train/patient{i:05d}/study1/view1_frontal.jpg"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((40, 40), 20 * i, np.uint8)).save(tmp_path / rel)
        rows.append({"Path": f"CheXpert-v1.0-small/{rel}", "No Finding": "", "Cardiomegaly": "-1.0" if i == 0 else "1.0",
                     "Edema": "", "Consolidation": "0.0", "Pneumonia": "", "Atelectasis": "", "Pneumothorax": "",
                     "Pleural Effusion": "1.0" if i % 2 else ""})
    pd.DataFrame(rows).to_csv(tmp_path / "train.csv", index=False)
    pd.DataFrame(rows[:2]).to_csv(tmp_path / "valid.csv", index=False)
    card = VOCABULARY.index("Cardiomegaly")
    for policy, expected in (("ones", 1.0), ("zeros", 0.0)):
        t = load_table(data_cfg("chexpert", root=str(tmp_path), image_size=32, uncertain=policy, cache=False))
        assert t.labels[0, card] == expected
    t = load_table(data_cfg("chexpert", root=str(tmp_path), image_size=32, uncertain="nan", cache=False))
    assert np.isnan(t.labels[0, card])
    assert np.isnan(t.labels[:, VOCABULARY.index("Hernia")]).all()  # CheXpert does not label Hernia
    assert (t.labels[:, VOCABULARY.index("Effusion")] == np.array([0, 1, 0, 1, 0, 1, 0, 1])).all()
    assert (t.splits[-2:] == "test").all()
    with pytest.raises(UserError, match="policy"):
        load_table(data_cfg("chexpert", root=str(tmp_path), uncertain="maybe"))


def test_medmnist_official_splits(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for split, n in (("train", 10), ("val", 3), ("test", 4)):
        data[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        lab = np.zeros((n, 14), np.uint8)
        lab[0, 13] = 1  # Hernia
        data[f"{split}_labels"] = lab
    np.savez(tmp_path / "chestmnist.npz", **data)
    t = load_table(data_cfg("medmnist", root=str(tmp_path), image_size=32, cache=False))
    assert len(t) == 17 and (t.splits == "train").sum() == 10 and (t.splits == "test").sum() == 4
    assert t.column("Hernia").sum() == 3 and t.column(NO_FINDING).sum() == 14
    np.savez(tmp_path / "pneumoniamnist.npz", **{k: (v[:, :1] if "labels" in k else v) for k, v in data.items()})
    p = load_table(data_cfg("medmnist", flavour="pneumoniamnist", root=str(tmp_path), image_size=32, cache=False))
    assert np.isnan(p.column("Hernia")).all() and p.column("Pneumonia").sum() == 0
