"""The five correctness fixes of issue 17, each with a test that failed on the code before the fix."""

from __future__ import annotations

import torch
from gen_helpers import CLASSES, FakeXrays, tiny_batch
from torch import nn

from generators.cgan import CGAN
from generators.masks import MaskRuleError, per_finding_masks
from generators.train import LogConfig, LoopConfig, StepBatchSampler, fit, update_ema
from generators.translators.taggan import TagGAN
from generators.ucgan import UCGAN

FINDINGS = ["Edema", "Pneumothorax"]


class BNClassifier(nn.Module):
    """A tiny classifier with batch norm, whose running statistics the tests watch."""

    def __init__(self, k: int = len(CLASSES)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, 3, 2, 1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, 2, 1)
        self.head = nn.Linear(4, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.conv2(torch.relu(self.bn(self.conv1(x)))))
        return self.head(h.mean(dim=(2, 3)))


def _ucgan(**kw) -> UCGAN:
    torch.manual_seed(0)
    return UCGAN(classes=CLASSES, classifier=BNClassifier(), image_size=32, z_dim=8, g_channels=4, d_channels=4, **kw)


class Recording(FakeXrays):
    """FakeXrays that records which items were read."""

    def __init__(self, *a, **kw) -> None:
        super().__init__(*a, **kw)
        self.accessed: list[int] = []

    def __getitem__(self, i: int) -> dict:
        self.accessed.append(int(i))
        return super().__getitem__(i)


# 1. UCGAN's classifier C in eval mode during the G step --------------------------------------------


def test_ucgan_g_step_leaves_c_batchnorm_statistics_alone() -> None:
    m = _ucgan()
    opts = m.configure_optimizers()
    modes: list[bool] = []
    m.C.register_forward_pre_hook(lambda mod, _inp: modes.append(mod.training))
    m.training_step(tiny_batch(), opts, step=0, generator=torch.Generator().manual_seed(0))
    # Only C's own update (real batch, generated batch) moves its statistics; before the fix the G step's
    # generated batch (and the real batch of the MMD/style terms) moved them too: 4.
    assert int(m.C.bn.num_batches_tracked) == 2
    assert modes[:2] == [True, True] and modes[2:] and not any(modes[2:])
    assert m.C.training and m.C.bn.training  # the mode is restored after the step


def test_ucgan_score_terms_use_the_pseudo_labelling_probabilities() -> None:
    m = _ucgan()
    opts = m.configure_optimizers()
    # Running statistics far from any batch's own: train-mode and eval-mode logits then differ.
    m.C.bn.running_mean.fill_(0.05)
    m.C.bn.running_var.fill_(2.0)
    calls: list[tuple[torch.Tensor, torch.Tensor]] = []
    handle = m.C.register_forward_hook(
        lambda _m, inp, out: calls.append((inp[0].detach().clone(), out.detach().clone()))
    )
    m.training_step(tiny_batch(), opts, step=0, generator=torch.Generator().manual_seed(0))
    handle.remove()
    fake, logits_g_step = calls[2]  # C step: real, generated; G step: generated (scored for G)
    # C does not change in the G step, so classify() (eval mode: pseudo-labelling) must agree exactly.
    m.eval()
    with torch.no_grad():
        probs = m.classify(fake)
    assert torch.allclose(probs, torch.softmax(logits_g_step.float(), 1), atol=1e-6)
    assert logits_g_step.std(0).max() > 0  # not a degenerate constant output


# 2. EMA averages BatchNorm buffers ------------------------------------------------------------------


def test_ema_averages_batchnorm_buffers_instead_of_copying() -> None:
    live = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    ema.load_state_dict(live.state_dict())
    live[1].running_mean.fill_(1.0)
    live[1].running_var.fill_(3.0)
    live[1].num_batches_tracked.fill_(7)
    update_ema(ema, live, 0.75)
    assert torch.allclose(ema[1].running_mean, torch.full((2,), 0.25))  # 0.75 * 0 + 0.25 * 1
    assert torch.allclose(ema[1].running_var, torch.full((2,), 1.5))  # 0.75 * 1 + 0.25 * 3
    assert int(ema[1].num_batches_tracked) == 7  # integer buffers are copied


# 3. UCGAN update schedule and class balancing --------------------------------------------------------


def test_ucgan_paper_schedule_g_3to1_then_flipped_then_1to1() -> None:
    m = _ucgan(schedule="paper", schedule_steps=(3, 6), use_style=False)
    opts = m.configure_optimizers()
    flags = []
    for s in range(9):
        out = m.training_step(tiny_batch(seed=s), opts, step=s, generator=torch.Generator().manual_seed(s))
        flags.append((int(out["update_d"]), int(out["update_g"])))
    assert flags[:3] == [(1, 1), (0, 1), (0, 1)]  # G 3:1 over D
    assert flags[3:6] == [(1, 1), (1, 0), (1, 0)]  # flipped: D 3:1 over G
    assert flags[6:] == [(1, 1)] * 3  # then 1:1
    d_steps = {int(s["step"]) for s in opts["d"].state.values()}
    g_steps = {int(s["step"]) for s in opts["g"].state.values()}
    assert d_steps == {7} and g_steps == {7}


