"""What each GAN family declares it can do (class attributes read by the model store, never class names)."""

from __future__ import annotations

import pytest
import torch
from gen_helpers import CLASSES, TinyClassifier

from generators.base import Sampler, Translator
from generators.cgan import CGAN
from generators.translators import BranchedGAN, FixedPointGAN, TagGAN
from generators.ucgan import UCGAN

TINY_T = {"g_width": 4, "d_width": 4, "n_res": 1, "n_down": 2}

# family: (kind, conditional, adds_no_finding)
EXPECTED = {
    CGAN: ("sampler", True, False),
    UCGAN: ("sampler", False, True),
    FixedPointGAN: ("translator", True, False),
    TagGAN: ("translator", True, False),
    BranchedGAN: ("translator", True, False),
}


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_capabilities_are_class_attributes(cls: type) -> None:
    kind, conditional, adds_no_finding = EXPECTED[cls]
    # read from the class itself, without building a model
    assert (cls.kind, cls.conditional, cls.adds_no_finding) == (kind, conditional, adds_no_finding)
    assert type(cls.conditional) is bool and type(cls.adds_no_finding) is bool


def _build(cls: type):
    torch.manual_seed(0)
    if cls is CGAN:
        return CGAN(classes=CLASSES, image_size=32, z_dim=8, g_channels=4, d_channels=4)
    if cls is UCGAN:
        return UCGAN(classes=CLASSES, classifier=TinyClassifier(), image_size=32, z_dim=8, g_channels=4, d_channels=4)
    return cls(classes=["Edema", "Mass"], image_size=32, **TINY_T)


@pytest.mark.parametrize("cls", list(EXPECTED), ids=lambda c: c.__name__)
def test_instances_carry_classes_and_size_and_match_their_kind(cls: type) -> None:
    m = _build(cls)
    assert m.image_size == 32 and m.classes
    assert isinstance(m, Sampler if cls.kind == "sampler" else Translator)


def test_conditional_decides_whether_a_sampler_uses_y() -> None:
    g = torch.Generator
    y = torch.eye(3)[[0, 0]]
    for cls in (CGAN, UCGAN):
        m = _build(cls).eval()
        a = m.sample(2, y, generator=g().manual_seed(0))
        b = m.sample(2, torch.eye(3)[[1, 1]], generator=g().manual_seed(0))
        assert torch.equal(a, b) != cls.conditional
