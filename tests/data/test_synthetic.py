"""augment.data.synthetic: reading the synthetic dataset format, pseudo-label thresholds, errors,
and plugging the folder into a plain PyTorch training loop."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from augment.data.mixing import synthetic_view
from augment.data.synthetic import SyntheticDataset

CLASSES = ["Edema", "Hernia"]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core box: one thread is far faster for tiny models
    yield
    torch.set_num_threads(before)


def write_folder(root: Path, n: int = 6, size: int = 32, seed: int = 0) -> list[dict]:
    """Write ``n`` images in the synthetic format: an Edema image has a bright blob (and its mask),
    a Hernia image a bright bottom band (and its mask). Returns the rows written."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = []
    for i in range(n):
        image_id = f"syn_{seed}_{i:05d}"
        img = rng.integers(10, 50, size=(size, size), dtype=np.uint8)
        p = {"Edema": float(rng.uniform(0.05, 0.95)), "Hernia": float(rng.uniform(0.05, 0.95))}
        if i % 2 == 0:  # alternate so both labels occur whatever the random draws
            p["Edema"] = max(p["Edema"], 0.6)
        found = [c for c in CLASSES if p[c] >= 0.5]
        masks = []
        for c in found:
            m = np.zeros((size, size), dtype=np.uint8)
            if c == "Edema":
                m[8:20, 6:18] = 255
            else:
                m[size - 6 :, :] = 255
            img[m > 0] = 230
            rel = f"masks/{image_id}_{c}.png"
            Image.fromarray(m, mode="L").save(root / rel)
            masks.append(rel)
        Image.fromarray(img, mode="L").save(root / "images" / f"{image_id}.png")
        rows.append({
            "Image Index": f"{image_id}.png",
            "Finding Labels": "|".join(found) if found else "No Finding",
            "file": f"images/{image_id}.png",
            "mask": "|".join(masks),
            "p_Edema": f"{p['Edema']:.6f}",
            "p_Hernia": f"{p['Hernia']:.6f}",
            "generator": "cgan",
            "seed": str(seed * 1000 + i),
        })
    with open(root / "labels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (root / "dataset.json").write_text(json.dumps({"classes": CLASSES, "counts": {"total": n}, "threshold": 0.5}))
    return rows


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_items_follow_the_format(tmp_path: Path) -> None:
    rows = write_folder(tmp_path, n=6)
    ds = SyntheticDataset(tmp_path)
    assert len(ds) == 6 and ds.classes == CLASSES
    for i, row in enumerate(rows):
        item = ds[i]
        assert item["image"].dtype == torch.uint8 and item["image"].shape == (1, 32, 32)
        expected = np.array(Image.open(tmp_path / row["file"]))
        assert torch.equal(item["image"][0], torch.from_numpy(expected))
        want = [float(c in row["Finding Labels"].split("|")) for c in CLASSES]
        assert item["labels"].dtype == torch.float32 and item["labels"].tolist() == want
        assert item["probs"].tolist() == pytest.approx([float(row["p_Edema"]), float(row["p_Hernia"])])
        masks = item["masks"]
        assert masks.dtype == torch.uint8 and masks.shape == (2, 32, 32)
        assert set(masks.unique().tolist()) <= {0, 1}
        for k, c in enumerate(CLASSES):
            # a class without a mask is all zeros; one with a mask matches the file (0/255 -> 0/1)
            if f"_{c}.png" in row["mask"]:
                assert masks[k].sum() > 0
                assert torch.equal(masks[k], torch.from_numpy(np.array(Image.open(tmp_path / f"masks/{ds.ids[i]}_{c}.png")) // 255))
            else:
                assert masks[k].sum() == 0
    assert ds.label_matrix().shape == (6, 2)
    assert "masks" not in SyntheticDataset(tmp_path, with_masks=False)[0]


def test_classes_take_aliases_and_order(tmp_path: Path) -> None:
    rows = write_folder(tmp_path, n=4)
    ds = SyntheticDataset(tmp_path, classes=["hiatal hernia", "edema", "No Finding"])
    assert ds.classes == ["Hernia", "Edema", "No Finding"]
    for i, row in enumerate(rows):
        found = row["Finding Labels"].split("|")
        assert ds[i]["labels"].tolist() == [float("Hernia" in found), float("Edema" in found),
                                            float(found == ["No Finding"])]
        assert torch.isnan(ds[i]["probs"][2])  # no p_No Finding column


def test_threshold_changes_labels_not_images(tmp_path: Path) -> None:
    rows = write_folder(tmp_path, n=8)
    before = _digest(tmp_path)
    p = np.array([[float(r["p_Edema"]), float(r["p_Hernia"])] for r in rows], dtype=np.float32)
    low, high = SyntheticDataset(tmp_path, threshold=0.2), SyntheticDataset(tmp_path, threshold=0.8)
    written = p >= 0.5  # the folder's Finding Labels
    np.testing.assert_array_equal(low.labels, (p >= 0.2).astype(np.float32))
    # t above the set's threshold: a class written positive but below t is unlabelled (NaN), never a negative
    want = np.where(p >= 0.8, 1.0, np.where(written, np.nan, 0.0)).astype(np.float32)
    np.testing.assert_array_equal(high.labels, want)
    rejected = written & (p < 0.8)
    assert rejected.any() and np.isnan(high.labels[rejected]).all() and not (high.labels == 0)[rejected].any()
    assert np.nansum(low.labels) > np.nansum(high.labels)
    for i in range(len(rows)):
        assert torch.equal(low[i]["image"], high[i]["image"])
        assert torch.equal(low[i]["masks"], high[i]["masks"])
    assert _digest(tmp_path) == before  # nothing on disk was rewritten

    view = synthetic_view(low, ["Edema", "No Finding"], 0.8)
    assert view.classes == ["Edema", "No Finding"] and view.threshold == 0.8
    any_pos = (p >= 0.8).any(1)
    no_finding = np.where(any_pos, 0.0, np.where(rejected.any(1), np.nan, 1.0))
    edema = np.where(p[:, 0] >= 0.8, 1.0, np.where(written[:, 0], np.nan, 0.0))
    np.testing.assert_array_equal(view.labels, np.stack([edema, no_finding], 1).astype(np.float32))
    assert low.threshold == 0.2 and low.classes == CLASSES  # the original view is unchanged
    assert torch.equal(view[3]["image"], low[3]["image"])


def test_transform_is_applied_to_the_pil_image(tmp_path: Path) -> None:
    import torchvision.transforms as T

    write_folder(tmp_path, n=2)
    item = SyntheticDataset(tmp_path, transform=T.ToTensor())[0]
    raw = SyntheticDataset(tmp_path)[0]["image"]
    assert item["image"].dtype == torch.float32 and item["image"].shape == (1, 32, 32)
    assert torch.allclose(item["image"], raw.float() / 255)


def _one_line(err: pytest.ExceptionInfo, *parts: str) -> None:
    message = str(err.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, message


def test_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError) as err:
        SyntheticDataset(tmp_path / "nowhere")
    _one_line(err, "nowhere", "does not exist")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError) as err:
        SyntheticDataset(empty)
    _one_line(err, str(empty), "labels.csv")

    root = tmp_path / "ds"
    write_folder(root, n=3)
    table = (root / "labels.csv").read_text().splitlines()
    (root / "labels.csv").write_text("\n".join([table[0].replace(",file,", ",path,")] + table[1:]) + "\n")
    with pytest.raises(ValueError) as err:
        SyntheticDataset(root)
    _one_line(err, str(root), "column", "file")

    root2 = tmp_path / "ds2"
    rows = write_folder(root2, n=3)
    (root2 / rows[1]["file"]).unlink()
    with pytest.raises(ValueError) as err:
        SyntheticDataset(root2)
    _one_line(err, str(root2), "missing", rows[1]["file"])

    root3 = tmp_path / "ds3"
    rows = write_folder(root3, n=2)
    (root3 / rows[0]["mask"].split("|")[0]).unlink()
    with pytest.raises(ValueError) as err:
        SyntheticDataset(root3)
    _one_line(err, str(root3), "mask", "missing")
    assert len(SyntheticDataset(root3, with_masks=False)) == 2  # masks not wanted: not needed

    with pytest.raises(ValueError) as err:
        SyntheticDataset(root3, with_masks=False, threshold=1.5)
    _one_line(err, "threshold")
    with pytest.raises(ValueError) as err:
        SyntheticDataset(root3, with_masks=False, classes=["Mass"], threshold=0.5)
    _one_line(err, "p_ column", "Mass")
    with pytest.raises(ValueError) as err:
        SyntheticDataset(root3, with_masks=False, classes=["Edemma"])
    _one_line(err, "Edema")  # unknown name: the close match is named


def test_classes_fall_back_to_probability_columns(tmp_path: Path) -> None:
    write_folder(tmp_path, n=2)
    (tmp_path / "dataset.json").unlink()
    assert SyntheticDataset(tmp_path).classes == CLASSES


def test_plugs_into_a_plain_pytorch_training_loop(tmp_path: Path) -> None:
    """A user's own loop, nothing else from augment: DataLoader + nn.Sequential + optimizer."""
    import torchvision.transforms as T
    from torch import nn
    from torch.utils.data import DataLoader

    write_folder(tmp_path, n=48, seed=3)
    dataset = SyntheticDataset(tmp_path, transform=T.ToTensor())
    loader = DataLoader(dataset, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)  # the user's script seeds its own model
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
                          nn.Flatten(), nn.Linear(8 * 16, len(dataset.classes)))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    loss_fn = nn.BCEWithLogitsLoss()
    epoch_losses = []
    for _ in range(15):
        total = 0.0
        for batch in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"]), batch["labels"])
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch["image"])
        epoch_losses.append(total / len(dataset))
    assert batch["image"].shape[1:] == (1, 32, 32) and batch["masks"].shape[1:] == (2, 32, 32)
    assert epoch_losses[-1] < 0.7 * epoch_losses[0], epoch_losses


