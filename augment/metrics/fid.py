"""Frechet distance between image sets, on pytorch-fid's math, with injected feature extractors.

Images are uint8 arrays, 1 channel (``N x H x W`` or ``N x 1 x H x W``), or float tensors ``x`` in
[-1, 1] (``B x 1 x H x W``), the project's convention. Features are ``N x d`` float32 arrays;
statistics (mean, covariance) are float64.

Two extractors, each with an ``id`` string that is recorded with every result and every cached
statistic, so two FIDs are only ever compared when they were measured with the same network:

* :class:`InceptionExtractor`: pytorch-fid's FID Inception v3 (the TensorFlow FID network ported to
  PyTorch), weights read from a local file and never downloaded. Preprocessing is exactly
  ``python -m pytorch_fid``'s: a uint8 image ``u`` becomes ``u / 255`` in [0, 1] (what
  ``torchvision.transforms.ToTensor`` gives pytorch-fid), the grey channel is repeated to three
  channels (what PIL's ``convert("RGB")`` gives pytorch-fid for a grey PNG), then pytorch-fid's
  ``InceptionV3(resize_input=True, normalize_input=True)`` resizes to 299 x 299 (bilinear,
  ``align_corners=False``, no antialiasing) and maps [0, 1] to [-1, 1] (``2 * x - 1``) inside the
  network. Features are the 2048-d final average pool (or block 0-2 for ``dims`` 64 / 192 / 768,
  spatially averaged as pytorch-fid does). By default the convolutions run in channels-last
  memory format (faster on CPU; features equal pytorch-fid's up to float32 rounding, ~1e-7
  relative in FID); ``channels_last=False`` reproduces pytorch-fid's features bit for bit.
* :class:`DomainExtractor`: the penultimate features (``forward_head(forward_features(x),
  pre_logits=True)``) of a chest X-ray classifier trained on the real data; ``x`` in [-1, 1],
  1 channel, no resize. Its id carries the checkpoint's sha256. This is the default FID of
  ``augment evaluate``: Inception features of ImageNet photos say little about radiographs, and its
  weights cannot be downloaded here.

The Frechet distance itself is :func:`pytorch_fid.fid_score.calculate_frechet_distance`, called
unchanged: ``||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2))``, including its fallback that adds
``eps * I`` to both covariances when the matrix square root of a singular product is not finite.

With fewer samples than feature dimensions the covariance is singular and FID is biased upwards
(it falls as n grows); :func:`fid_from_stats` warns (:class:`SmallSampleWarning`). Compare FIDs
only at equal n and equal extractor id.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import math
import os
import re
import threading
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image
from torch import nn

import pytorch_fid
import pytorch_fid.inception
from pytorch_fid.fid_score import IMAGE_EXTENSIONS, calculate_frechet_distance
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3

from augment.errors import UserError
from cxrbase.progress import progress

log = logging.getLogger(__name__)

__all__ = [
    "FID_WEIGHTS_FILE",
    "FID_WEIGHTS_URL",
    "DomainExtractor",
    "FIDResult",
    "FIDStats",
    "FeatureExtractor",
    "InceptionExtractor",
    "InceptionWeightsNotFound",
    "RealStatsCache",
    "SingularProductWarning",
    "SmallSampleWarning",
    "array_fingerprint",
    "default_inception_weights_path",
    "features",
    "fid_folders",
    "fid_from_features",
    "fid_from_stats",
    "folder_fingerprint",
    "iter_folder_batches",
    "list_images",
    "statistics",
]

#: File name pytorch-fid (through ``torch.hub.load_state_dict_from_url``) looks for in
#: ``torch.hub.get_dir()/checkpoints``; the same name as the release asset in ``FID_WEIGHTS_URL``.
FID_WEIGHTS_FILE = os.path.basename(FID_WEIGHTS_URL)


class SmallSampleWarning(UserWarning):
    """FID statistics from fewer samples than feature dimensions: singular covariance, biased FID."""


class SingularProductWarning(RuntimeWarning):
    """The covariance product had no finite square root; pytorch-fid's ``eps * I`` offset was used."""


