"""Correctness of the FID: closed-form Gaussians, extractors, streaming, the cache, and equivalence
with ``python -m pytorch_fid`` on stand-in Inception weights (the real ones cannot be downloaded)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import linalg

from augment.metrics import fid as F
from augment.metrics.fid import (
    DomainExtractor,
    FIDStats,
    InceptionExtractor,
    InceptionWeightsNotFound,
    RealStatsCache,
    SingularProductWarning,
    SmallSampleWarning,
    features,
    fid_folders,
    fid_from_features,
    fid_from_stats,
    statistics,
)
from fid_weights import random_fid_inception_weights


def _closed_form_diag(mu1, s1, mu2, s2) -> float:
    """FID of N(mu1, diag(s1)) and N(mu2, diag(s2))."""
    return float(np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2)))


def _stats(mu, sigma, n=10_000, eid="x") -> FIDStats:
    return FIDStats(mu=np.asarray(mu, float), sigma=np.asarray(sigma, float), n=n, extractor_id=eid)


# ------------------------------------------------------------------------ Frechet distance


def test_frechet_exact_diagonal_gaussians():
    rng = np.random.default_rng(0)
    d = 6
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.1, 3, size=d), rng.uniform(0.1, 3, size=d)
    r = fid_from_stats(_stats(mu1, np.diag(s1)), _stats(mu2, np.diag(s2)))
    assert r.value == pytest.approx(_closed_form_diag(mu1, s1, mu2, s2), rel=1e-10)
    assert not r.eps_offset and r.dims == d and r.extractor_id == "x"


def test_frechet_rotation_invariant_full_covariance():
    # A common rotation turns the diagonal case into full covariances with the same FID.
    rng = np.random.default_rng(1)
    d = 5
    q, _ = np.linalg.qr(rng.normal(size=(d, d)))
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = rng.uniform(0.2, 2, size=d), rng.uniform(0.2, 2, size=d)
    r = fid_from_stats(_stats(q @ mu1, q @ np.diag(s1) @ q.T), _stats(q @ mu2, q @ np.diag(s2) @ q.T))
    assert r.value == pytest.approx(_closed_form_diag(mu1, s1, mu2, s2), rel=1e-8)


def test_frechet_large_samples_approach_closed_form():
    rng = np.random.default_rng(2)
    d, n = 4, 200_000
    mu1, mu2 = np.array([0.0, 1.0, -1.0, 0.5]), np.array([0.5, 1.0, 0.0, 0.0])
    s1, s2 = np.array([1.0, 2.0, 0.5, 1.0]), np.array([1.5, 1.0, 0.5, 3.0])
    x = mu1 + rng.normal(size=(n, d)) * np.sqrt(s1)
    y = mu2 + rng.normal(size=(n, d)) * np.sqrt(s2)
    exact = _closed_form_diag(mu1, s1, mu2, s2)
    assert fid_from_features(x, y).value == pytest.approx(exact, rel=0.02)


def test_identical_sets_zero_and_shift_increases():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(500, 8))
    assert abs(fid_from_features(x, x.copy()).value) < 1e-8
    near = fid_from_features(x, rng.normal(size=(500, 8))).value
    far = fid_from_features(x, rng.normal(size=(500, 8)) + 1.0).value
    assert near < 0.5 < far  # a mean shift of 1 in 8 dims adds ~8
    assert far == pytest.approx(8.0, rel=0.25)


def test_statistics_float64_like_pytorch_fid():
    x = np.random.default_rng(4).normal(size=(50, 7)).astype(np.float32)
    s = statistics(x, extractor_id="e", fingerprint="fp")
    assert s.mu.dtype == np.float64 and s.sigma.dtype == np.float64
    np.testing.assert_array_equal(s.mu, np.mean(x.astype(np.float64), axis=0))
    np.testing.assert_array_equal(s.sigma, np.cov(x.astype(np.float64), rowvar=False))
    assert (s.n, s.extractor_id, s.fingerprint, s.dims) == (50, "e", "fp", 7)


def test_small_sample_warning():
    rng = np.random.default_rng(5)
    with pytest.warns(SmallSampleWarning, match="n=5 samples < feature dimension d=8"):
        fid_from_features(rng.normal(size=(5, 8)), rng.normal(size=(9, 8)))
    with warnings.catch_warnings():
        warnings.simplefilter("error", SmallSampleWarning)
        fid_from_features(rng.normal(size=(9, 8)), rng.normal(size=(9, 8)))


def test_singular_product_reaches_pytorch_fid_eps_offset():
    # sigma1 @ sigma2 is singular and not diagonalisable: its square root is not finite, which is
    # the case pytorch-fid handles by adding eps * I to both covariances.
    s1 = np.array([[0.0, 0.0, 0.0], [0.0, 5.0, 4.0], [0.0, 4.0, 4.0]])
    s2 = np.array([[5.0, 1.0, 2.0], [1.0, 1.0, 2.0], [2.0, 2.0, 4.0]])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert not np.isfinite(linalg.sqrtm(s1 @ s2)).all()
    mu = np.zeros(3)
    with pytest.warns(SingularProductWarning):
        r = fid_from_stats(_stats(mu, s1), _stats(mu, s2))
    assert r.eps_offset and np.isfinite(r.value)
    # The limit: Tr(S1) + Tr(S2) - 2 Tr((S1^1/2 S2 S1^1/2)^1/2), a well-defined PSD square root.
    w, v = np.linalg.eigh(s1)
    r1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    lam = np.clip(np.linalg.eigvalsh(r1 @ s2 @ r1), 0, None)
    limit = np.trace(s1) + np.trace(s2) - 2 * np.sqrt(lam).sum()
    assert r.value == pytest.approx(limit, abs=1e-2)


def test_mismatched_extractors_refused():
    with pytest.raises(ValueError, match="different extractors"):
        fid_from_stats(_stats(np.zeros(2), np.eye(2), eid="a"), _stats(np.zeros(2), np.eye(2), eid="b"))


# ------------------------------------------------------------------------ extractors, streaming


def _tiny_timm(seed: int = 0) -> torch.nn.Module:
    import timm

    torch_state = torch.random.get_rng_state()
    model = timm.create_model("test_resnet", in_chans=1, num_classes=3, pretrained=False)
    torch.random.set_rng_state(torch_state)  # the test, not the library, re-initialises
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_domain_extractor_penultimate_features_and_id():
    model = _tiny_timm()
    ex = DomainExtractor(model, sha256="abc123", name="cls")
    assert ex.id.startswith("cls:") and "sha256=abc123" in ex.id
    u = np.random.default_rng(0).integers(0, 256, size=(5, 32, 32), dtype=np.uint8)
    got = ex(torch.from_numpy(u)[:, None])
    x = torch.from_numpy(u).float()[:, None] / 127.5 - 1
    with torch.no_grad():
        want = model.forward_head(model.forward_features(x), pre_logits=True)
    torch.testing.assert_close(got, want)
    assert got.shape == (5, model.num_features)
    # Float input is taken as x in [-1, 1].
    torch.testing.assert_close(ex(x), want)


def test_domain_extractor_without_sha_hashes_weights():
    a = DomainExtractor(_tiny_timm(0), sha256=None)
    b = DomainExtractor(_tiny_timm(0), sha256=None)
    c = DomainExtractor(_tiny_timm(1), sha256=None)
    assert "weights-sha256=" in a.id and a.id == b.id != c.id


def test_features_streaming_matches_array_and_holds_one_batch():
    ex = DomainExtractor(_tiny_timm(), sha256="s")
    u = np.random.default_rng(1).integers(0, 256, size=(23, 32, 32), dtype=np.uint8)
    whole = features(ex, u, batch_size=23)
    assert whole.dtype == np.float32 and whole.shape == (23, 96)

    consumed = 0
    seen: list[int] = []

    def stream():  # one image at a time, then a batch of 3, mixed 2-d / 3-d / 4-d items
        nonlocal consumed
        for i in range(20):
            consumed += 1
            yield u[i]
        consumed += 3
        yield u[20:23, None]

    class Spy:
        id, device = ex.id, ex.device

        def __call__(self, b):
            seen.append(consumed)
            assert b.shape[0] <= 8
            return ex(b)

    streamed = features(Spy(), stream(), batch_size=8)
    np.testing.assert_allclose(streamed, whole, rtol=1e-4, atol=1e-5)
    # each call happened as soon as its batch was full: the stream is not read ahead
    assert seen[:2] == [8, 16]
    assert features(ex, u[:, None], batch_size=5).shape == (23, 96)


def test_features_rejects_multichannel():
    ex = DomainExtractor(_tiny_timm(), sha256="s")
    with pytest.raises(ValueError, match="1-channel"):
        features(ex, np.zeros((2, 3, 8, 8), np.uint8))


# ------------------------------------------------------------------------ cache


def test_real_stats_cache_hit_miss_invalidate(tmp_path):
    cache = RealStatsCache(tmp_path / "cache")
    calls = []
    rng = np.random.default_rng(0)

    def compute():
        calls.append(1)
        return statistics(rng.normal(size=(20, 3)))

    a = cache.get_or_compute("real-train", "ext-1", "fp-1", compute)
    b = cache.get_or_compute("real-train", "ext-1", "fp-1", compute)
    assert len(calls) == 1 and (cache.hits, cache.misses) == (1, 1)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    assert b.mu.dtype == np.float64 and b.n == 20 and (b.extractor_id, b.fingerprint) == ("ext-1", "fp-1")

    c = cache.get_or_compute("real-train", "ext-1", "fp-2", compute)  # data changed: recompute
    assert len(calls) == 2 and c.fingerprint == "fp-2"
    assert not np.array_equal(a.mu, c.mu)
    assert cache.load("real-train", "ext-1", "fp-1") is None  # the stale entry was replaced
    cache.get_or_compute("real-train", "ext-2", "fp-2", compute)  # another extractor: own entry
    assert len(calls) == 3
    cache.get_or_compute("real-train", "ext-1", "fp-2", compute)
    assert len(calls) == 3 and cache.hits == 2

    cache.path("real-train", "ext-1").write_bytes(b"not an npz")  # corrupt: recompute, no crash
    cache.get_or_compute("real-train", "ext-1", "fp-2", compute)
    assert len(calls) == 4


class _Counting:
    """A real extractor that counts the batches it is called on."""

    def __init__(self, ex: DomainExtractor) -> None:
        self.ex, self.id, self.device, self.batches = ex, ex.id, ex.device, 0

    def __call__(self, b: torch.Tensor) -> torch.Tensor:
        self.batches += 1
        return self.ex(b)


def test_a_cache_hit_skips_the_real_feature_pass(tmp_path):
    """What evaluate's image quality does with the real train split: features (for KID, PR and the
    per-class sets) and statistics through the cache; on a hit the extractor is never called and
    every number is the same as on the miss."""
    ex = _Counting(DomainExtractor(_tiny_timm(), sha256="s"))
    u = np.random.default_rng(7).integers(0, 256, size=(10, 32, 32), dtype=np.uint8)
    rows = np.arange(10)
    fp = f"table-fp:{F.array_fingerprint(rows)}"

    def real(cache):
        f = cache.features_or_compute("phantom-train", ex.id, fp, lambda: features(ex, u[rows], batch_size=4))
        s = cache.get_or_compute("phantom-train", ex.id, fp, lambda: statistics(f, extractor_id=ex.id))
        return f, s

    f1, s1 = real(RealStatsCache(tmp_path / "cache"))
    assert ex.batches == 3  # 4 + 4 + 2 images: the pass ran once on the miss
    cache = RealStatsCache(tmp_path / "cache")  # a later evaluation
    f2, s2 = real(cache)
    assert ex.batches == 3 and (cache.hits, cache.misses) == (2, 0)
    assert f2.dtype == np.float32 and f2.shape == f1.shape
    np.testing.assert_array_equal(f2, f1)
    np.testing.assert_array_equal(s2.mu, s1.mu)
    np.testing.assert_array_equal(s2.sigma, s1.sigma)
    np.testing.assert_array_equal(statistics(f2).sigma, s1.sigma)  # derived numbers equal too
    # other rows (another split seed) are another fingerprint: computed, not a stale hit
    rows = np.arange(8)
    fp = f"table-fp:{F.array_fingerprint(rows)}"
    f3, _ = real(cache)
    assert ex.batches == 5 and f3.shape[0] == 8 and cache.misses == 2
    np.testing.assert_array_equal(f3, f1[:8])
    assert cache.load_features("phantom-train", ex.id, "table-fp:other") is None
    cache.features_path("phantom-train", ex.id).write_bytes(b"not an npz")  # corrupt: recompute, no crash
    real(cache)
    assert ex.batches == 7


def _write_pngs(folder: Path, n: int, size: int, seed: int, brightness: float = 0.0) -> None:
    """Random smooth grayscale PNGs: low-resolution noise upsampled bilinearly."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        low = rng.uniform(0, 255, size=(6, 6)) * (1 - brightness) + 255 * brightness
        img = Image.fromarray(low.astype(np.uint8), mode="L").resize((size, size), Image.BILINEAR)
        img.save(folder / f"img_{i:04d}.png")


