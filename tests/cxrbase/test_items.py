import numpy as np
import pytest
import torch

from cxrbase import balanced_weights, collate, dataset_labels, to_uint8, to_x


def _item(value: int, labels, weight=None, hw: bool = False) -> dict:
    image = torch.full((4, 4) if hw else (1, 4, 4), value, dtype=torch.uint8)
    item = {"image": image, "labels": torch.tensor(labels, dtype=torch.float32), "mask": "ignored"}
    if weight is not None:
        item["weight"] = weight
    return item


def test_collate_stacks_and_defaults_the_weight_to_one():
    batch = collate([_item(0, [1.0, float("nan")]), _item(255, [0.0, 1.0], weight=0.25)])
    assert set(batch) == {"image", "labels", "weight"}
    assert batch["image"].shape == (2, 1, 4, 4) and batch["image"].dtype == torch.uint8
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (2, 2)
    assert torch.isnan(batch["labels"][0, 1])
    assert batch["weight"].dtype == torch.float32
    assert batch["weight"].tolist() == [1.0, 0.25]


def test_collate_gives_hw_images_the_channel_dim():
    batch = collate([_item(3, [1.0], hw=True), _item(4, [0.0], hw=True)])
    assert batch["image"].shape == (2, 1, 4, 4)
    assert batch["image"][1, 0, 0, 0].item() == 4


def test_collate_errors():
    with pytest.raises(ValueError, match="empty"):
        collate([])
    with pytest.raises(KeyError, match="'labels'") as err:
        collate([{"image": torch.zeros(1, 2, 2, dtype=torch.uint8)}])
    assert "dataset items must be dicts" in str(err.value)


def test_to_x_exact_values_and_bit_identity_with_the_division():
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_x(image)
    assert x.dtype == torch.float32
    assert x[0, 0, 0, 0].item() == -1.0 and x.flatten()[-1].item() == 1.0
    assert x.flatten()[0:2].tolist() == [-1.0, pytest.approx(1 / 127.5 - 1.0)]
    assert torch.equal(x, image.float() / 127.5 - 1.0)  # bit for bit, the formula everywhere before
    assert image.dtype == torch.uint8 and image.flatten()[5].item() == 5  # input untouched


def test_to_x_moves_to_device_and_leaves_float_alone():
    x = torch.randn(2, 1, 3, 3, dtype=torch.float64)
    out = to_x(x, "cpu")
    assert out.dtype == torch.float32 and torch.equal(out, x.float())
    cl = to_x(torch.zeros(2, 1, 3, 3, dtype=torch.uint8), torch.device("cpu"), channels_last=True)
    assert cl.is_contiguous(memory_format=torch.channels_last)
    assert cl.device.type == "cpu"


def test_to_uint8_round_trip_and_clamp():
    image = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    back = to_uint8(to_x(image))
    assert back.dtype == np.uint8 and back.shape == (1, 16, 16)
    np.testing.assert_array_equal(back, image.numpy()[:, 0])
    extreme = torch.tensor([-3.0, -1.0, 0.0, 1.0, 5.0, 0.004]).reshape(1, 1, 1, 6)
    assert to_uint8(extreme)[0, 0].tolist() == [0, 0, 128, 255, 255, 128]  # round(127.5)=128 (half to even)


class _Items:
    def __init__(self, labels):
        self._labels = np.asarray(labels, dtype=np.float32)
        self.read = 0

    def __len__(self):
        return len(self._labels)

    def __getitem__(self, i):
        self.read += 1
        return {"image": torch.zeros(1, 2, 2, dtype=torch.uint8), "labels": self._labels[i]}


def test_dataset_labels_prefers_label_matrix_then_labels_then_items():
    base = [[1.0, 0.0], [float("nan"), 1.0]]

    class WithMatrix(_Items):
        labels = np.zeros((2, 2))

        def label_matrix(self):
            return np.ones((2, 2))

    class WithLabels(_Items):
        labels = torch.tensor([[0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)

    ds = WithMatrix(base)
    out = dataset_labels(ds)
    assert out.dtype == np.float32 and out.tolist() == [[1.0, 1.0], [1.0, 1.0]] and ds.read == 0

    ds = WithLabels(base)
    out = dataset_labels(ds)
    assert out.dtype == np.float32 and out.tolist() == [[0.0, 1.0], [1.0, 1.0]] and ds.read == 0

    ds = _Items(base)
    out = dataset_labels(ds)
    assert ds.read == 2 and out.dtype == np.float32
    np.testing.assert_array_equal(out, np.asarray(base, dtype=np.float32))


def test_dataset_labels_ignores_a_labels_attribute_of_the_wrong_length():
    class Short(_Items):
        labels = np.zeros((1, 2))

    ds = Short([[1.0, 1.0], [0.0, 1.0]])
    assert dataset_labels(ds).tolist() == [[1.0, 1.0], [0.0, 1.0]] and ds.read == 2


def test_balanced_weights_equalise_classes():
    nan = float("nan")
    labels = np.array([[1, 0]] * 6 + [[0, 1]] * 2 + [[1, 1]] + [[0, 0]] * 3 + [[nan, 0]], dtype=np.float32)
    w = balanced_weights(labels)
    assert w.dtype == np.float64 and w.shape == (13,)
    # class 0 has 7 positives, class 1 has 3; the [1, 1] row takes its rarest class (1 / 3).
    np.testing.assert_allclose(w[:6], 1 / 7)
    np.testing.assert_allclose(w[6:9], 1 / 3)
    np.testing.assert_allclose(w[9:], 1 / 4)  # NaN counts as not positive: 4 rows with no positive
    # each group (rows whose rarest positive is class c, and the no-positive group) has the same mass
    # up to the shared row; with disjoint groups it is exact:
    disjoint = np.array([[1, 0]] * 5 + [[0, 1]] * 2 + [[0, 0]] * 9, dtype=np.float32)
    wd = balanced_weights(disjoint)
    assert wd[:5].sum() == pytest.approx(1.0) and wd[5:7].sum() == pytest.approx(1.0)
    assert wd[7:].sum() == pytest.approx(1.0)


def test_balanced_weights_equal_mass_for_a_rare_class_and_nan_rows():
    nan = float("nan")
    labels = np.array([[1, 0]] * 2 + [[0, 1]] * 8 + [[0, 0]] * 90 + [[nan, 0]] * 4, dtype=np.float32)
    w = balanced_weights(labels)
    assert [w[:2].sum(), w[2:10].sum(), w[10:].sum()] == pytest.approx([1.0, 1.0, 1.0])


def test_balanced_weights_without_classes():
    w = balanced_weights(np.zeros((3, 0), dtype=np.float32))
    np.testing.assert_allclose(w, [1 / 3] * 3)
