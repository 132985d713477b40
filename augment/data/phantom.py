"""Procedural chest radiograph phantom: the embedded default data source.

Every case is a PA chest radiograph drawn from scratch, a ground-truth mask for each finding it
shows, and the *same patient rendered healthy* (identical anatomy, exposure and noise realisation,
only the findings removed), so every demo runs on a fresh machine and every mask metric is exact.

Conventions:
    * Images are ``H x W`` ``uint8``, one channel, **bright = dense** like a displayed PA chest
      radiograph: lungs and air dark; bone, heart, mediastinum and soft tissue bright.
    * The image is shown as it is read: the patient's right is on the image left, so the heart
      lies right of the image centre.
    * Masks are ``bool`` (:class:`PhantomCase`) or ``uint8`` in ``{0, 1}`` (:class:`PhantomBatch`).
    * Everything is deterministic per ``(seed, index)``: the generators are
      ``np.random.default_rng([seed, index])`` (anatomy and exposure) and streams keyed by it,
      ``[seed, index, 1]`` (noise), ``[seed, index, 2]`` (which findings) and
      ``[seed, index, 3, k]`` (finding ``k``'s shape). So the healthy render of a patient does not
      depend on which findings are drawn, and no global random state is touched.

How it is drawn: a density map (the projected attenuation: soft tissue, lung air, heart and
mediastinum, spine, posterior and anterior ribs, clavicles, diaphragm domes, vessels) is built from
analytic shapes whose soft edges are the patient's blur, evaluated directly at the output size on
cached coordinate grids (small structures only inside their bounding windows). A film-like curve,
``x / sqrt(1 + x^2)`` (toe and shoulder, never a hard clip, so a finding always shows), maps it to
grey levels; then comes noise that grows with density. Findings add to the density (a
pneumothorax removes the lung markings and darkens instead), mostly by replacing lung air, so their
grey levels stay within those of normal anatomy. The healthy and abnormal renders share every
other term bit for bit and differ only where a finding has support; a finding's mask is where its
own contribution changes the grey level by at least :data:`MASK_THRESHOLD`, so the masks' union is
exactly where ``image`` and ``healthy`` differ by more than rounding.

Patient variation: size, position, rotation (up to 4 degrees), inspiration depth (dome and
costophrenic heights), lung width, heart size and axis, mediastinal width, body habitus, rib
contrast, exposure (level, contrast, curve asymmetry), noise level and blur. Findings vary in
position, extent and intensity; some are subtle.

Throughput: :func:`render_many` draws the anatomy of several patients per numpy call (every
operation is elementwise, so each image is bit for bit what :func:`render` gives); one CPU core
renders about 1300 images/s at 64 px and 550 at 128 px (``benchmarks/bench_phantom.py``,
``docs/benchmarks.md``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from augment.data import labels

try:  # the clip ufunc itself: np.clip adds three Python-level calls, ~2 us each time
    from numpy._core.umath import clip as _clip
except ImportError:  # numpy < 2
    from numpy.core.umath import clip as _clip

PHANTOM_FINDINGS: tuple[str, ...] = (
    "Atelectasis",
    "Cardiomegaly",
    "Effusion",
    "Mass",
    "Nodule",
    "Pneumonia",
    "Pneumothorax",
    "Edema",
    "Hernia",
)
"""Findings the phantom draws, canonical names in :data:`augment.data.labels.FINDINGS` order."""

DEFAULT_PREVALENCE: dict[str, float] = {
    "Atelectasis": 0.25,
    "Cardiomegaly": 0.2,
    "Effusion": 0.25,
    "Mass": 0.12,
    "Nodule": 0.15,
    "Pneumonia": 0.15,
    "Pneumothorax": 0.12,
    "Edema": 0.15,
    "Hernia": 0.04,
}
"""Probability of each finding in an image that is not drawn healthy (see :func:`render`).

Hernia is the rarest, as in ChestX-ray14; the others are kept within a factor of about 2 of
each other so that small demo sets have examples of every class.
"""

SIZES: tuple[int, ...] = (32, 64, 128, 256)
MASK_THRESHOLD = 2.0
"""Grey levels (before noise and rounding) a finding must change a pixel by to be in its mask."""

_F32 = np.float32


# --------------------------------------------------------------------------------------------
# public types
# --------------------------------------------------------------------------------------------


@dataclass
class PhantomCase:
    """One rendered patient.

    Attributes:
        image: ``H x W`` uint8 radiograph with the findings.
        healthy: ``H x W`` uint8, the same patient without findings (same anatomy, exposure and
            noise realisation), ground truth for "virtual healing".
        findings: canonical names of the findings present, in :data:`PHANTOM_FINDINGS` order.
        masks: finding -> ``H x W`` bool, one per present finding; where that finding changes the
            image by at least :data:`MASK_THRESHOLD` grey levels. For Cardiomegaly it is the
            enlarged heart beyond the patient's normal heart.
        lungs: ``H x W`` bool lung fields of the healthy anatomy (heart and mediastinum excluded).
        heart: ``H x W`` bool heart silhouette as drawn in ``image`` (enlarged with Cardiomegaly;
            the normal heart is then ``heart & ~masks["Cardiomegaly"]``, up to its soft border).
    """

    image: np.ndarray
    healthy: np.ndarray
    findings: list[str]
    masks: dict[str, np.ndarray]
    lungs: np.ndarray
    heart: np.ndarray


@dataclass
class PhantomBatch:
    """Many rendered patients, stacked.

    Attributes:
        images: ``N x H x W`` uint8 radiographs with findings.
        healthy: ``N x H x W`` uint8 paired healthy renders.
        labels: ``N x len(VOCABULARY)`` float32 multi-hot over
            :data:`augment.data.labels.VOCABULARY` (``No Finding`` = 1 when no finding). Findings
            the phantom never draws are 0: known absent, not unlabelled.
        masks: finding -> ``N x H x W`` uint8 in ``{0, 1}``, for every finding in
            :data:`PHANTOM_FINDINGS` (zeros where absent).
        lungs: ``N x H x W`` uint8 ``{0, 1}`` lung fields.
        patient_ids: ``f"phantom-{seed}-{index}"``.
    """

    images: np.ndarray
    healthy: np.ndarray
    labels: np.ndarray
    masks: dict[str, np.ndarray]
    lungs: np.ndarray
    patient_ids: list[str]


# --------------------------------------------------------------------------------------------
# small numeric helpers (float32 in, float32 out; python-float scalars keep float32)
# --------------------------------------------------------------------------------------------

_Win = tuple[slice, slice]


def _ramp(x: np.ndarray, lo: float | np.ndarray, hi: float | np.ndarray) -> np.ndarray:
    """0 at ``lo``, 1 at ``hi``, linear between, constant outside (``lo > hi`` falls).

    ``lo`` and ``hi`` may be per-patient ``B x 1 x 1`` arrays.
    """
    k = 1.0 / (hi - lo)
    t = x * k
    t += -lo * k
    return _clip(t, 0.0, 1.0, out=t)


def _smooth(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smoothstep from 0 at ``lo`` to 1 at ``hi``: exactly 0 and 1 outside, so supports are compact."""
    t = _ramp(x, lo, hi)
    t2 = t * t
    t *= -2.0
    t += 3.0
    t *= t2
    return t


