import json
import time
from pathlib import Path

import pytest
import torch

from augment.cli import main
from augment.config import compose, to_dict
from augment.models import LATEST, find_models, load_model
from generators.checkpoint import load_checkpoint


def test_train_sampler_and_translator_inline_write_loadable_checkpoints(in_tmp, tiny):
    assert main(["train", *tiny, "generator=cgan", "translator=fixed_point", "--out", "t"]) == 0
    m = json.loads((in_tmp / "t" / "metrics.json").read_text())
    assert set(m["models"]) == {"cgan", "fixed_point", "classifier"}  # the cgan brings its pseudo-labeller
    assert Path(LATEST.read_text().strip()) == (in_tmp / "t").resolve()
    assert find_models(None) == (in_tmp / "t").resolve()
    for fam in ("cgan", "fixed_point"):
        path = in_tmp / "t" / "models" / fam / "checkpoint.pt"
        ckpt = torch.load(path, weights_only=True)
        assert ckpt["step"] == 6 and ckpt["done"] and ckpt["classes"] == ["Edema", "Hernia", "Effusion"]
        system, _ = load_model(path)  # rebuilt from its own config, no training config needed
        assert system.image_size == 32
    cgan, _ = load_model(in_tmp / "t" / "models" / "cgan" / "checkpoint.pt")
    y = torch.eye(3)
    x = cgan.sample(3, y, generator=torch.Generator().manual_seed(0))
    assert x.shape == (3, 1, 32, 32) and x.abs().max() <= 1.0


def test_ucgan_classifier_gets_a_no_finding_class(in_tmp, tiny):
    assert main(["train", *tiny, "generator=ucgan", "--out", "t"]) == 0
    ckpt = load_checkpoint(in_tmp / "t" / "models" / "ucgan" / "checkpoint.pt")
    assert ckpt["classes"][-1] == "No Finding" and ckpt["model_cfg"]["classifier"]["num_classes"] == 4


def test_rerun_resumes_and_another_family_is_refused(in_tmp, tiny, capsys):
    assert main(["train", *tiny, "generator=cgan", "--out", "t"]) == 0
    assert main(["train", *tiny, "generator=cgan", "train.max_steps=9", "--out", "t"]) == 0
    assert load_checkpoint(in_tmp / "t" / "models" / "cgan" / "checkpoint.pt")["step"] == 9
    lines = (in_tmp / "t" / "models" / "cgan" / "metrics.jsonl").read_text().strip().splitlines()
    assert json.loads(lines[-1])["step"] == 9
    # a checkpoint of one class list cannot be resumed with another: refused, the run's config.yaml kept as it
    # was, and the message does not promise that the same command resumes (it cannot)
    config = (in_tmp / "t" / "config.yaml").read_bytes()
    capsys.readouterr()
    assert main(["train", *tiny, "generator=cgan", "--classes", "edema,hernia", "--out", "t"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "train into a new --out folder" in err and "the same command resumes" not in err
    assert (in_tmp / "t" / "config.yaml").read_bytes() == config


@pytest.mark.parametrize("args,needle", [
    (["generator=stylegan"], "unknown generator"),
    (["generator=cgan,wgan"], "unknown generator family 'wgan'"),
    (["generator=cgan", "train.min_images_per_class=100000"], "minimum 100000"),
    (["generator=cgan", "--classes", "pneumothorax"], "no positive image"),
])
def test_train_bad_input(in_tmp, tiny, capsys, args, needle):
    assert main(["train", *tiny, *args, "--out", "t"]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_no_trained_models_message(in_tmp):
    from augment.errors import UserError

    with pytest.raises(UserError, match="augment train"):
        find_models(None)


@pytest.mark.ray
@pytest.mark.timeout(900)  # about a minute on an idle 2-core machine; timed out at 300 s under a load of 10
def test_three_translators_train_in_parallel_ray_actors_and_evaluate(in_tmp, tiny, capsys):
    """Step 4's done-when: `augment train translator=fixed_point,taggan,branched` (Ray actors), then
    `augment evaluate` scores each family and the reference on the phantom's ground truth."""
    pytest.importorskip("ray")
    from augment import runtime

    overrides = [o for o in tiny if not o.startswith("runtime=")] + ["runtime=local", "train.max_steps=3"]
    try:
        assert main(["train", *overrides, "translator=fixed_point,taggan,branched", "--out", "tr"]) == 0
    finally:
        runtime.shutdown()
    m = json.loads((in_tmp / "tr" / "metrics.json").read_text())
    assert set(m["models"]) == {"fixed_point", "taggan", "branched"}
    for fam in m["models"]:
        ckpt = load_checkpoint(in_tmp / "tr" / "models" / fam / "checkpoint.pt")
        assert ckpt["kind"] == "translator" and ckpt["step"] == 3 and ckpt["done"]
    capsys.readouterr()
    assert main(["evaluate", *[o for o in tiny if not o.startswith("train.")], "--models", "tr", "--out", "ev"]) == 0
    text = capsys.readouterr().out
    for fam in ("fixed_point", "taggan", "branched", "reference"):
        assert f"| {fam} | Edema |" in text
    ev = json.loads((in_tmp / "ev" / "metrics.json").read_text())
    assert set(ev["masks"]) == {"fixed_point", "taggan", "branched"}
    assert all((in_tmp / "ev" / f"masks_{fam}.png").is_file() for fam in ev["masks"])


@pytest.mark.ray
@pytest.mark.timeout(900)  # ~60 s on an idle 2-core machine; 270 s seen under a load of 10
def test_parallel_ray_actors_and_a_killed_actor_resumes_to_the_final_step(in_tmp, tiny):
    """Two families train at once in Ray actors; an actor killed mid-training is restarted by Ray
    and resumes from its checkpoint to the same final step."""
    ray = pytest.importorskip("ray")
    from augment import runtime

    overrides = [o for o in tiny if not o.startswith("runtime=")] + ["runtime=local"]
    assert main(["train", *overrides, "generator=cgan,ucgan", "--out", "par"]) == 0
    m = json.loads((in_tmp / "par" / "metrics.json").read_text())
    assert set(m["models"]) == {"cgan", "ucgan", "classifier"}  # the cgan brings its pseudo-labeller

    cfg = compose([*overrides, "generator=cgan", "train.max_steps=400", "train.ckpt_every=5", "train.sample_every=null"])
    out = in_tmp / "kill" / "models" / "cgan"
    payload = {"cfg": to_dict(cfg), "kind": "generator", "family": "cgan", "classes": ["Edema", "Hernia", "Effusion"],
               "out": str(out)}
    runtime.init(cfg.runtime)
    try:
        actor = runtime.actor_class(cfg.runtime).remote("augment.jobs.gan:train_model")
        first_pid = ray.get(actor.pid.remote())
        ref = actor.run.remote(payload)
        deadline = time.time() + 120
        while time.time() < deadline:
            ck = out / "checkpoint.pt"
            if ck.exists() and load_checkpoint(ck)["step"] >= 10:
                break
            time.sleep(0.2)
        step_at_kill = load_checkpoint(out / "checkpoint.pt")["step"]
        assert step_at_kill < 400, "training finished before the kill: raise max_steps"
        ray.kill(actor, no_restart=False)
        result = ray.get(ref, timeout=300)
        assert result["family"] == "cgan"
        final = load_checkpoint(out / "checkpoint.pt")
        assert final["step"] == 400 and final["done"]
        assert ray.get(actor.pid.remote()) != first_pid  # the actor really was restarted
    finally:
        runtime.shutdown()