class InceptionWeightsNotFound(FileNotFoundError, UserError):
    """The FID Inception weights file is missing; the message says where to put it."""


# --------------------------------------------------------------------------------------------
# Extractors
# --------------------------------------------------------------------------------------------


@runtime_checkable
class FeatureExtractor(Protocol):
    """What :func:`features` needs: an id, a device and a batch -> features call.

    ``__call__`` takes a uint8 tensor ``B x 1 x H x W`` (or float ``x`` in [-1, 1]) already on
    ``device`` and returns float features ``B x d``.
    """

    id: str
    device: torch.device

    def __call__(self, images: torch.Tensor) -> torch.Tensor: ...


def default_inception_weights_path() -> Path:
    """Where pytorch-fid looks for the FID Inception weights: ``torch.hub.get_dir()/checkpoints``.

    ``torch.hub.get_dir()`` is ``$TORCH_HOME/hub`` when ``TORCH_HOME`` is set, else
    ``$XDG_CACHE_HOME/torch/hub`` or ``~/.cache/torch/hub``.
    """
    return Path(torch.hub.get_dir()) / "checkpoints" / FID_WEIGHTS_FILE


def _sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _sha256_state_dict(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# pytorch-fid's builder reads its weights through a module-level function; it is swapped for one
# that returns an already loaded state dict, so construction can never reach the network. The
# lock keeps two threads from building at the same time with each other's weights.
_BUILD_LOCK = threading.Lock()


@contextlib.contextmanager
def _swapped(owner: object, name: str, value: Any) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block; the original is put back however it ends."""
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


def _build_fid_inception(state_dict: dict[str, torch.Tensor], dims: int) -> InceptionV3:
    block = InceptionV3.BLOCK_INDEX_BY_DIM[dims]

    def _local_only(url: str, *args: object, **kwargs: object) -> dict[str, torch.Tensor]:
        if url != FID_WEIGHTS_URL:  # only the FID weights are ever meant to pass through here
            raise RuntimeError(f"refusing to fetch {url}: augment never downloads weights")
        return state_dict

    # fork_rng: the modules' default initialisers (overwritten by the weights) would otherwise
    # advance the caller's global RNG.
    with (_BUILD_LOCK, torch.random.fork_rng(devices=[]),
          _swapped(pytorch_fid.inception, "load_state_dict_from_url", _local_only)):
        net = InceptionV3([block], resize_input=True, normalize_input=True, use_fid_inception=True)
    return net.eval()


class InceptionExtractor:
    """pytorch-fid's FID Inception v3 with weights from a local file (see the module docstring).

    Args:
        weights_path: the ``pt_inception-2015-12-05-6726825d.pth`` file; default
            :func:`default_inception_weights_path`, where pytorch-fid itself looks.
        device: where the network runs.
        dims: 2048 (final average pool, the standard FID), or 768 / 192 / 64 (earlier blocks).
        channels_last: run the convolutions in NHWC memory format (about 1.3-1.5x faster on CPU);
            features then differ from pytorch-fid's by float32 rounding only (~1e-6 relative),
            ``False`` reproduces them bit for bit.

    Raises:
        InceptionWeightsNotFound: (a ``FileNotFoundError``) when the file is missing; the message
            says where to put it and where it comes from. Nothing is downloaded.
    """

    def __init__(self, weights_path: str | os.PathLike[str] | None = None, device: str | torch.device = "cpu",
                 dims: int = 2048, *, channels_last: bool = True) -> None:
        if dims not in InceptionV3.BLOCK_INDEX_BY_DIM:
            raise ValueError(f"dims must be one of {sorted(InceptionV3.BLOCK_INDEX_BY_DIM)}, got {dims}")
        path = Path(weights_path) if weights_path is not None else default_inception_weights_path()
        if not path.is_file():
            default = default_inception_weights_path()
            raise InceptionWeightsNotFound(
                f"FID Inception weights not found at {path}. Put the file {FID_WEIGHTS_FILE} there "
                f"(or at {default}, where pytorch-fid looks, or pass its path); it is the pytorch-fid "
                f"release asset {FID_WEIGHTS_URL} (sha256 prefix 6726825d), downloaded on a machine with "
                f"network access, since augment never downloads weights. Without it, use the domain "
                f"FID (DomainExtractor)."
            )
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
        self.dims = dims
        self.weights_path = path
        self.sha256 = _sha256_file(path)
        self.id = f"pytorch-fid-inception-v3:dims={dims}:sha256={self.sha256}"
        self.net = _build_fid_inception(state_dict, dims)
        self.channels_last = channels_last
        if channels_last:
            self.net.to(memory_format=torch.channels_last)
        self.device = torch.device("cpu")
        self.to(device)

    def to(self, device: str | torch.device) -> InceptionExtractor:
        """Move the network; returns self."""
        self.device = torch.device(device)
        self.net.to(self.device)
        return self

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``B x dims`` of uint8 ``B x 1 x H x W`` (or float ``x`` in [-1, 1])."""
        if images.dtype == torch.uint8:
            x01 = images.to(torch.float32).div(255)  # bit-identical to ToTensor() in pytorch-fid
        else:
            x01 = (images.to(torch.float32) + 1) / 2
        x01 = x01.expand(-1, 3, -1, -1) if x01.shape[1] == 1 else x01
        if self.channels_last:
            x01 = x01.contiguous(memory_format=torch.channels_last)
        out = self.net(x01)[0]
        if out.shape[2] != 1 or out.shape[3] != 1:  # blocks 0-2: pytorch-fid averages spatially
            out = torch.nn.functional.adaptive_avg_pool2d(out, output_size=(1, 1))
        return out.flatten(1)

    def __repr__(self) -> str:
        return f"InceptionExtractor(id={self.id!r}, device={self.device})"


class DomainExtractor:
    """Penultimate features of a classifier trained on the real data (the domain FID).

    Args:
        model: a timm model (``forward_head(forward_features(x), pre_logits=True)`` is used), or
            any module whose ``forward`` returns ``B x d`` features. Put in eval mode; not copied.
        sha256: sha256 of the checkpoint file the model was loaded from, recorded in :attr:`id`.
            When None, a sha256 of the model's state dict is recorded instead (``weights-sha256``),
            so cached statistics of two different models never collide.
        name: a readable prefix for the id (e.g. the classifier config name).
    """

    def __init__(self, model: nn.Module, *, sha256: str | None, name: str = "domain") -> None:
        self.model = model.eval()
        cfg = getattr(model, "pretrained_cfg", None)
        arch = (cfg.get("architecture") if isinstance(cfg, dict) else None) or type(model).__name__
        digest = f"sha256={sha256}" if sha256 is not None else f"weights-sha256={_sha256_state_dict(model)}"
        self.id = f"{name}:{arch}:{digest}"
        self.sha256 = sha256
        try:
            self.device = next(model.parameters()).device
        except StopIteration:
            self.device = torch.device("cpu")
        self._timm_style = hasattr(model, "forward_features") and hasattr(model, "forward_head")

    def to(self, device: str | torch.device) -> DomainExtractor:
        """Move the model; returns self."""
        self.device = torch.device(device)
        self.model.to(self.device)
        return self

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Features ``B x d`` of uint8 ``B x 1 x H x W`` (or float ``x`` in [-1, 1])."""
        if images.dtype == torch.uint8:
            x = images.to(torch.float32).div(127.5).sub(1.0)
        else:
            x = images.to(torch.float32)
        if self._timm_style:
            out = self.model.forward_head(self.model.forward_features(x), pre_logits=True)
        else:
            out = self.model(x)
        return out.flatten(1)

    def __repr__(self) -> str:
        return f"DomainExtractor(id={self.id!r}, device={self.device})"


# --------------------------------------------------------------------------------------------
# Features
# --------------------------------------------------------------------------------------------


def _as_batch(a: np.ndarray | torch.Tensor) -> torch.Tensor:
    """One item of an image stream as a ``B x 1 x H x W`` tensor (2-d: one image; 3-d: B x H x W)."""
    t = torch.from_numpy(np.ascontiguousarray(a)) if isinstance(a, np.ndarray) else a
    if t.ndim == 2:
        return t[None, None]
    if t.ndim == 3:
        return t[:, None]
    if t.ndim == 4:
        if t.shape[1] != 1:
            raise ValueError(f"expected 1-channel images (B x 1 x H x W), got shape {tuple(t.shape)}")
        return t
    raise ValueError(f"expected an image H x W or a batch B x H x W / B x 1 x H x W, got shape {tuple(t.shape)}")


def _rebatch(images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
             batch_size: int) -> Iterator[torch.Tensor]:
    """Yield ``B x 1 x H x W`` batches of exactly ``batch_size`` (the last may be smaller)."""
    if isinstance(images, (np.ndarray, torch.Tensor)):
        arr = _as_batch(images)
        for i in range(0, arr.shape[0], batch_size):
            yield arr[i:i + batch_size]
        return
    pending: list[torch.Tensor] = []
    count = 0
    for item in images:
        b = _as_batch(item)
        while b.shape[0]:
            take = min(batch_size - count, b.shape[0])
            pending.append(b[:take])
            count += take
            b = b[take:]
            if count == batch_size:
                yield pending[0] if len(pending) == 1 else torch.cat(pending)
                pending, count = [], 0
    if count:
        yield pending[0] if len(pending) == 1 else torch.cat(pending)


def features(extractor: FeatureExtractor,
             images: np.ndarray | torch.Tensor | Iterable[np.ndarray | torch.Tensor],
             batch_size: int = 50, device: str | torch.device | None = None) -> np.ndarray:
    """Features of a stream of images, computed batch by batch.

    Only one batch of images is held at a time, so ``images`` may be a generator over a dataset
    of any size (memory O(batch) for images; the returned features are ``N x d`` float32).

    Args:
        extractor: an :class:`InceptionExtractor`, :class:`DomainExtractor` or anything following
            :class:`FeatureExtractor`.
        images: uint8 (or float ``x`` in [-1, 1]) array/tensor ``N x H x W`` or ``N x 1 x H x W``, or
            an iterable of such arrays (a 2-d item is one image, a 3-d or 4-d item a batch). Items
            are re-batched to ``batch_size``.
        batch_size: images per forward pass.
        device: move the extractor there first; default: where it already is.

    Returns:
        ``N x d`` float32 features, in input order.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if device is not None and torch.device(device) != extractor.device:
        extractor.to(device)  # type: ignore[attr-defined]
    total = None
    if isinstance(images, (np.ndarray, torch.Tensor)):
        total = math.ceil(images.shape[0] / batch_size) if images.ndim >= 3 else 1
    out: list[np.ndarray] = []
    for batch in progress(_rebatch(images, batch_size), total=total, desc="features"):  # quiet off a terminal
        f = extractor(batch.to(extractor.device, non_blocking=True))
        out.append(f.detach().to("cpu", torch.float32).numpy())
    if not out:
        raise ValueError("no images given")
    return np.concatenate(out, axis=0)


# --------------------------------------------------------------------------------------------
# Statistics and FID
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FIDStats:
    """Gaussian statistics of one image set's features.

    Attributes:
        mu: mean, float64 ``d``.
        sigma: covariance (``n - 1`` normalisation, as ``np.cov``), float64 ``d x d``.
        n: number of images.
        extractor_id: the extractor's id.
        fingerprint: identifies the data the statistics were computed from ("" if unknown).
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor_id: str = "unknown"
    fingerprint: str = ""

    @property
    def dims(self) -> int:
        """Feature dimension d."""
        return int(self.mu.shape[0])


@dataclass(frozen=True)
class FIDResult:
    """A Frechet distance and what it was measured with.

    Attributes:
        value: the FID.
        extractor_id: the feature extractor's id (the network and its weights' sha256).
        n1: images in the first set.
        n2: images in the second set.
        dims: feature dimension.
        eps_offset: True when pytorch-fid's ``eps * I`` fallback was needed.
    """

    value: float
    extractor_id: str
    n1: int
    n2: int
    dims: int
    eps_offset: bool = False

    def __float__(self) -> float:
        return self.value

    def as_dict(self) -> dict[str, float | int | str | bool]:
        """Plain dict for metrics.json."""
        return {"fid": self.value, "extractor": self.extractor_id, "n1": self.n1, "n2": self.n2,
                "dims": self.dims, "eps_offset": self.eps_offset}


def statistics(feats: np.ndarray, *, extractor_id: str = "unknown", fingerprint: str = "") -> FIDStats:
    """Mean and covariance of features in float64, computed as pytorch-fid does.

    Args:
        feats: ``N x d`` features, N >= 2.
        extractor_id: recorded in the result.
        fingerprint: recorded in the result.

    Returns:
        The statistics.
    """
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"need features N x d with N >= 2, got shape {f.shape}")
    mu = np.mean(f, axis=0)
    sigma = np.cov(f, rowvar=False)
    return FIDStats(mu=mu, sigma=np.atleast_2d(sigma), n=int(f.shape[0]), extractor_id=extractor_id,
                    fingerprint=fingerprint)


_SINGULAR_MSG = re.compile(r"fid calculation produces singular product")


def _frechet(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray,
             eps: float) -> tuple[float, bool]:
    """pytorch-fid's ``calculate_frechet_distance``; its print becomes a warning.

    It also turns a failure into the same eps offset pytorch-fid uses for a non-finite square
    root: recent SciPy returns a finite but complex square root for some singular products,
    which pytorch-fid rejects ("Imaginary component") before its own offset can apply.
    """
    buf = io.StringIO()
    with warnings.catch_warnings():
        # scipy >= 1.16 deprecates sqrtm(disp=False), which pytorch-fid passes; its singular /
        # ill-conditioned warning is expected for n < d and is reported by SmallSampleWarning.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message=r"Matrix is (singular|ill-conditioned)")
        try:
            with contextlib.redirect_stdout(buf):
                value = calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=eps)
            offset = bool(_SINGULAR_MSG.search(buf.getvalue()))
        except ValueError as err:
            if "Imaginary component" not in str(err):
                raise
            eye = np.eye(sigma1.shape[0]) * eps
            with contextlib.redirect_stdout(io.StringIO()):
                value = calculate_frechet_distance(mu1, sigma1 + eye, mu2, sigma2 + eye, eps=eps)
            offset = True
    if offset:
        warnings.warn(f"the covariance product is singular: added {eps} to the diagonal of both "
                      f"covariances (pytorch-fid's fallback)", SingularProductWarning, stacklevel=3)
    return float(value), offset


def fid_from_stats(s1: FIDStats, s2: FIDStats, *, eps: float = 1e-6) -> FIDResult:
    """Frechet distance between two sets' statistics (pytorch-fid's ``calculate_frechet_distance``).

    Args:
        s1: first set.
        s2: second set; same extractor and dimension.
        eps: diagonal offset used when the covariance product is singular.

    Returns:
        The FID with its extractor id and sample sizes.

    Raises:
        ValueError: different extractors or dimensions.

    Warns:
        SmallSampleWarning: a set has fewer samples than feature dimensions.
        SingularProductWarning: the eps offset was needed.
    """
    if s1.extractor_id != s2.extractor_id:
        raise ValueError(f"statistics from different extractors: {s1.extractor_id!r} vs {s2.extractor_id!r}")
    if s1.mu.shape != s2.mu.shape or s1.sigma.shape != s2.sigma.shape:
        raise ValueError(f"feature dimensions differ: {s1.mu.shape} vs {s2.mu.shape}")
    d = s1.dims
    small = min(s1.n, s2.n)
    if small < d:
        warnings.warn(f"FID from n={small} samples < feature dimension d={d}: the covariance is singular and "
                      f"FID is biased upwards; use n >= d and compare FIDs only at equal n",
                      SmallSampleWarning, stacklevel=2)
    value, offset = _frechet(s1.mu, s1.sigma, s2.mu, s2.sigma, eps)
    return FIDResult(value=value, extractor_id=s1.extractor_id, n1=s1.n, n2=s2.n, dims=d, eps_offset=offset)


def fid_from_features(f1: np.ndarray, f2: np.ndarray, *, extractor_id: str = "unknown",
                      eps: float = 1e-6) -> FIDResult:
    """Frechet distance between two feature sets ``N1 x d`` and ``N2 x d`` (float64 statistics).

    Args:
        f1: first set's features.
        f2: second set's features.
        extractor_id: the extractor's id, recorded in the result.
        eps: see :func:`fid_from_stats`.

    Returns:
        The FID.
    """
    s1 = statistics(f1, extractor_id=extractor_id)
    s2 = statistics(f2, extractor_id=extractor_id)
    return fid_from_stats(s1, s2, eps=eps)


# --------------------------------------------------------------------------------------------
# Cache of real statistics
# --------------------------------------------------------------------------------------------


def array_fingerprint(images: np.ndarray | torch.Tensor) -> str:
    """sha256 of an image array's shape, dtype and bytes."""
    a = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    h = hashlib.sha256(f"{a.dtype}:{a.shape}:".encode())
    h.update(np.ascontiguousarray(a).view(np.uint8).reshape(-1).data)
    return h.hexdigest()


