"""augment.data.mixing: per-batch ratio, epoch coverage, xi weights reaching the classifier loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from augment.data.mixing import MixedBatchSampler, MixedDataset
from cxrbase import collate
from classifiers.train import masked_bce_with_logits, train_classifier


@pytest.fixture(autouse=True)
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Items(Dataset):
    """Items in the classifier contract; ``bright`` images carry label 1 (or ``flip`` it)."""

    def __init__(self, n: int, *, seed: int, classes=("Edema",), flip: bool = False, size: int = 8) -> None:
        rng = np.random.default_rng(seed)
        self.classes = list(classes)
        pos = rng.random(n) < 0.5
        self.images = rng.integers(0, 100, size=(n, 1, size, size), dtype=np.uint8)
        self.images[pos] += 120
        self.labels = np.repeat((pos != flip).astype(np.float32)[:, None], len(classes), 1)

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        return {"image": torch.from_numpy(self.images[i].copy()), "labels": torch.from_numpy(self.labels[i].copy())}


@pytest.mark.parametrize(("ratio", "n_syn"), [(1.0, 8), (0.5, 5), (3.0, 12), (0.0, 0)])
def test_every_batch_keeps_the_ratio_and_every_real_image_appears(ratio: float, n_syn: int) -> None:
    n_real, n_synthetic, bs = 50, 200, 16
    sampler = MixedBatchSampler(n_real, n_synthetic, batch_size=bs, ratio=ratio,
                                generator=torch.Generator().manual_seed(0))
    assert sampler.n_syn_per_batch == n_syn == round(bs * ratio / (1 + ratio))
    batches = list(sampler)
    assert len(batches) == len(sampler) == math.ceil(n_real / (bs - n_syn))
    for batch in batches:
        assert len(batch) == bs
        assert sum(i >= n_real for i in batch) == n_syn
        assert all(0 <= i < n_real + n_synthetic for i in batch)
    real_seen = [i for b in batches for i in b if i < n_real]
    assert set(real_seen) == set(range(n_real))
    assert len(real_seen) - n_real < bs - n_syn  # only the last batch is topped up
    syn_seen = [i for b in batches for i in b if i >= n_real]
    assert len(set(syn_seen)) == len(syn_seen)  # synthetic drawn without repeats within a pass


def test_sampler_is_deterministic_per_generator_and_epochs_differ() -> None:
    def make(seed: int) -> MixedBatchSampler:
        return MixedBatchSampler(30, 30, batch_size=8, ratio=1.0, generator=torch.Generator().manual_seed(seed),
                                 num_batches=5)

    a, b = make(1), make(1)
    first_a, first_b = list(a), list(b)
    assert first_a == first_b and len(first_a) == 5
    assert list(a) != first_a  # the next epoch continues the generator
    assert list(make(2)) != first_a


def test_sampler_errors() -> None:
    g = torch.Generator()
    with pytest.raises(ValueError, match="no real image"):
        MixedBatchSampler(10, 10, batch_size=4, ratio=100.0, generator=g)
    with pytest.raises(ValueError, match="none"):
        MixedBatchSampler(10, 0, batch_size=4, ratio=1.0, generator=g)
    with pytest.raises(ValueError, match="real"):
        MixedBatchSampler(0, 10, batch_size=4, ratio=1.0, generator=g)


def test_mixed_dataset_weights_and_layout() -> None:
    real, syn = Items(5, seed=0), Items(3, seed=1)
    ds = MixedDataset(real, syn, xi=0.25)
    assert len(ds) == 8 and ds.classes == ["Edema"]
    assert [ds[i]["weight"].item() for i in range(8)] == [1.0] * 5 + [0.25] * 3
    assert torch.equal(ds[6]["image"], syn[1]["image"]) and torch.equal(ds[2]["image"], real[2]["image"])
    assert ds.label_matrix().shape == (8, 1)
    assert [ds.is_synthetic(i) for i in (4, 5)] == [False, True]
    with pytest.raises(ValueError, match="classes"):
        MixedDataset(real, Items(3, seed=1, classes=("Hernia",)), xi=1.0)
    with pytest.raises(ValueError, match="image"):
        MixedDataset(real, Items(3, seed=1, size=16), xi=1.0)
    with pytest.raises(ValueError, match="xi"):
        MixedDataset(real, syn, xi=-1.0)


def _grad(model: nn.Module, batch: dict) -> torch.Tensor:
    model.zero_grad()
    x = batch["image"].float() / 127.5 - 1
    masked_bce_with_logits(model(x), batch["labels"], batch["weight"]).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_weights_reach_the_loss() -> None:
    real, syn = Items(6, seed=0), Items(6, seed=1, flip=True)  # synthetic labels contradict the real ones
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
    real_only = _grad(model, collate([real[i] for i in range(6)]))
    for xi, same in ((0.0, True), (0.5, False)):
        ds = MixedDataset(real, syn, xi=xi)
        mixed = _grad(model, collate([ds[i] for i in range(12)]))
        assert torch.allclose(mixed, real_only, atol=1e-7) == same


def test_training_with_zero_xi_equals_training_on_real_alone() -> None:
    """End to end through the classifier loop: synthetic items with weight 0 change no weight."""
    real, syn = Items(40, seed=0), Items(40, seed=1, flip=True)
    mixed_ds = MixedDataset(real, syn, xi=0.0)
    batches = list(MixedBatchSampler(40, 40, batch_size=10, ratio=1.0, generator=torch.Generator().manual_seed(0)))
    real_batches = [[i for i in b if i < 40] for b in batches]

    def fit(ds: Dataset, sampler: list[list[int]]) -> nn.Module:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Flatten(), nn.Linear(64, 1))
        train_classifier(model, ds, None, epochs=2, batch_size=10, lr=1e-2, sampler=sampler, progress=False)
        return model

    a, b = fit(mixed_ds, batches), fit(real, real_batches)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.allclose(pa, pb, atol=1e-6)
    c = fit(MixedDataset(real, syn, xi=1.0), batches)
    assert not torch.allclose(a[1].weight, c[1].weight, atol=1e-4)


def test_real_weights_balance_the_real_part_and_keep_the_ratio() -> None:
    # 90 real items of which 10 positive: with balanced weights the positives fill about half of the real slots
    labels = np.zeros((90, 1), dtype=np.float32)
    labels[:10] = 1
    from cxrbase import balanced_weights

    w = balanced_weights(labels)
    s = MixedBatchSampler(90, 30, batch_size=16, ratio=1.0, generator=torch.Generator().manual_seed(0),
                          real_weights=w, num_batches=200)
    real = [i for b in s for i in b if i < 90]
    syn = [i for b in s for i in b if i >= 90]
    assert len(real) == len(syn) == 200 * 8
    share = np.mean(np.array(real) < 10)
    assert 0.4 < share < 0.6  # without weights it would be about 10/90
    with pytest.raises(ValueError, match="real_weights"):
        MixedBatchSampler(90, 30, batch_size=16, ratio=1.0, generator=torch.Generator(), real_weights=w[:5])


def test_slot_generator_keeps_the_real_part_the_same_whatever_fills_the_slot() -> None:
    """The arms of one seed see the same real images: with a separate slot generator the real
    indices depend on the real generator alone (an arm without a slot draws them too)."""
    def real_parts(n_syn: int, ratio: float, batch: int, weights=None) -> list[list[int]]:
        s = MixedBatchSampler(30, n_syn, batch_size=batch, ratio=ratio, generator=torch.Generator().manual_seed(5),
                              slot_generator=torch.Generator().manual_seed(9), num_batches=12, real_weights=weights)
        return [[i for i in b if i < 30] for b in s]

    with_slot = real_parts(7, 0.5, 12)
    assert all(len(b) == 8 for b in with_slot)
    assert real_parts(0, 0.0, 8) == with_slot  # the real arm: 8 real, no slot
    assert real_parts(50, 0.5, 12) == with_slot  # another slot set
    w = [1.0 + (i % 3) for i in range(30)]
    assert real_parts(0, 0.0, 8, w) == real_parts(7, 0.5, 12, w)
    shared = MixedBatchSampler(30, 7, batch_size=12, ratio=0.5, generator=torch.Generator().manual_seed(5), num_batches=12)
    assert [[i for i in b if i < 30] for b in shared] != with_slot  # one generator for both: the slot shifts the real draws


def test_synthetic_weights_draw_the_slot_in_proportion() -> None:
    s = MixedBatchSampler(10, 4, batch_size=4, ratio=1.0, generator=torch.Generator().manual_seed(0),
                          num_batches=500, synthetic_weights=[0.0, 1.0, 0.0, 3.0])
    slot = [i - 10 for b in s for i in b if i >= 10]
    counts = np.bincount(slot, minlength=4)
    assert counts[0] == counts[2] == 0 and 2.5 < counts[3] / counts[1] < 3.5
    with pytest.raises(ValueError, match="synthetic_weights"):
        MixedBatchSampler(10, 4, batch_size=4, ratio=1.0, generator=torch.Generator(), synthetic_weights=[1.0])
