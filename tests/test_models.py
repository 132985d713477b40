"""The model store: capabilities come from the family class, never from its name."""

from __future__ import annotations

import pytest

from augment.errors import UserError
from augment.models import describe, family_class, model_classes, model_config, peek
from cfg_helpers import full_cfg
from generators.cgan import CGAN
from generators.ucgan import UCGAN

FAMILIES = {
    "generators.cgan.CGAN": ("sampler", True, False),
    "generators.ucgan.UCGAN": ("sampler", False, True),
    "generators.translators.fixed_point.FixedPointGAN": ("translator", True, False),  # translate(x, target)
    "generators.translators.taggan.TagGAN": ("translator", True, False),
    "generators.translators.branched.BranchedGAN": ("translator", True, False),
}


@pytest.mark.parametrize("target", sorted(FAMILIES))
def test_every_family_declares_its_capabilities(target):
    cls = family_class(target)
    kind, conditional, adds_no_finding = FAMILIES[target]
    assert (cls.kind, bool(cls.conditional), bool(cls.adds_no_finding)) == (kind, conditional, adds_no_finding)


def test_model_classes_read_the_class_attribute_not_the_name(monkeypatch):
    cgan_cfg = full_cfg("generator=cgan")["generator"]
    assert model_classes(cgan_cfg, ["Edema"]) == ["Edema"]
    ucgan = model_config(full_cfg("generator=ucgan")["generator"], ["Edema", "Hernia"])
    assert ucgan["classes"] == ["Edema", "Hernia", "No Finding"] and ucgan["classifier"]["num_classes"] == 3
    # a family that says it adds a No Finding class gets one, whatever its name
    monkeypatch.setattr(CGAN, "adds_no_finding", True)
    assert model_classes(cgan_cfg, ["Edema"]) == ["Edema", "No Finding"]


def test_targets_outside_the_allow_list_are_refused():
    with pytest.raises(UserError, match="refusing to instantiate"):
        family_class("os.system")
    with pytest.raises(UserError, match="refusing to instantiate"):  # exact names, not a package prefix
        family_class("generators.cgan.NoSuchFamily")
    with pytest.raises(UserError, match="no _target_"):
        family_class(None)


