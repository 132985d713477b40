"""The fair comparison (`augment classify --arms ...`): equal step budgets, paired intervals, the
low-data curve, scoring a trained model on a folder (--checkpoint), and the bad input of issue 16."""

from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from stage_args import TINY

from augment.arms import CONTROLS, compare, paired, parse_arms, parse_curve, t_interval
from augment.cli import main
from augment.errors import UserError

CLASSES = ("Edema", "Hernia", "Effusion")


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the shared 2-core box: one thread is far faster for tiny models
    yield
    torch.set_num_threads(before)


def synthetic_folder(root, n=24, size=32):
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        c = CLASSES[i % len(CLASSES)]
        Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / "images" / f"s{i:04d}.png")
        rows.append({"Image Index": f"s{i:04d}.png", "Finding Labels": c, "file": f"images/s{i:04d}.png", "mask": "",
                     **{f"p_{k}": (0.9 if k == c else 0.1) for k in CLASSES}, "generator": "test", "seed": i})
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    (root / "dataset.json").write_text(json.dumps({"classes": list(CLASSES)}))
    return root


def folder_set(root, n=90, classes=CLASSES, split_column=False):
    """A user's own labelled folder (data=folder): phantom images written as PNGs."""
    from cfg_helpers import data_cfg

    from augment.data.labels import finding_string
    from augment.data.sources import load_table

    table = load_table(data_cfg(n=n, image_size=32, seed=7, prevalence={"Edema": 0.3, "Hernia": 0.3, "Effusion": 0.3}))
    (root / "images").mkdir(parents=True)
    rows = []
    for i in range(len(table.splits)):
        Image.fromarray(np.asarray(table.images[i], dtype=np.uint8)).save(root / "images" / f"u{i:04d}.png")
        vec = np.array([float(table.column(c)[i] == 1) for c in classes])
        row = {"file": f"images/u{i:04d}.png", "labels": finding_string(vec, list(classes)), "patient_id": f"p{i}"}
        if split_column:
            row["part"] = "test" if i % 3 == 0 else "train"
        rows.append(row)
    pd.DataFrame(rows).to_csv(root / "labels.csv", index=False)
    return root


@pytest.fixture(scope="module")
def arms_run(tmp_path_factory):
    """The done-when command at the stage tests' size: 4 arms, 2 seeds, the step budget from epochs."""
    root = tmp_path_factory.mktemp("arms")
    syn = synthetic_folder(root / "syn")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(["classify", "--arms", "real,classic,oversample,synthetic", "--synthetic", str(syn),
                     "--seeds", "0,1", *TINY, "--out", str(root / "run")])
    assert code == 0
    return root / "run", json.loads((root / "run" / "metrics.json").read_text()), out.getvalue()


def test_arm_table_with_paired_intervals_is_printed_and_saved(arms_run):
    run, m, printed = arms_run
    assert m["mode"] == "arms" and m["arms"] == ["real", "classic", "oversample", "synthetic"] and m["seeds"] == [0, 1]
    for needle in ("| real |", "| synthetic |", "classic − real", "synthetic − real", "(best control)", "mean AUC"):
        assert needle in printed and needle in m["table"]
    assert "95 % t-interval" in (run / "arms.md").read_text()
    cmp = m["comparison"]
    assert set(cmp["vs_real"]) == {"classic", "oversample", "synthetic"}
    assert cmp["best_control"] in CONTROLS
    best = max(CONTROLS[:3], key=lambda a: cmp["arms"][a]["auc"]["mean_auc"]["mean"])
    assert cmp["best_control"] == best
    for arm in m["arms"]:
        for c in [*m["classes"], "mean_auc"]:
            s = cmp["arms"][arm]["auc"][c]
            assert s["n"] == 2 and s["sd"] is not None
    # each paired difference is the mean of the per-seed differences, inside its interval
    units = {(u["arm"], u["seed"]): u for u in m["units"]}
    d = cmp["synthetic_vs_best_control"]["mean_auc"]
    want = [units[("synthetic", s)]["test"]["mean_auc"] - units[(best, s)]["test"]["mean_auc"] for s in (0, 1)]
    assert d["values"] == pytest.approx(want) and d["lo"] <= d["mean"] <= d["hi"]
    for arm in m["arms"]:
        for s in (0, 1):
            assert (run / arm / f"seed{s}" / "best.pt").is_file()


