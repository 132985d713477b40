"""Hostile and careless inputs to ``augment generate`` (issue #15): every one is a single line, exit 2,
and leaves the output folder as it was (a new one is not created at all); a resume never mixes two
runs; ``--overwrite`` never empties a folder that is not augment output; the bytes do not depend on
``--batch-size``; the card holds no secrets.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from augment.cli import main
from generators.checkpoint import save_checkpoint

TRAIN = ["experiment=smoke", "runtime=inline", "data.n=240", "train.max_steps=6", "train.ckpt_every=3",
         "train.sample_every=null", "classify.epochs=1", "progress=false"]
GEN = ["experiment=smoke", "runtime=inline", "data.n=240", "progress=false", "generate.shard_size=16",
       "generate.batch_size=8", "--classes", "edema,hernia"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny train run: cgan + fixed_point + the labeller classifier."""
    run = tmp_path_factory.mktemp("hostile-models") / "run"
    assert main(["train", *TRAIN, "--out", str(run)]) == 0
    return run


def digest(folder: Path, skip: tuple[str, ...] = ("config.yaml",)) -> dict[str, str]:
    """sha256 of every file under ``folder`` (``config.yaml`` aside: the command line writes it before
    the stage runs, which is the CLI's business, #15 item 7)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in skip}


def one_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.startswith("augment: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def copy_run(models: Path, dst: Path) -> Path:
    shutil.copytree(models / "models", dst / "models")
    return dst


# --- item 3: --resume refuses another run's shards ------------------------------------------------------------

def _interrupted(models: Path, out: Path, monkeypatch, args: list[str]) -> None:
    """A run stopped after its first complete shard (the folder exists beforehand, so it is kept)."""
    from augment.errors import UserError
    from augment.jobs import shards

    real, calls = shards.ShardWorker.run, {"n": 0}

    def stop_after_one(self, spec):
        calls["n"] += 1
        if calls["n"] > 1:
            raise UserError("stopped by the test")
        return real(self, spec)

    out.mkdir()
    with monkeypatch.context() as m:
        m.setattr(shards.ShardWorker, "run", stop_after_one)
        assert main(["generate", *args, "--models", str(models), "--out", str(out)]) == 2
    assert (out / ".shards" / "plan.json").is_file() and len(list(out.glob(".shards/*/shard.json"))) == 1


@pytest.mark.parametrize("change,name", [(["--seed", "1"], "seed"), (["--threshold", "0.2"], "threshold"),
                                          (["--n", "14"], "n (--n)"), (["--translator", "none"], "translator"),
                                          (["mask.min_area=9"], "mask rule")])
def test_resume_with_other_settings_is_refused_and_changes_nothing(models, tmp_path, monkeypatch, capsys, change, name):
    args = [*GEN, "--n", "12", "generate.shard_size=8"]
    out = tmp_path / "run"
    _interrupted(models, out, monkeypatch, args)
    before = digest(out)
    capsys.readouterr()
    assert main(["generate", *args, *change, "--models", str(models), "--out", str(out), "--resume"]) == 2
    line = one_line(capsys.readouterr().err)
    assert name in line and "--overwrite" in line and "same settings" in line
    assert digest(out) == before
    # the same settings resume it
    assert main(["generate", *args, "--models", str(models), "--out", str(out), "--resume"]) == 0
    assert len(list((out / "images").iterdir())) == 12 and not (out / ".shards").exists()


def test_resume_of_a_finished_folder_with_another_seed_is_refused(models, tmp_path, capsys):
    out = tmp_path / "done"
    assert main(["generate", *GEN, "--n", "6", "--models", str(models), "--out", str(out)]) == 0
    before = digest(out, skip=("config.yaml", "metrics.json"))
    capsys.readouterr()
    assert main(["generate", *GEN, "--n", "6", "--seed", "3", "--models", str(models), "--out", str(out), "--resume"]) == 2
    assert "seed (--seed) 0 -> 3" in one_line(capsys.readouterr().err)
    assert digest(out, skip=("config.yaml", "metrics.json")) == before
    assert main(["generate", *GEN, "--n", "6", "--models", str(models), "--out", str(out), "--resume"]) == 0
    assert "already complete" in capsys.readouterr().out


def test_resume_of_shards_without_a_plan_is_refused(models, tmp_path, capsys):
    out = tmp_path / "old"
    (out / ".shards" / "edema-00000").mkdir(parents=True)
    (out / ".shards" / "edema-00000" / "shard.json").write_text('{"summary": {}, "rows": []}')
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), "--resume"]) == 2
    assert "--overwrite" in one_line(capsys.readouterr().err)
    assert (out / ".shards" / "edema-00000" / "shard.json").is_file()


def test_a_retrained_model_is_a_different_run(models, tmp_path, monkeypatch, capsys):
    run = copy_run(models, tmp_path / "models")
    args = [*GEN, "--n", "12", "generate.shard_size=8"]
    out = tmp_path / "run"
    _interrupted(run, out, monkeypatch, args)
    ck = run / "models" / "cgan" / "checkpoint.pt"
    payload = torch.load(ck, weights_only=True)
    payload["step"] = payload["step"] + 1
    save_checkpoint(ck, payload)
    capsys.readouterr()
    assert main(["generate", *args, "--models", str(run), "--out", str(out), "--resume"]) == 2
    assert "sampler checkpoint (sha256)" in one_line(capsys.readouterr().err)


# --- item 8: --overwrite only empties augment output ----------------------------------------------------------

@pytest.mark.parametrize("flag", ["--overwrite", "--resume"])
def test_overwrite_and_resume_refuse_a_folder_that_is_not_augment_output(models, tmp_path, capsys, flag):
    out = tmp_path / "home"
    (out / "thesis").mkdir(parents=True)
    (out / "thesis" / "chapter1.tex").write_text("precious")
    (out / "notes.txt").write_text("mine")
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), flag]) == 2
    assert "not augment output" in one_line(capsys.readouterr().err)
    assert (out / "thesis" / "chapter1.tex").read_text() == "precious" and (out / "notes.txt").is_file()
    assert not (out / ".shards").exists() and not (out / "images").exists()


def test_overwrite_takes_an_empty_folder(models, tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), "--overwrite"]) == 0
    assert len(list((out / "images").iterdir())) == 4


# --- item 9: byte-identical for any --batch-size ---------------------------------------------------------------

def test_same_bytes_for_batch_size_7_8_16_even_with_batch_coupled_numerics(models, tmp_path, monkeypatch):
    """A labeller whose arithmetic depends on the shape and the rows of its batch (as BLAS/cuDNN kernels
    chosen by batch size may): the output is still byte-identical for any --batch-size, because every
    forward pass has the same rows whatever the batch size."""
    from augment.jobs import shards

    real = shards.ShardWorker.pseudo_probs

    def coupled(self, x):
        return (real(self, x) + 1e-4 * (len(x) + x.mean())).clamp(0, 1)

    monkeypatch.setattr(shards.ShardWorker, "pseudo_probs", coupled)
    digests = []
    for bs in (7, 8, 16):
        out = tmp_path / f"bs{bs}"
        # a raw generate.batch_size=... override would win over --batch-size: GEN's is dropped
        gen = [a for a in GEN if not a.startswith("generate.batch_size=")]
        assert main(["generate", *gen, "--n", "20", "--models", str(models), "--out", str(out),
                     "--batch-size", str(bs), "generate.micro_batch=8"]) == 0
        assert OmegaConf.load(out / "config.yaml").generate.batch_size == bs
        digests.append(digest(out, skip=("config.yaml", "metrics.json", "dataset.json")))
    assert digests[0] == digests[1] == digests[2]
    assert sum(k.startswith("images/") for k in digests[0]) == 20 and any(k.startswith("masks/") for k in digests[0])


def test_labels_describe_the_saved_image(models, tmp_path):
    """p_<class> is the labeller's output on the PNG as written (uint8), not on the float sample."""
    import pandas as pd
    from PIL import Image
    import numpy as np

    from classifiers.model import load_classifier

    out = tmp_path / "saved"
    assert main(["generate", *GEN, "--n", "8", "--models", str(models), "--out", str(out),
                 "generate.micro_batch=8", "generate.device=cpu"]) == 0
    df = pd.read_csv(out / "labels.csv")
    model, meta = load_classifier(next((models / "models" / "classifier").glob("**/best.pt")))
    x = torch.stack([torch.from_numpy(np.asarray(Image.open(out / f), dtype=np.float32)) for f in df["file"]])
    with torch.no_grad():
        p = torch.sigmoid(model(x[:, None] / 127.5 - 1)).numpy()
    for j, c in enumerate(["Edema", "Hernia"]):
        assert np.allclose(df[f"p_{c}"], p[:, meta["classes"].index(c)], atol=1e-5)