def test_fid_folders_uses_cache_and_notices_changes(tmp_path):
    _write_pngs(tmp_path / "a", 12, 32, seed=0)
    _write_pngs(tmp_path / "b", 12, 32, seed=1, brightness=0.4)
    ex = DomainExtractor(_tiny_timm(), sha256="s")
    cache = RealStatsCache(tmp_path / "cache")
    with pytest.warns(SmallSampleWarning):
        r1 = fid_folders(tmp_path / "a", tmp_path / "b", ex, batch_size=5, cache=cache, num_workers=2)
        r2 = fid_folders(tmp_path / "a", tmp_path / "b", ex, batch_size=5, cache=cache, num_workers=0)
    assert (cache.misses, cache.hits) == (2, 2)
    assert r1.value == r2.value > 0 and r1.extractor_id == ex.id and (r1.n1, r1.n2) == (12, 12)
    # Same value without any cache, from the in-memory path.
    load = lambda d: np.stack([np.asarray(Image.open(p)) for p in sorted(d.glob("*.png"))])  # noqa: E731
    with pytest.warns(SmallSampleWarning):
        direct = fid_from_features(features(ex, load(tmp_path / "a"), 7), features(ex, load(tmp_path / "b"), 7))
    assert direct.value == pytest.approx(r1.value, rel=1e-5)
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(tmp_path / "b" / "img_9999.png")
    with pytest.warns(SmallSampleWarning):
        r3 = fid_folders(tmp_path / "a", tmp_path / "b", ex, batch_size=5, cache=cache)
    assert (cache.misses, cache.hits) == (3, 3) and r3.n2 == 13


