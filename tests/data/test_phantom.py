"""The procedural phantom: determinism, pairing, mask placement, prevalence, sizes, subtlety."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from augment.data import labels
from augment.data import phantom as ph

N_CASES = 24  # forced cases per finding in the placement tests (64 px: a few ms each)


def _union(case: ph.PhantomCase) -> np.ndarray:
    out = np.zeros(case.image.shape, bool)
    for m in case.masks.values():
        out |= m
    return out


def _centroid(mask: np.ndarray) -> tuple[float, float]:
    """(row, column) centre of mass as a fraction of the image side."""
    ys, xs = np.nonzero(mask)
    return ys.mean() / mask.shape[0], xs.mean() / mask.shape[1]


@pytest.fixture(scope="module")
def forced() -> dict[str, list[ph.PhantomCase]]:
    return {f: [ph.render(i, size=64, force=[f]) for i in range(N_CASES)] for f in ph.PHANTOM_FINDINGS}


def _auc(pos: np.ndarray, neg: np.ndarray) -> float:
    gt = (pos[:, None] > neg[None, :]).mean()
    eq = (pos[:, None] == neg[None, :]).mean()
    return float(gt + 0.5 * eq)


# ----------------------------------------------------------------------------- API and vocabulary


def test_findings_are_canonical_and_prevalence_covers_them() -> None:
    assert set(ph.PHANTOM_FINDINGS) <= set(labels.FINDINGS)
    assert {"Edema", "Hernia", "Pneumonia", "Effusion", "Mass", "Nodule", "Cardiomegaly", "Pneumothorax",
            "Atelectasis"} <= set(ph.PHANTOM_FINDINGS)
    assert set(ph.DEFAULT_PREVALENCE) == set(ph.PHANTOM_FINDINGS)
    assert all(0 < p <= 1 for p in ph.DEFAULT_PREVALENCE.values())
    rarest = min(ph.DEFAULT_PREVALENCE, key=ph.DEFAULT_PREVALENCE.get)
    assert rarest == "Hernia"


def test_case_types_and_shapes() -> None:
    case = ph.render(3, size=64, force=["Effusion", "Nodule"])
    assert case.image.dtype == np.uint8 and case.image.shape == (64, 64)
    assert case.healthy.dtype == np.uint8 and case.healthy.shape == (64, 64)
    assert case.findings == ["Effusion", "Nodule"]
    assert set(case.masks) == {"Effusion", "Nodule"}
    for m in (*case.masks.values(), case.lungs, case.heart):
        assert m.dtype == bool and m.shape == (64, 64)


# ----------------------------------------------------------------------------- determinism


def test_same_seed_and_index_give_the_same_bytes() -> None:
    a = ph.render(7, seed=3, size=64)
    b = ph.render(7, seed=3, size=64)
    assert a.image.tobytes() == b.image.tobytes()
    assert a.healthy.tobytes() == b.healthy.tobytes()
    assert a.findings == b.findings
    assert all(np.array_equal(a.masks[f], b.masks[f]) for f in a.findings)


def test_different_index_or_seed_gives_different_images() -> None:
    base = ph.render(7, seed=3, size=64).healthy
    assert not np.array_equal(base, ph.render(8, seed=3, size=64).healthy)
    assert not np.array_equal(base, ph.render(7, seed=4, size=64).healthy)


def test_global_random_state_is_untouched() -> None:
    np.random.seed(123)
    expected = np.random.random(3)
    np.random.seed(123)
    ph.render(0, size=32, force=["Mass"])
    ph.render_many(3, size=32)
    assert np.array_equal(np.random.random(3), expected)


def test_render_many_matches_render_whatever_the_batching() -> None:
    # render_many draws the anatomy of many patients at once (64 at a time at 32 px)
    batch = ph.render_many(70, seed=2, size=32, start=10)
    for i in (0, 1, 37, 63, 64, 65, 69):
        case = ph.render(10 + i, seed=2, size=32)
        assert np.array_equal(batch.images[i], case.image), i
        assert np.array_equal(batch.healthy[i], case.healthy), i
        assert np.array_equal(batch.lungs[i], case.lungs), i
        for f in ph.PHANTOM_FINDINGS:
            assert np.array_equal(batch.masks[f][i], case.masks.get(f, np.zeros((32, 32), bool))), (i, f)
    split = ph.render_many(10, seed=2, size=32, start=70)
    assert np.array_equal(split.images, batch.images[60:])
    assert np.array_equal(split.healthy, batch.healthy[60:])
    assert batch.patient_ids == [f"phantom-2-{i}" for i in range(10, 80)]


def test_healthy_render_does_not_depend_on_the_findings() -> None:
    plain = ph.render(5, size=64, force=[])
    for force in (["Mass"], ["Cardiomegaly", "Pneumothorax"], list(ph.PHANTOM_FINDINGS)):
        assert np.array_equal(ph.render(5, size=64, force=force).healthy, plain.image)
    assert np.array_equal(plain.image, plain.healthy)
    assert plain.findings == [] and plain.masks == {}


# ----------------------------------------------------------------------------- pairing and masks


def test_healthy_equals_image_outside_the_masks() -> None:
    for i in range(40):
        case = ph.render(i, size=64, healthy_fraction=0.0, prevalence={f: 0.4 for f in ph.PHANTOM_FINDINGS})
        assert case.findings
        diff = np.abs(case.image.astype(np.int16) - case.healthy.astype(np.int16))
        outside = ~_union(case)
        # the same noise realisation: only sub-threshold tails and rounding remain
        assert diff[outside].max() <= 2
        assert diff[outside].mean() < 0.15
        # and the masks are where the image changed: the difference recovers them
        inside = _union(case)
        assert diff[inside].mean() > 3.0


def test_every_mask_is_non_empty(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for f, cases in forced.items():
        for case in cases:
            assert case.findings == [f]
            assert case.masks[f].sum() >= 3, (f, case.masks[f].sum())


def test_difference_inside_masks_is_substantial(forced: dict[str, list[ph.PhantomCase]]) -> None:
    per_finding = {}
    for f, cases in forced.items():
        means = [np.abs(c.image.astype(float) - c.healthy)[c.masks[f]].mean() for c in cases]
        per_finding[f] = np.median(means)
        assert np.median(means) > 6.0, (f, np.median(means))
    assert np.mean(list(per_finding.values())) > 15.0


def test_hernia_is_retrocardiac_above_the_diaphragm(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for case in forced["Hernia"]:
        y, x = _centroid(case.masks["Hernia"])
        assert 0.45 < y < 0.85 and 1 / 3 < x < 2 / 3, (y, x)
        # behind the heart: most of it overlaps the heart shadow
        m = case.masks["Hernia"]
        assert (m & case.heart).sum() >= 0.5 * m.sum()


def test_effusion_sits_at_the_lung_bases(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for case in forced["Effusion"]:
        m = case.masks["Effusion"]
        lung_rows = np.nonzero(case.lungs.any(1))[0]
        middle = 0.5 * (lung_rows.min() + lung_rows.max())
        rows = np.nonzero(m)[0]
        assert (rows > middle).mean() > 0.8
        # in the lung fields, including the lung behind the heart
        assert (m & ndimage.binary_dilation(case.lungs | case.heart, iterations=2)).sum() >= 0.9 * m.sum()


def test_edema_is_bilateral_within_the_lungs(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for case in forced["Edema"]:
        m = case.masks["Edema"]
        near = ndimage.binary_dilation(case.lungs | case.heart, iterations=2)
        assert (m & near).sum() >= 0.95 * m.sum()
        half = m.shape[1] // 2
        left, right = m[:, :half].sum(), m[:, half:].sum()
        assert min(left, right) >= 0.2 * m.sum()


def test_pneumothorax_is_darker_apical_and_one_sided(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for case in forced["Pneumothorax"]:
        m = case.masks["Pneumothorax"]
        half = m.shape[1] // 2
        assert max(m[:, :half].sum(), m[:, half:].sum()) >= 0.95 * m.sum()
        # towards the apex of that lung
        side = np.zeros_like(m)
        side[:, :half] = m[:, :half].sum() > m[:, half:].sum()
        side[:, half:] = ~side[:, :half].any()
        lung_y, _ = _centroid(case.lungs & side)
        y, _ = _centroid(m)
        assert y < lung_y
        # the finding makes the region darker (the pleural line is the only brighter part)
        d = case.image.astype(float) - case.healthy
        assert d[m].mean() < -2.0


def test_cardiomegaly_mask_is_the_heart_beyond_the_normal_heart(
    forced: dict[str, list[ph.PhantomCase]],
) -> None:
    for i, case in enumerate(forced["Cardiomegaly"]):
        m = case.masks["Cardiomegaly"]
        normal = ph.render(i, size=64, force=[]).heart
        assert case.heart.sum() > normal.sum()
        # between the normal and the enlarged heart, up to the soft (blurred) border of each
        assert (m & ndimage.binary_erosion(normal, iterations=2)).sum() == 0
        assert (m & ~ndimage.binary_dilation(case.heart, iterations=3)).sum() == 0
        # brighter: lung air replaced by heart
        assert (case.image.astype(float) - case.healthy)[m].mean() > 5.0


@pytest.mark.parametrize("finding", ["Mass", "Nodule", "Pneumonia", "Atelectasis"])
def test_lung_findings_lie_in_the_lungs(forced: dict[str, list[ph.PhantomCase]], finding: str) -> None:
    for case in forced[finding]:
        m = case.masks[finding]
        near = ndimage.binary_dilation(case.lungs | case.heart, iterations=2)
        assert (m & near).sum() >= 0.9 * m.sum(), finding


def test_masses_are_larger_than_nodules(forced: dict[str, list[ph.PhantomCase]]) -> None:
    mass = np.median([c.masks["Mass"].sum() for c in forced["Mass"]])
    nodule = np.median([c.masks["Nodule"].sum() for c in forced["Nodule"]])
    assert mass > 1.5 * nodule


def test_findings_vary_in_position_size_and_intensity(forced: dict[str, list[ph.PhantomCase]]) -> None:
    for f in ("Mass", "Nodule", "Pneumonia", "Effusion", "Atelectasis"):
        cases = forced[f]
        cents = np.array([_centroid(c.masks[f]) for c in cases])
        areas = np.array([c.masks[f].sum() for c in cases])
        effects = np.array([np.abs(c.image.astype(float) - c.healthy)[c.masks[f]].mean() for c in cases])
        assert cents.std(0).max() > 0.03, f
        assert areas.max() > 1.5 * areas.min(), f
        assert effects.max() > 1.5 * effects.min(), f


def test_lesions_overlap_normal_anatomy_in_intensity(forced: dict[str, list[ph.PhantomCase]]) -> None:
    """No pixel threshold or global intensity statistic separates abnormal from healthy images."""
    healthy = [ph.render(i, size=64, force=[]).image for i in range(100, 100 + N_CASES)]

    def stats(im: np.ndarray) -> list[float]:
        return [im.mean(), *np.percentile(im, [1, 50, 99])]

    neg = np.array([stats(h) for h in healthy])
    for f, cases in forced.items():
        pos = np.array([stats(c.image) for c in cases])
        for k in range(neg.shape[1]):
            assert 0.15 < _auc(pos[:, k], neg[:, k]) < 0.85, (f, k)
        # lesion pixels take values the same patient's normal anatomy also takes
        inside = []
        for c in cases:
            m = c.masks[f]
            normal = c.healthy[~m]
            lo, hi = np.percentile(normal, [0.5, 99.5])
            vals = c.image[m]
            inside.append(((vals >= lo) & (vals <= hi)).mean())
        assert np.median(inside) > 0.5, (f, np.median(inside))


def test_subtle_and_obvious_cases_both_occur(forced: dict[str, list[ph.PhantomCase]]) -> None:
    effects = np.array([
        np.abs(c.image.astype(float) - c.healthy)[c.masks[f]].mean()
        for f, cases in forced.items() for c in cases
    ])
    assert effects.min() < 8.0
    assert effects.max() > 40.0


# ----------------------------------------------------------------------------- anatomy


def test_anatomy_is_where_a_pa_film_puts_it() -> None:
    for i in range(10):
        case = ph.render(i, size=64, force=[])
        img = case.image.astype(float)
        # the heart is right of the image centre (the patient's left), the lungs are dark
        _, hx = _centroid(case.heart)
        assert hx > 0.5
        half = 32
        assert case.lungs[:, :half].sum() > 50 and case.lungs[:, half:].sum() > 50
        assert img[case.lungs].mean() < img[case.heart].mean() - 40
        # bright = dense: the abdomen below the diaphragm is brighter than the lungs
        assert img[-6:, 20:44].mean() > img[case.lungs].mean() + 40


def test_windows_do_not_truncate_anything(monkeypatch: pytest.MonkeyPatch) -> None:
    """Small structures are drawn inside bounding windows; drawing them everywhere changes no bit."""
    def render_all(size: int, index: int) -> ph.PhantomCase:
        return ph.render(index, size=size, force=list(ph.PHANTOM_FINDINGS))

    windowed = {(s, i): render_all(s, i) for s in (32, 64) for i in range(4)}
    monkeypatch.setattr(ph._Anatomy, "window", lambda self, *box: (slice(None),) * 3)
    monkeypatch.setattr(ph._View, "window", lambda self, *box: (slice(None),) * 2)
    for (s, i), case in windowed.items():
        full = render_all(s, i)
        assert np.array_equal(full.image, case.image), (s, i)
        assert np.array_equal(full.healthy, case.healthy), (s, i)
        for f in ph.PHANTOM_FINDINGS:
            assert np.array_equal(full.masks[f], case.masks[f]), (s, i, f)


# ----------------------------------------------------------------------------- prevalence and force


def test_force_renders_exactly_the_given_findings() -> None:
    case = ph.render(1, size=32, force=["hernia", "pleural effusion"])
    assert case.findings == ["Effusion", "Hernia"]
    assert set(case.masks) == {"Effusion", "Hernia"}


def test_zero_prevalence_never_draws_the_finding() -> None:
    batch = ph.render_many(150, size=32, prevalence={"Hernia": 0, "Edema": 0.0}, healthy_fraction=0.0)
    col = {c: i for i, c in enumerate(labels.VOCABULARY)}
    assert batch.labels[:, col["Hernia"]].sum() == 0
    assert batch.labels[:, col["Edema"]].sum() == 0
    assert batch.masks["Hernia"].sum() == 0
    assert batch.labels[:, col["No Finding"]].sum() == 0  # healthy_fraction 0: every image abnormal


def test_prevalence_and_healthy_fraction_shape_the_labels() -> None:
    col = {c: i for i, c in enumerate(labels.VOCABULARY)}
    everything = ph.render_many(60, size=32, prevalence={"Effusion": 1.0}, healthy_fraction=0.0)
    assert everything.labels[:, col["Effusion"]].all()
    nothing = ph.render_many(30, size=32, prevalence={f: 0 for f in ph.PHANTOM_FINDINGS})
    assert nothing.labels[:, col["No Finding"]].all()
    assert np.array_equal(nothing.images, nothing.healthy)
    all_healthy = ph.render_many(30, size=32, healthy_fraction=1.0)
    assert all_healthy.labels[:, col["No Finding"]].all()
    default = ph.render_many(300, size=32)
    share = default.labels[:, col["No Finding"]].mean()
    assert 0.2 < share < 0.4  # default healthy_fraction 0.3
    per_image = default.labels[:, : len(labels.FINDINGS)].sum(1)
    assert (per_image >= 2).any()  # multi-label images occur


def test_bad_names_and_values_are_rejected() -> None:
    with pytest.raises(ValueError, match="cannot be drawn by the phantom"):
        ph.render(0, prevalence={"Fibrosis": 0.2})
    with pytest.raises(ValueError, match="did you mean"):
        ph.render(0, prevalence={"Hernai": 0.2})
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ph.render(0, prevalence={"Mass": 1.5})
    with pytest.raises(ValueError, match="cannot be drawn"):
        ph.render(0, force=["No Finding"])
    with pytest.raises(ValueError, match="healthy_fraction"):
        ph.render_many(2, healthy_fraction=-0.1)
    with pytest.raises(ValueError, match="size"):
        ph.render(0, size=48)


# ----------------------------------------------------------------------------- batches and sizes


def test_batch_layout_and_labels_agree_with_masks() -> None:
    b = ph.render_many(40, seed=1, size=32)
    assert b.images.shape == b.healthy.shape == b.lungs.shape == (40, 32, 32)
    assert b.images.dtype == b.healthy.dtype == b.lungs.dtype == np.uint8
    assert b.labels.shape == (40, len(labels.VOCABULARY)) and b.labels.dtype == np.float32
    assert set(b.masks) == set(ph.PHANTOM_FINDINGS)
    col = {c: i for i, c in enumerate(labels.VOCABULARY)}
    for f in ph.PHANTOM_FINDINGS:
        m = b.masks[f]
        assert m.dtype == np.uint8 and m.shape == (40, 32, 32) and set(np.unique(m)) <= {0, 1}
        np.testing.assert_array_equal(m.reshape(40, -1).any(1), b.labels[:, col[f]] == 1)
    nf = b.labels[:, col["No Finding"]] == 1
    np.testing.assert_array_equal(nf, b.labels[:, : len(labels.FINDINGS)].sum(1) == 0)
    assert set(np.unique(b.lungs)) == {0, 1}
    # findings the phantom never draws are known absent (0), not unlabelled (NaN)
    assert not np.isnan(b.labels).any()


@pytest.mark.parametrize("size", [32, 64, 128])
def test_all_sizes_render_every_finding(size: int) -> None:
    case = ph.render(2, size=size, force=list(ph.PHANTOM_FINDINGS))
    assert case.image.shape == case.healthy.shape == (size, size)
    assert case.findings == list(ph.PHANTOM_FINDINGS)
    for f in ph.PHANTOM_FINDINGS:
        assert case.masks[f].shape == (size, size) and case.masks[f].any(), f
    assert case.lungs.sum() > 0.1 * size * size
    # the same patient at every size: the downsampled 128 px healthy image resembles the 32 px one
    if size == 128:
        small = ph.render(2, size=32, force=[]).healthy.astype(float)
        big = ph.render(2, size=128, force=[]).healthy.astype(float).reshape(32, 4, 32, 4).mean((1, 3))
        assert np.corrcoef(small.ravel(), big.ravel())[0, 1] > 0.9