def _pulse(x: np.ndarray, half: float, edge: float | np.ndarray) -> np.ndarray:
    """1 where ``|x| < half``, falling linearly to 0 over ``edge`` (centred on the border)."""
    return _ramp(np.abs(x), half + 0.5 * edge, half - 0.5 * edge)


def _stripes(phase: np.ndarray, half: float, edge: float | np.ndarray) -> np.ndarray:
    """Periodic bars: 1 within ``half`` of an integer ``phase``, soft over ``edge`` (phase units)."""
    fr = np.abs(phase - np.rint(phase))
    return _ramp(fr, half + 0.5 * edge, half - 0.5 * edge)


@functools.lru_cache(maxsize=None)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: ``x`` to the image right, ``y`` down (cached per size)."""
    c = ((np.arange(size, dtype=np.float64) + 0.5) / size * 2.0 - 1.0).astype(_F32)
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


@functools.lru_cache(maxsize=None)
def _interp(size: int, res: int) -> np.ndarray:
    """``size x res`` smooth interpolation from ``res`` knots, scaled so fields have unit variance."""
    c = (np.arange(size) + 0.5) / size * 2.0 - 1.0
    knots = np.linspace(-1.15, 1.15, res)
    h = knots[1] - knots[0]
    w = np.exp(-0.5 * ((c[:, None] - knots[None, :]) / (0.75 * h)) ** 2)
    w /= w.sum(1, keepdims=True)
    # var(a g a^T) = (sum_i a_ki^2)(sum_j a_lj^2) for white g: normalise to about 1
    w /= np.sqrt((w * w).sum(1).mean())
    return w.astype(_F32)


def _field(rng: np.random.Generator, size: int, res: int, out: np.ndarray | None = None) -> np.ndarray:
    """Smooth random field, about unit standard deviation, features about ``2 / res`` wide.

    The knots are drawn at a fixed count whatever ``size``, so a patient looks the same at every
    size.
    """
    a = _interp(size, res)
    return np.matmul(a, rng.standard_normal((res, res), dtype=_F32) @ a.T, out=out)


# --------------------------------------------------------------------------------------------
# the patient
# --------------------------------------------------------------------------------------------


@dataclass
class _Patient:
    """Scalar parameters of one patient, its exposure and acquisition."""

    scale: float
    cx: float
    cy: float
    angle: float
    apex: float
    dome: tuple[float, float]  # (right, left) dome heights; the right one sits higher
    cp: float  # costophrenic angle height
    width: float  # lateral lung wall
    heart_c: tuple[float, float]
    heart_r: tuple[float, float]
    heart_tilt: float
    mediastinum: float
    body: float
    rib_amp: float
    rib_phase: float
    vessel_k: float
    level: float
    gain: float
    gamma: float
    noise: float
    blur_px: float


# (low, high) of the uniform draws behind _Patient, in draw order
_RANGES = np.array([
    (-1.0, 1.0),  # inspiration depth: deeper breath, lower domes and costophrenic angles
    (-0.02, 0.02),  # right dome
    (0.02, 0.07),  # left dome below the right (the liver lifts the right)
    (-0.02, 0.02),  # costophrenic angles
    (0.74, 0.84),  # lung width
    (0.9, 1.05),  # scale
    (-0.05, 0.05),  # centre x
    (0.0, 0.1),  # centre y
    (-4.0, 4.0),  # rotation, degrees
    (-0.78, -0.70),  # apex
    (0.1, 0.15),  # heart centre u
    (0.2, 0.25),  # heart centre v
    (0.32, 0.38),  # heart long radius
    (0.21, 0.25),  # heart short radius
    (15.0, 30.0),  # heart tilt, degrees
    (0.12, 0.15),  # mediastinum half width
    (0.86, 0.97),  # body half width
    (0.8, 1.2),  # rib contrast
    (-0.08, 0.08),  # rib phase
    (6.0, 8.5),  # vessels per hemithorax
    (0.28, 0.34),  # exposure: density at mid grey
    (3.8, 5.2),  # contrast
    (-0.06, 0.06),  # curve asymmetry
    (1.2, 4.5),  # noise, grey levels
    (0.35, 1.1),  # blur, pixels
])


def _draw_patient(rng: np.random.Generator) -> _Patient:
    lo, hi = _RANGES[:, 0], _RANGES[:, 1]
    draws = (lo + (hi - lo) * rng.random(len(_RANGES))).tolist()
    (insp, dr, dl, dcp, width, scale, cx, cy, angle, apex, hu, hv, hr0, hr1, tilt, med, body,
     rib_amp, rib_phase, vk, level, gain, gamma, noise, blur) = draws
    dome_r = 0.24 + 0.07 * insp + dr
    return _Patient(
        scale=scale,
        cx=cx,
        cy=cy,
        angle=math.radians(angle),
        apex=apex,
        dome=(dome_r, dome_r + dl),
        cp=0.50 + 0.07 * insp + dcp,
        width=width,
        heart_c=(hu, hv + 0.5 * (dome_r - 0.24)),
        heart_r=(hr0, hr1),
        heart_tilt=math.radians(tilt),
        mediastinum=med,
        body=body,
        rib_amp=rib_amp,
        rib_phase=rib_phase,
        vessel_k=vk,
        level=level,
        gain=gain,
        gamma=gamma,
        noise=noise,
        blur_px=blur,
    )


def _lung_parts(p: _Patient, u: np.ndarray, a: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, ...]:
    """Signed distances (positive inside, roughly in patient units) bounding the lung fields.

    Args:
        p: patient.
        u: patient x (the patient's right, the image left, is negative).
        a: distance from the midline, ``|u|``.
        v: height (down +).

    Returns:
        ``(outer, medial, diaphragm, dome_height)``: the egg-shaped rib-cage outline, the
        mediastinal border, the diaphragm, and the diaphragm's height.
    """
    w = p.width
    # egg: widest near the bases, its rounded apex medial of the lateral wall
    vc = 0.38
    dx = a * (1.0 / (0.53 * w))
    dx -= 0.47 / 0.53
    dy = v * (1.0 / (vc - p.apex))
    dy -= vc / (vc - p.apex)
    q = dx * dx
    q += dy * dy
    outer = np.sqrt(q)
    outer *= -0.53 * w
    outer += 0.53 * w
    # narrow between the apices, widest at the aortic arch
    medial = a - p.mediastinum * 0.65
    medial -= (p.mediastinum * 0.35) * _ramp(v, -0.75, -0.4)
    # domes: highest at mid-hemithorax, falling to the costophrenic angle laterally; the
    # right-left difference enters as a gentle tilt across the chest
    dr, dl = p.dome
    t = a * (1.0 / (0.58 * w))
    t -= 0.42 / 0.58
    height = t * t
    height *= p.cp - 0.5 * (dr + dl)
    height += u * ((dl - dr) / (0.84 * w))
    height += 0.5 * (dr + dl)
    return outer, medial, height - v, height


def _heart_geometry(p: _Patient, k: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Heart centre and radii enlarged by ``k`` around its base (the right border moves least)."""
    anchor = (p.heart_c[0] - 0.12, p.heart_c[1] + 0.12)
    c = (anchor[0] + k * (p.heart_c[0] - anchor[0]), anchor[1] + k * (p.heart_c[1] - anchor[1]))
    return c, (p.heart_r[0] * k, p.heart_r[1] * k)


def _heart_sd(
    c: tuple[float, float], r: tuple[float, float], tilt: float, u: np.ndarray, v: np.ndarray
) -> np.ndarray:
    """Approximate signed distance (positive inside) to the tilted heart ellipse."""
    if isinstance(tilt, np.ndarray):
        cs, sn = np.cos(tilt), np.sin(tilt)
    else:  # numpy scalars would promote float32 fields to float64
        cs, sn = math.cos(tilt), math.sin(tilt)
    du = u - c[0]
    dv = v - c[1]
    x = (du * cs + dv * sn) * (1.0 / r[0])
    y = (dv * cs - du * sn) * (1.0 / r[1])
    q = x * x
    q += y * y
    scale = np.minimum(r[0], r[1]) if isinstance(r[0], np.ndarray) else min(r)
    return (1.0 - np.sqrt(q)) * scale


def _window_span(
    p: _Patient, size: int, u0: float, u1: float, v0: float, v1: float
) -> tuple[int, int, int, int]:
    """Pixel rows and columns ``(r0, r1, c0, c1)`` covering a patient-space box."""
    cs, sn = math.cos(p.angle), math.sin(p.angle)
    half = size / 2.0
    xs = [p.cx + p.scale * (uu * cs - vv * sn) for uu in (u0, u1) for vv in (v0, v1)]
    ys = [p.cy + p.scale * (uu * sn + vv * cs) for uu in (u0, u1) for vv in (v0, v1)]

    def span(c: list[float]) -> tuple[int, int]:
        lo = int(math.floor((min(c) + 1.0) * half - 0.5)) - 1
        hi = int(math.ceil((max(c) + 1.0) * half - 0.5)) + 2
        return min(max(lo, 0), size), min(max(hi, 0), size)

    return (*span(ys), *span(xs))


class _Params:
    """The patients' parameters as ``B x 1 x 1`` float32 arrays (pairs as pairs of arrays)."""

    def __init__(self, patients: Sequence[_Patient]) -> None:
        for name in _Patient.__dataclass_fields__:
            values = [getattr(p, name) for p in patients]
            if isinstance(values[0], tuple):
                arr = np.array(values, dtype=_F32).T.reshape(2, -1, 1, 1)
                setattr(self, name, (arr[0], arr[1]))
            else:
                setattr(self, name, np.array(values, dtype=_F32).reshape(-1, 1, 1))


class _Anatomy:
    """A batch of patients' fields on the pixel grid (``B x H x W``), kept for drawing findings.

    Densities are in arbitrary units where soft tissue is about 0.5 and the lung air removes up
    to 0.36; :meth:`display` maps them to grey levels. Every operation is elementwise, so a
    patient's fields are bit for bit the same in a batch of any size. Structures drawn inside
    windows (the union of the patients' bounding boxes) are exactly zero outside their support.
    """

    def __init__(self, patients: Sequence[_Patient], size: int, rngs: Sequence[np.random.Generator]) -> None:
        self.patients = list(patients)
        self.size = size
        self.P = p = _Params(patients)
        gx, gy = _grid(size)
        cs, sn = np.cos(p.angle), np.sin(p.angle)
        inv = 1.0 / p.scale
        u = gx * (cs * inv) + gy * (sn * inv)
        u -= (p.cx * cs + p.cy * sn) * inv
        v = gy * (cs * inv) - gx * (sn * inv)
        v -= (p.cy * cs - p.cx * sn) * inv
        self.u, self.v = u, v
        self.a = a = np.abs(u)
        self.right = right = u < 0.0
        self.rf = rf = right.astype(_F32)
        self.px = px = (2.0 / size) * inv  # one pixel in patient units
        self.edge = e = np.hypot(0.6 * px, p.blur_px * px)  # soft-edge width: the blur

        # texture fields, drawn per patient in a fixed order
        tex, wob, frag = (np.empty_like(u) for _ in range(3))
        for b, r in enumerate(rngs):
            _field(r, size, 14, out=tex[b])
            _field(r, size, 6, out=wob[b])
            _field(r, size, 12, out=frag[b])

        # lungs
        outer, medial, diaph, height = _lung_parts(p, u, a, v)
        self.outer, self.dome_height = outer, height
        lung_sd = np.minimum(outer, medial)
        np.minimum(lung_sd, diaph, out=lung_sd)
        # windows reach past each structure's support by the soft edge; the knob shapes the
        # lung's distance field (and so the air thickness) up to 0.16 beyond its outline
        kc, kr = p.mediastinum - 0.01, 0.06 + 0.17 + 2.0 * e
        w = self.window(kc - kr, kc + kr, -0.3 - kr, -0.3 + kr)
        knob = np.sqrt((u[w] - kc) ** 2 + (v[w] + 0.3) ** 2) - 0.06  # aortic knob
        np.minimum(lung_sd[w], np.where(right[w], _F32(1.0), knob), out=lung_sd[w])
        self.lung_sd = lung_sd
        self.lung = lung = _ramp(lung_sd, -e, e)
        # aerated thickness: thin at the borders, thickest mid-lung
        air = lung * (0.55 + 0.45 * _ramp(lung_sd, 0.0, 0.16))

        # body: soft tissue, thickest centrally (a projected cylinder); neck, sloping shoulders
        # and arms on top, more tissue low down (breasts, abdominal wall)
        wb = v * 0.05
        wb += p.body
        w = self.window(-1.6, 1.6, -1.6, -0.4)
        vw = v[w]
        # wb = 0.26 + s1 + (body - 1.26 + 0.05 v) s2 near the top, written as a correction that
        # is exactly 0 where s1 = s2 = 1, so the window cannot change a single bit below it
        s1 = _smooth(vw, -1.12, -0.74)
        s1 -= 1.0
        s2 = _smooth(vw, -0.72, -0.42)
        s2 -= 1.0
        s2 *= (p.body - 1.26) + 0.05 * vw
        s1 += s2
        wb[w] += s1
        ratio = a / wb
        body = _ramp(ratio, 1.0 + 2.0 * e, 1.0 - 2.0 * e)
        r2 = ratio * ratio
        np.subtract(1.0, r2, out=r2)
        thick = np.sqrt(_clip(r2, 0.0, 1.0, out=r2))  # 0 outside the body
        soft = (0.28 + 0.05 * _ramp(v, -0.3, 0.5)) * body
        soft += 0.2 * thick

        # heart (normal size), on the diaphragm: below the dome it is lost in the abdomen
        self.above_diaphragm = _ramp(diaph, -0.03, 0.02)
        c, r = _heart_geometry(p, 1.0)
        m = np.maximum(r[0], r[1]) + 2.0 * e
        hw = self.window(c[0] - m, c[0] + m, c[1] - m, c[1] + m)
        self.heart_soft = np.zeros_like(u)
        self.heart_soft[hw] = hs = _ramp(_heart_sd(c, r, p.heart_tilt, u[hw], v[hw]), -e, e)

        # ribs: posterior arcs (convex upwards, spaced wider downwards) and fainter anterior ribs
        # sloping down towards the midline; dimmer where the liver overlaps them
        cage = _ramp(outer, -0.07, -0.02) * _ramp(a, 0.04, 0.09)
        pv = 0.15 * a  # v + 0.6 a - 0.9 a^2 - 0.15 a^3: arcs turning down at the lateral wall
        pv += 0.9
        pv *= a
        np.subtract(0.6, pv, out=pv)
        pv *= a
        pv += v
        tp = (pv + (0.8 - p.rib_phase)) * (1.0 / 1.3)
        phase = _clip(tp * (12.0 - 2.0 * tp), 0.5, 11.5)  # half-integers end the series
        period = 1.30 / 9.0
        pe = np.minimum(2.0 * e / period, 0.45)
        prib = _stripes(phase, 0.23, pe)
        av = (v + 0.45 * a + (0.42 - p.rib_phase)) * (1.0 / 0.2)
        _clip(av, -0.5, 6.5, out=av)
        arib = _stripes(av, 0.2, pe) * _ramp(a, 0.18, 0.34)
        fade = _clip((period * size / 2.0) * p.scale * 0.4 - 1.0, 0.0, 1.0)  # ribs alias below ~4 px
        low = 1.0 - 0.55 * _ramp(v - height, 0.0, 0.12)
        prib *= 0.06
        prib += 0.028 * arib
        self.ribs = ribs = prib * cage * low * (p.rib_amp * fade)

        # lung markings: vessels branching out of the hila, thinning and fading outwards
        m = 0.03 + 3.0 * e  # the left base sits lower than p.cp: the domes' tilt
        w = self.window(-p.width - m, p.width + m, p.apex - m, p.cp + 0.1 + m)
        rfw, aw = rf[w], a[w]
        dv = v[w] + 0.1
        dv -= 0.06 * rfw
        da = aw + 0.01 * rfw
        da -= 0.09
        r = da * da
        r += dv * dv
        r = np.sqrt(r)
        den = np.abs(da)
        den += np.abs(dv)
        den += 0.03
        ph = dv / den  # an angle-like coordinate around the hilum, in (-1, 1)
        ph *= p.vessel_k
        ph += 0.8 * wob[w]
        ph += 2.0 * r
        # vessels are stripes of ph, thinner outwards: 16 (width - |ph - round(ph)|) + 1, with
        # width 0.12 - 0.1 r
        base = 2.92 - 1.6 * r
        fr = np.abs(ph - np.rint(ph))
        fr *= -16.0
        fr += base
        ves = _clip(fr, 0.0, 1.0, out=fr) * _ramp(r, 0.7, 0.15)
        ph *= 2.1
        fw = frag[w]
        ph += 0.6 * fw
        fr = np.abs(ph - np.rint(ph))
        fr *= -16.0
        fr += base
        ves2 = _clip(fr, 0.0, 1.0, out=fr) * (_ramp(r, 0.6, 0.2) * _ramp(fw, -0.2, 0.6))
        ves *= 0.04
        ves += 0.025 * ves2
        ves += 0.012 * tex[w]
        ves += 0.06 * _smooth(r, 0.22, 0.1)  # hila
        self.markings = markings = np.zeros_like(u)
        markings[w] = lung[w] * ves

        static = soft + ribs
        static += markings
        # spine: vertebral bodies with end plates, pedicles
        w = self.window(-0.1 - 2.0 * e, 0.1 + 2.0 * e, -1.6, 1.6)
        uw, vw = u[w], v[w]
        fr = (vw + 1.0) * (1.0 / 0.085)
        fr = np.abs(fr - np.rint(fr))
        col = _pulse(uw, 0.075, np.maximum(e, 0.015))
        col *= 0.035 * (0.75 + 0.25 * _ramp(fr, 0.05, 0.14))
        col += 0.025 * _pulse(a[w] - 0.058, 0.012, np.maximum(e, 0.006)) * _pulse(fr - 0.25, 0.1, 0.05)
        static[w] += col
        # trachea (an air column), carina at about v = -0.25
        w = self.window(-0.08 - 2.0 * e, 0.06 + 2.0 * e, -1.6, -0.15)
        static[w] -= 0.1 * _pulse(u[w] + 0.01, 0.038, np.maximum(e, 0.012)) * _ramp(v[w], -0.2, -0.32)
        # clavicles: S-curve from the sternal notch out and up to the acromion
        w = self.window(-0.85, 0.85, -0.82 - 2.0 * e, -0.45 + 2.0 * e)
        ca = a[w] - 0.07
        cl = v[w] - (-0.56 + 0.5 * p.rib_phase) + 0.08 * ca + 0.12 * ca * ca
        half = 0.036 - 0.012 * _clip(ca, 0.0, 0.7)
        clav = _clip((half - np.abs(cl)) * (1.0 / np.maximum(e, 0.01)) + 0.5, 0.0, 1.0)
        static[w] += 0.11 * clav * _ramp(ca, -0.02, 0.02) * _ramp(ca, 0.74, 0.64)
        # gastric bubble under the left hemidiaphragm
        w = self.window(0.2, 0.52, p.dome[1] - 0.05, p.cp + 0.25)
        gh = ((u[w] - 0.36) * (1.0 / 0.11)) ** 2 + ((v[w] - (height[w] + 0.09)) * (1.0 / 0.055)) ** 2
        static[w] -= np.where(right[w], _F32(0.0), 0.1 * _ramp(gh, 1.0, 0.5))

        self.air = air
        static -= 0.36 * air
        # the lung air the heart does not already hide: what a finding in the lung may replace
        self.aerated = air.copy()
        self.aerated[hw] -= 0.75 * air[hw] * hs
        # the heart: its own density where it stands above the diaphragm, and the air it hides
        self.healthy = static
        self.healthy[hw] += hs * (0.06 * self.above_diaphragm[hw] + 0.27 * air[hw])
        self.lungs = (lung_sd >= 0.0) & (self.heart_soft < 0.5)

    def window(self, u0: Any, u1: Any, v0: Any, v1: Any) -> tuple[slice, slice, slice]:
        """Slices (all patients, rows, columns) covering each patient's box ``[u0, u1] x [v0, v1]``.

        Box edges are floats or ``B x 1 x 1`` arrays (one edge per patient).
        """
        box = [np.broadcast_to(np.asarray(x, dtype=np.float64), (len(self.patients), 1, 1)).ravel()
               for x in (u0, u1, v0, v1)]
        spans = [_window_span(p, self.size, *(float(b[i]) for b in box)) for i, p in enumerate(self.patients)]
        r0, r1, c0, c1 = zip(*spans)
        return slice(None), slice(min(r0), max(r1)), slice(min(c0), max(c1))

    def display(self, density: np.ndarray) -> np.ndarray:
        """Film-like density -> grey-level curve (float 0..255, monotone, toe and shoulder, no clip)."""
        return _display(density, self.P.level, self.P.gain, self.P.gamma)

    def view(self, b: int) -> _View:
        """Patient ``b`` alone, for drawing its findings."""
        return _View(self, b)


def _display(density: np.ndarray, level: np.ndarray, gain: np.ndarray, gamma: np.ndarray) -> np.ndarray:
    x = density - level
    x *= gain
    x += gamma * x * x
    y = x / np.sqrt(x * x + 1.0)
    y *= 127.5
    y += 127.5
    return y


class _View:
    """One patient of an :class:`_Anatomy` batch (``H x W`` fields, scalar parameters)."""

    def __init__(self, an: _Anatomy, b: int) -> None:
        self.p = an.patients[b]
        self.size = an.size
        for name in ("u", "v", "a", "right", "rf", "outer", "dome_height", "lung_sd", "lung", "air",
                     "aerated", "markings", "ribs", "heart_soft", "above_diaphragm", "healthy"):
            setattr(self, name, getattr(an, name)[b])
        self.px = float(an.px[b, 0, 0])
        self.edge = float(an.edge[b, 0, 0])
        self._display = (an.P.level[b], an.P.gain[b], an.P.gamma[b])

    def window(self, u0: float, u1: float, v0: float, v1: float) -> _Win:
        """Pixel slices covering the patient-space box ``[u0, u1] x [v0, v1]``."""
        r0, r1, c0, c1 = _window_span(self.p, self.size, u0, u1, v0, v1)
        return slice(r0, r1), slice(c0, c1)

    def _heart(self, k: float) -> tuple[_Win, np.ndarray]:
        """Window and signed distance of the heart enlarged by ``k``."""
        c, r = _heart_geometry(self.p, k)
        m = max(r) + 2.0 * self.edge
        w = self.window(c[0] - m, c[0] + m, c[1] - m, c[1] + m)
        return w, _heart_sd(c, r, self.p.heart_tilt, self.u[w], self.v[w])

    def display(self, density: np.ndarray) -> np.ndarray:
        """The batch's grey-level curve for this patient (bit for bit the same)."""
        return _display(density, *self._display)


# --------------------------------------------------------------------------------------------
# findings: each returns its density contribution (0 outside its support)
# --------------------------------------------------------------------------------------------


def _side(rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5)


def _on_side(an: _View, right: bool, values: np.ndarray) -> np.ndarray:
    return np.where(an.right if right else ~an.right, values, _F32(0.0))


def _in_lung_point(an: _View, rng: np.random.Generator, margin: float, right: bool | None = None,
                   v_range: tuple[float, float] = (-0.8, 0.8)) -> tuple[float, float]:
    """A random point (u, v) inside a lung field, ``margin`` from its border (patient units)."""
    p = an.p
    hc, hr = _heart_geometry(p, 1.0)
    n = 64
    sides = np.full(n, bool(right)) if right is not None else rng.random(n) < 0.5
    a = rng.uniform(0.05, 0.85, n)
    v = rng.uniform(v_range[0], v_range[1], n)
    u = np.where(sides, -a, a)
    outer, medial, diaph, _ = _lung_parts(p, u, a, v)
    heart = _heart_sd(hc, hr, p.heart_tilt, u, v)
    sd = np.minimum(np.minimum(outer, medial), np.minimum(diaph, -heart))
    for shrink in (1.0, 0.5, 0.0):
        ok = np.flatnonzero(sd > margin * shrink)
        if ok.size:
            return float(u[ok[0]]), float(v[ok[0]])
    i = int(np.argmax(sd))
    return float(u[i]), float(v[i])


def _local(an: _View, w: _Win, values: np.ndarray) -> np.ndarray:
    out = np.zeros_like(an.u)
    out[w] = values
    return out


def _draw_edema(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar haze ("bat wing"), fading to the periphery, with blurred patchiness."""
    frac = rng.uniform(0.15, 0.55)  # share of the lung air replaced by fluid at the hila
    reach = rng.uniform(0.32, 0.55)
    patch = _field(rng, an.size, 8)
    hv = rng.uniform(-0.04, 0.08)
    da = (an.a - (0.21 - 0.01 * an.rf)) * (1.0 / 1.2)
    dv = an.v - (hv - 0.06 + 0.04 * an.rf)
    r = np.sqrt(da * da + dv * dv)
    w = _smooth(r, reach, reach * 0.2) * _clip(0.75 + 0.25 * patch, 0.3, 1.2)
    return (0.36 * frac) * w * an.aerated


def _draw_pneumonia(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Lobar (sharp fissure edge) or patchy consolidation in one lung."""
    right = _side(rng)
    kind = str(rng.choice(["lower", "upper", "middle", "patchy"], p=[0.35, 0.2, 0.15, 0.3]))
    if kind == "middle" and not right:
        kind = "lower"
    frac = rng.uniform(0.25, 0.85)
    patch = _clip(_field(rng, an.size, 10), -1.5, 1.5)
    v, a = an.v, an.a
    e = max(an.edge, 0.01)
    if kind == "upper":  # bounded below by the horizontal fissure: a sharp lower edge
        fissure = rng.uniform(-0.2, 0.0)
        region = _ramp(v, fissure + e, fissure - e) * (0.75 + 0.2 * patch)
    elif kind == "lower":  # the oblique fissure is seen en face: a fuzzy upper edge
        top = rng.uniform(-0.05, 0.2)
        region = _smooth(v, top - 0.04, top + 0.14) * _ramp(a, 0.12, 0.26) * (0.7 + 0.25 * patch)
    elif kind == "middle":  # against the right heart border, which it silhouettes
        fis = rng.uniform(-0.1, 0.0)
        region = _ramp(v, fis - e, fis + e) * _smooth(v, 0.45, 0.3) * _smooth(a, 0.52, 0.32)
        region *= 0.75 + 0.2 * patch
    else:
        cu, cv = _in_lung_point(an, rng, 0.06, right)
        rad = rng.uniform(0.14, 0.3)
        d = np.sqrt((an.u - cu) ** 2 + (v - cv) ** 2)
        region = _smooth(d, rad, rad * 0.5) * (0.4 + 0.6 * _smooth(patch, -0.5, 0.6))
    return _on_side(an, right, (0.36 * frac) * _clip(region, 0.0, 1.0) * an.aerated)


def _draw_effusion(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Basal fluid with a meniscus rising laterally; fills the costophrenic angle, hides the dome."""
    p = an.p
    which = str(rng.choice(["right", "left", "both"], p=[0.4, 0.35, 0.25]))
    out = np.zeros_like(an.v)
    for right in (True, False):
        if which != "both" and (which == "right") != right:
            continue
        cp, w = p.cp, p.width
        depth = rng.uniform(0.04, 0.45)  # fluid height above the costophrenic angle
        men = rng.uniform(0.03, 0.08) + 0.25 * depth  # the meniscus climbs the lateral wall
        frac = rng.uniform(0.5, 0.95)
        t = _clip((an.a - 0.1) * (1.0 / (w - 0.1)), 0.0, 1.2)
        top = (cp - depth) - men * t * t
        e = max(an.edge, 0.015)
        dv = an.v - top
        fluid = _smooth(dv, -e, 3.0 * e) * (0.8 + 0.2 * _ramp(dv, 0.0, 0.3))
        out += _on_side(an, right, (0.36 * frac) * fluid * an.aerated)
    return out


def _sphere(an: _View, w: _Win, cu: float, cv: float, rad: float, lob: np.ndarray | None) -> np.ndarray:
    du = an.u[w] - cu
    dv = an.v[w] - cv
    q = np.sqrt(du * du + dv * dv) * (1.0 / rad)
    if lob is not None:
        q *= 1.0 + lob
    e = max(an.edge / rad, 0.08)
    return np.sqrt(_clip(1.0 - q * q, 0.0, 1.0) * 0.85 + 0.15) * _smooth(q, 1.0 + e, 1.0 - e)


def _draw_mass(an: _View, rng: np.random.Generator) -> np.ndarray:
    """A rounded, lobulated opacity over 3 cm inside a lung field."""
    rad = max(rng.uniform(0.06, 0.14), 2.5 * an.px)  # larger than a nodule at any size
    cu, cv = _in_lung_point(an, rng, 0.6 * rad)
    lob = _clip(0.12 * _field(rng, an.size, 18), -0.2, 0.3)
    amp = rng.uniform(0.07, 0.28)
    m = 1.4 * rad + 2.0 * an.edge  # the lobulation below stretches the outline by up to 1 / 0.8
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    return _local(an, w, amp * _sphere(an, w, cu, cv, rad, lob[w]))


def _draw_nodule(an: _View, rng: np.random.Generator) -> np.ndarray:
    """A small, well-defined round opacity (at least about 3 px across)."""
    rad = max(rng.uniform(0.022, 0.05), 1.5 * an.px)
    cu, cv = _in_lung_point(an, rng, 0.02)
    amp = rng.uniform(0.06, 0.25)
    m = 1.2 * rad + 2.0 * an.edge
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    return _local(an, w, amp * _sphere(an, w, cu, cv, rad, None))


def _draw_atelectasis(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Plate-like (discoid) band in a lower zone, or a collapsed lower lobe wedge by the heart."""
    right = _side(rng)
    if rng.random() < 0.6:
        cu, cv = _in_lung_point(an, rng, 0.05, right, v_range=(0.0, 0.45))
        length = rng.uniform(0.1, 0.28)
        thick = max(rng.uniform(0.012, 0.03), 0.9 * an.px)
        ang = rng.uniform(-0.3, 0.3)
        frac = rng.uniform(0.4, 1.0)
        m = 0.5 * length + 0.04 + 2.0 * an.edge
        w = an.window(cu - m, cu + m, cv - m, cv + m)
        du, dv = an.u[w] - cu, an.v[w] - cv
        cs, sn = math.cos(ang), math.sin(ang)
        across = _pulse(dv * cs - du * sn, thick, max(an.edge, 0.006))
        along = _ramp(np.abs(du * cs + dv * sn), 0.5 * length, 0.5 * length - 0.04)
        band = across * along
        return _local(an, w, (0.36 * frac) * band * an.aerated[w])
    # wedge from the hilum down to the medial diaphragm (lower lobe collapse)
    x = -an.u if right else an.u  # lateral distance on that side
    v = an.v
    hv = rng.uniform(-0.05, 0.08)
    width = rng.uniform(0.12, 0.26)
    base = an.dome_height + 0.02
    t = _clip((v - hv) / np.maximum(base - hv, 0.1), 0.0, 1.0)
    lateral = 0.06 + width * t
    wedge = _ramp(x - lateral, 0.02, -0.02) * _ramp(v, hv, hv + 0.06) * _ramp(v - base, 0.02, -0.03)
    wedge *= _ramp(x, -0.02, 0.04)
    frac = rng.uniform(0.3, 0.8)
    return _on_side(an, right, (0.36 * frac) * wedge * an.aerated + 0.06 * frac * wedge)


def _draw_hernia(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Retrocardiac rounded opacity sitting on the diaphragm, often with an air-fluid level."""
    p = an.p
    rad = rng.uniform(0.07, 0.14)
    ry = rad * rng.uniform(0.7, 0.9)
    cu = rng.uniform(-0.04, 0.1)
    cv = 0.5 * (p.dome[0] + p.dome[1]) + rng.uniform(0.0, 0.07) - 0.6 * ry
    m = 1.1 * rad + 2.0 * an.edge
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    du = (an.u[w] - cu) * (1.0 / rad)
    dv = (an.v[w] - cv) * (1.0 / ry)
    q = np.sqrt(du * du + dv * dv)
    e = max(an.edge / ry, 0.06)
    amp = rng.uniform(0.04, 0.14)
    out = amp * _smooth(q, 1.0 + e, 1.0 - e) * (0.8 + 0.2 * _ramp(q, 0.5, 1.0))
    if rng.random() < 0.8:  # gas above a horizontal fluid level
        lvl = cv + ry * rng.uniform(-0.4, 0.35)
        gas = _ramp(an.v[w], lvl + 0.5 * an.edge, lvl - 0.5 * an.edge) * _smooth(q, 0.92, 0.8)
        out -= rng.uniform(1.4, 2.2) * amp * gas
    return _local(an, w, out)


def _draw_pneumothorax(an: _View, rng: np.random.Generator) -> np.ndarray:
    """Apical / lateral rim with no lung markings, darker, and a thin visceral pleural line."""
    p = an.p
    right = _side(rng)
    apex = p.apex
    depth = rng.uniform(0.04, 0.16)
    end = rng.uniform(-0.15, 0.4)  # how far down the lateral wall it reaches
    v = an.v
    dd = depth * _smooth(v, end + 0.1, apex + 0.25) + 0.005
    e = max(an.edge, 0.006)
    gap = an.outer - dd
    lower = _ramp(v, end + 0.15, end - 0.05)
    region = _ramp(gap, e, -e) * _ramp(an.lung_sd, -an.edge, an.edge) * lower
    line = _pulse(gap, max(0.004, 0.35 * an.px), e) * _ramp(an.lung_sd, 0.0, 0.01)
    line *= lower * _ramp(dd, 0.02, 0.035)
    lucency = rng.uniform(0.03, 0.08)
    burn = rng.uniform(0.0, 0.3)  # ribs partly burnt out in the hyperlucent rim
    out = -region * (an.markings + lucency + burn * an.ribs) + rng.uniform(0.05, 0.12) * line
    return _on_side(an, right, out)


_DRAW: dict[str, Callable[[_View, np.random.Generator], np.ndarray]] = {
    "Atelectasis": _draw_atelectasis,
    "Effusion": _draw_effusion,
    "Mass": _draw_mass,
    "Nodule": _draw_nodule,
    "Pneumonia": _draw_pneumonia,
    "Pneumothorax": _draw_pneumothorax,
    "Edema": _draw_edema,
    "Hernia": _draw_hernia,
}


# --------------------------------------------------------------------------------------------
# rendering
# --------------------------------------------------------------------------------------------


def _check_size(size: int) -> int:
    if int(size) != size or int(size) not in SIZES:
        valid = ", ".join(map(str, SIZES))
        raise ValueError(f"phantom size must be one of {valid} (a power of two); got {size}")
    return int(size)


def _phantom_name(name: str, what: str) -> str:
    canon = labels.canonical(name)
    if canon not in PHANTOM_FINDINGS:
        raise ValueError(
            f"{what} '{name}' ({canon}) cannot be drawn by the phantom; "
            f"it draws {', '.join(PHANTOM_FINDINGS)}"
        )
    return canon


def resolve_prevalence(prevalence: Mapping[str, float] | None) -> dict[str, float]:
    """Validate a prevalence mapping and merge it over :data:`DEFAULT_PREVALENCE`.

    Keys may be any alias :func:`augment.data.labels.canonical` accepts; findings not given keep
    their default, so ``{"Hernia": 0}`` only removes hernias.

    Raises:
        ValueError: an unknown name, a finding the phantom cannot draw, or a value outside [0, 1].
    """
    out = dict(DEFAULT_PREVALENCE)
    for name, value in (prevalence or {}).items():
        canon = _phantom_name(str(name), "prevalence key")
        value = float(value)
        if not 0.0 <= value <= 1.0 or math.isnan(value):
            raise ValueError(f"prevalence of {canon} must be in [0, 1]; got {value}")
        out[canon] = value
    return out


def _choose(rng: np.random.Generator, prev: Mapping[str, float], healthy_fraction: float) -> list[str]:
    draws = rng.random(len(PHANTOM_FINDINGS) + 2)
    if draws[0] < healthy_fraction:
        return []
    probs = np.array([prev[f] for f in PHANTOM_FINDINGS])
    chosen = [f for f, d, q in zip(PHANTOM_FINDINGS, draws[1:], probs) if d < q]
    if not chosen and probs.sum() > 0:
        # an abnormal image has at least one finding: pick one in proportion to prevalence
        cdf = np.cumsum(probs) / probs.sum()
        chosen = [PHANTOM_FINDINGS[min(int(np.searchsorted(cdf, draws[-1], side="right")), len(cdf) - 1)]]
    return chosen


def _to_uint8(grey: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Add the noise (which carries +0.5, so truncation rounds) and quantise."""
    x = grey + noise
    return _clip(x, 0.0, 255.0, out=x).astype(np.uint8)


def render(
    index: int,
    *,
    seed: int = 0,
    size: int = 64,
    prevalence: Mapping[str, float] | None = None,
    healthy_fraction: float = 0.3,
    force: Sequence[str] | None = None,
) -> PhantomCase:
    """Render patient ``index`` of phantom ``seed``.

    With probability ``healthy_fraction`` the patient has no finding; otherwise each finding is
    present independently with its prevalence, and if none came up one is picked in proportion to
    the prevalences (so an abnormal image has one or more findings). A finding with prevalence 0
    never appears; with all prevalences 0 every image is healthy.

    Args:
        index: patient number; with ``seed`` it fixes everything (see the module docstring).
        seed: phantom seed.
        size: image side in pixels, one of :data:`SIZES`.
        prevalence: finding -> probability, merged over :data:`DEFAULT_PREVALENCE`; keys may be
            aliases (``"pleural effusion"``).
        healthy_fraction: probability that the image has no finding.
        force: render exactly these findings, ignoring ``prevalence`` and ``healthy_fraction``
            (``[]`` renders the patient healthy). The anatomy, exposure and noise stay those of
            ``(seed, index)``.

    Returns:
        The case: image, paired healthy image, findings, masks and anatomy masks.

    Raises:
        ValueError: bad size, an unknown finding or one the phantom cannot draw, a prevalence or
            ``healthy_fraction`` outside [0, 1].
    """
    size = _check_size(size)
    if force is not None:
        findings = {_phantom_name(str(f), "forced finding") for f in force}
        chosen = [f for f in PHANTOM_FINDINGS if f in findings]
    else:
        prev = resolve_prevalence(prevalence)
        if not 0.0 <= healthy_fraction <= 1.0:
            raise ValueError(f"healthy_fraction must be in [0, 1]; got {healthy_fraction}")
        chosen = _choose(np.random.default_rng([seed, index, 2]), prev, healthy_fraction)
    return _render([index], seed, size, [chosen])[0]


def _cardiomegaly(an: _View, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Density change of an enlarged heart, and the enlarged heart's silhouette (soft)."""
    win, sd = an._heart(rng.uniform(1.16, 1.45))
    soft = np.zeros_like(an.u)
    soft[win] = _ramp(sd, -an.edge, an.edge)
    change = soft - an.heart_soft  # >= 0: the enlarged heart contains the normal one
    # heart density where it stands above the diaphragm, and the lung air it now hides
    return change * (0.06 * an.above_diaphragm + 0.27 * an.air), soft


_BATCH_PIXELS = 1 << 17
"""Pixels rendered together: amortises numpy's per-call overhead, stays within the caches."""


def _render(
    indices: Sequence[int], seed: int, size: int, chosen: Sequence[Sequence[str]]
) -> list[PhantomCase]:
    """Render the patients ``indices`` (all anatomy in one batch), ``chosen[i]`` their findings."""
    rngs = [np.random.default_rng([seed, index]) for index in indices]
    an = _Anatomy([_draw_patient(r) for r in rngs], size, rngs)
    grey_h = an.display(an.healthy)
    # quantum noise, the same realisation in both renders: uniform draws summed over 2 x 2
    # neighbours (near Gaussian, unit variance, slightly correlated like a detector's), growing
    # with density since fewer photons reach the detector behind bone
    raw = np.stack([np.random.default_rng([seed, index, 1]).random((size + 1, size + 1), dtype=_F32)
                    for index in indices])
    noise = raw[:, :-1, :-1] + raw[:, 1:, :-1]
    noise += raw[:, :-1, 1:]
    noise += raw[:, 1:, 1:]
    noise -= 2.0
    noise *= (an.P.noise * math.sqrt(3.0)) * (0.55 + grey_h * (0.9 / 255.0))
    noise += 0.5  # rounds on the cast to uint8
    healthy = _to_uint8(grey_h, noise)
    hearts = an.heart_soft >= 0.5
    return [
        _findings(an, b, index, seed, chosen[b], grey_h[b], noise[b], healthy[b], hearts[b])
        for b, index in enumerate(indices)
    ]


def _findings(an: _Anatomy, b: int, index: int, seed: int, chosen: Sequence[str], grey_h: np.ndarray,
              noise: np.ndarray, healthy: np.ndarray, heart: np.ndarray) -> PhantomCase:
    """Draw patient ``b``'s findings onto its healthy render."""
    masks: dict[str, np.ndarray] = {}
    if not chosen:
        return PhantomCase(healthy.copy(), healthy, [], masks, an.lungs[b], heart)
    view = an.view(b)
    contributions: dict[str, np.ndarray] = {}
    for k, name in enumerate(PHANTOM_FINDINGS):
        if name in chosen:
            frng = np.random.default_rng([seed, index, 3, k])
            if name == "Cardiomegaly":
                contributions[name], soft = _cardiomegaly(view, frng)
                heart = soft >= 0.5
            else:
                contributions[name] = _DRAW[name](view, frng)
    total = view.healthy.copy()
    for c in contributions.values():
        total += c
    grey = view.display(total)
    image = _to_uint8(grey, noise)
    if len(contributions) == 1:
        (name,) = contributions
        masks[name] = np.abs(grey - grey_h) >= MASK_THRESHOLD
    else:
        # each finding's own effect; where only their sum reaches the threshold, the pixel goes
        # to the finding with the largest own effect, so the masks' union is exactly where the
        # findings together change the image
        names = list(contributions)
        effects = np.stack([np.abs(view.display(view.healthy + contributions[n]) - grey_h) for n in names])
        for name, eff in zip(names, effects):
            masks[name] = eff >= MASK_THRESHOLD
        rest = np.abs(grey - grey_h) >= MASK_THRESHOLD
        for m in masks.values():
            rest &= ~m
        if rest.any():
            owner = effects.argmax(0)
            for k, name in enumerate(names):
                masks[name] |= rest & (owner == k)
    return PhantomCase(image, healthy, list(contributions), masks, an.lungs[b], heart)


def render_many(
    n: int,
    *,
    seed: int = 0,
    size: int = 64,
    start: int = 0,
    prevalence: Mapping[str, float] | None = None,
    healthy_fraction: float = 0.3,
    progress: bool = False,
) -> PhantomBatch:
    """Render patients ``start .. start + n - 1`` and stack them.

    Each image is exactly ``render(start + i, seed=seed, size=size, ...)``, so batches of any
    split give the same images.

    Args:
        n: number of images.
        seed: phantom seed.
        size: image side, one of :data:`SIZES`.
        start: first index.
        prevalence: as in :func:`render`.
        healthy_fraction: as in :func:`render`.
        progress: show a progress bar (quiet when stderr is not a terminal).

    Returns:
        The stacked batch; ``masks`` holds every finding in :data:`PHANTOM_FINDINGS`.
    """
    size = _check_size(size)
    if n < 0:
        raise ValueError(f"n must be >= 0; got {n}")
    prev = resolve_prevalence(prevalence)
    if not 0.0 <= healthy_fraction <= 1.0:
        raise ValueError(f"healthy_fraction must be in [0, 1]; got {healthy_fraction}")
    images = np.empty((n, size, size), np.uint8)
    healthy = np.empty((n, size, size), np.uint8)
    lungs = np.empty((n, size, size), np.uint8)
    masks = {f: np.zeros((n, size, size), np.uint8) for f in PHANTOM_FINDINGS}
    y = np.zeros((n, len(labels.VOCABULARY)), np.float32)
    chunk = max(1, _BATCH_PIXELS // (size * size))
    bar = None
    if progress:
        import sys

        from tqdm import tqdm

        bar = tqdm(total=n, desc="phantom", unit="img", disable=not sys.stderr.isatty())
    for lo in range(0, n, chunk):
        indices = list(range(start + lo, start + min(lo + chunk, n)))
        chosen = [_choose(np.random.default_rng([seed, i, 2]), prev, healthy_fraction) for i in indices]
        for i, case in enumerate(_render(indices, seed, size, chosen), start=lo):
            images[i] = case.image
            healthy[i] = case.healthy
            lungs[i] = case.lungs
            for f, m in case.masks.items():
                masks[f][i] = m
            y[i] = labels.multi_hot(case.findings)
        if bar is not None:
            bar.update(len(indices))
    if bar is not None:
        bar.close()
    ids = [f"phantom-{seed}-{index}" for index in range(start, start + n)]
    return PhantomBatch(images, healthy, y, masks, lungs, ids)