def test_fid_folders_mixed_sizes_is_an_error(tmp_path):
    _write_pngs(tmp_path / "a", 3, 32, seed=0)
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "a" / "small.png")
    ex = DomainExtractor(_tiny_timm(), sha256="s")
    with pytest.raises(ValueError, match="share a size"):
        fid_folders(tmp_path / "a", tmp_path / "a", ex, batch_size=8)


# ------------------------------------------------------------------------ Inception


def test_inception_missing_weights_says_where_and_never_downloads(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    with pytest.raises(InceptionWeightsNotFound) as err:
        InceptionExtractor()
    msg = str(err.value)
    assert isinstance(err.value, FileNotFoundError)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    assert str(expected) in msg
    assert "https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/" in msg
    assert "\n" not in msg
    with pytest.raises(FileNotFoundError, match="elsewhere.pth"):
        InceptionExtractor(tmp_path / "elsewhere.pth")


def test_random_weights_leave_global_rng_alone(tmp_path):
    before = torch.random.get_rng_state()
    random_fid_inception_weights(tmp_path / "w.pth", seed=3)
    assert torch.equal(before, torch.random.get_rng_state())
    a = torch.load(tmp_path / "w.pth", weights_only=True)
    random_fid_inception_weights(tmp_path / "w2.pth", seed=3)
    b = torch.load(tmp_path / "w2.pth", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    InceptionExtractor(tmp_path / "w.pth", dims=64)
    assert torch.equal(before, torch.random.get_rng_state())


def test_inception_build_restores_pytorch_fids_loader(tmp_path):
    """The loader swapped in while the network is built is put back, also when the build fails."""
    import pytorch_fid.inception as pfi

    original = pfi.load_state_dict_from_url
    InceptionExtractor(random_fid_inception_weights(tmp_path / "w.pth", seed=0), dims=64)
    assert pfi.load_state_dict_from_url is original
    torch.save({"not": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(RuntimeError):  # strict load_state_dict: wrong keys
        InceptionExtractor(tmp_path / "bad.pth", dims=64)
    assert pfi.load_state_dict_from_url is original


def _parse_fid(stdout: str) -> float:
    m = re.search(r"^FID:\s+(\S+)\s*$", stdout, flags=re.M)
    assert m, f"no FID line in pytorch-fid output:\n{stdout}"
    return float(m.group(1))


@pytest.mark.parametrize("dims", [768, pytest.param(2048, marks=pytest.mark.slow)])
def test_equivalence_with_python_m_pytorch_fid(tmp_path, monkeypatch, dims):
    """Our InceptionExtractor + fid_folders give pytorch-fid's own command-line value.

    768 (blocks 0-2, spatially averaged) runs by default; 2048 (the standard pool3 FID, adding
    Mixed_7a-c) is marked slow: each 2048 x 2048 matrix square root takes ~20 s on 2 cores.
    """
    torch_home = tmp_path / "torch"
    weights = random_fid_inception_weights(
        torch_home / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth", seed=0)
    d1, d2 = tmp_path / "one", tmp_path / "two"
    _write_pngs(d1, 6, 32, seed=0)
    _write_pngs(d2, 6, 32, seed=1, brightness=0.3)

    env = {**os.environ, "TORCH_HOME": str(torch_home)}
    cmd = [sys.executable, "-m", "pytorch_fid", str(d1), str(d2), "--device", "cpu", "--batch-size", "4",
           "--dims", str(dims)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Downloading" not in proc.stdout + proc.stderr
    theirs = _parse_fid(proc.stdout)

    monkeypatch.setenv("TORCH_HOME", str(torch_home))  # ours finds the same file where they look
    ex = InceptionExtractor(dims=dims)
    assert ex.weights_path == weights and ex.sha256 in ex.id
    with pytest.warns(SmallSampleWarning):
        ours = fid_folders(d1, d2, ex, batch_size=4)
    assert ours.extractor_id == ex.id and f"dims={dims}" in ex.id and (ours.n1, ours.n2) == (6, 6)
    assert theirs > 0
    assert ours.value == pytest.approx(theirs, rel=1e-4)
