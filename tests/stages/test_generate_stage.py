import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cfg_helpers import data_cfg
from PIL import Image

from augment.cli import main
from augment.data.sources import load_table
from augment.data.synthetic import SyntheticDataset

from stage_args import GEN, TRAIN  # noqa: F401


def digest(folder: Path) -> dict[str, str]:
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file() and p.name not in ("dataset.json", "config.yaml", "metrics.json"):
            out[str(p.relative_to(folder))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def check_dataset(folder: Path, n: int) -> pd.DataFrame:
    df = pd.read_csv(folder / "labels.csv")
    assert len(df) == n and df["Image Index"].is_unique
    assert sorted(p.name for p in (folder / "images").iterdir()) == sorted(df["Image Index"])
    for f in df["file"]:
        with Image.open(folder / f) as im:
            im.load()
            assert im.mode == "L"
    for cell in df["mask"].fillna(""):
        for m in [x for x in cell.split("|") if x]:
            arr = np.asarray(Image.open(folder / m))
            assert set(np.unique(arr)) <= {0, 255}
    assert not (folder / ".shards").exists()
    return df


def test_generate_writes_the_synthetic_format_and_reads_back(models, tmp_path):
    out = tmp_path / "syn"
    assert main(["generate", *GEN, "--n", "20", "--models", str(models), "--out", str(out)]) == 0
    df = check_dataset(out, 20)
    assert {"Image Index", "Finding Labels", "file", "mask", "p_Edema", "p_Hernia", "generator", "seed"} <= set(df.columns)
    card = json.loads((out / "dataset.json").read_text())
    assert card["counts"] == {"Edema": 10, "Hernia": 10} and card["threshold"] == 0.1
    assert len(card["checkpoints"]["sampler"]["sha256"]) == 64 and card["config"]["generate"]["n"] == 20
    assert (df["p_Edema"][df["Image Index"].str.startswith("edema")] >= 0.1).all()
    ds = SyntheticDataset(out)
    assert len(ds) == 20 and ds[0]["image"].shape == (1, 32, 32)
    table = load_table(data_cfg("folder", root=str(out), image_size=32, cache=False))
    assert len(table) == 20 and "Edema" in table.lesion_masks
    assert main(["classify", *TRAIN, "--synthetic", str(out), "--out", str(tmp_path / "cls")]) == 0
    m = json.loads((tmp_path / "cls" / "metrics.json").read_text())
    assert m["mode"] == "augmented" and m["per_seed"][0]["n_train_synthetic"] == 20


def test_same_command_same_bytes_for_any_batch_size(models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(a), "--batch-size", "8"]) == 0
    # a raw override (GEN's generate.batch_size=8 would win over a --batch-size flag)
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(b), "generate.batch_size=5"]) == 0
    assert digest(a) == digest(b) and len(digest(a)) >= 12
    c = tmp_path / "c"
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(c), "--seed", "1"]) == 0
    assert digest(a) != digest(c)


@pytest.mark.ray
def test_same_bytes_with_two_ray_workers(models, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(a)]) == 0
    gen = [o for o in GEN if o != "runtime=inline"] + ["runtime=local"]
    try:
        assert main(["generate", *gen, "--n", "12", "--models", str(models), "--out", str(b), "--workers", "2",
                     "--batch-size", "16"]) == 0
    finally:
        from augment import runtime

        runtime.shutdown()
    assert digest(a) == digest(b)


def test_refuses_a_non_empty_out_and_overwrite_replaces(models, tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["generate", *GEN, "--n", "6", "--models", str(models), "--out", str(out)]) == 0
    (out / "keep.txt").write_text("stray")
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out)]) == 2
    assert "not empty" in capsys.readouterr().err and (out / "keep.txt").exists()
    # augment output (its dataset.json says so) is replaced; a folder of anything else is refused (test_hostile_generate)
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), "--overwrite"]) == 0
    assert not (out / "keep.txt").exists()
    check_dataset(out, 4)


@pytest.mark.parametrize("args,needle", [
    (["--classes", "edma"], "did you mean 'Edema'"),
    (["--classes", "mass"], "does not cover Mass"),
    (["--n", "0"], "at least one image"),
    (["--threshold", "1.2"], "outside (0, 1)"),
    (["--sampler", "ucgan"], "no ucgan sampler"),
    (["--translator", "taggan"], "no taggan translator"),
])
def test_bad_input_one_line_exit_2_nothing_written(models, tmp_path, capsys, args, needle):
    out = tmp_path / "bad"
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err
    assert not out.exists()