# --- item 6 (generate's part): bad checkpoints and settings ----------------------------------------------------

class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _spoil(run: Path, how: str, tmp_path: Path) -> list[str]:
    """Damage a copy of the train run; returns extra command-line arguments."""
    cgan, fp = run / "models" / "cgan" / "checkpoint.pt", run / "models" / "fixed_point" / "checkpoint.pt"
    lab = next((run / "models" / "classifier").glob("**/best.pt"))
    marker = str(tmp_path / "MARKER")
    if how == "empty sampler":
        cgan.write_bytes(b"")
    elif how == "truncated sampler":
        cgan.write_bytes(cgan.read_bytes()[:2000])
    elif how == "empty translator":
        fp.write_bytes(b"")
    elif how == "truncated translator":
        fp.write_bytes(fp.read_bytes()[: fp.stat().st_size // 2])
    elif how == "translator as sampler":
        shutil.copy(fp, cgan)
    elif how == "sampler as translator":
        shutil.copy(cgan, fp)
    elif how == "cgan as ucgan":
        (run / "models" / "ucgan").mkdir()
        shutil.copy(cgan, run / "models" / "ucgan" / "checkpoint.pt")
        return ["--sampler", "ucgan"]
    elif how in ("pickle sampler", "pickle translator"):
        path = cgan if how == "pickle sampler" else fp
        payload = torch.load(path, weights_only=True)
        payload["extra"] = Evil(marker)
        torch.save(payload, path)
    elif how == "weights that do not fit":
        payload = torch.load(cgan, weights_only=True)
        payload["state_dict"] = {"w": torch.zeros(3)}
        payload.pop("ema_state_dict", None)
        save_checkpoint(cgan, payload)
    elif how == "truncated labeller":
        lab.write_bytes(lab.read_bytes()[:1500])
    elif how == "empty labeller":
        bad = tmp_path / "empty.pt"
        bad.write_bytes(b"")
        return ["--labeller", str(bad)]
    elif how == "sampler as labeller":
        return ["--labeller", str(cgan)]
    elif how == "pickle labeller":
        payload = torch.load(lab, weights_only=True)
        payload["extra"] = Evil(marker)
        torch.save(payload, tmp_path / "evil.pt")
        return ["--labeller", str(tmp_path / "evil.pt")]
    return []


BAD_CHECKPOINTS = {
    "empty sampler": "empty", "truncated sampler": "corrupt, truncated", "empty translator": "empty",
    "truncated translator": "corrupt, truncated", "translator as sampler": "not a sampler",
    "sampler as translator": "not a translator", "cgan as ucgan": "not a ucgan",
    "pickle sampler": "pickled Python objects", "pickle translator": "pickled Python objects",
    "weights that do not fit": "cannot rebuild", "truncated labeller": "corrupt, truncated",
    "empty labeller": "empty", "sampler as labeller": "not a classifier checkpoint",
    "pickle labeller": "pickled Python objects",
}


@pytest.mark.parametrize("how", sorted(BAD_CHECKPOINTS))
def test_a_bad_checkpoint_is_one_line_and_leaves_nothing(models, tmp_path, capsys, how):
    run = copy_run(models, tmp_path / "models")
    extra = _spoil(run, how, tmp_path)
    out = tmp_path / "out"
    code = main(["generate", *GEN, "--n", "4", "--models", str(run), "--out", str(out), *extra])
    line = one_line(capsys.readouterr().err)
    assert code == 2 and BAD_CHECKPOINTS[how] in line
    assert not out.exists()  # no config.yaml, no .shards
    assert not (tmp_path / "MARKER").exists()


@pytest.mark.parametrize("setting,needle", [
    ("generate.shard_size=0", "generate.shard_size=0"), ("generate.n=abc", "generate.n='abc'"),
    ("generate.n=2.5", "generate.n=2.5"), ("generate.batch_size=abc", "generate.batch_size"),
    ("generate.workers=0", "generate.workers=0"), ("generate.micro_batch=0", "generate.micro_batch=0"),
    ("generate.threshold=abc", "generate.threshold"), ("generate.max_factor=abc", "generate.max_factor"),
    ("generate.max_factor=0", "generate.max_factor"), ("generate.per_class=maybe", "generate.per_class"),
])
def test_a_bad_setting_is_one_line_and_leaves_nothing(models, tmp_path, capsys, setting, needle):
    out = tmp_path / "out"
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out), setting]) == 2
    assert needle in one_line(capsys.readouterr().err)
    assert not out.exists()


