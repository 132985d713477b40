import dataclasses
import json
import math
import sqlite3

import numpy as np
import optuna
import pandas as pd
import pytest
import yaml

from augment import search
from augment.search import spaces
from augment.search import study as search_study
from augment.cli import build_parser, main, to_overrides, COMMANDS
from augment.config import compose, to_dict
from augment.data.sources import load_table
from augment.jobs.classifier import train_seed
from augment.jobs.masks import mask_metrics

from search_args import PSEUDO, TINY


def metrics(folder):
    return json.loads((folder / "metrics.json").read_text())


def stored_trials(folder, study="pseudo_label"):
    return optuna.load_study(study_name=study, storage=f"sqlite:///{folder / 'study.db'}").get_trials()


def test_pseudo_label_search_writes_best_yaml_plots_and_a_rerun_continues(in_tmp, models):
    out = in_tmp / "s"
    assert main(["search", *PSEUDO, f"search.models={models}", "--trials", "2", "--out", str(out)]) == 0
    m = metrics(out)
    assert m["space"] == "pseudo_label" and m["n_trials"]["COMPLETE"] == 2 and m["this_run"]["trials"] == 2
    # the first trial of a new study is the base config's point (t = generate.threshold, r and xi of classify)
    assert m["default_trial"]["params"] == {"threshold": 0.1, "ratio": 0.5, "xi": 0.125}
    values = [t.value for t in stored_trials(out) if t.state.name == "COMPLETE"]
    assert m["best"]["values"]["val_mean_auc"] == pytest.approx(max(values))
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["trial"] == m["best"]["trial"]
    assert f"classify.threshold={best['params']['threshold']!r}" in best["overrides"]
    assert any(o.startswith("classify.synthetic=") and str(out / "pool") in o for o in best["overrides"])
    for plot in ("history.png", "importances.png"):
        assert (out / plot).stat().st_size > 5000, plot
    assert len(pd.read_csv(out / "trials.csv")) == 2
    assert (out / "config.yaml").is_file()
    pool_card = (out / "pool" / "dataset.json").read_bytes()
    # the pool's stored probabilities let every trial relabel it at its own t
    assert set(pd.read_csv(out / "pool" / "labels.csv").columns) >= {"p_Edema", "p_Hernia", "p_Effusion"}

    # same command, same --out: the study continues, the pool is reused, the sampler does not repeat itself
    assert main(["search", *PSEUDO, f"search.models={models}", "--trials", "1", "--out", str(out)]) == 0
    m2 = metrics(out)
    assert m2["total_trials"] == 3 and m2["this_run"]["stored_before"] == 2 and m2["this_run"]["trials"] == 1
    assert (out / "pool" / "dataset.json").read_bytes() == pool_card
    params = [tuple(sorted(t.params.items())) for t in stored_trials(out)]
    assert len(set(params)) == 3
    assert len(pd.read_csv(out / "trials.csv")) == 3


def test_best_yaml_applies_to_the_composed_config_and_to_classify(in_tmp, pool):
    out = in_tmp / "s"
    assert main(["search", *PSEUDO, f"search.pool={pool}", "--trials", "1", "--out", str(out)]) == 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    parser = build_parser()

    def composed(argv):  # as main() parses
        ns, rest = parser.parse_known_args(argv)
        ns.overrides = [*ns.overrides, *rest]
        return compose(to_overrides(ns, COMMANDS[ns._command]))

    plain = composed(["classify", *TINY])
    applied = composed(["classify", *TINY, "--from-search", str(out / "best.yaml")])
    assert plain.classify.threshold is None and list(plain.classify.synthetic) == []
    assert applied.classify.threshold == pytest.approx(best["params"]["threshold"])
    assert applied.generate.threshold == pytest.approx(best["params"]["threshold"])  # new sets at the same t
    assert applied.classify.ratio == pytest.approx(best["params"]["ratio"])
    assert applied.classify.xi == pytest.approx(best["params"]["xi"])
    assert list(applied.classify.synthetic) == [str(pool)]
    # flags and raw overrides given on the command line win over the file; a folder finds its best.yaml
    mine = composed(["classify", *TINY, "--from-search", str(out), "--threshold", "0.9", "classify.xi=0.7"])
    assert mine.classify.threshold == 0.9 and mine.classify.xi == 0.7
    assert mine.classify.ratio == pytest.approx(best["params"]["ratio"])

    # and it really runs: classify on real + the search's pool at the best t
    assert main(["classify", *TINY, "--from-search", str(out / "best.yaml"), "--out", "c"]) == 0
    c = metrics(in_tmp / "c")
    assert c["mode"] == "augmented" and c["synthetic"] == [str(pool)]
    assert yaml.safe_load((in_tmp / "c" / "config.yaml").read_text())["classify"]["threshold"] == pytest.approx(
        best["params"]["threshold"])