def test_no_models_names_the_train_command(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main(["generate", *GEN, "--n", "4", "--out", str(tmp_path / "x")]) == 2
    assert "augment train" in capsys.readouterr().err


def test_disk_full_ends_clearly_without_a_partial_shard(models, tmp_path, capsys, monkeypatch):
    import augment.jobs.shards as gen

    calls = {"n": 0}
    real = gen.write_png

    def full(path, arr):
        calls["n"] += 1
        if calls["n"] > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(path, arr)

    monkeypatch.setattr(gen, "write_png", full)
    out = tmp_path / "full"
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "disk full" in err and "Traceback" not in err
    assert not list(out.glob(".shards/*.tmp")) if out.exists() else True


def test_killed_run_resumes_to_exactly_n_identical_images(models, tmp_path):
    ref = tmp_path / "ref"
    args = [*GEN, "--n", "24", "--models", str(models), "generate.shard_size=8", "generate.batch_size=4"]
    assert main(["generate", *args, "--out", str(ref)]) == 0
    out = tmp_path / "killed"
    exe = Path(sys.executable).parent / "augment"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([str(exe), "generate", *args, "--out", str(out)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        done = [p for p in out.glob(".shards/*") if p.is_dir() and not p.name.endswith(".tmp")]
        if len(done) >= 2:
            break
        time.sleep(0.05)
    if proc.poll() is not None:
        pytest.skip("generation finished before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "labels.csv").exists()
    assert main(["generate", *args, "--out", str(out), "--resume"]) == 0
    check_dataset(out, 24)
    assert digest(out) == digest(ref)


def test_a_class_short_of_its_quota_is_refused_unless_allow_short(models, tmp_path, monkeypatch, capsys):
    import torch

    from augment.jobs import shards as gen

    def only_edema(self, x):  # a labeller that never finds Hernia
        p = torch.zeros(len(x), len(self.classes))
        p[:, self.classes.index("Edema")] = 0.9
        return p

    monkeypatch.setattr(gen.ShardWorker, "pseudo_probs", only_edema)
    args = ["generate", *GEN, "--n", "8", "--models", str(models), "generate.max_factor=2", "generate.shard_size=8"]
    assert main([*args, "--out", str(tmp_path / "strict")]) == 2
    err = capsys.readouterr().err
    assert "Hernia 0/4" in err and "--allow-short" in err and "Traceback" not in err
    assert not (tmp_path / "strict").exists()
    assert main([*args, "--allow-short", "--out", str(tmp_path / "short")]) == 0
    df = check_dataset(tmp_path / "short", 4)
    assert (df["Finding Labels"] == "Edema").all()
    card = json.loads((tmp_path / "short" / "dataset.json").read_text())
    assert card["counts"] == {"Edema": 4, "Hernia": 0} and card["n"] == 4


def test_the_driver_reads_each_shard_file_once(models, tmp_path, monkeypatch):
    """Polling rounds reuse the parsed shard.json of complete shards instead of re-reading them."""
    reads: dict[str, int] = {}
    real = Path.read_text

    def counting(self, *a, **kw):
        if self.name == "shard.json":
            reads[str(self)] = reads.get(str(self), 0) + 1
        return real(self, *a, **kw)

    monkeypatch.setattr(Path, "read_text", counting)
    out = tmp_path / "once"
    assert main(["generate", *GEN, "--n", "12", "--models", str(models), "--out", str(out)]) == 0
    check_dataset(out, 12)
    assert reads and max(reads.values()) == 1


def test_ctrl_c_on_a_fresh_out_keeps_the_shards_and_resume_finishes(models, tmp_path, monkeypatch, capsys):
    from augment.jobs import shards as gen

    real_run = gen.ShardWorker.run
    calls = {"n": 0}

    def interrupted_second(self, spec):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real_run(self, spec)

    monkeypatch.setattr(gen.ShardWorker, "run", interrupted_second)
    args = ["generate", *GEN, "--n", "40", "--models", str(models), "--out", str(tmp_path / "g")]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert "augment: interrupted: finished work is kept in" in err and "--resume" in err and "Traceback" not in err
    assert list((tmp_path / "g" / ".shards").glob("*/shard.json"))  # the first shard survived
    monkeypatch.undo()
    assert main([*args, "--resume"]) == 0
    check_dataset(tmp_path / "g", 40)


def test_masks_from_the_pseudo_labellers_gradcam_without_a_translator(models, tmp_path, monkeypatch, capsys):
    from augment.jobs import shards as gen

    def no_translator(*args, **kwargs):
        raise AssertionError("--masks gradcam must not load a translator")

    monkeypatch.setattr(gen.ShardWorker, "finding_masks", no_translator)
    out = tmp_path / "cam"
    args = ["generate", *GEN, "--n", "8", "--models", str(models), "--masks", "gradcam", "--out", str(out)]
    assert main(args) == 0
    df = check_dataset(out, 8)
    card = json.loads((out / "dataset.json").read_text())
    assert card["checkpoints"]["translator"]["family"] == "gradcam"
    assert len(df) == 8
    arrays = [np.asarray(Image.open(p)) for p in (out / "masks").glob("*.png")]
    assert arrays and all(set(np.unique(a)) <= {0, 255} for a in arrays)
    assert any(a.any() for a in arrays)  # the CAM rule selected something
    # the same folder cannot be resumed with a translator's masks: the plan names the mask source
    assert main([*args[:-4], "--masks", "fixed_point", "--resume", "--out", str(out)]) == 2
    assert "translator (--translator) gradcam -> fixed_point" in capsys.readouterr().err