def test_the_writer_and_the_reader_share_the_format(tmp_path):
    """write_dataset turns shard rows into the folder that SyntheticDataset reads back: same ids,
    labels, probabilities and masks; the shards are gone."""
    from augment.data.synthetic import FORMAT, IMAGE_INDEX, write_dataset
    from cxrbase import write_png

    shards, out = tmp_path / "set" / ".shards", tmp_path / "set"
    rows = []
    for k, (name, labels) in enumerate([("edema-00000001", ["Edema"]), ("hernia-00000002", ["Hernia"])]):
        shard = shards / f"s{k}"
        write_png(shard / "images" / f"{name}.png", np.full((32, 32), 40 + k, np.uint8))
        masks = []
        for c in labels:
            write_png(shard / "masks" / f"{name}_{c}.png", np.full((32, 32), 255, np.uint8))
            masks.append(f"masks/{name}_{c}.png")
        rows.append({"id": name, "attempt": k, "labels": labels, "masks": masks, "shard": f"s{k}",
                     "probs": [0.9 if c in labels else 0.1 for c in CLASSES]})
    card = write_dataset(out, shards, rows, CLASSES, generator="cgan", seed=3, counts={"Edema": 1, "Hernia": 1},
                         rejected=5, threshold=0.5, config={}, versions={}, checkpoints={}, timings={})
    assert card["format"] == FORMAT and card["n"] == 2 and card["image_size"] == 32 and not shards.exists()
    ds = SyntheticDataset(out)
    assert ds.ids == ["edema-00000001", "hernia-00000002"] and ds.classes == CLASSES
    assert ds.labels.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    assert np.allclose(ds.probs, [[0.9, 0.1], [0.1, 0.9]])
    item = ds[1]
    assert int(item["image"][0, 0, 0]) == 41 and item["masks"][1].all() and not item["masks"][0].any()
    with open(out / "labels.csv") as fh:
        header = next(csv.reader(fh))
    assert header[0] == IMAGE_INDEX and "seed" in header