def test_every_arm_runs_the_same_number_of_optimizer_steps(arms_run):
    _, m, _ = arms_run
    b = m["budget"]
    # the budget from classify.epochs: epochs x ceil(real train images / real images per step)
    assert b["steps"] == 2 * math.ceil(b["n_real_train"] / b["real_per_step"])
    assert b["real_per_step"] + b["slot_per_step"] == b["batch_size"] == 32 and b["slot_per_step"] > 0
    steps = {(arm, seed): n for arm, per in m["steps"].items() for seed, n in per.items()}
    assert len(steps) == 8 and set(steps.values()) == {b["steps"]}
    assert {u["real_per_step"] for u in m["units"]} == {b["real_per_step"]}  # the same real images per step
    slots = {u["arm"]: u["slot_per_step"] for u in m["units"]}
    assert slots == {"real": 0, "classic": 0, "oversample": b["slot_per_step"], "synthetic": b["slot_per_step"]}
    assert {u["arm"]: u["classic"] for u in m["units"]} == {"real": False, "classic": True, "oversample": False,
                                                             "synthetic": False}


def test_checkpoints_store_the_validation_thresholds(arms_run):
    run, m, _ = arms_run
    ckpt = torch.load(run / "synthetic" / "seed1" / "best.pt", weights_only=True)
    unit = next(u for u in m["units"] if u["arm"] == "synthetic" and u["seed"] == 1)
    assert ckpt["extra"]["thresholds"] == pytest.approx(unit["thresholds"])
    assert ckpt["extra"]["arm"] == "synthetic" and ckpt["extra"]["steps"] == m["budget"]["steps"]


def test_checkpoint_scores_a_folder_per_arm_over_seeds(arms_run, tmp_path, capsys):
    run, m, _ = arms_run
    data = folder_set(tmp_path / "mine")
    assert main(["classify", "--checkpoint", str(run), "runtime=inline", "progress=false", "data=folder",
                 f"data.root={data}", "data.image_size=32", "--out", str(tmp_path / "score")]) == 0
    s = json.loads((tmp_path / "score" / "metrics.json").read_text())
    assert s["mode"] == "score" and set(s["groups"]) == set(m["arms"]) and s["n"] == 90
    g = s["groups"]["synthetic"]
    assert [x["seed"] for x in g["models"]] == [0, 1]
    assert all(x["thresholds_from"] == "validation" for x in g["models"])
    for c in CLASSES:
        assert g["summary"]["auc"][c]["n"] == 2 and 0 <= g["summary"]["f1"][c]["mean"] <= 1
        assert 0 <= g["summary"]["accuracy"][c]["mean"] <= 1
    # the stored threshold is the one used: re-score seed 1 by hand
    unit = next(u for u in m["units"] if u["arm"] == "synthetic" and u["seed"] == 1)
    assert g["models"][1]["test"]["thresholds"] == pytest.approx(unit["thresholds"])
    assert not (tmp_path / "score" / "seed0").exists()  # nothing trained
    out = capsys.readouterr().out
    assert "F1" in out
    # an arms run is compared again on the scored data: paired by seed, the same rule as the run's own table
    c = s["comparison"]
    assert set(c["arms"]) == set(m["arms"]) and c["best_control"] in ("real", "classic", "oversample")
    d = c["vs_real"]["synthetic"]["mean_auc"]
    want = [s["groups"]["synthetic"]["models"][i]["test"]["mean_auc"] - s["groups"]["real"]["models"][i]["test"]["mean_auc"]
            for i in (0, 1)]
    assert d["values"] == pytest.approx(want)
    assert "The arms on this data, paired by seed" in out and "| synthetic − real |" in out


def test_checkpoint_with_split_column_scores_only_test_rows(arms_run, tmp_path):
    run, _, _ = arms_run
    data = folder_set(tmp_path / "mine", split_column=True)
    pt = run / "real" / "seed0" / "best.pt"
    assert main(["classify", "runtime=inline", "progress=false", f"classify.checkpoint={pt}", "data=folder",
                 f"data.root={data}", "data.image_size=32", "data.split_column=part", "--out", str(tmp_path / "s")]) == 0
    s = json.loads((tmp_path / "s" / "metrics.json").read_text())
    assert s["n"] == 30 and list(s["groups"]) == ["model"]


def test_checkpoint_whose_classes_the_data_lacks_is_one_line(arms_run, tmp_path, capsys):
    run, _, _ = arms_run
    data = folder_set(tmp_path / "mine", classes=("Edema", "Effusion"))
    assert main(["classify", "runtime=inline", "progress=false", f"classify.checkpoint={run}", "data=folder",
                 f"data.root={data}", "data.image_size=32", "--out", str(tmp_path / "s")]) == 2
    err = capsys.readouterr().err
    assert "Hernia are not labelled" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "s").exists()