def folder_fingerprint(files: Sequence[Path]) -> str:
    """sha256 of the files' names, sizes and modification times (not their bytes: cheap at 100k).

    Args:
        files: the image files, as :func:`list_images` returns them.
    """
    h = hashlib.sha256()
    for p in files:
        st = p.stat()
        h.update(f"{p.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


class RealStatsCache:
    """Statistics (and, where a caller needs them, features) of real image sets on disk, keyed by
    extractor id and data fingerprint.

    One ``.npz`` per (name, extractor) for statistics: ``mu``, ``sigma``, ``n``, ``extractor_id``,
    ``fingerprint``; and one ``.features.npz`` per (name, extractor) for the features themselves
    (``features`` ``N x d`` float32, ``extractor_id``, ``fingerprint``), for callers that need more
    than the Gaussian statistics (KID, precision/recall, per-class subsets). An entry is reused only
    when both the extractor id and the fingerprint match; otherwise it is recomputed and overwritten
    (written to a temporary file and renamed, so a crash never leaves half an entry). Both lookups
    consult the disk *before* calling ``compute``, so a hit costs no feature pass.

    Args:
        root: cache directory (created on first write).

    Attributes:
        hits: lookups answered from disk.
        misses: lookups that had to compute.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root)
        self.hits = 0
        self.misses = 0

    def path(self, name: str, extractor_id: str) -> Path:
        """The statistics entry file for ``name`` under ``extractor_id``."""
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")[:80] or "stats"
        ext = hashlib.sha256(extractor_id.encode()).hexdigest()[:12]
        return self.root / f"{safe}-{ext}.npz"

    def features_path(self, name: str, extractor_id: str) -> Path:
        """The features entry file for ``name`` under ``extractor_id``."""
        p = self.path(name, extractor_id)
        return p.with_name(p.name[: -len(".npz")] + ".features.npz")

    @staticmethod
    def _read(p: Path, extractor_id: str, fingerprint: str, keys: Sequence[str]) -> dict[str, np.ndarray] | None:
        """The arrays ``keys`` of entry ``p``, or None when absent, unreadable or stale."""
        if not p.is_file():
            return None
        try:
            with np.load(p, allow_pickle=False) as z:
                arrays = {k: z[k] for k in keys}
                stored = (str(z["extractor_id"]), str(z["fingerprint"]))
        except (OSError, KeyError, ValueError) as err:
            log.warning("ignoring unreadable FID cache entry %s: %s", p, err)
            return None
        if stored != (extractor_id, fingerprint):
            log.info("FID cache entry %s is stale (data or extractor changed); recomputing", p)
            return None
        return arrays

    @staticmethod
    def _write(p: Path, **arrays: np.ndarray) -> Path:
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_name(f".{p.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, p)
        return p

    def load(self, name: str, extractor_id: str, fingerprint: str) -> FIDStats | None:
        """The cached statistics, or None when absent, unreadable or stale."""
        z = self._read(self.path(name, extractor_id), extractor_id, fingerprint, ("mu", "sigma", "n"))
        if z is None:
            return None
        return FIDStats(mu=z["mu"], sigma=z["sigma"], n=int(z["n"]), extractor_id=extractor_id,
                        fingerprint=fingerprint)

    def save(self, name: str, stats: FIDStats) -> Path:
        """Write ``stats`` as the entry for ``name``; returns its path."""
        return self._write(self.path(name, stats.extractor_id), mu=stats.mu, sigma=stats.sigma,
                           n=np.int64(stats.n), extractor_id=np.str_(stats.extractor_id),
                           fingerprint=np.str_(stats.fingerprint))

    def get_or_compute(self, name: str, extractor_id: str, fingerprint: str,
                       compute: Callable[[], FIDStats]) -> FIDStats:
        """Cached statistics when id and fingerprint match, else ``compute()`` saved and returned.

        Args:
            name: the data set's name (e.g. ``"nih-train-128"``), one entry per name and extractor.
            extractor_id: the extractor's id.
            fingerprint: the data's fingerprint (:func:`folder_fingerprint`, :func:`array_fingerprint`
                or the data cache's key).
            compute: computes the statistics on a miss, e.g.
                ``lambda: statistics(features(extractor, images), extractor_id=extractor.id)``; not
                called on a hit.
        """
        stats = self.load(name, extractor_id, fingerprint)
        if stats is not None:
            self.hits += 1
            return stats
        self.misses += 1
        stats = compute()
        stats = FIDStats(mu=stats.mu, sigma=stats.sigma, n=stats.n, extractor_id=extractor_id,
                         fingerprint=fingerprint)
        self.save(name, stats)
        return stats

    def load_features(self, name: str, extractor_id: str, fingerprint: str) -> np.ndarray | None:
        """The cached features ``N x d``, or None when absent, unreadable or stale."""
        z = self._read(self.features_path(name, extractor_id), extractor_id, fingerprint, ("features",))
        return None if z is None else z["features"]

    def save_features(self, name: str, feats: np.ndarray, extractor_id: str, fingerprint: str) -> Path:
        """Write ``feats`` (``N x d``, stored as given: float32 from :func:`features`) as the features
        entry for ``name``; returns its path."""
        return self._write(self.features_path(name, extractor_id), features=np.asarray(feats),
                           extractor_id=np.str_(extractor_id), fingerprint=np.str_(fingerprint))

    def features_or_compute(self, name: str, extractor_id: str, fingerprint: str,
                            compute: Callable[[], np.ndarray]) -> np.ndarray:
        """Cached features when id and fingerprint match, else ``compute()`` (the feature pass)
        saved and returned. The stored array is the computed one byte for byte, so every number
        derived from it (statistics, KID, precision/recall) is the same on a hit as on a miss.

        Args:
            name: the data set's name; entries apart from the statistics entry of the same name.
            extractor_id: the extractor's id.
            fingerprint: identifies the images exactly (for a split of a table: the table's
                fingerprint and the row indices, e.g. ``f"{fp}:{array_fingerprint(rows)}"``).
            compute: the feature pass, e.g. ``lambda: features(extractor, images, batch_size)``;
                not called on a hit.
        """
        feats = self.load_features(name, extractor_id, fingerprint)
        if feats is not None:
            self.hits += 1
            return feats
        self.misses += 1
        feats = np.asarray(compute())
        self.save_features(name, feats, extractor_id, fingerprint)
        return feats


# --------------------------------------------------------------------------------------------
# Folders
# --------------------------------------------------------------------------------------------


def list_images(folder: str | os.PathLike[str]) -> list[Path]:
    """Image files directly in ``folder``, in pytorch-fid's order (sorted paths, its extensions)."""
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(f"image folder not found: {path}")
    return sorted(f for ext in IMAGE_EXTENSIONS for f in path.glob(f"*.{ext}"))


def _decode_gray(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"))


def iter_folder_batches(files: Sequence[Path], batch_size: int, num_workers: int = 4) -> Iterator[np.ndarray]:
    """Decode image files to uint8 ``B x H x W`` batches, one batch ahead of the consumer.

    PNG decoding releases the GIL, so a thread pool decodes the next batch while the network
    runs on the current one. Colour images are converted to grey (PIL ``"L"``).

    Args:
        files: image files; all must have the same size.
        batch_size: images per batch.
        num_workers: decoding threads (0: decode in the calling thread).
    """
    chunks = [files[i:i + batch_size] for i in range(0, len(files), batch_size)]

    def decode(chunk: Sequence[Path]) -> np.ndarray:
        imgs = list(pool.map(_decode_gray, chunk)) if pool is not None else [_decode_gray(p) for p in chunk]
        shapes = {im.shape for im in imgs}
        if len(shapes) > 1:
            raise ValueError(f"images in one folder must share a size; found {sorted(shapes)} among "
                             f"{chunk[0].parent} (resize them first)")
        return np.stack(imgs)

    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 0 else None
    ahead = ThreadPoolExecutor(max_workers=1)
    try:
        pending = ahead.submit(decode, chunks[0]) if chunks else None
        for i in range(len(chunks)):
            batch = pending.result()  # type: ignore[union-attr]
            pending = ahead.submit(decode, chunks[i + 1]) if i + 1 < len(chunks) else None
            yield batch
    finally:
        ahead.shutdown(wait=True, cancel_futures=True)
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


def _folder_stats(folder: Path, extractor: FeatureExtractor, batch_size: int, num_workers: int,
                  cache: RealStatsCache | None) -> FIDStats:
    files = list_images(folder)
    if not files:
        raise ValueError(f"no images ({', '.join(sorted(IMAGE_EXTENSIONS))}) in {folder}")
    fp = folder_fingerprint(files)

    def compute() -> FIDStats:
        feats = features(extractor, iter_folder_batches(files, batch_size, num_workers), batch_size)
        return statistics(feats, extractor_id=extractor.id, fingerprint=fp)

    if cache is None:
        return compute()
    return cache.get_or_compute(str(folder.resolve()), extractor.id, fp, compute)


def fid_folders(dir1: str | os.PathLike[str], dir2: str | os.PathLike[str], extractor: FeatureExtractor,
                batch_size: int = 50, *, cache: RealStatsCache | None = None,
                num_workers: int = 4) -> FIDResult:
    """FID between two folders of images, the same value as ``python -m pytorch_fid dir1 dir2``.

    Files are those pytorch-fid reads (its extensions, sorted), decoded to grey in batches by a
    thread pool while the network runs. With ``cache``, each folder's statistics are stored under
    its resolved path and reused while the folder's files (names, sizes, mtimes) and the
    extractor are unchanged: the real set is then read once.

    Args:
        dir1: first folder (e.g. synthetic images).
        dir2: second folder (e.g. real images).
        extractor: feature extractor.
        batch_size: images per forward pass.
        cache: optional statistics cache.
        num_workers: decoding threads.

    Returns:
        The FID with the extractor id and sample sizes.
    """
    s1 = _folder_stats(Path(dir1), extractor, batch_size, num_workers, cache)
    s2 = _folder_stats(Path(dir2), extractor, batch_size, num_workers, cache)
    return fid_from_stats(s1, s2)