def test_describe_reads_metadata_and_capabilities(tmp_path, monkeypatch):
    import torch

    from augment.config import build
    from generators.checkpoint import save_checkpoint

    cfg = model_config(full_cfg("generator=ucgan", "generator.g_channels=4", "generator.d_channels=4",
                                "generator.z_dim=8", "classifier=tiny")["generator"], ["Edema"])
    cfg["image_size"] = 32
    system = build(cfg)
    path = tmp_path / "ucgan" / "checkpoint.pt"
    save_checkpoint(path, {"model_cfg": cfg, "classes": cfg["classes"], "image_size": 32, "step": 7,
                           "state_dict": system.state_dict()})
    info = describe(path)
    assert (info.family, info.kind, info.conditional, info.step, info.image_size) == ("ucgan", "sampler", False, 7, 32)
    assert info.findings == ["Edema"]
    monkeypatch.setattr(UCGAN, "conditional", True)  # the capability is read from the class
    assert describe(path).conditional is True
    assert isinstance(peek(path)["state_dict"], dict)
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(UserError, match="corrupt, truncated or not a checkpoint"):
        peek(bad)
    torch.save({"weights": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(UserError, match="no model_cfg"):
        peek(tmp_path / "plain.pt")


def _tiny_cgan_checkpoint(path, **extra):
    from augment.config import build
    from generators.checkpoint import save_checkpoint

    cfg = model_config(full_cfg("generator=cgan", "generator.g_channels=4", "generator.d_channels=4",
                                "generator.z_dim=8")["generator"], ["Edema"])
    cfg["image_size"] = 32
    system = build(cfg)
    save_checkpoint(path, {"model_cfg": cfg, "classes": cfg["classes"], "image_size": 32, "step": 1,
                           "state_dict": system.state_dict(), **extra})
    return path


def test_unreadable_checkpoints_are_one_line_saying_why(tmp_path):
    from augment.models import load_model

    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    for reader in (peek, load_model):
        with pytest.raises(UserError, match="the file is empty") as exc:
            reader(empty)
        assert "\n" not in str(exc.value)
    good = _tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(UserError, match="corrupt, truncated") as exc:
        load_model(truncated)
    assert "\n" not in str(exc.value) and "\x1b" not in str(exc.value)


def test_a_pickle_checkpoint_is_refused_without_running_it(tmp_path):
    import torch

    from augment.models import load_model

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    ckpt = torch.load(_tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt"), weights_only=True)
    ckpt["extra"] = Evil()
    torch.save(ckpt, tmp_path / "evil.pt")
    for reader in (peek, load_model):
        with pytest.raises(UserError, match="pickled Python objects"):
            reader(tmp_path / "evil.pt")
    assert not marker.exists()


def test_describe_checks_the_kind_and_the_family(tmp_path):
    path = _tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt")
    assert describe(path, kind="sampler", family="cgan").conditional is True
    with pytest.raises(UserError, match="holds a sampler .*not a translator"):
        describe(path, kind="translator")
    with pytest.raises(UserError, match="holds a CGAN, not a ucgan"):
        describe(path, family="ucgan")


def test_classifier_meta_refuses_a_gan_checkpoint(tmp_path):
    from augment.models import classifier_meta

    with pytest.raises(UserError, match="not a classifier checkpoint .*a sampler"):
        classifier_meta(_tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt"))


def test_weights_that_do_not_fit_are_one_line(tmp_path):
    import torch

    from augment.models import load_model

    path = _tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["state_dict"] = {"w": torch.zeros(2)}
    from generators.checkpoint import save_checkpoint

    save_checkpoint(path, ckpt)
    with pytest.raises(UserError, match="cannot rebuild the model"):
        load_model(path, kind="sampler")


FAMILY_GROUPS = {"cgan": "generator", "ucgan": "generator", "fixed_point": "translator", "taggan": "translator",
                 "branched": "translator"}


@pytest.mark.parametrize("family", sorted(FAMILY_GROUPS))
def test_the_fewshot_mapping_of_each_family_yaml_reaches_its_discriminator(family):
    """The YAML's ``fewshot:`` is handed whole to make_regulariser: off by override (the CGAN ships with
    DiffAugment + LeCam 0.1, issue 17's choice; the others ship off), on by one override."""
    from augment.config import build

    group = FAMILY_GROUPS[family]
    tiny = [f"{group}={family}", "classifier=tiny"]
    shipped = full_cfg(*tiny)[group]["fewshot"]
    if family == "cgan":
        assert shipped["diffaug"] == "translation,cutout,brightness,contrast" and shipped["lecam_weight"] == 0.1
    else:
        assert shipped["diffaug"] is None and shipped["lecam_weight"] == 0.0
    off = full_cfg(*tiny, f"{group}.fewshot.diffaug=null", f"{group}.fewshot.lecam_weight=0")[group]
    assert set(off["fewshot"]) == {"diffaug", "diffaug_p", "diffaug_adaptive", "ada_target", "ada_images",
                                   "lecam_weight", "lecam_decay"}
    on = full_cfg(*tiny, f"{group}.fewshot.diffaug=translation", f"{group}.fewshot.lecam_weight=0.25")[group]
    regs = {}
    for name, cfg in (("off", off), ("on", on)):
        system = build(model_config(cfg, ["Edema"]))
        regs[name] = getattr(system, "reg_normal", None) if family == "taggan" else system.reg  # None = no tools
    assert regs["off"] is None
    reg = regs["on"]
    assert reg.active and reg.lecam_weight == 0.25 and list(reg.policy) == ["translation"]


def test_a_checkpoint_with_the_old_flat_fewshot_keys_still_loads(tmp_path):
    """Checkpoints written while the few-shot keywords sat at the top of the config keep loading."""
    import torch

    from augment.config import build
    from augment.models import load_model, upgrade_model_cfg

    path = _tiny_cgan_checkpoint(tmp_path / "cgan" / "checkpoint.pt")
    ckpt = torch.load(path, weights_only=True)
    fewshot = ckpt["model_cfg"].pop("fewshot")
    ckpt["model_cfg"].update({**fewshot, "lecam_weight": 0.5})  # the old shape, with LeCam on
    ckpt["state_dict"] = build(upgrade_model_cfg(ckpt["model_cfg"])).state_dict()  # with LeCam's anchors
    torch.save(ckpt, path)
    system, _ = load_model(path)
    assert system.reg is not None and system.reg.lecam_weight == 0.5
    assert upgrade_model_cfg({"a": 1}) == {"a": 1}
