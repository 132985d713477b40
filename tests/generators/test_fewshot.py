"""Few-shot tools of issue 17: differentiable augmentation at the discriminate() seam, ADA, LeCam,
spectral norm in every discriminator, the FastGAN-style CGAN architecture and Fixed-Point GAN with R1."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import CLASSES, TinyClassifier, tiny_batch
from torch import nn

import generators.adversarial as adversarial
from generators.adversarial import (
    AUG_OPS,
    DiscriminatorRegulariser,
    d_loss,
    diff_augment,
    discriminate,
    lecam_penalty,
    make_regulariser,
    parse_policy,
)
from generators.cgan import CGAN
from generators.fastgan import FastGANDiscriminator, FastGANGenerator, sle_pairs
from generators.translators.branched import BranchedGAN
from generators.translators.fixed_point import FixedPointGAN
from generators.translators.taggan import TagGAN
from generators.ucgan import UCGAN

FINDINGS = ["Edema", "Pneumothorax"]
TINY_T = dict(g_width=4, d_width=4, n_res=1)
FEW = dict(diffaug="translation,cutout,brightness,contrast", lecam_weight=0.1)


def _x(b: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 1, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# -- the augmentation ------------------------------------------------------------------------------------


@pytest.mark.parametrize("op", AUG_OPS)
def test_each_op_is_differentiable_and_changes_the_images(op: str) -> None:
    x = _x().requires_grad_(True)
    y = diff_augment(x, [op], generator=torch.Generator().manual_seed(1))
    assert y.shape == x.shape and not torch.equal(y, x)
    (grad,) = torch.autograd.grad((y * torch.randn_like(y)).sum(), x)
    assert grad.abs().sum() > 0  # gradients reach the input through the op


def test_translation_shifts_and_cutout_zeroes_a_square() -> None:
    x = torch.arange(32.0).repeat(32, 1)[None, None].repeat(2, 1, 1, 1) / 32
    y = diff_augment(x, ["translation"], generator=torch.Generator().manual_seed(3))
    for i in range(2):  # each row is the original shifted by an integer (zeros enter at one side)
        row, orig = y[i, 0, 16], x[i, 0, 16]
        assert any(
            torch.equal(row[max(0, s) : 32 + min(0, s)], orig[max(0, -s) : 32 - max(0, s)]) for s in range(-4, 5)
        )
    c = diff_augment(torch.ones(3, 1, 32, 32), ["cutout"], generator=torch.Generator().manual_seed(0))
    zeros = (c == 0).flatten(1).sum(1)
    assert torch.all(zeros > 0) and torch.all(zeros <= 16 * 16)


def test_probability_zero_is_identity_and_policy_rejects_flip() -> None:
    x = _x()
    assert torch.equal(diff_augment(x, AUG_OPS, p=0.0, generator=torch.Generator().manual_seed(0)), x)
    assert parse_policy("translation, cutout") == ("translation", "cutout")
    assert parse_policy(None) == () and make_regulariser() is None
    with pytest.raises(ValueError, match="flip"):
        parse_policy(["flip"])


def test_same_seed_same_bytes() -> None:
    a = diff_augment(_x(), AUG_OPS, p=0.5, generator=torch.Generator().manual_seed(7))
    b = diff_augment(_x(), AUG_OPS, p=0.5, generator=torch.Generator().manual_seed(7))
    c = diff_augment(_x(), AUG_OPS, p=0.5, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_discriminate_needs_the_generator_only_when_augmenting() -> None:
    reg = make_regulariser(diffaug="brightness")
    with pytest.raises(ValueError, match="generator"):
        discriminate(lambda v: v, _x(), reg=reg)
    assert torch.equal(discriminate(lambda v: v, _x()), _x())


# -- every family: every D input augmented, real and fake, D and G steps ------------------------------


def _family(name: str):
    torch.manual_seed(0)
    x, y2 = tiny_batch()["x"], torch.tensor([[1.0, 0], [1, 1], [0, 1], [0, 0]])
    if name == "cgan":
        m = CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, fewshot=FEW)
        return m, [m.D], tiny_batch()
    if name == "cgan_fastgan":
        m = CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, arch="fastgan", fewshot=FEW)
        return m, [m.D], tiny_batch()
    if name == "ucgan":
        m = UCGAN(classes=CLASSES, classifier=TinyClassifier(), image_size=32, z_dim=8, g_channels=4,
                  d_channels=4, use_style=False, fewshot=FEW)
        return m, [m.D], tiny_batch()
    if name == "fixed_point":
        m = FixedPointGAN(classes=FINDINGS, image_size=32, **TINY_T, fewshot=FEW)
        return m, [m.D], {"x": x, "y": y2}
    if name == "taggan":
        m = TagGAN(classes=FINDINGS, image_size=32, partial_removal=0.5, **TINY_T, fewshot=FEW)
        return m, [m.D_normal, m.D_abnormal], {"x": x, "y": y2}
    m = BranchedGAN(classes=FINDINGS, image_size=32, n_branches=2, **TINY_T, fewshot=FEW)
    return m, [m.D], {"x": x, "y": y2}


FAMILIES = ["cgan", "cgan_fastgan", "ucgan", "fixed_point", "taggan", "branched"]


@pytest.mark.parametrize("family", FAMILIES)
def test_every_discriminator_input_is_augmented_real_and_fake(family: str, monkeypatch) -> None:
    system, discriminators, batch = _family(family)
    real_x = batch["x"]
    augmented: list[torch.Tensor] = []
    d_inputs: list[torch.Tensor] = []
    original = DiscriminatorRegulariser.augment

    def spy(self, x, *, generator):
        augmented.append(x.detach().clone())
        out = original(self, x, generator=generator)
        out.tag_augmented = True
        return out

    monkeypatch.setattr(DiscriminatorRegulariser, "augment", spy)
    for d in discriminators:
        d.register_forward_pre_hook(lambda _m, inp: d_inputs.append(inp[0]))
    system.training_step(batch, system.configure_optimizers(), step=0, generator=torch.Generator().manual_seed(0))
    assert d_inputs and len(augmented) == len(d_inputs)
    assert all(getattr(t, "tag_augmented", False) for t in d_inputs)  # D never saw an un-augmented image
    is_real = [a.shape == real_x.shape and torch.equal(a, real_x) for a in augmented]
    assert any(is_real) and not all(is_real)  # both real and generated images go through it


@pytest.mark.parametrize("family", FAMILIES)
def test_few_shot_state_is_checkpointed_and_lecam_anchors_move(family: str) -> None:
    system, _, batch = _family(family)
    opts = system.configure_optimizers()
    system.training_step(batch, opts, step=0, generator=torch.Generator().manual_seed(0))
    keys = system.state_dict().keys()
    regs = [k for k in keys if k.endswith("anchor_real")]
    assert regs and any(k.endswith(".p") for k in keys)  # augmentation probability and anchors resume exactly
    assert any(float(system.state_dict()[k]) != 0.0 for k in regs)


@pytest.mark.parametrize("family", ["cgan", "fixed_point"])
def test_training_with_the_tools_is_reproducible(family: str) -> None:
    def run() -> dict[str, torch.Tensor]:
        system, _, batch = _family(family)
        opts = system.configure_optimizers()
        for s in range(2):
            system.training_step(batch, opts, step=s, generator=torch.Generator().manual_seed(s))
        return system.state_dict()

    a, b = run(), run()
    assert all(torch.equal(a[k], b[k]) for k in a)


# -- ADA and LeCam -----------------------------------------------------------------------------------


def test_ada_probability_follows_the_overfitting_signal() -> None:
    reg = DiscriminatorRegulariser(policy="translation", p=0.5, adaptive=True, ada_images=40, ada_interval=2)
    confident = torch.full((4,), 3.0)  # D(real) > 0 everywhere: r_t = 1 > 0.6
    for _ in range(2):
        d_loss("bce", confident, torch.zeros(4), reg=reg)
    assert float(reg.p) == pytest.approx(0.5 + 8 / 40) and float(reg.rt) == 1.0
    unsure = torch.tensor([1.0, -1.0, -1.0, -1.0])  # r_t = -0.5 < 0.6: less augmentation
    for _ in range(20):
        d_loss("bce", unsure, torch.zeros(4), reg=reg)
    assert float(reg.p) == 0.0  # clamped at 0
    fixed = DiscriminatorRegulariser(policy="translation", p=0.3)
    d_loss("bce", confident, torch.zeros(4), reg=fixed)
    assert float(fixed.p) == pytest.approx(0.3)


def test_lecam_penalty_value_gradient_and_anchor_updates() -> None:
    real = torch.tensor([1.0, 3.0], requires_grad=True)
    fake = torch.tensor([-2.0, 0.0], requires_grad=True)
    assert float(lecam_penalty(real.detach(), fake.detach(), torch.tensor(2.0), torch.tensor(-1.0))) == pytest.approx(
        ((2**2 + 4**2) / 2) + ((4**2 + 2**2) / 2)
    )
    reg = DiscriminatorRegulariser(lecam_weight=0.5, lecam_decay=0.9)
    plain = d_loss("hinge", real, fake)
    loss = d_loss("hinge", real, fake, reg=reg)
    assert float(reg.anchor_real) == pytest.approx(0.1 * 2.0) and float(reg.anchor_fake) == pytest.approx(0.1 * -1.0)
    expected = lecam_penalty(real, fake, torch.tensor(0.2), torch.tensor(-0.1))
    assert float((loss - plain).detach()) == pytest.approx(0.5 * float(expected.detach()), rel=1e-5)
    (g,) = torch.autograd.grad(loss - plain, real)
    assert g.abs().sum() > 0
    d_loss("hinge", real, fake, reg=reg)
    assert float(reg.anchor_real) == pytest.approx(0.9 * 0.2 + 0.1 * 2.0)


# -- spectral norm everywhere -------------------------------------------------------------------------


def _has_sn(m: nn.Module) -> bool:
    convs = [c for c in m.modules() if isinstance(c, (nn.Conv2d, nn.Linear))]
    return bool(convs) and all(hasattr(c, "parametrizations") for c in convs)


def test_spectral_norm_is_available_in_every_discriminator() -> None:
    torch.manual_seed(0)
    cg = CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4, spectral_norm=True)
    uc = UCGAN(classes=CLASSES, classifier=TinyClassifier(), image_size=32, z_dim=8, g_channels=4, d_channels=4,
               spectral_norm=True)
    fp = FixedPointGAN(classes=FINDINGS, image_size=32, spectral_norm=True, **TINY_T)
    tg = TagGAN(classes=FINDINGS, image_size=32, spectral_norm=True, **TINY_T)
    br = BranchedGAN(classes=FINDINGS, image_size=32, n_branches=2, spectral_norm=True, **TINY_T)
    for d in (cg.D, uc.D, fp.D, tg.D_normal, tg.D_abnormal, br.D):
        assert _has_sn(d)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in uc.D.modules())
    assert not _has_sn(FixedPointGAN(classes=FINDINGS, image_size=32, **TINY_T).D)


# -- FastGAN-style CGAN -----------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_fastgan_shapes_and_conditioning(size: int) -> None:
    torch.manual_seed(0)
    G = FastGANGenerator(image_size=size, z_dim=8, channels=4, num_classes=3).eval()
    D = FastGANDiscriminator(image_size=size, channels=4, num_classes=3)
    z = torch.randn(2, 8)
    x0, x1 = G(z, torch.eye(3)[[0, 0]]), G(z, torch.eye(3)[[1, 1]])
    assert x0.shape == (2, 1, size, size) and x0.abs().max() <= 1 and not torch.equal(x0, x1)
    assert D(x0, torch.eye(3)[:2]).shape == (2,)
    logits, rec = D(x0, torch.eye(3)[:2], quadrant=3)
    assert logits.shape == (2,) and rec.ndim == 0 and rec > 0
    assert len(G.sle) == len(sle_pairs(size)) >= 1


def test_sle_gates_reach_the_output() -> None:
    torch.manual_seed(0)
    G = FastGANGenerator(image_size=64, z_dim=8, channels=4, num_classes=2)
    assert sle_pairs(64) == [(4, 32), (8, 64)] and sle_pairs(256) == [(8, 128), (16, 256)]
    out = G(torch.randn(2, 8), torch.eye(2))
    grads = torch.autograd.grad(out.sum(), [p for s in G.sle.values() for p in s.parameters()])
    assert all(g.abs().sum() > 0 for g in grads)


def test_fastgan_cgan_trains_d_decoders_on_real_images_with_l1() -> None:
    system, _, batch = _family("cgan_fastgan")
    opts = system.configure_optimizers()
    before = [p.detach().clone() for p in system.D.dec_whole.parameters()]
    out = system.training_step(batch, opts, step=0, generator=torch.Generator().manual_seed(0))
    assert "recon" in out and out["recon"] > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, system.D.dec_whole.parameters()))
    with pytest.raises(ValueError, match="arch"):
        CGAN(classes=CLASSES, image_size=32, arch="stylegan")
    sample = system.eval().sample(3, generator=torch.Generator().manual_seed(0))
    assert sample.shape == (3, 1, 32, 32)


# -- Fixed-Point GAN with R1 and one critic step ------------------------------------------------------


def test_fixed_point_r1_recipe_updates_g_every_step() -> None:
    torch.manual_seed(0)
    m = FixedPointGAN(classes=FINDINGS, image_size=32, adv="bce", lambda_gp=0.0, lambda_r1=1.0, n_critic=1, **TINY_T)
    opts = m.configure_optimizers()
    batch = {"x": _x(), "y": torch.tensor([[1.0, 0], [0, 1], [0, 0], [1, 1]])}
    logs = [m.training_step(batch, opts, step=s, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    assert all("d_r1" in lg and lg["d_r1"] > 0 and "d_gp" not in lg and "g_loss" in lg for lg in logs)
    assert {int(s["step"]) for s in opts["G"].state.values()} == {3}
    wgan = FixedPointGAN(classes=FINDINGS, image_size=32, **TINY_T)  # the paper's recipe stays the default
    assert (wgan.adv, wgan.n_critic, wgan.lambda_gp, wgan.lambda_r1) == ("wgan", 5, 10.0, 0.0)
    assert adversarial.check_kind("bce") == "bce"


def test_resumed_run_with_the_tools_matches_the_uninterrupted_one(tmp_path) -> None:
    from gen_helpers import FakeXrays

    from generators.train import CheckpointConfig, LogConfig, LoopConfig, fit

    def make() -> CGAN:
        torch.manual_seed(0)
        return CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4,
                    fewshot={**FEW, "diffaug_adaptive": True, "diffaug_p": 0.5, "ada_images": 16})

    logs = LogConfig(progress=False)
    full = make()
    fit(full, FakeXrays(), LoopConfig(batch_size=4, max_steps=6, seed=1), logs=logs)
    part = make()
    fit(part, FakeXrays(), LoopConfig(batch_size=4, max_steps=3, seed=1),
        checkpoint=CheckpointConfig(tmp_path, every=3), logs=logs)
    resumed = make()
    fit(resumed, FakeXrays(), LoopConfig(batch_size=4, max_steps=6, seed=1),
        checkpoint=CheckpointConfig(tmp_path, every=3), logs=logs)
    a, b = full.state_dict(), resumed.state_dict()
    assert float(a["reg.p"]) != 0.5  # ADA moved p, and the resumed run carried it on
    assert all(torch.equal(a[k], b[k]) for k in a)