def _patched(monkeypatch, fake):
    """Replace the pseudo-label objective (the search runs inline, in this process)."""
    space = spaces.SPACES["pseudo_label"]
    real = space.objective
    monkeypatch.setitem(spaces.SPACES, "pseudo_label",
                        dataclasses.replace(space, objective=lambda trial, ov, ctx: fake(trial, ov, ctx, real)))


def test_a_raising_trial_and_a_nan_trial_are_failed_and_the_study_goes_on(in_tmp, pool, monkeypatch):
    def fake(trial, overrides, ctx, real):
        if trial.number == 0:
            raise RuntimeError("injected failure")
        if trial.number == 1:
            return {"values": [math.nan], "attrs": {}}
        return real(trial, overrides, ctx)

    _patched(monkeypatch, fake)
    out = in_tmp / "s"
    assert main(["search", *PSEUDO, f"search.pool={pool}", "--trials", "3", "--out", str(out)]) == 0
    states = {t.number: t.state.name for t in stored_trials(out)}
    assert states == {0: "FAIL", 1: "FAIL", 2: "COMPLETE"}
    m = metrics(out)
    errors = {f["trial"]: f["error"] for f in m["failures"]}
    assert "injected failure" in errors[0] and "not finite" in errors[1]
    assert m["best"]["trial"] == 2 and (out / "best.yaml").is_file()
    # one complete trial: the importance plot is skipped with a note, the history is drawn
    assert m["plots"]["importances"].startswith("skipped") and (out / "history.png").is_file()