def test_ucgan_constant_schedule_is_the_default_1to1() -> None:
    m = _ucgan(use_style=False)
    assert m.schedule == "constant"
    opts = m.configure_optimizers()
    for s in range(2):
        m.training_step(tiny_batch(seed=s), opts, step=s, generator=torch.Generator().manual_seed(s))
    assert {int(s["step"]) for s in opts["d"].state.values()} == {2}
    assert {int(s["step"]) for s in opts["g"].state.values()} == {2}


def test_ucgan_balanced_choice_overrides_the_loop(tmp_path) -> None:
    ds = Recording(n=10)
    m = _ucgan(balanced=False, use_style=False)
    fit(m, ds, LoopConfig(batch_size=4, max_steps=3, seed=5, balanced=True), logs=LogConfig(progress=False))
    plain = StepBatchSampler(10, 4, seed=5, stop_step=3)
    assert ds.accessed == [i for b in plain for i in b]  # the paper's unbalanced draw, not the loop's balanced one


# 4. CGAN: a fresh real batch per critic step ------------------------------------------------------------


def test_cgan_each_critic_step_sees_its_own_real_batch() -> None:
    torch.manual_seed(0)
    m = CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, loss="wgan-gp", n_critic=2)
    seen: list[torch.Tensor] = []
    m.D.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0].detach().clone()))
    batch = tiny_batch(b=8)
    m.training_step(batch, m.configure_optimizers(), step=0, generator=torch.Generator().manual_seed(0))
    # D calls per critic step: real, fake, interpolates (gradient penalty); then the G step's fake.
    real_1, real_2 = seen[0], seen[3]
    assert torch.equal(real_1, batch["x"][:4]) and torch.equal(real_2, batch["x"][4:])


def test_fit_delivers_n_critic_real_batches_per_step() -> None:
    ds = Recording(n=10)
    torch.manual_seed(0)
    m = CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, loss="wgan-gp", n_critic=3)
    fit(m, ds, LoopConfig(batch_size=2, max_steps=2, seed=0), logs=LogConfig(progress=False))
    assert len(ds.accessed) == 2 * 3 * 2
    assert ds.accessed == [i for b in StepBatchSampler(10, 6, seed=0, stop_step=2) for i in b]


# 5. TagGAN: per-finding masks on multi-finding images ask for a trained removal set -------------------


def _multi_batch(b: int = 4) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"x": torch.rand(b, 1, 32, 32, generator=g) * 2 - 1, "y": torch.ones(b, len(FINDINGS))}


def _tag(**kw) -> TagGAN:
    torch.manual_seed(0)
    return TagGAN(classes=FINDINGS, image_size=32, g_width=4, d_width=4, n_res=1, normal_bank=4, **kw)


def test_taggan_trains_the_removal_set_per_finding_masks_ask_for() -> None:
    m = _tag(partial_removal=0.5)
    asked: list[tuple[float, ...]] = []
    h = m.G.register_forward_pre_hook(lambda _m, inp: asked.extend(tuple(r.tolist()) for r in inp[1]))
    x = _multi_batch(1)["x"]
    per_finding_masks(m, x, torch.ones(1, 2), FINDINGS, rule="fixed", threshold=0.0)
    h.remove()
    assert set(asked) == {(1.0, 0.0), (0.0, 1.0)}  # remove one finding, keep the other

    trained: list[tuple[float, ...]] = []
    m.G.register_forward_pre_hook(lambda _m, inp: trained.extend(tuple(r.tolist()) for r in inp[1]))
    opts = m.configure_optimizers()
    for s in range(4):
        m.training_step(_multi_batch(), opts, step=s, generator=torch.Generator().manual_seed(s))
    assert set(asked) <= set(trained)  # before the fix every trained set was a superset: only (1, 1)


def test_taggan_partial_rows_are_judged_by_d_abnormal_with_the_kept_findings() -> None:
    m = _tag(partial_removal=1.0)
    x, c_x = _multi_batch()["x"], torch.ones(4, 2)
    c = torch.tensor([[1.0, 0.0]] * 4)
    kept = c_x - c
    terms = m.generator_terms(x, c_x, c, kept)
    assert {"g_partial_adv", "g_partial_domain"} <= set(terms)
    assert float(terms["g_adv_normal"]) == 0.0  # no fully healed image to show D_Normal


def test_per_finding_masks_refuse_multi_finding_images_for_a_model_without_partial_removal() -> None:
    m = _tag(partial_removal=0.0)
    x = _multi_batch(1)["x"]
    try:
        per_finding_masks(m, x, torch.ones(1, 2), FINDINGS, rule="fixed", threshold=0.0)
    except MaskRuleError as err:
        assert "partial" in str(err)
    else:
        raise AssertionError("an untrained removal set was answered")
    # single-finding images still work
    out = per_finding_masks(m, x, torch.tensor([[1.0, 0.0]]), FINDINGS, rule="fixed", threshold=0.0)
    assert set(out) == {"Edema"}
