"""Translators (Fixed-Point GAN, TagGAN, Branched GANs): one step at 32 px with tiny widths, the
inference contract, and each loss on hand-made tensors."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from generators.base import GANSystem, Translation, Translator
from generators.translators import BranchedGAN, FixedPointGAN, TagGAN
from generators.translators import branched as br
from generators.translators import fixed_point as fp
from generators.translators import taggan as tg
from generators.translators.common import complementary_targets, sample_targets
from generators.translators.losses import domain_loss
from generators.translators.nets import UNetGenerator, bounded_residual, check_bottleneck

FINDINGS = ["Edema", "Mass", "Pneumothorax"]
SIZE = 32
TINY = {"g_width": 4, "d_width": 4, "n_res": 1, "n_down": 2}


def make(family: str, **kw) -> nn.Module:
    torch.manual_seed(0)  # tests may seed; the library never does
    if family == "fixed_point":
        return FixedPointGAN(classes=FINDINGS, image_size=SIZE, **{**TINY, **kw})
    if family == "taggan":
        return TagGAN(classes=FINDINGS, image_size=SIZE, **{**TINY, **kw})
    return BranchedGAN(classes=FINDINGS, image_size=SIZE, **{"n_branches": 3, **TINY, **kw})


def batch(b: int = 4, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 1, SIZE, SIZE, generator=g) * 2 - 1
    y = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, float("nan")], [1, 0, 1]])[:b]
    return {"x": x, "y": y}


def snapshot(m: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


def changed(before: dict[str, torch.Tensor], m: nn.Module) -> bool:
    return any(not torch.equal(before[k], v) for k, v in m.state_dict().items() if v.is_floating_point())


FAMILIES = ["fixed_point", "taggan", "branched"]


# -- contract shared by every family ------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_one_step_finite_and_updates_every_network(family: str) -> None:
    sys_ = make(family)
    assert isinstance(sys_, GANSystem) and isinstance(sys_, Translator)
    opts = sys_.configure_optimizers()
    names = ["G", "G_back", "D_normal", "D_abnormal"] if family == "taggan" else ["G", "D"]
    nets = {name: getattr(sys_, name) for name in names}
    before = {k: snapshot(m) for k, m in nets.items()}
    logs = sys_.training_step(batch(), opts, step=0, generator=torch.Generator().manual_seed(3))
    assert logs and all(isinstance(v, float) and math.isfinite(v) for v in logs.values()), logs
    assert "g_loss" in logs and "d_loss" in logs
    for name, m in nets.items():
        assert changed(before[name], m), f"{name} was not updated"


@pytest.mark.parametrize("family", FAMILIES)
def test_training_step_leaves_global_rng_alone_and_is_reproducible(family: str) -> None:
    results = []
    for _ in range(2):
        sys_ = make(family)
        opts = sys_.configure_optimizers()
        state = torch.random.get_rng_state()
        logs = sys_.training_step(batch(), opts, step=0, generator=torch.Generator().manual_seed(7))
        assert torch.equal(state, torch.random.get_rng_state()), "training_step drew from the global RNG"
        results.append(logs)
    assert results[0] == results[1]


@pytest.mark.parametrize("family", FAMILIES)
def test_translate_contract(family: str) -> None:
    sys_ = make(family)
    x = batch()["x"]
    out = sys_.translate(x, torch.zeros(4, len(FINDINGS)))
    assert isinstance(out, Translation) and out.mask is None
    assert out.image.shape == x.shape and out.diff_map.shape == x.shape
    assert out.image.min() >= -1.0 and out.image.max() <= 1.0
    assert torch.equal(out.diff_map, x - out.image)
    grid = sys_.sample_grid(batch())  # rows of 8: input / healed / difference, padded with black
    assert grid.shape == (24, 1, SIZE, SIZE)
    assert torch.equal(grid[:4], x) and torch.equal(grid[8:12], out.image)
    assert torch.equal(grid[16:20], (x - out.image) / (x - out.image).abs().max())
    assert torch.all(grid[4:8] == -1) and torch.all(grid[20:] == -1)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_generator_loss_term_reaches_G(family: str) -> None:
    sys_ = make(family)
    b = batch()
    x, c_x = b["x"], torch.nan_to_num(b["y"])
    c_t = complementary_targets(c_x, generator=torch.Generator().manual_seed(0))
    if family == "fixed_point":
        terms = sys_.generator_terms(x, c_x, c_t)
    elif family == "taggan":
        terms = sys_.generator_terms(x, c_x, torch.ones_like(c_x))
    else:
        terms = sys_.generator_terms(x, c_x, c_t, torch.tensor([0.3, 0.6]))
    assert set(terms) == set(sys_.generator_weights())
    params = list(sys_.G.parameters())
    for name, term in terms.items():
        grads = torch.autograd.grad(term, params, retain_graph=True, allow_unused=True)
        total = sum(float(g.abs().sum()) for g in grads if g is not None)
        assert total > 0, f"{name} does not reach G"


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="n_down"):
        FixedPointGAN(classes=FINDINGS, image_size=32, n_down=5)
    with pytest.raises(ValueError, match="power of two"):
        check_bottleneck(48, 2)
    with pytest.raises(ValueError, match="unknown adversarial loss 'nope'"):
        TagGAN(classes=FINDINGS, image_size=32, adv="nope")


# -- shared nets and losses ---------------------------------------------------------------------------


def test_bounded_residual_identity_and_range() -> None:
    x = torch.tensor([-1.0, -0.5, 0.0, 0.5, 1.0])
    assert torch.equal(bounded_residual(x, torch.zeros(5)), x)  # saturated pixels included
    hi = bounded_residual(x, torch.full((5,), 50.0))
    lo = bounded_residual(x, torch.full((5,), -50.0))
    assert torch.allclose(hi, torch.ones(5)) and torch.allclose(lo, -torch.ones(5))
    mid = bounded_residual(torch.tensor([0.0]), torch.atanh(torch.tensor([0.5])))
    assert mid.item() == pytest.approx(0.5)  # halfway from 0 to white


def test_unet_condition_changes_output_and_skips_shape() -> None:
    torch.manual_seed(0)
    net = UNetGenerator(cond_dim=3, width=4, n_down=2, n_res=1, skips=True)
    x = torch.rand(2, 1, 32, 32)
    a = net(x, torch.zeros(2, 3))
    b = net(x, torch.ones(2, 3))
    assert a.shape == (2, 1, 32, 32) and not torch.allclose(a, b)
    with pytest.raises(ValueError, match="pass c"):
        net(x)


def test_domain_loss_hand_value_and_shape_check() -> None:
    assert domain_loss(torch.zeros(2, 3), torch.ones(2, 3)).item() == pytest.approx(3 * math.log(2))
    confident = domain_loss(torch.tensor([[9.0, -9.0]]), torch.tensor([[1.0, 0.0]]))
    assert confident.item() < 1e-3
    with pytest.raises(ValueError):
        domain_loss(torch.zeros(2, 3), torch.zeros(2, 2))


def test_target_sampling_uses_the_generator() -> None:
    y = torch.eye(4)[:, :3]
    t1 = sample_targets(y, generator=torch.Generator().manual_seed(5), p_healthy=0.0)
    t2 = sample_targets(y, generator=torch.Generator().manual_seed(5), p_healthy=0.0)
    assert torch.equal(t1, t2)
    assert sorted(map(tuple, t1.tolist())) == sorted(map(tuple, y.tolist()))  # a permutation of the rows
    assert torch.equal(sample_targets(y, generator=torch.Generator(), p_healthy=1.0), torch.zeros_like(y))
    y2 = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0]])
    c = complementary_targets(y2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(c, torch.tensor([[0.0, 0, 0], [1, 0, 0], [1, 0, 0]]))
    c = complementary_targets(torch.zeros(3, 3), generator=torch.Generator().manual_seed(0))
    assert torch.equal(c.sum(1), torch.ones(3))  # one random finding each when the batch has none


# -- Fixed-Point GAN ----------------------------------------------------------------------------------


def test_fixed_point_identity_loss_zero_for_identity_G_positive_otherwise() -> None:
    sys_ = make("fixed_point")
    x, c_x = batch()["x"], torch.nan_to_num(batch()["y"])
    assert fp.identity_loss(x, sys_.G(x, c_x)).item() > 0
    nn.init.zeros_(sys_.G.net.head.weight)
    nn.init.zeros_(sys_.G.net.head.bias)  # raw output 0 -> G(x, c) = x exactly
    same = sys_.G(x, c_x)
    assert torch.equal(same, x)
    assert fp.identity_loss(x, same).item() == 0.0
    terms = sys_.generator_terms(x, c_x, torch.zeros_like(c_x))
    assert terms["g_id"].item() == 0.0 and terms["g_cyc"].item() == 0.0


def test_fixed_point_cycle_loss_hand_value() -> None:
    x = torch.zeros(1, 1, 2, 2)
    assert fp.cycle_loss(x, [x + 0.5, x - 0.25]).item() == pytest.approx(0.75)
    with pytest.raises(ValueError):
        fp.cycle_loss(x, [])


def test_stargan_ablation_drops_same_domain_terms() -> None:
    calls = {"fp": 0, "star": 0}
    for key, use_id in (("fp", True), ("star", False)):
        sys_ = make("fixed_point", use_identity=use_id)
        sys_.G.register_forward_hook(lambda *_, k=key: calls.__setitem__(k, calls[k] + 1))
        b = batch()
        terms = sys_.generator_terms(b["x"], torch.nan_to_num(b["y"]), torch.zeros(4, 3))
        if not use_id:
            assert terms["g_id"].item() == 0.0 and sys_.generator_weights()["g_id"] == 0.0
    assert calls == {"fp": 4, "star": 2}  # G(x,c_y), G(G(x,c_y),c_x) [+ G(x,c_x), G(G(x,c_x),c_x)]


def test_fixed_point_n_critic_schedules_G() -> None:
    sys_ = make("fixed_point", n_critic=2)
    opts = sys_.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    before = snapshot(sys_.G)
    logs = sys_.training_step(batch(), opts, step=1, generator=g)
    assert "g_loss" not in logs and not changed(before, sys_.G)
    logs = sys_.training_step(batch(), opts, step=2, generator=g)
    assert "g_loss" in logs and changed(before, sys_.G)


# -- TagGAN ---------------------------------------------------------------------------------------------


def test_taggan_y_is_x_minus_M_exactly() -> None:
    sys_ = make("taggan")
    x = batch()["x"]
    target = torch.tensor([[0.0, 0, 0], [0, 1, 0], [0, 0, 0], [1, 0, 0]])
    m = sys_.G(x, 1.0 - target).detach()
    out = sys_.translate(x, target)
    assert torch.equal(out.image, x - m)
    assert torch.allclose(out.diff_map, m, atol=1e-6)
    assert torch.equal(tg.subtract_map(x, m), x - m)


def test_taggan_map_keeps_y_in_range_and_cycle_loss() -> None:
    x = torch.linspace(-1, 1, 9)
    for raw in (torch.full((9,), 30.0), torch.full((9,), -30.0), torch.linspace(-3, 3, 9)):
        y = x - tg.bounded_disease_map(x, raw)
        assert y.min() >= -1.0 - 1e-6 and y.max() <= 1.0 + 1e-6
    assert torch.equal(tg.bounded_disease_map(x, torch.zeros(9)), torch.zeros(9))
    assert tg.cycle_loss(torch.zeros(2, 1, 2, 2), torch.full((2, 1, 2, 2), 0.3)).item() == pytest.approx(0.3)


def test_taggan_removal_targets_are_supersets() -> None:
    c_x = torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 1, 1]] * 20)
    c = tg.removal_targets(c_x, generator=torch.Generator().manual_seed(0))
    assert torch.all(c >= c_x) and set(c.unique().tolist()) <= {0.0, 1.0}
    assert (c > c_x).any() and (c == c_x).all(1).any()  # both extras and exact labels occur


def test_taggan_normal_bank_feeds_D_normal_when_batch_has_no_normals() -> None:
    sys_ = make("taggan")
    opts = sys_.configure_optimizers()
    g = torch.Generator().manual_seed(0)
    abnormal = {"x": batch()["x"], "y": torch.ones(4, 3)}
    assert "d_normal" not in sys_.training_step(abnormal, opts, step=0, generator=g)
    sys_.training_step(batch(), opts, step=1, generator=g)  # has one normal -> banked
    assert "d_normal" in sys_.training_step(abnormal, opts, step=2, generator=g)


def test_taggan_without_backward_cycle() -> None:
    sys_ = make("taggan", use_backward_cycle=False)
    assert not hasattr(sys_, "G_back") and not hasattr(sys_, "D_abnormal")
    logs = sys_.training_step(batch(), sys_.configure_optimizers(), step=0, generator=torch.Generator())
    assert "g_cyc" not in logs and math.isfinite(logs["g_loss"])


def test_taggan_without_backward_cycle_trains_before_its_first_normal() -> None:
    """No normal in the batch and none banked yet: D_Normal has no real to compare, so D waits (it
    used to raise 'element 0 of tensors does not require grad') while G still steps."""
    sys_ = make("taggan", use_backward_cycle=False)
    opts = sys_.configure_optimizers()
    d_before, g_before = snapshot(sys_.D_normal), snapshot(sys_.G)
    abnormal = {"x": batch()["x"], "y": torch.ones(4, 3)}
    logs = sys_.training_step(abnormal, opts, step=0, generator=torch.Generator().manual_seed(0))
    assert "d_normal" not in logs and math.isfinite(logs["g_loss"])
    assert not changed(d_before, sys_.D_normal) and changed(g_before, sys_.G)
    assert "d_normal" in sys_.training_step(batch(), opts, step=1, generator=torch.Generator().manual_seed(1))


# -- Branched GANs ------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 5])
def test_branched_n_branches_sum_to_reconstruction_and_train(n: int) -> None:
    sys_ = make("branched", n_branches=n, g_width=2)
    x = batch()["x"]
    c = torch.zeros(4, 3)
    psi = sys_.decompose(x, c)
    assert psi.shape == (4, n, 1, SIZE, SIZE)
    assert psi.abs().max() <= 1.0
    assert torch.allclose(psi.sum(1), sys_.reconstruct(x, c))
    assert torch.equal(sys_.translate(x, c).image, sys_.reconstruct(x, c).clamp(-1, 1))
    logs = sys_.training_step(batch(), sys_.configure_optimizers(), step=0, generator=torch.Generator())
    assert all(math.isfinite(v) for v in logs.values())


def test_alpha_blend_eq4() -> None:
    own = torch.randn(2, 3, 1, 4, 4)
    other = torch.randn(2, 3, 1, 4, 4)
    assert torch.allclose(br.alpha_blend(own, other, torch.ones(2)), br.compose(own))
    assert torch.allclose(br.alpha_blend(own, other, torch.zeros(2)), own[:, 0] + other[:, 1:].sum(1))
    half = br.alpha_blend(own, other, torch.tensor([0.5, 0.25]))
    expect = own[:, 0] + 0.5 * own[:, 1] + 0.5 * other[:, 1] + 0.25 * own[:, 2] + 0.75 * other[:, 2]
    assert torch.allclose(half, expect)
    with pytest.raises(ValueError):
        br.alpha_blend(own, other, torch.ones(3))


def test_branched_reconstruction_losses_hand_values() -> None:
    x = torch.zeros(1, 1, 4, 4)
    assert br.rec_loss(x, x + 0.5).item() == pytest.approx(0.75)
    assert br.grad_rec_loss(x, x + 0.5).item() == pytest.approx(0.0)  # a constant has no gradient
    ramp = torch.arange(4.0).view(1, 1, 1, 4).expand(1, 1, 4, 4)
    assert br.grad_rec_loss(x, ramp).item() == pytest.approx(2.0)  # d/dx = 1 everywhere: 1 + 1
    psi1 = torch.zeros(1, 1, 4, 4)
    psi1[..., 0, 0] = 1.0  # I selects only the top-left pixel
    x_hat = torch.zeros(1, 1, 4, 4)
    x_hat[..., 0, 0] = 0.5
    x_hat[..., 3, 3] = 0.9  # outside I: ignored
    assert br.dis_rec_loss(x, x_hat, psi1).item() == pytest.approx(0.75)
    assert br.dis_rec_loss(x, x, torch.zeros(1, 1, 4, 4)).item() == 0.0


def test_branched_specialisation_sparsity_energy_hand_values() -> None:
    one = torch.zeros(1, 2, 1, 2, 2)
    one[:, 0] = 0.7  # a single non-zero branch per pixel
    assert br.specialisation_loss(one).item() == pytest.approx(0.0)
    both = torch.ones(1, 2, 1, 2, 2)  # sum psi^2 = 2, (sum psi)^2 = 4
    assert br.specialisation_loss(both).item() == pytest.approx(4.0)
    assert br.sparsity_loss(torch.tensor([[-0.5, 0.25]])).item() == pytest.approx(0.375)
    equal = torch.ones(1, 3, 1, 2, 2)
    assert br.energy_balance_loss(equal).item() == pytest.approx(0.0)
    unequal = equal.clone()
    unequal[:, 2] = 0.0  # energies 1 and 0: var 0.25 / mean^2 0.25
    assert br.energy_balance_loss(unequal).item() == pytest.approx(1.0)
    assert br.energy_balance_loss(torch.ones(1, 2, 1, 2, 2)).item() == 0.0


def test_select_domain_multi_task_output() -> None:
    adv = torch.arange(4.0).view(1, 4, 1, 1).repeat(3, 1, 1, 1)  # outputs 0,1,2 findings; 3 No Finding
    c = torch.tensor([[1.0, 0, 0], [0, 1, 1], [0, 0, 0]])
    assert br.select_domain(adv, c).flatten().tolist() == [0.0, 1.5, 3.0]
