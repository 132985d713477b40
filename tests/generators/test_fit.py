"""The training loop (generators/train.py) and checkpoint files (generators/checkpoint.py)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from gen_helpers import CLASSES, FakeXrays, TinyClassifier
from torch import nn

from generators.cgan import CGAN
from generators.checkpoint import apply_checkpoint, load_checkpoint, save_checkpoint
from cxrbase import balanced_weights, collate, write_png
from generators.train import (
    CheckpointConfig,
    HookBase,
    LogConfig,
    LoopConfig,
    StepBatchSampler,
    TrainState,
    derive_seed,
    fit,
    image_grid,
    to_batch,
)
from generators.ucgan import UCGAN

CGAN_CFG = {"_target_": "generators.cgan.CGAN", "image_size": 32, "z_dim": 8, "g_channels": 4, "d_channels": 4}


def tiny_cgan(seed: int = 0, classes: list[str] = CLASSES) -> CGAN:
    torch.manual_seed(seed)  # tests may seed; library code never does
    return CGAN(classes=classes, image_size=32, z_dim=8, g_channels=4, d_channels=4)


def tiny_ucgan(seed: int = 0) -> UCGAN:
    torch.manual_seed(seed)
    return UCGAN(classes=CLASSES, classifier=TinyClassifier(), image_size=32, z_dim=8, g_channels=4, d_channels=4)


def _state_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -- data ---------------------------------------------------------------------------------------------


def test_batches_depend_only_on_seed_and_step() -> None:
    full = list(StepBatchSampler(7, 3, seed=5, stop_step=9))
    tail = list(StepBatchSampler(7, 3, seed=5, start_step=4, stop_step=9))
    assert tail == full[4:]
    assert list(StepBatchSampler(7, 3, seed=6, stop_step=9)) != full
    # each epoch of 7 indices is a permutation of the dataset
    flat = [i for b in full for i in b]
    assert sorted(flat[:7]) == list(range(7)) and sorted(flat[7:14]) == list(range(7))
    # a dataset smaller than a batch still yields full batches
    assert all(len(b) == 5 for b in StepBatchSampler(2, 5, seed=0, stop_step=3))


def test_balanced_sampling_draws_rare_classes_more() -> None:
    labels = torch.zeros(100, 2)
    labels[:5, 0] = 1  # rare
    labels[5:, 1] = 1
    labels[7, 0] = math.nan
    w = balanced_weights(labels.numpy())  # the sampler takes numpy or torch weights
    assert w[0] == pytest.approx(1 / 5) and w[50] == pytest.approx(1 / 95)
    plain = StepBatchSampler(100, 10, seed=0, stop_step=50)
    bal = StepBatchSampler(100, 10, seed=0, stop_step=50, weights=w)
    rare = lambda s: sum(i < 5 for b in s for i in b)  # noqa: E731
    assert rare(bal) > 3 * rare(plain)
    assert rare(bal) == pytest.approx(250, rel=0.2)  # half of 500 draws


def test_batch_conversion() -> None:
    items = [{"image": torch.full((1, 4, 4), 255, dtype=torch.uint8), "labels": torch.tensor([1.0, math.nan])},
             {"image": torch.zeros(1, 4, 4, dtype=torch.uint8), "labels": torch.tensor([0.0, 1.0])}]
    b = to_batch(collate(items), torch.device("cpu"))
    assert b["x"].shape == (2, 1, 4, 4) and b["x"].max() == 1.0 and b["x"].min() == -1.0
    assert b["y"].tolist() == [[1.0, 0.0], [0.0, 1.0]]


def test_seeds() -> None:
    assert derive_seed(0, 1, 2) == derive_seed(0, 1, 2) != derive_seed(0, 1, 3)


def test_configs_refuse_bad_values() -> None:
    with pytest.raises(ValueError, match="batch_size and max_steps"):
        LoopConfig(batch_size=0, max_steps=1)
    with pytest.raises(ValueError, match="batch_size and max_steps"):
        LoopConfig(batch_size=1, max_steps=0)
    with pytest.raises(ValueError, match="ema_decay"):
        LoopConfig(batch_size=1, max_steps=1, ema_decay=1.0)
    with pytest.raises(ValueError, match="every"):
        CheckpointConfig("x", every=0)
    with pytest.raises(ValueError, match="every"):
        LogConfig(every=0)


# -- resume ------------------------------------------------------------------------------------------

QUIET = LogConfig(progress=False)


def loop(max_steps: int, batch_size: int = 4, **kw) -> LoopConfig:
    return LoopConfig(batch_size=batch_size, max_steps=max_steps, **kw)


@pytest.mark.parametrize("family", ["cgan", "ucgan"])
def test_resume_gives_identical_weights(tmp_path: Path, family: str) -> None:
    make = tiny_cgan if family == "cgan" else tiny_ucgan
    kw = dict(seed=3, ema_decay=0.9, balanced=True)
    logs = LogConfig(every=1, progress=False)
    data = FakeXrays()

    straight = make(seed=0)
    fit(straight, data, loop(4, **kw), checkpoint=CheckpointConfig(tmp_path / "a", every=1000), logs=logs)

    first = make(seed=0)
    fit(first, data, loop(2, **kw), checkpoint=CheckpointConfig(tmp_path / "b", every=1000), logs=logs)
    half = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert half["step"] == 2 and half["done"] is True
    resumed = make(seed=123)  # other initial weights: everything must come from the checkpoint
    fit(resumed, data, loop(4, **kw), checkpoint=CheckpointConfig(tmp_path / "b", every=1000), logs=logs)

    assert _state_equal(straight.state_dict(), resumed.state_dict())
    a = load_checkpoint(tmp_path / "a" / "checkpoint.pt")
    b = load_checkpoint(tmp_path / "b" / "checkpoint.pt")
    assert _state_equal(a["ema_state_dict"], b["ema_state_dict"])
    assert a["step"] == b["step"] == 4
    # the log of the resumed run holds each step once
    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]


def test_finished_checkpoint_is_not_trained_again(tmp_path: Path, dataset: FakeXrays) -> None:
    m = tiny_cgan()
    out = fit(m, dataset, loop(2), checkpoint=CheckpointConfig(tmp_path), logs=QUIET)
    written = (tmp_path / "checkpoint.pt").read_bytes()
    again = tiny_cgan(seed=9)
    out2 = fit(again, dataset, loop(2), checkpoint=CheckpointConfig(tmp_path), logs=QUIET)
    assert out2 == out
    assert _state_equal(m.state_dict(), again.state_dict())
    assert (tmp_path / "checkpoint.pt").read_bytes() == written  # not rewritten


# -- checkpoint contents -----------------------------------------------------------------------------


def test_checkpoint_contents_load_weights_only(tmp_path: Path, dataset: FakeXrays) -> None:
    m = tiny_cgan()
    meta = {"model_cfg": CGAN_CFG, "data_fingerprint": "abc123"}
    fit(m, dataset, loop(3), checkpoint=CheckpointConfig(tmp_path, meta=meta), logs=QUIET)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert ckpt["model_cfg"] == CGAN_CFG and ckpt["data_fingerprint"] == "abc123"
    assert ckpt["classes"] == CLASSES and ckpt["image_size"] == 32
    assert ckpt["step"] == 3 and ckpt["done"] is True
    assert set(ckpt["optimizer_states"]) == {"g", "d"}
    assert ckpt["ema_state_dict"] is None
    assert {"python", "torch"} <= set(ckpt["versions"])
    assert ckpt["system_class"] == "generators.cgan.CGAN"
    assert set(ckpt["metrics"]) >= {"loss_d", "loss_g"}
    assert ckpt["fit"] == {"seed": 0, "batch_size": 4, "max_steps": 3, "balanced": False, "ema_decay": None,
                           "amp": False, "real_batches_per_step": 1}
    assert set(ckpt) == {"model_cfg", "data_fingerprint", "classes", "image_size", "system_class", "state_dict",
                         "ema_state_dict", "optimizer_states", "step", "done", "metrics", "fit", "versions"}
    rebuilt = apply_checkpoint(tiny_cgan(seed=5), ckpt)
    assert _state_equal(rebuilt.state_dict(), m.state_dict())
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind


def test_checkpoint_every_n_steps(tmp_path: Path, dataset: FakeXrays) -> None:
    on_disk: dict[int, int] = {}

    def spy(step: int, metrics: dict[str, float]) -> None:
        path = tmp_path / "checkpoint.pt"
        on_disk[step] = load_checkpoint(path)["step"] if path.exists() else 0

    fit(tiny_cgan(), dataset, loop(5), checkpoint=CheckpointConfig(tmp_path, every=2),
        logs=LogConfig(every=1, progress=False, on_metrics=spy))
    # metrics are reported before the step's checkpoint is written
    assert on_disk == {1: 0, 2: 0, 3: 2, 4: 2, 5: 4}
    final = load_checkpoint(tmp_path / "checkpoint.pt")
    assert final["step"] == 5 and final["done"] is True


def test_unsafe_meta_is_refused_before_training(tmp_path: Path, dataset: FakeXrays) -> None:
    class Cfg(dict):
        pass

    m = tiny_cgan()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(TypeError, match="model_cfg"):
        fit(m, dataset, loop(1), checkpoint=CheckpointConfig(tmp_path, meta={"model_cfg": Cfg(a=1)}), logs=QUIET)
    assert _state_equal(before, m.state_dict())


def test_other_family_or_classes_refuse_to_resume(tmp_path: Path, dataset: FakeXrays) -> None:
    def ckpt(**kw) -> CheckpointConfig:
        return CheckpointConfig(tmp_path, **kw)

    fit(tiny_cgan(), dataset, loop(1), checkpoint=ckpt(meta={"model_cfg": CGAN_CFG}), logs=QUIET)
    other_cfg = {"_target_": "generators.ucgan.UCGAN"}
    with pytest.raises(ValueError, match=r"generators\.cgan\.CGAN.*generators\.ucgan\.UCGAN"):
        fit(tiny_cgan(), dataset, loop(2), checkpoint=ckpt(meta={"model_cfg": other_cfg}), logs=QUIET)
    with pytest.raises(ValueError, match=r"CGAN.*UCGAN"):  # no meta: the system's class decides
        fit(tiny_ucgan(), dataset, loop(2), checkpoint=ckpt(), logs=QUIET)
    other = ["Edema", "Pneumonia", "No Finding"]
    with pytest.raises(ValueError, match=r"'Hernia'.*'Pneumonia'"):
        fit(tiny_cgan(classes=other), dataset, loop(2), checkpoint=ckpt(), logs=QUIET)
    # resume=False starts over in the same folder
    fit(tiny_ucgan(), dataset, loop(1), checkpoint=ckpt(resume=False), logs=QUIET)
    assert load_checkpoint(tmp_path / "checkpoint.pt")["system_class"] == "generators.ucgan.UCGAN"


def test_missing_corrupt_and_unsafe_checkpoints(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "nope.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(bad)
    good = tmp_path / "good.pt"
    save_checkpoint(good, {"w": torch.ones(2), "cfg": {"a": [1, 2.5, "x", None]}})
    good.write_bytes(good.read_bytes()[:50])  # truncated
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(good)
    with pytest.raises(TypeError, match=r"payload\['obj'\]"):
        save_checkpoint(tmp_path / "x.pt", {"obj": object()})


def test_data_that_does_not_fit_the_model_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="64 x 64.*32 px"):
        fit(tiny_cgan(), FakeXrays(size=64), loop(1, batch_size=2), logs=QUIET)
    with pytest.raises(ValueError, match="2 label columns"):
        fit(tiny_cgan(), FakeXrays(classes=["a", "b"]), loop(1, batch_size=2), logs=QUIET)


# -- EMA, metrics, samples ---------------------------------------------------------------------------


def test_ema_differs_from_raw_generator(tmp_path: Path, dataset: FakeXrays) -> None:
    m = tiny_cgan()
    init = {k: v.clone() for k, v in m.G.state_dict().items()}
    fit(m, dataset, loop(3, ema_decay=0.5), checkpoint=CheckpointConfig(tmp_path), logs=QUIET)
    ema = load_checkpoint(tmp_path / "checkpoint.pt")["ema_state_dict"]
    raw = m.G.state_dict()
    weights = [k for k in raw if k.endswith("weight")]
    assert any(not torch.equal(ema[k], raw[k]) for k in weights)
    assert any(not torch.equal(ema[k], init[k]) for k in weights)
    # the EMA lies between the initial and the final weights for a slowly moving average
    k = "project.0.weight"
    assert (ema[k] - raw[k]).abs().sum() < (init[k] - raw[k]).abs().sum()


def test_on_metrics_and_jsonl(tmp_path: Path, dataset: FakeXrays) -> None:
    calls: list[tuple[int, dict]] = []
    logs = LogConfig(every=2, path=tmp_path / "m.jsonl", on_metrics=lambda s, m: calls.append((s, m)), progress=False)
    out = fit(tiny_cgan(), dataset, loop(5), logs=logs)
    assert [s for s, _ in calls] == [2, 4, 5]
    assert calls[-1][1] == out and all(math.isfinite(v) for v in out.values())
    lines = [json.loads(x) for x in (tmp_path / "m.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 5]
    assert lines[-1]["loss_g"] == pytest.approx(out["loss_g"])


def test_sample_grids_are_written(tmp_path: Path, dataset: FakeXrays) -> None:
    pil = pytest.importorskip("PIL.Image")
    fit(tiny_cgan(), dataset, loop(2, ema_decay=0.9), checkpoint=CheckpointConfig(tmp_path),
        logs=LogConfig(sample_every=1, progress=False))
    pngs = sorted((tmp_path / "samples").glob("*.png"))
    assert [p.name for p in pngs] == ["step_0000001.png", "step_0000002.png"]
    img = pil.open(pngs[-1])
    # 3 classes x 8 samples of 32 px with 2 px padding
    assert img.mode == "L" and img.size == (8 * 34 + 2, 3 * 34 + 2)
    assert not list((tmp_path / "samples").glob(".*"))  # written atomically: no temporary left


def test_image_grid_layout_and_png_round_trip(tmp_path: Path) -> None:
    pil = pytest.importorskip("PIL.Image")
    import numpy as np

    x = torch.linspace(-1, 1, 2 * 3 * 5).reshape(2, 1, 3, 5)
    grid = image_grid(x, nrow=2, pad=1)
    assert grid.shape == (1 + 4, 1 + 12) and grid.dtype == np.uint8
    assert grid[0, 0] == 128  # padding is mid-grey (0 in [-1, 1])
    assert grid[1, 1] == 0 and grid[1 + 2, 1 + 5 + 1 + 4] == 255  # first and last pixels: -1 and 1
    write_png(tmp_path / "g.png", grid)
    assert np.array_equal(np.asarray(pil.open(tmp_path / "g.png")), grid)


class ToySystem(nn.Module):
    """A non-GAN system: G regresses the batch mean. Shows fit needs only the GANSystem protocol."""

    def __init__(self) -> None:
        super().__init__()
        self.G = nn.Linear(1, 1)
        self.grids = 0

    def configure_optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return {"g": torch.optim.SGD(self.G.parameters(), lr=0.1)}

    def training_step(self, batch, opts, *, step, generator) -> dict[str, float]:
        if step == getattr(self, "fail_at", -1):
            raise RuntimeError("boom")
        target = batch["x"].mean()
        loss = (self.G(torch.ones(1, 1)).squeeze() - target) ** 2
        opts["g"].zero_grad()
        loss.backward()
        opts["g"].step()
        return {"loss": loss.item(), "noise": torch.rand((), generator=generator).item()}

    def sample_grid(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.grids += 1
        return batch["x"][:2]


def test_fit_drives_any_system_and_translator_grids(tmp_path: Path, dataset: FakeXrays) -> None:
    m = ToySystem()
    out = fit(m, dataset, loop(3, batch_size=2), checkpoint=CheckpointConfig(tmp_path),
              logs=LogConfig(every=1, sample_every=3, progress=False))
    assert m.grids == 1 and (tmp_path / "samples" / "step_0000003.png").exists()
    assert set(out) == {"loss", "noise"}
    # the per-step generator is seeded from (seed, step): the same run gives the same draws
    again = fit(ToySystem(), dataset, loop(3, batch_size=2), logs=LogConfig(every=1, progress=False))
    assert again["noise"] == out["noise"]


class Recorder(HookBase):
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def before_train(self, state: TrainState) -> None:
        self.calls.append(("before_train", state.step))

    def after_step(self, state: TrainState) -> None:
        self.calls.append(("after_step", state.step, state.logged, sorted(state.outputs)))

    def after_train(self, state: TrainState) -> None:
        self.calls.append(("after_train", state.step, state.completed))


def test_extra_hooks_see_every_step_after_the_built_in_ones(tmp_path: Path, dataset: FakeXrays) -> None:
    rec = Recorder()
    fit(ToySystem(), dataset, loop(2, batch_size=2), checkpoint=CheckpointConfig(tmp_path / "a"),
        logs=LogConfig(every=2, progress=False), hooks=[rec])
    out = ["loss", "noise"]
    assert rec.calls == [("before_train", 0), ("after_step", 1, False, out), ("after_step", 2, True, out),
                         ("after_train", 2, True)]
    # a resumed run starts the hooks at its checkpoint's step
    rec = Recorder()
    fit(ToySystem(), dataset, loop(3, batch_size=2), checkpoint=CheckpointConfig(tmp_path / "a"),
        logs=LogConfig(every=2, progress=False), hooks=[rec])
    assert rec.calls == [("before_train", 2), ("after_step", 3, True, out), ("after_train", 3, True)]


def test_a_failing_step_closes_the_hooks_but_writes_no_final_checkpoint(tmp_path: Path, dataset: FakeXrays) -> None:
    m, rec = ToySystem(), Recorder()
    m.fail_at = 2
    with pytest.raises(RuntimeError, match="boom"):
        fit(m, dataset, loop(4, batch_size=2), checkpoint=CheckpointConfig(tmp_path, every=1),
            logs=LogConfig(every=1, progress=False), hooks=[rec])
    assert rec.calls[-1] == ("after_train", 2, False)
    # the periodic checkpoint of step 2 is there; no checkpoint claims a step that did not finish
    assert load_checkpoint(tmp_path / "checkpoint.pt")["step"] == 2


def test_fit_leaves_the_global_rng_alone(tmp_path: Path, dataset: FakeXrays) -> None:
    m = tiny_ucgan()
    state = torch.get_rng_state()
    fit(m, dataset, loop(2, balanced=True, ema_decay=0.9), checkpoint=CheckpointConfig(tmp_path),
        logs=LogConfig(sample_every=2, progress=False))
    assert torch.equal(state, torch.get_rng_state())


def test_ema_warms_up_so_a_short_run_does_not_sample_its_initial_weights(tmp_path: Path) -> None:
    from generators.train import ema_decay_at

    assert ema_decay_at(0.999, 0) == pytest.approx(0.1)
    assert ema_decay_at(0.999, 100_000) == 0.999
    assert all(ema_decay_at(0.999, n) <= ema_decay_at(0.999, n + 1) for n in range(2000))
    m = tiny_cgan(seed=0)
    init = {k: v.clone() for k, v in m.G.state_dict().items()}
    fit(m, FakeXrays(), loop(12, ema_decay=0.999, seed=0), checkpoint=CheckpointConfig(tmp_path), logs=QUIET)
    ema = load_checkpoint(tmp_path / "checkpoint.pt")["ema_state_dict"]
    raw = m.G.state_dict()
    keys = [k for k, v in raw.items() if v.is_floating_point() and "running" not in k]
    to_raw = sum(float((ema[k] - raw[k]).norm()) for k in keys)
    init_to_raw = sum(float((init[k] - raw[k]).norm()) for k in keys)
    assert to_raw < 0.5 * init_to_raw  # a fixed 0.999 would leave the EMA at 98.8 % of the initial weights