@pytest.mark.parametrize("column", ["file", "mask"])
@pytest.mark.parametrize("escape", ["../outside/x_Edema.png", "ABSOLUTE", "/etc/passwd_Edema.png", "LINK"])
def test_paths_that_leave_the_folder_are_refused(tmp_path, column, escape):
    """A labels.csv naming a file outside the set (../, absolute, a symlink out) is refused with one
    line, never read."""
    root = tmp_path / "set"
    write_folder(root, n=2)
    outside = tmp_path / "outside"
    outside.mkdir()
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(outside / "x_Edema.png")
    if escape == "ABSOLUTE":
        escape = str(outside / "x_Edema.png")
    elif escape == "LINK":
        (root / "masks" / "link_Edema.png").symlink_to(outside / "x_Edema.png")
        escape = "masks/link_Edema.png"
    with open(root / "labels.csv") as fh:
        rows = list(csv.DictReader(fh))
    if column == "mask":
        rows[0]["mask"] = escape
    else:
        rows[0]["file"] = escape
    with open(root / "labels.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(ValueError, match="outside the folder"):
        SyntheticDataset(root)


def _written_set(tmp_path, config):
    from augment.data.synthetic import write_dataset
    from cxrbase import write_png

    shards, out = tmp_path / "set" / ".shards", tmp_path / "set"
    rows = []
    specs = [("edema-00000001", ["Edema"]), ("hernia-00000002", ["Hernia"]), ("both-00000003", ["Edema", "Hernia"]),
             ("none-00000004", [])]
    for k, (name, labels) in enumerate(specs):
        write_png(shards / "s0" / "images" / f"{name}.png", np.full((32, 24), 40 + k, np.uint8))
        rows.append({"id": name, "attempt": k, "labels": labels, "masks": [], "shard": "s0",
                     "probs": [0.9 if c in labels else 0.1 for c in CLASSES]})
    write_dataset(out, shards, rows, CLASSES, generator="cgan", seed=3, counts={"Edema": 2, "Hernia": 2},
                  rejected=0, threshold=0.5, config=config, versions={}, checkpoints={}, timings={})
    return out, specs


def test_labels_csv_has_the_nih_data_entry_columns_with_honest_values(tmp_path):
    import pandas as pd

    from augment.data.synthetic import NIH_COLUMNS

    out, specs = _written_set(tmp_path, {"data": {"name": "phantom"}})
    with open(out / "labels.csv") as fh:
        header = next(csv.reader(fh))
    nih = ["Image Index", "Finding Labels", "Follow-up #", "Patient ID", "Patient Age", "Patient Gender",
           "View Position", "OriginalImage[Width", "Height]", "OriginalImagePixelSpacing[x", "y]"]
    assert header[:11] == nih == list(NIH_COLUMNS)
    assert header[11:] == ["file", "mask", "p_Edema", "p_Hernia", "generator", "seed"]  # ours kept
    df = pd.read_csv(out / "labels.csv")
    assert (df["Follow-up #"] == 0).all() and (df["View Position"] == "PA").all()
    assert (df["OriginalImage[Width"] == 24).all() and (df["Height]"] == 32).all()
    # unknown age, sex and pixel spacing are missing values, as a reader of the NIH file sees gaps
    assert df[["Patient Age", "Patient Gender", "OriginalImagePixelSpacing[x", "y]"]].isna().all().all()
    assert df["Patient ID"].tolist() == sorted(n for n, _ in specs)
    # a source that does not say its view leaves the view unknown
    other, _ = _written_set(tmp_path / "b", {"data": {"name": "folder"}})
    assert pd.read_csv(other / "labels.csv")["View Position"].isna().all()


def test_torchxrayvision_nih_dataset_reads_a_written_set(tmp_path):
    xrv = pytest.importorskip("torchxrayvision")
    out, specs = _written_set(tmp_path, {"data": {"name": "phantom"}})
    ds = xrv.datasets.NIH_Dataset(imgpath=str(out / "images"), csvpath=str(out / "labels.csv"))
    assert len(ds) == len(specs)
    by_id = {Path(i).stem: k for k, i in enumerate(ds.csv["Image Index"])}
    for name, labels in specs:
        row = ds.labels[by_id[name]]
        for c in ("Edema", "Hernia", "Effusion"):
            assert row[ds.pathologies.index(c)] == float(c in labels), (name, c)
    sample = ds[by_id["both-00000003"]]
    assert sample["img"].shape == (1, 32, 24)
