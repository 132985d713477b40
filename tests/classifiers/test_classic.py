"""classifiers.classic: classic augmentation on uint8 batches, and the loop's step budget and augment hook."""

from __future__ import annotations

import pytest
import torch

from classifiers.classic import ClassicAugment
from classifiers.model import create_classifier
from classifiers.train import train_classifier


def _batch() -> torch.Tensor:
    x = torch.zeros(6, 1, 32, 32, dtype=torch.uint8)
    x[:, :, 8:24, 4:12] = 200  # a bright block on the left: a flip would move it right
    return x


def test_same_generator_same_bytes_and_each_image_its_own_draw() -> None:
    aug, x = ClassicAugment(), _batch()
    a = aug(x, torch.Generator().manual_seed(0))
    b = aug(x, torch.Generator().manual_seed(0))
    c = aug(x, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == x.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert not torch.equal(a, x)
    assert len({bytes(a[i].numpy()) for i in range(len(a))}) == len(a)  # per image, not one draw per batch
    assert torch.equal(x, _batch())  # the input is not changed in place


@pytest.mark.parametrize("size", [32, 33])
def test_batched_pass_equals_torchvision_v2_image_by_image(size) -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randint(0, 256, (16, 1, size, size), generator=g, dtype=torch.uint8)
    x[:, :, 5:20, 3:12] = 240
    aug = ClassicAugment(degrees=15, translate=0.1, scale=(0.8, 1.2), brightness=0.3, contrast=0.3)
    batched = aug(x, torch.Generator().manual_seed(11))
    reference = aug.reference(x, torch.Generator().manual_seed(11))
    assert torch.equal(batched, reference)


def test_small_affine_keeps_the_side_no_flip() -> None:
    out = ClassicAugment()(_batch().repeat(20, 1, 1, 1), torch.Generator().manual_seed(3)).float()
    left, right = out[..., :16].sum(dim=(1, 2, 3)), out[..., 16:].sum(dim=(1, 2, 3))
    assert (left > 3 * right).all()  # the bright block stays on its side in every image


def test_identity_settings_change_nothing() -> None:
    x = _batch()
    same = ClassicAugment(degrees=0, translate=0, scale=(1, 1), brightness=0, contrast=0)(x, torch.Generator())
    assert torch.equal(same, x)


def test_bad_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="scale"):
        ClassicAugment(scale=(1.2, 0.9))
    with pytest.raises(ValueError, match="uint8"):
        ClassicAugment()(torch.zeros(2, 1, 8, 8), torch.Generator())


def test_max_steps_is_an_exact_budget_and_augment_sees_every_batch(squares) -> None:
    ds = squares(50, seed=0)
    calls = []

    def spy(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        calls.append(len(images))
        assert isinstance(gen, torch.Generator) and images.dtype == torch.uint8
        return images

    model = create_classifier("tiny", num_classes=2, in_chans=1)
    res = train_classifier(model, ds, None, epochs=100, batch_size=16, device="cpu", max_steps=7, augment=spy,
                           progress=False, amp=False)
    assert res.steps == 7 and len(calls) == 7  # 3 batches per epoch: 2 full epochs and 1 step of a third
    assert len(res.history) == 3
    model = create_classifier("tiny", num_classes=2, in_chans=1)
    assert train_classifier(model, ds, None, epochs=2, batch_size=16, device="cpu", progress=False, amp=False).steps == 6