# --- item 11: disk space up front; which train run was used ----------------------------------------------------

def test_more_images_than_the_disk_holds_is_refused_up_front(models, tmp_path, capsys):
    out = tmp_path / "huge"
    assert main(["generate", *GEN, "--n", "1000000000000", "--models", str(models), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "need about" in line and "free" in line and "PB" in line
    assert not out.exists()


def test_a_short_disk_is_refused_before_any_shard(models, tmp_path, capsys, monkeypatch):
    from collections import namedtuple

    from augment.stages import generate as stage

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(stage.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 20_000, 20_000))
    out = tmp_path / "small"
    assert main(["generate", *GEN, "--n", "20", "--models", str(models), "--out", str(out)]) == 2
    line = one_line(capsys.readouterr().err)
    assert "20.0 KB free" in line and "need about" in line and not out.exists()


def test_generate_says_which_train_run_latest_named(models, tmp_path, monkeypatch, capsys):
    from augment.models import mark_latest

    monkeypatch.chdir(tmp_path)
    mark_latest(models)
    assert main(["generate", *GEN, "--n", "4", "--out", str(tmp_path / "g")]) == 0
    assert f"models of {models.resolve()} (runs/train/latest" in capsys.readouterr().out


# --- dataset.json holds no secrets ----------------------------------------------------------------------------

def test_the_card_masks_passwords(models, tmp_path):
    out = tmp_path / "card"
    assert main(["generate", *GEN, "--n", "4", "--models", str(models), "--out", str(out),
                 "search.storage='postgresql://alice:hunter2@db.example/studies'"]) == 0
    text = (out / "dataset.json").read_text()
    assert "hunter2" not in text and "postgresql://alice:***@db.example/studies" in text
    assert json.loads(text)["config"]["generate"]["n"] == 4