def test_ctrl_c_keeps_the_study_consistent_and_the_rerun_resumes(in_tmp, pool, monkeypatch, capsys):
    def fake(trial, overrides, ctx, real):
        if trial.number == 1:
            raise KeyboardInterrupt
        return real(trial, overrides, ctx)

    _patched(monkeypatch, fake)
    out = in_tmp / "s"
    assert main(["search", *PSEUDO, f"search.pool={pool}", "--trials", "4", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert "augment: interrupted: the study keeps its 2 finished trial(s)" in err and "Traceback" not in err
    m = metrics(out)
    assert m["this_run"]["interrupted"] and m["total_trials"] == 2
    assert {t.number: t.state.name for t in stored_trials(out)} == {0: "COMPLETE", 1: "FAIL"}
    with sqlite3.connect(out / "study.db") as db:  # the file is a sound database, nothing left running
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert db.execute("SELECT COUNT(*) FROM trials WHERE state = 'RUNNING'").fetchone()[0] == 0
    monkeypatch.undo()
    assert main(["search", *PSEUDO, f"search.pool={pool}", "--trials", "1", "--out", str(out)]) == 0
    m2 = metrics(out)
    assert m2["total_trials"] == 3 and m2["n_trials"]["COMPLETE"] == 2 and not m2["this_run"]["interrupted"]


@pytest.mark.ray
def test_two_ray_workers_write_concurrent_trials_to_one_study(in_tmp, pool, monkeypatch):
    from augment import runtime

    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the actors' torch threads (2 workers on 2 cores)
    out = in_tmp / "s"
    local = [o for o in PSEUDO if o != "runtime=inline"] + ["runtime=local"]
    try:
        assert main(["search", *local, f"search.pool={pool}", "--trials", "4", "--workers", "2",
                     "--out", str(out)]) == 0
    finally:
        runtime.shutdown()
    trials = [t for t in stored_trials(out) if t.state.name == "COMPLETE"]
    assert len(trials) == 4
    pids = {t.user_attrs["worker_pid"] for t in trials}
    assert len(pids) == 2 and {t.user_attrs["worker_rank"] for t in trials} == {0, 1}
    by_worker = {pid: [t for t in trials if t.user_attrs["worker_pid"] == pid] for pid in pids}
    a, b = (sorted(ts, key=lambda t: t.datetime_start) for ts in by_worker.values())
    span = lambda ts: (ts[0].datetime_start, ts[-1].datetime_complete)  # noqa: E731
    (a0, a1), (b0, b1) = span(a), span(b)
    assert a0 < b1 and b0 < a1, "the two workers did not run at the same time"
    assert metrics(out)["this_run"]["worker_pids"] == sorted(pids)


@pytest.mark.parametrize("args,needle", [
    (["search=nope"], "unknown search 'nope': choose one of pseudo_label, translator_weights, ucgan_weights"),
    ([], "no search space: pass search=<space>"),
    (["search=pseudo_label", "--storage", "sqlite:////no/such/dir/study.db"], "cannot open the study storage"),
    (["search=pseudo_label", "--storage", "nonsense://user:secret@host/db"], "cannot open the study storage"),
    (["search=pseudo_label", "runtime=local", "--workers", "999"], "--workers 999 is more than the"),
    (["search=pseudo_label", "search.params.threshold.low=0.9", "search.params.threshold.high=0.6"], "is not below"),
    (["search=pseudo_label", "+search.params.bogus={low: 1, high: 2}"], "bogus, not a parameter"),
    (["search=pseudo_label", "--trials", "0"], "--trials 0"),
])
def test_bad_input_is_one_line_and_exit_2(in_tmp, capsys, args, needle):
    base = [t for t in TINY if t != "runtime=inline"] if "runtime=local" in args else TINY
    assert main(["search", *base, *args, "--out", "s"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "secret" not in err
    assert not (in_tmp / "s").exists()


def test_a_failure_after_the_study_exists_keeps_out_for_the_rerun(in_tmp, pool, capsys):
    out = in_tmp / "s"
    assert main(["search", *PSEUDO, "search.pool=/no/such/pool", "--trials", "1", "--out", str(out)]) == 2
    assert "has no labels.csv" in capsys.readouterr().err
    assert (out / "study.db").is_file()  # kept: a search's folder may hold trained models and trials
    assert main(["search", *PSEUDO, f"search.pool={pool}", "--trials", "1", "--out", str(out)]) == 0
    assert metrics(out)["total_trials"] == 1


@pytest.mark.parametrize("space,make", [
    ("pseudo_label", lambda url: optuna.create_study(storage=url, study_name="mine", direction="minimize")),
    ("ucgan_weights", lambda url: optuna.create_study(storage=url, study_name="mine", direction="maximize")),
])
def test_a_study_that_exists_with_another_direction_is_refused(in_tmp, capsys, space, make):
    url = f"sqlite:///{in_tmp / 'shared.db'}"
    make(url)
    assert main(["search", *TINY, f"search={space}", "--storage", url, "--study", "mine", "--out", "s"]) == 2
    err = capsys.readouterr().err
    assert "study 'mine'" in err and "exists with direction(s)" in err and "--study" in err
    assert len(optuna.load_study(study_name="mine", storage=url).trials) == 0


def test_a_study_of_another_space_is_refused(in_tmp, capsys):
    url = f"sqlite:///{in_tmp / 'shared.db'}"
    study = optuna.create_study(storage=url, study_name="mine", direction="maximize")
    study.set_user_attr("space", "translator_weights")
    assert main(["search", *TINY, "search=pseudo_label", "--storage", url, "--study", "mine", "--out", "s"]) == 2
    assert "holds the translator_weights space" in capsys.readouterr().err


def test_from_search_with_a_bad_file_is_one_line(in_tmp, capsys):
    (in_tmp / "b.yaml").write_text("just: text\n")
    assert main(["classify", *TINY, "--from-search", str(in_tmp / "b.yaml")]) == 2
    assert "no 'overrides' list" in capsys.readouterr().err
    assert main(["classify", *TINY, "--from-search", str(in_tmp / "none.yaml")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_pruning_callback_reports_and_prunes(tmp_path):
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(lower=0.6))
    trial = study.ask()
    cb = spaces.pruning_callback(trial)
    cb(1, {"val_mean_auc": None})  # undefined AUC: nothing reported
    cb(2, {"val_mean_auc": 0.7})
    with pytest.raises(optuna.TrialPruned):
        cb(3, {"val_mean_auc": 0.5})
    assert study.trials[0].intermediate_values == {2: 0.7, 3: 0.5}


@pytest.mark.parametrize("kind", ["median", "hyperband"])
def test_the_pruners_never_prune_the_warmup_epochs(kind):
    scfg = {"pruner": kind, "startup_trials": 1, "warmup_epochs": 1}
    pruner = search_study.make_pruner(spaces.SPACES["pseudo_label"], scfg, epochs=4)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(3):  # good trials: 0.9 at every epoch
        t = study.ask()
        for epoch in range(1, 5):
            t.report(0.9, epoch)
        study.tell(t, 0.9)
    bad = study.ask()
    bad.report(0.1, 1)
    assert not bad.should_prune()  # epoch 1 is warmup: its AUC says little
    if kind == "median":  # then it is pruned (Hyperband's brackets need more trials to decide)
        bad.report(0.1, 2)
        assert bad.should_prune()
    assert search_study.make_pruner(spaces.SPACES["ucgan_weights"], scfg, 4).__class__.__name__ == "NopPruner"


def test_the_classifier_stops_when_on_epoch_raises(tmp_path):
    """The search prunes through train_seed(on_epoch=...): the exception stops training."""
    cfg = to_dict(compose([*TINY, "classify.epochs=3", "classify.patience=null"]))
    seen = []

    def on_epoch(epoch, m):
        seen.append((epoch, m["val_mean_auc"]))
        if epoch == 1:
            raise optuna.TrialPruned("stop")

    with pytest.raises(optuna.TrialPruned):
        train_seed({"cfg": cfg, "seed": 0, "out": str(tmp_path), "classes": ["Edema", "Hernia", "Effusion"],
                    "synthetic": []}, on_epoch=on_epoch)
    assert [e for e, _ in seen] == [1] and seen[0][1] is not None


def test_translator_space_searches_only_the_weights_the_family_has():
    base = {"translator": {"lambda_cyc": 10.0, "lambda_id": 10.0}, "mask": {"threshold": 0.1}}
    ranges = compose(["search=translator_weights"]).search.params
    ranges = {k: dict(v) for k, v in ranges.items()}
    fixed = optuna.trial.FixedTrial({"lambda_cyc": 3.0, "lambda_id": 2.0, "lambda_sparse": 5.0, "mask_threshold": 0.2})
    assert spaces.suggest_translator(fixed, ranges, base) == [
        "translator.lambda_cyc=3.0", "translator.lambda_id=2.0", "mask.rule=fixed", "mask.threshold=0.2"]
    branched = {"translator": {"lambda_sparse": 1.0, "lambda_rec": 10.0}, "mask": {"threshold": 0.1}}
    assert spaces.suggest_translator(fixed, ranges, branched) == [
        "translator.lambda_sparse=5.0", "mask.rule=fixed", "mask.threshold=0.2"]
    # and every suggested override composes with its family
    for family, ov in (("fixed_point", spaces.suggest_translator(fixed, ranges, base)),
                       ("branched", spaces.suggest_translator(fixed, ranges, branched))):
        cfg = compose([f"translator={family}", *ov])
        assert cfg.mask.rule == "fixed" and cfg.mask.threshold == 0.2


def test_translator_weights_space_scores_mask_dice_on_validation(in_tmp):
    out = in_tmp / "t"
    assert main(["search", "search=translator_weights", *TINY, "search.overrides=['train.max_steps=4']",
                 "--trials", "2", "--out", str(out)]) == 0
    m = metrics(out)
    trials = stored_trials(out, "translator_weights")
    assert m["n_trials"]["COMPLETE"] == 2, m["failures"]
    for t in trials:
        assert set(t.params) == {"lambda_cyc", "lambda_id", "mask_threshold"}  # fixed_point has no lambda_sparse
        assert 0.0 <= t.value <= 1.0 and t.user_attrs["n_lesion_images"] > 0
    best = yaml.safe_load((out / "best.yaml").read_text())
    assert best["overrides"][0] == "translator=fixed_point" and "mask.rule=fixed" in best["overrides"]
    cfg = compose(search.read_best(out / "best.yaml"))
    assert cfg.translator.lambda_cyc == pytest.approx(best["params"]["lambda_cyc"])
    assert cfg.mask.threshold == pytest.approx(best["params"]["mask_threshold"]) and cfg.mask.rule == "fixed"
    assert not list((out / "trials").rglob("*.pt"))  # checkpoints are dropped after each trial


def test_the_translator_objective_is_the_dice_evaluate_reports_on_the_validation_split(in_tmp):
    """The search optimises the Dice `augment evaluate` reports: a trial's value is the mean over findings
    of mask_metrics(...)["per_class"][c]["dice_mean"] (the function evaluate calls, with the mask rule
    evaluate builds from cfg.mask) on the validation split, for the trial's own checkpoint."""
    out = in_tmp / "t"
    assert main(["search", "search=translator_weights", *TINY, "search.overrides=['train.max_steps=4']",
                 "search.keep_checkpoints=true", "--trials", "1", "--out", str(out)]) == 0
    (trial,) = stored_trials(out, "translator_weights")
    assert trial.state.name == "COMPLETE", metrics(out)["failures"]
    cfg = compose([*TINY, "train.max_steps=4", *trial.user_attrs["overrides"]])
    mask_cfg = {"rule": str(cfg.mask.rule), "threshold": float(cfg.mask.threshold),  # as augment evaluate builds it
                "percentile": float(cfg.mask.percentile), "min_area": int(cfg.mask.min_area),
                "smooth_sigma": float(cfg.mask.smooth_sigma)}
    assert mask_cfg["rule"] == "fixed" and mask_cfg["threshold"] == trial.params["mask_threshold"]
    ckpt = out / "trials" / f"{trial.number:04d}" / "models" / "fixed_point" / "checkpoint.pt"
    reported = mask_metrics(load_table(cfg.data, show_progress=False), metrics(out)["classes"], ckpt, mask_cfg,
                            split="val")["per_class"]
    dice = {c: m["dice_mean"] for c, m in reported.items() if m.get("dice_mean") is not None}
    assert dice and trial.user_attrs["val_dice_per_finding"] == dice
    assert trial.value == float(np.mean(list(dice.values())))


def test_mask_score_is_the_mean_over_findings_with_ground_truth():
    per = {"Edema": {"dice_mean": 0.2, "iou_mean": 0.1, "poi_mean": 0.5, "n_lesion_images": 3},
           "Hernia": {"dice_mean": 0.6, "iou_mean": 0.4, "poi_mean": 0.7, "n_lesion_images": 1},
           "Effusion": {"detection_auc": 0.5, "n_images": 9},  # no ground truth: not a Dice
           "Mass": {"undefined": "no test images with this finding"}}
    score = spaces.mask_score({"per_class": per, "n_images": 12})
    assert score["values"] == [pytest.approx(0.4)] and score["attrs"]["val_iou"] == pytest.approx(0.25)
    assert score["attrs"]["val_dice_per_finding"] == {"Edema": 0.2, "Hernia": 0.6}
    assert score["attrs"]["n_lesion_images"] == 4
    with pytest.raises(ValueError, match="no validation lesion"):
        spaces.mask_score({"per_class": {"Effusion": per["Effusion"]}, "n_images": 9})


@pytest.mark.filterwarnings("ignore::augment.metrics.fid.SmallSampleWarning")  # n=20 pools, on purpose
def test_ucgan_weights_space_reports_auc_and_fid_on_a_pareto_front(in_tmp):
    out = in_tmp / "u"
    assert main(["search", "search=ucgan_weights", *TINY, "search.overrides=['train.max_steps=4']",
                 "search.pool_n=20", "search.fid_images=60", "--trials", "2", "--out", str(out)]) == 0
    m = metrics(out)
    assert m["n_trials"]["COMPLETE"] >= 1, m["failures"]
    assert m["objectives"] == {"val_mean_auc": "maximize", "fid": "minimize"}
    front = m["pareto_front"]
    assert front and all(set(p["values"]) == {"val_mean_auc", "fid"} and p["values"]["fid"] >= 0 for p in front)
    assert m["best"]["trial"] in [p["trial"] for p in front]
    assert (out / "pareto.png").stat().st_size > 5000 and (out / "history_val_mean_auc.png").is_file()
    assert (out / "history_fid.png").is_file()
    study = optuna.load_study(study_name="ucgan_weights", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.directions) == 2
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert all(t.user_attrs["fid_n_fake"] == 20 and t.user_attrs["fid_n_real"] == 60 for t in done)
    cfg = compose(search.read_best(out / "best.yaml"))
    assert cfg.generator._target_.endswith("UCGAN")
    assert cfg.generator.alpha == pytest.approx(m["best"]["params"]["alpha"])


def test_experiment_smoke_ranges_suit_its_tiny_models_and_other_spaces_ignore_them():
    """experiment=smoke lowers the pseudo-label threshold range (20-step models never reach 0.5, so a
    pool at t=0.5 would be empty); a space that does not search the threshold drops that range."""
    pl = compose(["search=pseudo_label", "experiment=smoke"])
    ranges = spaces.check_ranges(spaces.SPACES["pseudo_label"], to_dict(pl.search.params))
    assert ranges["threshold"]["low"] <= pl.generate.threshold < ranges["threshold"]["high"]
    tw = to_dict(compose(["search=translator_weights", "experiment=smoke"]).search.params)
    assert "threshold" in tw
    kept = spaces.check_ranges(spaces.SPACES["translator_weights"], tw)
    assert "threshold" not in kept and set(kept) <= set(spaces.SPACES["translator_weights"].params)
    assert "threshold" in tw  # the caller's dict is not modified
