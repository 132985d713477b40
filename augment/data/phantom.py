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

How it is drawn: a density map (the projected attenuation) is built from analytic shapes with soft
edges whose width is the patient's blur, evaluated directly at the output size on cached coordinate
grids, then mapped to grey levels by a film-like curve (``tanh``: toe and shoulder, never a hard
clip) and given signal-dependent noise. Findings add to (or, for a pneumothorax, subtract from) the
density, so the healthy and abnormal renders differ only where a finding has support; a finding's
mask is where its own contribution changes the grey level by at least :data:`MASK_THRESHOLD`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from augment.data import labels

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
"""Probability of each finding in an image that is not drawn healthy (see :func:`render`)."""

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
            the normal heart is ``heart & ~masks["Cardiomegaly"]``).
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


def _ramp(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """0 at ``lo``, 1 at ``hi``, linear between, constant outside (``lo > hi`` falls)."""
    k = 1.0 / (hi - lo)
    t = x * k
    t += -lo * k
    return np.clip(t, 0.0, 1.0, out=t)


def _smooth(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Smoothstep from 0 at ``lo`` to 1 at ``hi``: exactly 0 and 1 outside, so supports are compact."""
    t = _ramp(x, lo, hi)
    t2 = t * t
    t *= -2.0
    t += 3.0
    t *= t2
    return t


def _pulse(x: np.ndarray, half: float, edge: float) -> np.ndarray:
    """1 where ``|x| < half``, falling linearly to 0 over ``edge`` (centred on the border)."""
    return _ramp(np.abs(x), half + 0.5 * edge, half - 0.5 * edge)


def _stripes(phase: np.ndarray, half: float, edge: float) -> np.ndarray:
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


def _field(rng: np.random.Generator, size: int, res: int) -> np.ndarray:
    """Smooth random field, about unit standard deviation, features about ``2 / res`` wide.

    The knots are drawn at a fixed count whatever ``size``, so a patient looks the same at every
    size.
    """
    a = _interp(size, res)
    return a @ rng.standard_normal((res, res), dtype=_F32) @ a.T


# --------------------------------------------------------------------------------------------
# the patient
# --------------------------------------------------------------------------------------------


@dataclass
class _Patient:
    """Scalar parameters of one patient, its exposure and acquisition (pairs are (right, left))."""

    scale: float
    cx: float
    cy: float
    angle: float
    apex: tuple[float, float]
    dome: tuple[float, float]
    cp: tuple[float, float]  # costophrenic angle height
    width: tuple[float, float]  # lateral lung wall
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


def _draw_patient(rng: np.random.Generator) -> _Patient:
    u = rng.uniform
    insp = u(-1.0, 1.0)  # inspiration depth: deeper breath, lower domes and longer lungs
    dome_r = 0.24 + 0.07 * insp + u(-0.02, 0.02)
    dome_l = dome_r + u(0.02, 0.07)  # the right hemidiaphragm sits higher (the liver)
    cp = 0.50 + 0.07 * insp + u(-0.02, 0.02)
    wr = u(0.74, 0.84)
    return _Patient(
        scale=u(0.9, 1.05),
        cx=u(-0.05, 0.05),
        cy=u(0.0, 0.1),
        angle=math.radians(u(-4.0, 4.0)),
        apex=(u(-0.78, -0.70), u(-0.78, -0.70)),
        dome=(dome_r, dome_l),
        cp=(cp + u(-0.02, 0.01), cp + u(0.0, 0.04)),
        width=(wr, wr + u(-0.03, 0.03)),
        heart_c=(u(0.1, 0.15), u(0.2, 0.25) + 0.5 * (dome_r - 0.24)),
        heart_r=(u(0.32, 0.38), u(0.21, 0.25)),
        heart_tilt=math.radians(u(15.0, 30.0)),
        mediastinum=u(0.12, 0.15),
        body=u(0.86, 0.97),
        rib_amp=u(0.8, 1.2),
        rib_phase=u(-0.08, 0.08),
        vessel_k=u(6.0, 8.5),
        level=u(0.28, 0.34),
        gain=u(3.8, 5.2),
        gamma=u(-0.06, 0.06),
        noise=u(1.2, 4.5),
        blur_px=u(0.35, 1.1),
    )


def _lung_parts(p: _Patient, a: np.ndarray, v: np.ndarray, rf: np.ndarray | float) -> tuple[np.ndarray, ...]:
    """Signed distances (positive inside, roughly in patient units) bounding a lung field.

    Args:
        p: patient.
        a: distance from the midline, ``|u|``.
        v: height (down +).
        rf: 1 on the patient's right (the image left), 0 on the left.

    Returns:
        ``(outer, medial, diaphragm, dome_height)``: the egg-shaped rib-cage outline, the
        mediastinal border, the diaphragm, and the dome height at ``a``.
    """

    def sel(pair: tuple[float, float]) -> np.ndarray | float:
        return pair[1] + (pair[0] - pair[1]) * rf

    w = p.width
    # egg: widest near the bases, its rounded apex medial of the lateral wall
    vc = 0.38
    dx = (a - sel((0.47 * w[0], 0.47 * w[1]))) * sel((1.0 / (0.53 * w[0]), 1.0 / (0.53 * w[1])))
    dy = (v - vc) * sel((1.0 / (vc - p.apex[0]), 1.0 / (vc - p.apex[1])))
    q = dx * dx
    q += dy * dy
    outer = (1.0 - np.sqrt(q)) * sel((0.53 * w[0], 0.53 * w[1]))
    # narrow between the apices, widest at the aortic arch
    medial = a - p.mediastinum * 0.65 - (p.mediastinum * 0.35) * _ramp(v, -0.75, -0.4)
    # dome: highest at mid-hemithorax, falling to the costophrenic angle laterally
    t = (a - sel((0.42 * w[0], 0.42 * w[1]))) * sel((1.0 / (0.58 * w[0]), 1.0 / (0.58 * w[1])))
    height = sel(p.dome) + sel((p.cp[0] - p.dome[0], p.cp[1] - p.dome[1])) * (t * t)
    return outer, medial, height - v, height


def _heart_geometry(p: _Patient, k: float) -> tuple[tuple[float, float], tuple[float, float]]:
    """Heart centre and radii enlarged by ``k`` around its base (the right border moves least)."""
    anchor = (p.heart_c[0] - 0.12, p.heart_c[1] + 0.12)
    c = (anchor[0] + k * (p.heart_c[0] - anchor[0]), anchor[1] + k * (p.heart_c[1] - anchor[1]))
    return c, (p.heart_r[0] * k, p.heart_r[1] * k)


def _heart_sd(c: tuple[float, float], r: tuple[float, float], tilt: float, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Approximate signed distance (positive inside) to the tilted heart ellipse."""
    cs, sn = math.cos(tilt), math.sin(tilt)
    du = u - c[0]
    dv = v - c[1]
    x = (du * cs + dv * sn) * (1.0 / r[0])
    y = (dv * cs - du * sn) * (1.0 / r[1])
    q = x * x
    q += y * y
    return (1.0 - np.sqrt(q)) * min(r)


class _Anatomy:
    """One patient's fields on the pixel grid, kept for drawing findings.

    Densities are in arbitrary units where soft tissue is about 0.5 and the lung air removes up
    to 0.36; :meth:`display` maps them to grey levels.
    """

    def __init__(self, p: _Patient, size: int, rng: np.random.Generator) -> None:
        self.p = p
        self.size = size
        gx, gy = _grid(size)
        cs, sn = math.cos(p.angle), math.sin(p.angle)
        inv = 1.0 / p.scale
        self._rot = (cs, sn)
        u = gx * (cs * inv) + gy * (sn * inv)
        u -= (p.cx * cs + p.cy * sn) * inv
        v = gy * (cs * inv) - gx * (sn * inv)
        v -= (p.cy * cs - p.cx * sn) * inv
        self.u, self.v = u, v
        self.a = a = np.abs(u)
        self.right = right = u < 0.0
        self.rf = rf = right.astype(_F32)
        self.px = px = 2.0 / size * inv  # one pixel in patient units
        self.edge = e = math.hypot(0.6 * px, p.blur_px * px)  # soft-edge width: the blur

        # texture fields
        self.tex = tex = _field(rng, size, 14)
        wob = _field(rng, size, 6)
        frag = _field(rng, size, 12)

        # lungs
        outer, medial, diaph, height = _lung_parts(p, a, v, rf)
        self.outer, self.dome_height = outer, height
        lung_sd = np.minimum(outer, medial)
        np.minimum(lung_sd, diaph, out=lung_sd)
        w = self.window(p.mediastinum - 0.1, p.mediastinum + 0.1, -0.42, -0.18)
        knob = np.sqrt((u[w] - (p.mediastinum - 0.01)) ** 2 + (v[w] + 0.3) ** 2) - 0.06  # aortic knob
        np.minimum(lung_sd[w], np.where(right[w], _F32(1.0), knob), out=lung_sd[w])
        self.lung_sd = lung_sd
        self.lung = lung = _ramp(lung_sd, -e, e)
        # aerated thickness: thin at the borders, thickest mid-lung
        air = lung * (0.55 + 0.45 * _ramp(lung_sd, 0.0, 0.16))

        # body: soft tissue, thickest centrally (a projected cylinder); neck, sloping shoulders
        # and arms on top, more tissue low down (breasts, abdominal wall)
        wb = 0.26 + _smooth(v, -1.12, -0.74)
        wb += (p.body - 1.26) * _smooth(v, -0.72, -0.42)
        wb += 0.05 * v * _ramp(v, -0.72, -0.42)
        ratio = a / wb
        body_in = _ramp(ratio, 1.0 + 2.0 * e, 1.0 - 2.0 * e)
        r2 = ratio * ratio
        thick = np.sqrt(np.clip(1.0 - r2, 0.0, 1.0, out=r2))
        soft = body_in * (0.28 + 0.2 * thick + 0.05 * _ramp(v, -0.3, 0.5))

        # heart (normal size), on the diaphragm: below the dome it is lost in the abdomen
        self.above_diaphragm = _ramp(diaph, -0.03, 0.02)
        self.heart_win, heart_sd = self._heart(1.0)
        self.heart_soft = np.zeros_like(u)
        self.heart_density = np.zeros_like(u)
        self.heart_soft[self.heart_win] = hs = _ramp(heart_sd, -e, e)
        self.heart_density[self.heart_win] = 0.06 * hs * self.above_diaphragm[self.heart_win]

        # ribs: posterior arcs (convex upwards, spaced wider downwards) and fainter anterior ribs
        # sloping down towards the midline; dimmer where the liver overlaps them
        cage = _ramp(outer, -0.07, -0.02) * _ramp(a, 0.04, 0.09)
        lat = np.maximum(a - 0.55, 0.0)
        pv = v + 0.6 * a - 0.9 * a * a - 1.2 * lat * lat
        tp = (pv + (0.8 - p.rib_phase)) * (1.0 / 1.3)
        phase = np.clip(tp * (12.0 - 2.0 * tp), 0.5, 11.5)  # half-integers end the series
        period = 1.30 / 9.0
        pe = min(2.0 * e / period, 0.45)
        prib = _stripes(phase, 0.23, pe)
        av = (v + 0.45 * a + (0.42 - p.rib_phase)) * (1.0 / 0.2)
        np.clip(av, -0.5, 6.5, out=av)
        arib = _stripes(av, 0.2, pe) * _ramp(a, 0.18, 0.34)
        fade = min(max((period * size * p.scale / 2.0 - 2.5) / 2.5, 0.0), 1.0)  # ribs alias below ~4 px
        low = 1.0 - 0.55 * _ramp(v - height, 0.0, 0.12)
        prib *= 0.06
        prib += 0.028 * arib
        self.ribs = ribs = prib * cage * low * (p.rib_amp * fade)

        # lung markings: vessels branching out of the hila, thinning and fading outwards
        dv = v - (-0.1 + 0.06 * rf)
        da = a - (0.09 - 0.01 * rf)
        r = da * da
        r += dv * dv
        r = np.sqrt(r)
        t = dv / (np.abs(da) + 0.03)
        ang = t / (1.0 + np.abs(t))
        ph = p.vessel_k * ang + 0.8 * wob + 2.0 * r
        width = 0.05 + 0.05 / (r + 0.15)
        fr = np.abs(ph - np.rint(ph))
        ves = np.clip((width - fr) * 16.0 + 1.0, 0.0, 1.0) * _ramp(r, 0.7, 0.15)
        ph *= 2.1
        ph += 0.6 * frag
        fr = np.abs(ph - np.rint(ph))
        ves2 = np.clip((width - fr) * 16.0 + 1.0, 0.0, 1.0) * (_ramp(r, 0.6, 0.2) * _ramp(frag, -0.2, 0.6))
        ves *= 0.04
        ves += 0.025 * ves2
        ves += 0.012 * tex
        ves += 0.06 * _smooth(r, 0.22, 0.1)  # hila
        self.markings = markings = lung * ves

        static = soft + ribs
        static += markings
        # spine: vertebral bodies with end plates, pedicles
        w = self.window(-0.1, 0.1, -1.6, 1.6)
        uw, vw = u[w], v[w]
        fr = (vw + 1.0) * (1.0 / 0.085)
        fr = np.abs(fr - np.rint(fr))
        col = _pulse(uw, 0.075, max(e, 0.015))
        col *= 0.035 * (0.75 + 0.25 * _ramp(fr, 0.05, 0.14))
        col += 0.025 * _pulse(a[w] - 0.058, 0.012, max(e, 0.006)) * _pulse(fr - 0.25, 0.1, 0.05)
        static[w] += col
        # trachea (an air column), carina at about v = -0.25
        w = self.window(-0.07, 0.05, -1.6, -0.15)
        static[w] -= 0.1 * _pulse(u[w] + 0.01, 0.038, max(e, 0.012)) * _ramp(v[w], -0.2, -0.32)
        # clavicles: S-curve from the sternal notch out and up to the acromion
        w = self.window(-0.85, 0.85, -0.95, -0.4)
        ca = a[w] - 0.07
        cl = v[w] - (-0.56 + 0.5 * p.rib_phase) + 0.15 * ca + 0.12 * ca * ca
        half = 0.036 - 0.012 * np.clip(ca, 0.0, 0.7)
        clav = np.clip((half - np.abs(cl)) * (1.0 / max(e, 0.01)) + 0.5, 0.0, 1.0)
        static[w] += 0.11 * clav * _ramp(ca, -0.02, 0.02) * _ramp(ca, 0.74, 0.64)
        # gastric bubble under the left hemidiaphragm
        w = self.window(0.2, 0.52, p.dome[1] - 0.05, p.cp[1] + 0.25)
        gh = ((u[w] - 0.36) * (1.0 / 0.11)) ** 2 + ((v[w] - (height[w] + 0.09)) * (1.0 / 0.055)) ** 2
        static[w] -= np.where(right[w], _F32(0.0), 0.1 * _ramp(gh, 1.0, 0.5))

        self.air = air
        static -= 0.36 * air
        self.static = static
        # the lung air the heart does not already hide: what a finding in the lung may replace
        self.aerated = air - 0.75 * air * self.heart_soft
        self.healthy = static + self.heart_density
        self.healthy += 0.27 * air * self.heart_soft
        self.lungs = (lung_sd >= 0.0) & (self.heart_soft < 0.5)

    def window(self, u0: float, u1: float, v0: float, v1: float) -> _Win:
        """Pixel slices covering the patient-space box ``[u0, u1] x [v0, v1]``."""
        p, (cs, sn) = self.p, self._rot
        us = np.array([u0, u1, u0, u1])
        vs = np.array([v0, v0, v1, v1])
        x = p.cx + p.scale * (us * cs - vs * sn)
        y = p.cy + p.scale * (us * sn + vs * cs)
        half = self.size / 2.0

        def span(c: np.ndarray) -> slice:
            lo = int(math.floor((c.min() + 1.0) * half - 0.5)) - 1
            hi = int(math.ceil((c.max() + 1.0) * half - 0.5)) + 2
            return slice(min(max(lo, 0), self.size), min(max(hi, 0), self.size))

        return span(y), span(x)

    def _heart(self, k: float) -> tuple[_Win, np.ndarray]:
        """Window and signed distance of the heart enlarged by ``k``."""
        c, r = _heart_geometry(self.p, k)
        m = max(r) + 2.0 * self.edge
        w = self.window(c[0] - m, c[0] + m, c[1] - m, c[1] + m)
        return w, _heart_sd(c, r, self.p.heart_tilt, self.u[w], self.v[w])

    def display(self, density: np.ndarray) -> np.ndarray:
        """Film-like density -> grey-level curve (float 0..255, monotone, toe and shoulder, no clip)."""
        p = self.p
        x = density - p.level
        x *= p.gain
        x += p.gamma * x * x
        y = x / np.sqrt(x * x + 1.0)
        y *= 127.5
        y += 127.5
        return y


# --------------------------------------------------------------------------------------------
# findings: each returns its density contribution (0 outside its support)
# --------------------------------------------------------------------------------------------


def _side(rng: np.random.Generator) -> bool:
    return bool(rng.random() < 0.5)


def _on_side(an: _Anatomy, right: bool, values: np.ndarray) -> np.ndarray:
    return np.where(an.right if right else ~an.right, values, _F32(0.0))


def _in_lung_point(an: _Anatomy, rng: np.random.Generator, margin: float, right: bool | None = None,
                   v_range: tuple[float, float] = (-0.8, 0.8)) -> tuple[float, float]:
    """A random point (u, v) inside a lung field, ``margin`` from its border (patient units)."""
    p = an.p
    hc, hr = _heart_geometry(p, 1.0)
    n = 64
    sides = np.full(n, bool(right)) if right is not None else rng.random(n) < 0.5
    a = rng.uniform(0.05, 0.85, n)
    v = rng.uniform(v_range[0], v_range[1], n)
    outer, medial, diaph, _ = _lung_parts(p, a, v, sides.astype(np.float64))
    u = np.where(sides, -a, a)
    heart = _heart_sd(hc, hr, p.heart_tilt, u, v)
    sd = np.minimum(np.minimum(outer, medial), np.minimum(diaph, -heart))
    for shrink in (1.0, 0.5, 0.0):
        ok = np.flatnonzero(sd > margin * shrink)
        if ok.size:
            return float(u[ok[0]]), float(v[ok[0]])
    i = int(np.argmax(sd))
    return float(u[i]), float(v[i])


def _local(an: _Anatomy, w: _Win, values: np.ndarray) -> np.ndarray:
    out = np.zeros_like(an.u)
    out[w] = values
    return out


def _draw_edema(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Bilateral perihilar haze ("bat wing"), fading to the periphery, with blurred patchiness."""
    frac = rng.uniform(0.15, 0.55)  # share of the lung air replaced by fluid at the hila
    reach = rng.uniform(0.32, 0.55)
    patch = _field(rng, an.size, 8)
    hv = rng.uniform(-0.04, 0.08)
    da = (an.a - (0.21 - 0.01 * an.rf)) * (1.0 / 1.2)
    dv = an.v - (hv - 0.06 + 0.04 * an.rf)
    r = np.sqrt(da * da + dv * dv)
    w = _smooth(r, reach, reach * 0.2) * np.clip(0.75 + 0.25 * patch, 0.3, 1.2)
    return (0.36 * frac) * w * an.aerated


def _draw_pneumonia(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Lobar (sharp fissure edge) or patchy consolidation in one lung."""
    right = _side(rng)
    kind = str(rng.choice(["lower", "upper", "middle", "patchy"], p=[0.35, 0.2, 0.15, 0.3]))
    if kind == "middle" and not right:
        kind = "lower"
    frac = rng.uniform(0.25, 0.85)
    patch = np.clip(_field(rng, an.size, 10), -1.5, 1.5)
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
        region = _smooth(d, rad, rad * 0.5) * _smooth(patch, -0.5, 0.6)
    return _on_side(an, right, (0.36 * frac) * np.clip(region, 0.0, 1.0) * an.aerated)


def _draw_effusion(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Basal fluid with a meniscus rising laterally; fills the costophrenic angle, hides the dome."""
    p = an.p
    which = str(rng.choice(["right", "left", "both"], p=[0.4, 0.35, 0.25]))
    out = np.zeros_like(an.v)
    for right in (True, False):
        if which != "both" and (which == "right") != right:
            continue
        cp = p.cp[0 if right else 1]
        w = p.width[0 if right else 1]
        depth = rng.uniform(0.04, 0.45)  # fluid height above the costophrenic angle
        men = rng.uniform(0.03, 0.08) + 0.25 * depth  # the meniscus climbs the lateral wall
        frac = rng.uniform(0.5, 0.95)
        t = np.clip((an.a - 0.1) * (1.0 / (w - 0.1)), 0.0, 1.2)
        top = (cp - depth) - men * t * t
        e = max(an.edge, 0.015)
        dv = an.v - top
        fluid = _smooth(dv, -e, 3.0 * e) * (0.8 + 0.2 * _ramp(dv, 0.0, 0.3))
        out += _on_side(an, right, (0.36 * frac) * fluid * an.aerated)
    return out


def _sphere(an: _Anatomy, w: _Win, cu: float, cv: float, rad: float, lob: np.ndarray | None) -> np.ndarray:
    du = an.u[w] - cu
    dv = an.v[w] - cv
    q = np.sqrt(du * du + dv * dv) * (1.0 / rad)
    if lob is not None:
        q *= 1.0 + lob
    e = max(an.edge / rad, 0.08)
    return np.sqrt(np.clip(1.0 - q * q, 0.0, 1.0) * 0.85 + 0.15) * _smooth(q, 1.0 + e, 1.0 - e)


def _draw_mass(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A rounded, lobulated opacity over 3 cm inside a lung field."""
    rad = rng.uniform(0.06, 0.14)
    cu, cv = _in_lung_point(an, rng, 0.6 * rad)
    lob = 0.12 * _field(rng, an.size, 18)
    amp = rng.uniform(0.07, 0.28)
    m = 1.3 * rad + 2.0 * an.edge
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    return _local(an, w, amp * _sphere(an, w, cu, cv, rad, lob[w]))


def _draw_nodule(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """A small, well-defined round opacity (at least about 3 px across)."""
    rad = max(rng.uniform(0.022, 0.05), 1.6 * an.px)
    cu, cv = _in_lung_point(an, rng, 0.02)
    amp = rng.uniform(0.06, 0.25)
    m = 1.2 * rad + 2.0 * an.edge
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    return _local(an, w, amp * _sphere(an, w, cu, cv, rad, None))


def _draw_atelectasis(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Plate-like (discoid) band in a lower zone, or a collapsed lower lobe wedge by the heart."""
    right = _side(rng)
    if rng.random() < 0.6:
        cu, cv = _in_lung_point(an, rng, 0.05, right, v_range=(0.0, 0.45))
        length = rng.uniform(0.1, 0.28)
        thick = max(rng.uniform(0.012, 0.03), 0.9 * an.px)
        ang = rng.uniform(-0.3, 0.3)
        frac = rng.uniform(0.4, 1.0)
        m = 0.5 * length + 0.05
        w = an.window(cu - m, cu + m, cv - m, cv + m)
        du, dv = an.u[w] - cu, an.v[w] - cv
        cs, sn = math.cos(ang), math.sin(ang)
        band = _pulse(dv * cs - du * sn, thick, max(an.edge, 0.006)) * _ramp(np.abs(du * cs + dv * sn), 0.5 * length, 0.5 * length - 0.04)
        return _local(an, w, (0.36 * frac) * band * an.aerated[w])
    # wedge from the hilum down to the medial diaphragm (lower lobe collapse)
    x = -an.u if right else an.u  # lateral distance on that side
    v = an.v
    hv = rng.uniform(-0.05, 0.08)
    width = rng.uniform(0.12, 0.26)
    base = an.dome_height + 0.02
    t = np.clip((v - hv) / np.maximum(base - hv, 0.1), 0.0, 1.0)
    lateral = 0.06 + width * t
    wedge = _ramp(x - lateral, 0.02, -0.02) * _ramp(v, hv, hv + 0.06) * _ramp(v - base, 0.02, -0.03)
    wedge *= _ramp(x, -0.02, 0.04)
    frac = rng.uniform(0.3, 0.8)
    return _on_side(an, right, (0.36 * frac) * wedge * an.aerated + 0.03 * frac * wedge)


def _draw_hernia(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Retrocardiac rounded opacity sitting on the diaphragm, often with an air-fluid level."""
    p = an.p
    rad = rng.uniform(0.07, 0.14)
    ry = rad * rng.uniform(0.7, 0.9)
    cu = rng.uniform(-0.04, 0.1)
    cv = 0.5 * (p.dome[0] + p.dome[1]) + rng.uniform(0.0, 0.07) - 0.6 * ry
    m = rad + 2.0 * an.edge
    w = an.window(cu - m, cu + m, cv - m, cv + m)
    du = (an.u[w] - cu) * (1.0 / rad)
    dv = (an.v[w] - cv) * (1.0 / ry)
    q = np.sqrt(du * du + dv * dv)
    e = max(an.edge / ry, 0.06)
    amp = rng.uniform(0.06, 0.16)
    out = amp * _smooth(q, 1.0 + e, 1.0 - e) * (0.8 + 0.2 * _ramp(q, 0.5, 1.0))
    if rng.random() < 0.7:  # gas above a horizontal fluid level
        lvl = cv + ry * rng.uniform(-0.5, 0.2)
        gas = _ramp(an.v[w], lvl + 0.5 * an.edge, lvl - 0.5 * an.edge) * _smooth(q, 0.92, 0.8)
        out -= rng.uniform(1.4, 2.2) * amp * gas
    return _local(an, w, out)


def _draw_pneumothorax(an: _Anatomy, rng: np.random.Generator) -> np.ndarray:
    """Apical / lateral rim with no lung markings, darker, and a thin visceral pleural line."""
    p = an.p
    right = _side(rng)
    apex = p.apex[0 if right else 1]
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


_DRAW: dict[str, Callable[[_Anatomy, np.random.Generator], np.ndarray]] = {
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
        raise ValueError(f"phantom size must be one of {', '.join(map(str, SIZES))} (a power of two); got {size}")
    return int(size)


def _phantom_name(name: str, what: str) -> str:
    canon = labels.canonical(name)
    if canon not in PHANTOM_FINDINGS:
        raise ValueError(
            f"{what} '{name}' ({canon}) cannot be drawn by the phantom; it draws {', '.join(PHANTOM_FINDINGS)}"
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
    return np.clip(x, 0.0, 255.0, out=x).astype(np.uint8)


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
    return _render(index, seed, size, chosen)


def _cardiomegaly(an: _Anatomy, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Density change of an enlarged heart, and the enlarged heart's silhouette (soft)."""
    win, sd = an._heart(rng.uniform(1.16, 1.45))
    soft = np.zeros_like(an.u)
    soft[win] = _ramp(sd, -an.edge, an.edge)
    change = soft - an.heart_soft  # >= 0: the enlarged heart contains the normal one
    # heart density where it stands above the diaphragm, and the lung air it now hides
    return change * (0.06 * an.above_diaphragm + 0.27 * an.air), soft


def _render(index: int, seed: int, size: int, chosen: Sequence[str]) -> PhantomCase:
    rng = np.random.default_rng([seed, index])
    p = _draw_patient(rng)
    an = _Anatomy(p, size, rng)
    grey_h = an.display(an.healthy)
    # quantum noise (triangular, unit variance): it grows with density, since fewer photons
    # reach the detector behind bone; the same realisation goes into both renders
    noise = np.random.default_rng([seed, index, 1]).random((2, size, size), dtype=_F32)
    noise = noise[0] + noise[1]
    noise -= 1.0
    noise *= (p.noise * math.sqrt(6.0)) * (0.55 + grey_h * (0.9 / 255.0))
    noise += 0.5  # rounds on the cast to uint8
    healthy = _to_uint8(grey_h, noise)

    heart = an.heart_soft >= 0.5
    masks: dict[str, np.ndarray] = {}
    if not chosen:
        return PhantomCase(healthy, healthy.copy(), [], masks, an.lungs, heart)

    contributions: dict[str, np.ndarray] = {}
    for k, name in enumerate(PHANTOM_FINDINGS):
        if name in chosen:
            frng = np.random.default_rng([seed, index, 3, k])
            if name == "Cardiomegaly":
                contributions[name], soft = _cardiomegaly(an, frng)
                heart = soft >= 0.5
            else:
                contributions[name] = _DRAW[name](an, frng)
    total = an.healthy.copy()
    for c in contributions.values():
        total += c
    grey = an.display(total)
    image = _to_uint8(grey, noise)
    for name, c in contributions.items():
        # each finding's own effect on the grey level (the total, when it is alone)
        own = grey if len(contributions) == 1 else an.display(an.healthy + c)
        own -= grey_h
        masks[name] = np.abs(own, out=own) >= MASK_THRESHOLD
    return PhantomCase(image, healthy, list(contributions), masks, an.lungs, heart)


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
    ids: list[str] = []
    indices = range(start, start + n)
    if progress:
        import sys

        from tqdm import tqdm

        indices = tqdm(indices, desc="phantom", unit="img", disable=not sys.stderr.isatty())
    for i, index in enumerate(indices):
        chosen = _choose(np.random.default_rng([seed, index, 2]), prev, healthy_fraction)
        case = _render(index, seed, size, chosen)
        images[i] = case.image
        healthy[i] = case.healthy
        lungs[i] = case.lungs
        for f, m in case.masks.items():
            masks[f][i] = m
        y[i] = labels.multi_hot(case.findings)
        ids.append(f"phantom-{seed}-{index}")
    return PhantomBatch(images, healthy, y, masks, lungs, ids)