def test_low_data_curve_table_per_point_and_figure(in_tmp, tiny):
    syn = synthetic_folder(in_tmp / "syn")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["classify", *tiny, "classify.arms=[real,synthetic]", "--synthetic", str(syn), "--seeds", "0,1",
                     "classify.curve=[5,all]", "classify.steps=3", "--out", "c"]) == 0
    m = json.loads((in_tmp / "c" / "metrics.json").read_text())
    assert m["points"] == ["5", "all"] and set(m["curve"]) == {"5", "all"}
    assert m["steps"] == {p: {a: {"0": 3, "1": 3} for a in ("real", "synthetic")} for p in ("5", "all")}
    assert (in_tmp / "c" / "curve.png").stat().st_size > 5000
    assert "### 5 real positives per class" in out.getvalue() and "### all real positives" in out.getvalue()
    n5 = m["budget"]["5"]["n_real_train"]
    assert n5 < m["budget"]["all"]["n_real_train"]
    u = next(u for u in m["units"] if u["point"] == "5")
    assert u["n_train_real"] == n5
    assert (in_tmp / "c" / "positives_5" / "real" / "seed0" / "best.pt").is_file()


@pytest.mark.parametrize("args,needle", [
    (["classify.arms=[real,synthetc]"], "unknown arm 'synthetc': did you mean synthetic?"),
    (["classify.arms=[real,synthetic]"], "arm synthetic needs synthetic images: pass --synthetic DIR"),
    (["classify.arms=[real,oversample]", "classify.limit_positives={Hernia: 0}"], "no Hernia positive to repeat"),
    (["classify.arms=[real,classic]", "classify.limit_positives={Edema: 100000}"], "asks for 100000 Edema positives"),
    (["classify.arms=[real]", "classify.curve=[20,100000]"], "asks for 100000"),
    (["classify.limit_positives={Edema: 100000}"], "asks for 100000 Edema positives"),
    (["classify.curve=[20]"], "classify.curve needs arms"),
    (["classify.arms=[real]", "classify.steps=0"], "classify.steps=0"),
])
def test_bad_arms_input_is_one_line_exit_2_nothing_written(in_tmp, tiny, capsys, args, needle):
    assert main(["classify", *tiny, *args, "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (in_tmp / "c").exists()


def test_limit_above_the_available_count_says_how_many_exist(in_tmp, tiny, capsys):
    assert main(["classify", *tiny, "classify.limit_positives={Edema: 100000}", "--out", "c"]) == 2
    err = capsys.readouterr().err
    assert "but the train split" in err and "use at most" in err


def test_parse_arms_and_curve():
    assert parse_arms("real, classic,real") == ["real", "classic"]
    assert parse_arms(["synthetic+classic", "Oversample"]) == ["synthetic+classic", "oversample"]
    with pytest.raises(UserError, match="did you mean classic"):
        parse_arms(["clasic"])
    assert parse_curve([20, "40", "all"]) == [20, 40, None]
    with pytest.raises(UserError, match="whole numbers"):
        parse_curve(["many"])


def test_t_interval_matches_the_t_distribution():
    s = t_interval([0.1, 0.2, 0.3, 0.4, 0.5])
    half = 2.7764451051977987 * np.std([0.1, 0.2, 0.3, 0.4, 0.5], ddof=1) / math.sqrt(5)  # t(0.975, 4)
    assert s["mean"] == pytest.approx(0.3) and s["lo"] == pytest.approx(0.3 - half) and s["hi"] == pytest.approx(0.3 + half)
    one = t_interval([0.5])
    assert one["lo"] is None and one["sd"] == 0.0
    p = paired({0: 0.8, 1: 0.7, 2: None}, {0: 0.6, 1: 0.65, 2: 0.5})
    assert p["seeds"] == [0, 1] and p["values"] == pytest.approx([0.2, 0.05])


def test_compare_picks_the_best_control_by_mean_auc():
    def unit(arm, seed, auc):
        return {"arm": arm, "seed": seed, "steps": 10, "test": {"auc": {"Edema": auc}, "mean_auc": auc}}

    units = [unit("real", 0, 0.6), unit("real", 1, 0.62), unit("oversample", 0, 0.7), unit("oversample", 1, 0.69),
             unit("synthetic", 0, 0.75), unit("synthetic", 1, 0.74)]
    r = compare(units, ["real", "oversample", "synthetic"], ["Edema"])
    assert r["best_control"] == "oversample"
    assert r["synthetic_vs_best_control"]["mean_auc"]["mean"] == pytest.approx(0.05)
    assert r["vs_real"]["synthetic"]["Edema"]["values"] == pytest.approx([0.15, 0.12])


def test_classify_augment_is_an_option_of_the_single_run_too(in_tmp, tiny):
    assert main(["classify", *tiny, "--out", "plain"]) == 0
    assert main(["classify", *tiny, "classify.augment=true", "--out", "aug"]) == 0
    a = torch.load(in_tmp / "plain" / "seed0" / "best.pt", weights_only=True)
    b = torch.load(in_tmp / "aug" / "seed0" / "best.pt", weights_only=True)
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert len(a["extra"]["thresholds"]) == 3  # the single run stores its validation thresholds too
