"""Procedural phantom of lateral thoraco-lumbar radiographs, the `synthetic` source.

Each virtual participant has a whole spine (C7 to the sacrum) on a smooth
sagittal curve and gets two overlapping scanned films, an upper and a lower
one, like the Rotterdam Study radiographs of the paper. Each of T4..L4 is
labelled on exactly one of the two films; `truth_visible` marks every T4..L4
centroid that lies inside a film.

Geometry lives in millimetres in an anatomical frame (u anterior, v caudal).
Every film is rendered analytically from that geometry at a coarse
"intermediate" resolution (3 film pixels per intermediate pixel), where
blur hides the difference, and then upsampled with film grain added at full
resolution. Textures (trabecular bone, quantum noise, grain, smooth blobs)
come from banks built once from a fixed seed and are sampled at random
offsets, so one participant costs about 30 ms on one core.

Output depends only on (seed, index): every random number comes from numpy's
PCG64 stream seeded with both, which is the same on every platform, and the
banks come from a fixed seed. Rendering is plain float32 numpy and Pillow;
a different CPU or library build may round a transcendental function in the
last bit, which can move a pixel by one grey level but not the geometry.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from vertjax import vertebrae

# Levels of the modelled spine, top to bottom; S2..S4 complete the sacrum.
LEVELS: tuple[str, ...] = (
    ("C7",)
    + tuple(f"T{i}" for i in range(1, 13))
    + tuple(f"L{i}" for i in range(1, 6))
    + ("S1", "S2", "S3", "S4")
)
_INDEX = {name: i for i, name in enumerate(LEVELS)}
_FIRST = _INDEX["T4"]  # LEVELS index of layer 0 (T4); layer k is level _FIRST + k.
_K = vertebrae.K
_N = len(LEVELS)

# Adult means in mm per level (C7..S4): mid body height, antero-posterior depth,
# and the disc below. Sacral "discs" are the thin fused remnants.
_HEIGHT = np.array(
    [13.5, 14.5, 15.5, 16.5, 17.8, 18.4, 19.0, 19.7, 20.4, 21.2, 22.0, 22.9, 24.0]
    + [25.2, 26.2, 26.9, 27.2, 26.6, 27.0, 21.0, 17.0, 13.0]
)
_DEPTH = np.array(
    [17.0, 19.0, 21.0, 23.0, 25.0, 26.0, 27.0, 28.0, 29.0, 30.0, 31.0, 32.0, 33.0]
    + [34.5, 35.5, 36.5, 37.0, 37.0, 42.0, 34.0, 27.0, 20.0]
)
_DISC = np.array(
    [4.0, 4.0, 4.2, 4.4, 4.6, 4.8, 5.0, 5.2, 5.4, 5.6, 5.8, 6.0, 7.5]
    + [8.5, 9.5, 10.5, 11.5, 10.5, 1.2, 1.0, 0.8, 0.0]
)

_UPSAMPLE = 3  # film pixels per intermediate pixel
_MIN_LONG_SIDE = 1000  # film pixels
_BANK_SEED = 20250601  # fixed: the texture banks are part of the phantom's definition


@dataclasses.dataclass(frozen=True)
class Radiograph:
    """One synthetic film and its ground truth.

    Attributes:
      image: uint8 [H, W] grayscale, bone bright, >= 1000 px on the long side.
      centroids: float32 [13, 2] (x, y) in this image's pixels, T4..L4; valid
        where `truth_visible`, 0 elsewhere.
      labeled: bool [13], annotated on this radiograph.
      truth_visible: bool [13], the centroid lies inside this image.
      pixel_spacing_mm: film pixel size in mm.
      view: 'upper' or 'lower'.
      fractured: bool [13], which of T4..L4 carry an osteoporotic fracture.
    """

    image: np.ndarray
    centroids: np.ndarray
    labeled: np.ndarray
    truth_visible: np.ndarray
    pixel_spacing_mm: float
    view: str
    fractured: np.ndarray


def _smooth_noise(
    rng: np.random.Generator, size: int, sigma_y: float, sigma_x: float
) -> np.ndarray:
    """White noise low-passed with a Gaussian in Fourier space, unit std, float32 [size, size]."""
    white = rng.standard_normal((size, size))
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    kernel = np.exp(-2.0 * np.pi**2 * ((fy * sigma_y) ** 2 + (fx * sigma_x) ** 2))
    out = np.fft.irfft2(np.fft.rfft2(white) * kernel, s=(size, size))
    return ((out - out.mean()) / out.std()).astype(np.float32)


@functools.cache
def _banks() -> dict[str, np.ndarray]:
    """Texture banks shared by all participants (built once, about 0.5 s)."""
    rng = np.random.default_rng(_BANK_SEED)
    # Trabeculae: mostly vertical struts with thinner horizontal ones (~0.8 mm/texel).
    trab = _smooth_noise(rng, 512, 0.6, 2.2) * 0.6 + _smooth_noise(rng, 512, 2.5, 0.7) * 0.4
    grain = rng.standard_normal((2400, 2400)).astype(np.float32)
    # Film grain clumps over about two pixels.
    grain = 0.5 * grain + 0.25 * (np.roll(grain, 1, 0) + np.roll(grain, 1, 1))
    banks = {
        "trabecular": trab,
        "quantum": rng.standard_normal((1024, 1024)).astype(np.float32),
        "blobs": _smooth_noise(rng, 512, 9.0, 9.0),  # 1 mm/texel: bowel gas
        "grain": np.clip(np.round(grain * 4.0), -127, 127).astype(np.int16),
    }
    for bank in banks.values():
        bank.flags.writeable = False  # shared by every participant
    return banks


def _crop(bank: np.ndarray, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A random [h, w] window of a bank (tiled when the bank is too small)."""
    bh, bw = bank.shape
    if h > bh or w > bw:
        bank = np.tile(bank, (h // bh + 1, w // bw + 1))
        bh, bw = bank.shape
    r = int(rng.integers(0, bh - h + 1))
    c = int(rng.integers(0, bw - w + 1))
    return bank[r : r + h, c : c + w]


@dataclasses.dataclass(frozen=True)
class _Spine:
    """Per-level geometry in mm, anatomical frame (u anterior, v caudal), arrays [_N]."""

    center: np.ndarray  # [_N, 2] body frame origin (u, v)
    alpha: np.ndarray  # [_N] body axis tilt: axis t = (sin a, cos a), anterior n = (cos a, -sin a)
    depth: np.ndarray
    h_post: np.ndarray  # posterior and anterior rim heights
    h_ant: np.ndarray
    concave_top: np.ndarray  # endplate dip at the middle, mm
    concave_bot: np.ndarray
    centroid: np.ndarray  # [_N, 2] area centroid of the (possibly deformed) body
    fractured: np.ndarray  # bool [_N]
    intact_post: np.ndarray  # rim heights before any fracture
    intact_ant: np.ndarray
    age: float
    soft: dict  # soft-tissue and thorax parameters


def _body_profile(depth, h_post, h_ant, c_top, c_bot, x):
    """Top and bottom endplate y' at local x' (anterior positive) of one body."""
    s = x / depth + 0.5  # 0 posterior wall, 1 anterior wall
    h = h_post + (h_ant - h_post) * s
    bulge = 1.0 - (2.0 * x / depth) ** 2
    return -h / 2 + c_top * bulge, h / 2 - c_bot * bulge


def _make_spine(rng: np.random.Generator) -> _Spine:
    """Draws one participant's spine: curve, sizes, fractures, soft-tissue build."""
    age = float(rng.uniform(45.0, 90.0))
    size = float(np.clip(rng.normal(1.0, 0.06), 0.85, 1.15))
    height = _HEIGHT * size * rng.normal(1.0, 0.025, _N)
    depth = _DEPTH * size * rng.normal(1.0, 0.025, _N)
    disc = _DISC * size * rng.normal(1.0, 0.08, _N)
    # Discs narrow with age.
    disc *= 1.0 - 0.002 * (age - 45.0)

    kyphosis = float(np.clip(rng.normal(28.0 + 0.4 * (age - 45.0), 8.0), 20.0, 60.0))
    lordosis = float(np.clip(rng.normal(50.0, 9.0), 30.0, 70.0))
    # delta[i]: rotation (deg) from body i to body i+1; kyphosis positive.
    delta = np.zeros(_N - 1)
    delta[:_FIRST] = rng.normal(2.5, 1.0, _FIRST)
    thor = np.arange(_FIRST, _INDEX["T12"])  # T4->T5 .. T11->T12
    w = np.exp(-(((thor - 7.5) / 3.5) ** 2)) * rng.uniform(0.7, 1.3, thor.size)
    delta[thor] = kyphosis * (8.0 / 9.0) * w / w.sum()
    delta[_INDEX["T12"]] = rng.normal(0.0, 2.0)
    lum = np.arange(_INDEX["L1"], _INDEX["S1"])  # L1->L2 .. L5->S1
    w = np.array([0.08, 0.13, 0.2, 0.26, 0.33]) * rng.uniform(0.8, 1.2, lum.size)
    delta[lum] = -lordosis * w / w.sum()
    delta[_INDEX["S1"] :] = rng.uniform(10.0, 20.0, _N - 1 - _INDEX["S1"])

    # Physiological wedging carries about 45 % of the local curvature.
    local = np.concatenate([[delta[0]], (delta[:-1] + delta[1:]) / 2, [delta[-1]]])
    wedge = np.radians(0.45 * local)
    wedge[_INDEX["S1"] :] = 0.0
    h_post = height + depth * np.tan(wedge) / 2
    h_ant = height - depth * np.tan(wedge) / 2
    c_top = rng.uniform(0.3, 1.0, _N) * size
    c_bot = rng.uniform(0.3, 1.0, _N) * size
    c_top[_INDEX["S1"] :] = 0.0
    c_bot[_INDEX["S1"] :] = 0.0

    intact_post, intact_ant = h_post.copy(), h_ant.copy()
    fractured = np.zeros(_N, bool)
    if rng.random() < 0.05 + (age - 45.0) / 45.0 * 0.4:  # 25 % over the age range
        count = int(rng.choice([1, 2, 3], p=[0.6, 0.28, 0.12]))
        # Osteoporotic fractures cluster at mid-thoracic and thoraco-lumbar levels.
        prior = np.array([1, 2, 3, 4, 4, 3, 2, 3, 5, 5, 3, 2, 1], float)
        for k in rng.choice(_K, size=count, replace=False, p=prior / prior.sum()):
            i = _FIRST + int(k)
            fractured[i] = True
            loss = float(rng.uniform(0.2, 0.45))
            kind = rng.choice(3, p=[0.5, 0.3, 0.2])
            if kind == 0:  # wedge: anterior height loss, adds kyphosis
                lost = loss * h_ant[i]
                h_ant[i] -= lost
                extra = math.degrees(math.atan(lost / depth[i]))
                delta[i - 1] += extra / 2
                delta[i] += extra / 2
            elif kind == 1:  # biconcave: the middle sinks, rims nearly kept
                h_post[i] *= 0.95
                h_ant[i] *= 0.95
                mid = (h_post[i] + h_ant[i]) / 2
                c_top[i] = c_bot[i] = loss * mid / 2
            else:  # crush: the whole body loses height
                h_post[i] *= 1.0 - loss
                h_ant[i] *= 1.0 - loss

    # Chain the bodies from C7 downwards.
    alpha = np.radians(np.concatenate([[0.0], np.cumsum(delta)]))
    mid_h = (h_post + h_ant) / 2
    center = np.zeros((_N, 2))
    for i in range(_N - 1):
        a0, a1 = alpha[i], alpha[i + 1]
        am = (a0 + a1) / 2
        step = (
            mid_h[i] / 2 * np.array([math.sin(a0), math.cos(a0)])
            + disc[i] * np.array([math.sin(am), math.cos(am)])
            + mid_h[i + 1] / 2 * np.array([math.sin(a1), math.cos(a1)])
        )
        center[i + 1] = center[i] + step

    # Stand the spine up: C7 over S1 with an age-related forward offset.
    vec = center[_INDEX["S1"]] - center[0]
    offset = rng.normal(-10.0 + 0.5 * (age - 45.0), 15.0)
    gamma = math.atan2(offset, np.hypot(*vec)) - math.atan2(vec[0], vec[1])
    rot = np.array([[math.cos(gamma), math.sin(gamma)], [-math.sin(gamma), math.cos(gamma)]])
    center = center @ rot.T
    alpha = alpha + gamma

    # Area centroid of the region between the endplates (midpoint rule, 128 strips).
    xs = ((np.arange(128) + 0.5) / 128 - 0.5)[None, :] * depth[:, None]
    top, bot = _body_profile(
        depth[:, None], h_post[:, None], h_ant[:, None], c_top[:, None], c_bot[:, None], xs
    )
    area = (bot - top).sum(1)
    cx = (xs * (bot - top)).sum(1) / area
    cy = ((bot**2 - top**2) / 2).sum(1) / area
    normal = np.stack([np.cos(alpha), -np.sin(alpha)], 1)
    axis = np.stack([np.sin(alpha), np.cos(alpha)], 1)
    centroid = center + cx[:, None] * normal + cy[:, None] * axis

    fat = float(rng.uniform(0.0, 1.0))
    soft = {
        "back": rng.uniform(70.0, 95.0) + 25.0 * fat,  # body centre to back skin
        "chest": rng.uniform(150.0, 190.0) + 30.0 * fat,  # body centre to chest skin
        "belly": rng.uniform(150.0, 200.0) + 80.0 * fat,
        "dome": rng.uniform(-0.3, 0.6),  # diaphragm dome height, in levels above T11
        "dome_split": rng.uniform(8.0, 22.0),
        "heart": rng.uniform(0.8, 1.2),
        "gas": rng.uniform(0.0, 1.0),
        "crest": rng.uniform(-0.3, 0.6),  # iliac crest, in levels below L4
        "wing_shift": rng.uniform(-10.0, 10.0, 2).tolist(),
        "rib_slope": rng.uniform(0.18, 0.35),
        "rib_bend": rng.uniform(0.0015, 0.0035),
        "rib_side": rng.uniform(4.0, 9.0),
        "rib_width": rng.uniform(0.14, 0.24, (2, 16)).astype(np.float32),
        "rib_jitter": rng.uniform(-0.12, 0.12, (2, 16)).astype(np.float32),
        "rib_gain": rng.uniform(0.5, 1.2, (2, 16)).astype(np.float32),
        "bone": float(np.clip(1.15 - 0.008 * (age - 45.0) + rng.normal(0, 0.06), 0.6, 1.2)),
        "shoulder": rng.uniform(0.2, 0.6),
        "tex": rng.integers(0, 512, (_N, 2)),
        # Anterior osteophytes (top, bottom corner) come with age and load.
        "spur": rng.random((_N, 2))
        < np.clip((age - 50.0) / 40.0, 0, 1) * np.linspace(0.1, 0.6, _N)[:, None],
        "spur_len": rng.uniform(1.5, 5.0, (_N, 2)),
    }
    soft["spur"][_INDEX["S1"] :] = False
    return _Spine(
        center=center,
        alpha=alpha,
        depth=depth,
        h_post=h_post,
        h_ant=h_ant,
        concave_top=c_top,
        concave_bot=c_bot,
        centroid=centroid,
        fractured=fractured,
        intact_post=intact_post,
        intact_ant=intact_ant,
        age=age,
        soft=soft,
    )


@dataclasses.dataclass(frozen=True)
class _Film:
    """Placement of one film: film mm (X right, Y down) -> anatomy (u, v)."""

    origin: np.ndarray  # (w, v) of the film's top-left corner; w = flip * u
    rho: float  # film rotation, radians
    flip: float  # +1: anterior to the right, -1: anterior to the left
    spacing: float  # film pixel size, mm
    rows: int  # intermediate grid size; the film is _UPSAMPLE times larger
    cols: int

    def to_film(self, uv: np.ndarray) -> np.ndarray:
        """Anatomy (u, v) [..., 2] -> film mm (X, Y) [..., 2]."""
        w = np.stack([uv[..., 0] * self.flip, uv[..., 1]], -1) - self.origin
        c, s = math.cos(self.rho), math.sin(self.rho)
        return np.stack([c * w[..., 0] + s * w[..., 1], -s * w[..., 0] + c * w[..., 1]], -1)

    def affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(u, v) = base + M @ (col, row) at intermediate pixel centres: (base [2], M [2, 2])."""
        si = self.spacing * _UPSAMPLE
        c, s = math.cos(self.rho), math.sin(self.rho)
        m = np.array([[c, -s], [s, c]]) * si
        base = self.origin + m @ np.array([0.5, 0.5])
        flip = np.array([[self.flip, 0.0], [0.0, 1.0]])
        return flip @ base, flip @ m


def _place_film(spine: _Spine, view: str, flip: float, spacing: float, rng) -> _Film:
    """Chooses a film's extent (DESIGN: upper C7-T3 .. T11-L1, lower T9-T12 .. L5-S1)."""
    rho = math.radians(float(np.clip(rng.normal(0.0, 1.8), -5.0, 5.0)))
    probe = _Film(np.zeros(2), rho, flip, spacing, 1, 1)
    q = probe.to_film(spine.centroid)  # film-aligned frame, arbitrary origin
    if view == "upper":
        top_range, bottom_range = ("C7", "T3"), ("T11", "L1")
    else:
        top_range, bottom_range = ("T9", "T12"), ("L5", "S1")
    top = rng.uniform(q[_INDEX[top_range[0]], 1], q[_INDEX[top_range[1]], 1])
    bottom = rng.uniform(q[_INDEX[bottom_range[0]], 1], q[_INDEX[bottom_range[1]], 1])
    height = bottom - top
    inside = (q[:, 1] > top) & (q[:, 1] < bottom)
    xs = q[inside, 0]
    # The film centre lies a little behind the bodies: the posterior elements
    # and the back need room.
    margin = 15.0
    width = max(height * rng.uniform(0.55, 0.9), 150.0, np.ptp(xs) + 2 * margin + 90.0)
    width = min(width, max(height, np.ptp(xs) + 2 * margin))
    centre = xs.mean() - flip * rng.uniform(-5.0, 30.0)
    left = centre - width / 2
    left = float(np.clip(left, xs.max() + margin - width, xs.min() - margin))
    if height / spacing < _MIN_LONG_SIDE:
        spacing = height / _MIN_LONG_SIDE
    si = spacing * _UPSAMPLE
    rows = math.ceil(height / si)
    cols = math.ceil(width / si)
    c, s = math.cos(rho), math.sin(rho)
    origin = np.array([c * left - s * top, s * left + c * top])
    return _Film(origin, rho, flip, spacing, rows, cols)


def _bbox(film: _Film, uv: np.ndarray) -> tuple[int, int, int, int] | None:
    """Intermediate-pixel box (r0, r1, c0, c1) covering anatomy points [..., 2]; None if off-film."""
    xy = film.to_film(uv.reshape(-1, 2)) / (film.spacing * _UPSAMPLE)
    c0 = max(int(np.floor(xy[:, 0].min())), 0)
    c1 = min(int(np.ceil(xy[:, 0].max())) + 1, film.cols)
    r0 = max(int(np.floor(xy[:, 1].min())), 0)
    r1 = min(int(np.ceil(xy[:, 1].max())) + 1, film.rows)
    if r0 >= r1 or c0 >= c1:
        return None
    return r0, r1, c0, c1


def _local(film: _Film, box, center, alpha) -> tuple[np.ndarray, np.ndarray]:
    """Body-frame coordinates (x' anterior, y' caudal), mm, of the pixels in `box`."""
    base, m = film.affine()
    r0, r1, c0, c1 = box
    n = np.array([math.cos(alpha), -math.sin(alpha)])
    t = np.array([math.sin(alpha), math.cos(alpha)])
    d = base - center
    rows = np.arange(r0, r1, dtype=np.float32)[:, None]
    cols = np.arange(c0, c1, dtype=np.float32)[None, :]
    x = np.float32(n @ d) + np.float32(n @ m[:, 0]) * cols + np.float32(n @ m[:, 1]) * rows
    y = np.float32(t @ d) + np.float32(t @ m[:, 0]) * cols + np.float32(t @ m[:, 1]) * rows
    return x, y


def _frame_points(center, alpha, x, y) -> np.ndarray:
    """Body-frame points (x', y') -> anatomy (u, v), [..., 2]."""
    n = np.array([math.cos(alpha), -math.sin(alpha)])
    t = np.array([math.sin(alpha), math.cos(alpha)])
    return center + np.multiply.outer(x, n) + np.multiply.outer(y, t)


def _rounded_box_sd(dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance (mm, negative inside) of a rounded box from inner distances dx, dy."""
    qx = r - dx
    qy = r - dy
    outside = np.hypot(np.maximum(qx, 0), np.maximum(qy, 0))
    return np.minimum(np.maximum(qx, qy), 0) + outside - r


def _capsule(x, y, p0, p1, radius):
    """Soft mask of a capsule from p0 to p1 (mm, body frame), 1 inside."""
    dx, dy = p1[0] - p0[0], p1[1] - p0[1]
    t = np.clip(((x - p0[0]) * dx + (y - p0[1]) * dy) / (dx * dx + dy * dy), 0, 1)
    dist = np.hypot(x - p0[0] - t * dx, y - p0[1] - t * dy)
    return np.clip((radius - dist) / 1.2 + 0.5, 0, 1)


def _draw_vertebra(att: np.ndarray, film: _Film, spine: _Spine, i: int, px: float) -> None:
    """Adds vertebral body i and its posterior elements to the attenuation map."""
    # Python floats keep the float32 pixel arrays from being promoted.
    c, a = spine.center[i], float(spine.alpha[i])
    depth, hp, ha = float(spine.depth[i]), float(spine.h_post[i]), float(spine.h_ant[i])
    hmax = max(hp, ha)
    sacral = i >= _INDEX["S1"]
    bone = spine.soft["bone"]

    # Vertebral body: rounded trapezoid, cortical shell, trabecular interior.
    spurs = spine.soft["spur"][i]
    reach = float(np.max(spine.soft["spur_len"][i] * spurs)) + 1.0
    corners = _frame_points(
        c,
        a,
        np.array([-depth / 2 - 1, depth / 2 + reach, depth / 2 + reach, -depth / 2 - 1]),
        np.array([-1, -1, 1, 1]) * (hmax / 2 + reach),
    )
    box = _bbox(film, corners)
    if box is not None:
        x, y = _local(film, box, c, a)
        top, bot = _body_profile(
            depth, hp, ha, float(spine.concave_top[i]), float(spine.concave_bot[i]), x
        )
        # Anterior and posterior walls are slightly concave (the waist).
        waist = 0.9 * np.clip(1 - (2 * y / hmax) ** 2, 0, 1)
        dx = depth / 2 - np.abs(x) - waist
        dy = np.minimum(y - top, bot - y)
        sd = _rounded_box_sd(dx, dy, 2.0)
        mask = np.clip(0.5 - sd / px, 0, 1)
        tex = _banks()["trabecular"]
        oy, ox = spine.soft["tex"][i]
        ti = (np.round(y * 1.3).astype(np.int32) + oy) & 511
        tj = (np.round(x * 1.3).astype(np.int32) + ox) & 511
        cancellous = bone * (0.34 + 0.08 * tex[ti, tj])
        # Cortex: a bright shell ~1 mm thick, thicker on the endplates.
        rim = np.exp(-(((sd + 0.9) / 0.9) ** 2)) * (0.3 + 0.25 * (1.3 - bone))
        rim *= np.where(dy < dx, np.float32(1.25), np.float32(0.8))
        if sacral:
            cancellous = cancellous * 0.8
        body = mask * cancellous + rim
        for side in np.nonzero(spurs)[0]:
            # A beak from the anterior corner reaching out over the disc.
            sign = 1.0 if side else -1.0
            length = float(spine.soft["spur_len"][i, side])
            p0 = (depth / 2 - 1.5, sign * (ha / 2 - 1.5))
            p1 = (depth / 2 + 0.8 * length, sign * (ha / 2 + 0.6 * length))
            body += 0.5 * bone * _capsule(x, y, p0, p1, 1.1)
        att[box[0] : box[1], box[2] : box[3]] += body

    # Posterior elements: pedicle, articular pillar, spinous process.
    lp = 0.3 * depth + 4.0
    xb = -depth / 2
    level = LEVELS[i]
    if level.startswith("L"):
        sp_angle, sp_len, sp_rad = math.radians(8.0), 20.0, 7.5
    elif sacral:
        sp_angle, sp_len, sp_rad = math.radians(0.0), 8.0, 3.0
    elif level == "C7":
        sp_angle, sp_len, sp_rad = math.radians(20.0), 40.0, 3.5
    else:
        k = int(level[1:])
        sp_angle = math.radians(35.0 + 25.0 * math.sin(math.pi * min(k, 11) / 12))
        sp_len, sp_rad = 38.0, 3.2
    p0 = (xb - lp - 6.0, 0.05 * hmax)
    p1 = (p0[0] - sp_len * math.cos(sp_angle), p0[1] + sp_len * math.sin(sp_angle))
    xmin = min(p1[0], xb - lp - 14.0) - sp_rad - 2
    ymax = max(p1[1], 0.7 * hmax) + sp_rad + 2
    corners = _frame_points(
        c,
        a,
        np.array([xmin, xb + 1, xb + 1, xmin]),
        np.array([-0.75 * hmax, -0.75 * hmax, ymax, ymax]),
    )
    box = _bbox(film, corners)
    if box is None:
        return
    x, y = _local(film, box, c, a)
    ped_dx = np.minimum(x - (xb - lp - 2.0), xb + 1.0 - x)
    ped_dy = np.minimum(y + 0.42 * hmax, 0.02 * hmax - y)
    pedicle = np.clip(0.5 - _rounded_box_sd(ped_dx, ped_dy, 2.5) / px, 0, 1)
    pillar_c = (xb - lp - 5.0, 0.05 * hmax)
    e = ((x - pillar_c[0]) / 7.0) ** 2 + ((y - pillar_c[1]) / (0.8 * hmax)) ** 2
    pillar = np.clip((1.0 - e) * 2.0, 0, 1)
    if level.startswith("L"):
        # Lumbar spinous processes are broad, nearly horizontal plates.
        sp_dx = np.minimum(x - p1[0], p0[0] - x)
        sp_dy = np.minimum(y - (p0[1] - sp_rad), p0[1] + sp_rad - y + 0.15 * (x - p0[0]))
        spinous = np.clip(0.5 - _rounded_box_sd(sp_dx, sp_dy, 4.0) / px, 0, 1) * 0.8
    else:
        spinous = _capsule(x, y, p0, p1, sp_rad)
    post = 0.16 * pedicle + 0.13 * pillar + 0.15 * spinous
    att[box[0] : box[1], box[2] : box[3]] += bone * post


def _draw_body(film: _Film, spine: _Spine, rng) -> np.ndarray:
    """Attenuation map float32 [rows, cols] of soft tissue, thorax, pelvis and spine."""
    base, m = film.affine()
    rows = np.arange(film.rows, dtype=np.float32)[:, None]
    cols = np.arange(film.cols, dtype=np.float32)[None, :]
    u = np.float32(base[0]) + np.float32(m[0, 0]) * cols + np.float32(m[0, 1]) * rows
    v = np.float32(base[1]) + np.float32(m[1, 0]) * cols + np.float32(m[1, 1]) * rows
    cv, cu = spine.centroid[:, 1], spine.centroid[:, 0]  # v increases down the spine
    ur = u - np.interp(v, cv, cu).astype(np.float32)  # u relative to the body centres
    p = spine.soft
    lv = lambda name: float(cv[_INDEX[name]])  # noqa: E731

    # Soft tissue: elliptical cross-section between back and front skin.
    diaph = lv("T11") - p["dome"] * (lv("T12") - lv("T11"))
    front = np.where(v < diaph, p["chest"], p["belly"]).astype(np.float32)
    front = front + np.float32(0.12) * np.maximum(v - diaph, 0)  # belly bulges
    back = np.float32(p["back"])
    half = (front + back) / 2
    mid = (front - back) / 2
    thick = np.sqrt(np.clip(1 - ((ur - mid) / half) ** 2, 0, 1))
    att = 0.9 * thick

    # Shoulder girdle over the upper thoracic spine.
    att += p["shoulder"] * np.clip((lv("T4") - v) / 60.0, 0, 1.5) * thick

    # Lungs: air over the thoracic spine, above two diaphragm domes; the heart fills
    # the anterior lower chest.
    apex = lv("T1") - 25.0
    lung_ant = p["chest"] - 25.0
    lung_post = -back + 30.0
    side = np.clip((ur - lung_post) / 20.0, 0, 1) * np.clip((lung_ant - ur) / 25.0, 0, 1)
    side *= np.clip((v - apex) / 40.0, 0, 1)
    air = np.zeros_like(v)
    for shift in (0.0, p["dome_split"]):
        # Lowest posteriorly (costophrenic recess), highest ~6 cm in front of the spine.
        dome = diaph + shift + 0.0025 * (ur - 60.0) ** 2 - 0.12 * (ur - 60.0)
        air += 0.5 * np.clip((dome - v) / 3.0, 0, 1)
    heart_c = (95.0, lv("T9") + 5.0)
    he = ((ur - heart_c[0]) / (55.0 * p["heart"])) ** 2 + ((v - heart_c[1]) / 60.0) ** 2
    heart = np.clip((1.0 - he) * 1.2, 0, 1)
    lung = side * air * (1.0 - 0.6 * heart)
    att -= 0.55 * lung

    # Bowel gas in the abdomen, in front of and over the lumbar spine, and a
    # mottled soft-tissue background.
    belly = np.clip((v - diaph - 20.0) / 30.0, 0, 1) * np.clip((ur + 10.0) / 25.0, 0, 1)
    belly *= thick
    blobs = _banks()["blobs"]
    off = rng.integers(0, 512, 2)
    gi = (v.astype(np.int32) + off[0]) & 511
    gj = (u.astype(np.int32) + off[1]) & 511
    blob = blobs[gi, gj]
    threshold = np.float32(1.3 - 0.9 * p["gas"])
    att -= 0.3 * belly * np.clip((blob - threshold) * 1.5, 0, 1)
    att += 0.04 * thick * blob

    _draw_ribs(att, v, ur, spine, film)
    _draw_pelvis(att, v, ur, spine, film)
    px = film.spacing * _UPSAMPLE
    for i in range(_N):
        _draw_vertebra(att, film, spine, i, px)
    return att


def _draw_ribs(att, v, ur, spine: _Spine, film: _Film) -> None:
    """Adds two superimposed rib cages (near and far side) crossing the thoracic spine."""
    p = spine.soft
    cv = spine.centroid[:, 1]
    heads = cv[_INDEX["T1"] : _INDEX["T12"] + 1] - 4.0
    step = np.diff(heads)
    knots = np.concatenate(
        [[heads[0] - 2 * step[0], heads[0] - step[0]], heads, [heads[-1] + step[-1]]]
    )
    index = np.arange(-1.0, 14.0)
    rows = np.nonzero((v.min(axis=1) < knots[-1] + 150.0) & (v.max(axis=1) > knots[0]))[0]
    if rows.size == 0:
        return
    sl = slice(rows[0], rows[-1] + 1)
    vv, uu = v[sl], ur[sl]
    post = uu + 15.0
    descent = np.where(post > 0, p["rib_slope"] * post + p["rib_bend"] * post**2, 0.004 * post**2)
    total = np.zeros_like(vv)
    for side, (scale, shift, gain) in enumerate(((1.0, 0.0, 1.0), (1.06, p["rib_side"], 0.7))):
        lev = np.interp(vv - shift - scale * descent, knots, index).astype(np.float32)
        k = np.floor(lev)
        kk = np.clip(k, 0, 15).astype(np.int32)
        # Each rib has its own width, height offset and density.
        width = p["rib_width"][side][kk]
        frac = lev - k - 0.5 - p["rib_jitter"][side][kk]
        body = np.sqrt(np.clip(1 - (frac / width) ** 2, 0, 1))
        edge = np.exp(-(((np.abs(frac) - 0.85 * width) / 0.04) ** 2))
        # Ribs 1-10 reach the front (cartilage fades); 11-12 float short.
        reach = np.where(
            k >= 11, np.float32(60), np.where(k >= 8, np.float32(120), np.float32(p["chest"] - 30))
        )
        extent = np.clip((reach - uu) / 40.0, 0, 1) * np.clip((uu + p["back"] - 15.0) / 15.0, 0, 1)
        valid = (k >= 1) & (k <= 12)
        total += gain * valid * extent * p["rib_gain"][side][kk] * (0.1 * body + 0.09 * edge)
    att[sl] += total * p["bone"]


def _draw_pelvis(att, v, ur, spine: _Spine, film: _Film) -> None:
    """Adds the iliac wings (two, slightly offset) over the lower lumbar spine and sacrum."""
    p = spine.soft
    cv = spine.centroid[:, 1]
    crest = float(cv[_INDEX["L4"]] + p["crest"] * (cv[_INDEX["L5"]] - cv[_INDEX["L4"]]))
    rows = np.nonzero(v.max(axis=1) > crest - 15.0)[0]
    if rows.size == 0:
        return
    sl = slice(rows[0], None)
    vv, uu = v[sl], ur[sl]
    for shift, gain in ((p["wing_shift"][0], 1.0), (p["wing_shift"][1], 0.8)):
        # The crest arcs over the lumbosacral junction, highest a little in
        # front of the spine; the wing below it is a thin plate that fades out
        # towards the sciatic notch and the anterior spines.
        crest_v = crest + shift + 0.004 * (uu - 25.0 - shift) ** 2
        depth = vv - crest_v
        spread = np.clip((uu + 70.0) / 25.0, 0, 1) * np.clip((110.0 - uu) / 25.0, 0, 1)
        inside = np.clip(depth / 2.0, 0, 1) * np.clip(1.0 - depth / 120.0, 0, 1)
        wing = inside * (0.07 + 0.08 * np.clip(1 - depth / 25.0, 0, 1))
        rim = np.exp(-(((depth - 2.5) / 2.0) ** 2)) * 0.14
        att[sl] += gain * spread * (wing + rim) * p["bone"]


def _text_layer(size: tuple[int, int], text: str, height_px: int) -> Image.Image:
    """Text drawn with PIL's built-in bitmap font, scaled to `height_px` tall ('L' mode)."""
    font = ImageFont.load_default_imagefont()
    box = font.getbbox(text)
    small = Image.new("L", (box[2] + 2, box[3] + 2), 0)
    ImageDraw.Draw(small).text((1, 1), text, fill=255, font=font)
    scale = max(height_px / small.height, 1.0)
    return small.resize(
        (max(1, int(small.width * scale)), max(1, int(small.height * scale))), Image.NEAREST
    )


def _artefacts(rows: int, cols: int, film: _Film, rng) -> tuple[np.ndarray, np.ndarray]:
    """Scanned-film marks: (bright, dark) overlays float32 [rows, cols] in [0, 1]."""
    bright = Image.new("L", (cols, rows), 0)
    dark = Image.new("L", (cols, rows), 0)
    db, dd = ImageDraw.Draw(bright), ImageDraw.Draw(dark)
    si = film.spacing * _UPSAMPLE
    # Lead side marker ("L"/"R") and a paper label with an id and a date.
    if rng.random() < 0.8:
        letter = _text_layer((cols, rows), str(rng.choice(["L", "R"])), int(14 / si))
        x = int(rng.uniform(0.05, 0.85) * cols)
        y = int(rng.choice([rng.uniform(0.02, 0.1), rng.uniform(0.85, 0.93)]) * rows)
        bright.paste(255, (x, y), letter)
    if rng.random() < 0.6:
        text = f"RS{rng.integers(1, 4)}-{rng.integers(1, 5)} {rng.integers(1000, 9999)}"
        text += f" {rng.integers(1, 29):02d}.{rng.integers(1, 13):02d}.{rng.integers(1990, 2010)}"
        layer = _text_layer((cols, rows), text, int(rng.uniform(3.0, 5.0) / si))
        w, h = layer.size
        # Labels sit in a corner, where they hide no anatomy of interest.
        x = int(rng.choice([rng.uniform(0.01, 0.05) * cols, cols * rng.uniform(0.95, 0.99) - w]))
        y = int(rng.choice([rng.uniform(0.01, 0.04) * rows, rows * rng.uniform(0.96, 0.99) - h]))
        target = bright if rng.random() < 0.5 else dark
        other = dark if target is bright else bright
        other.paste(200, (x - 4, y - 4, x + w + 4, y + h + 4))
        target.paste(255, (x, y), layer)
    # A radiopaque ruler along one edge, cm ticks.
    if rng.random() < 0.25:
        x = int(rng.choice([rng.uniform(0.02, 0.08), rng.uniform(0.86, 0.92)]) * cols)
        y0 = int(rng.uniform(0.05, 0.3) * rows)
        y1 = int(rng.uniform(0.7, 0.95) * rows)
        db.rectangle((x, y0, x + int(8 / si), y1), fill=70)
        tick = 10.0 / si
        for k in range(int((y1 - y0) / tick) + 1):
            length = 8 if k % 5 == 0 else 4
            yy = int(y0 + k * tick)
            db.line((x, yy, x + int(length / si), yy), fill=255, width=1)
    # Pen and grease-pencil marks.
    for _ in range(int(rng.choice([0, 0, 1, 1, 2, 3]))):
        n = int(rng.integers(3, 7))
        start = rng.uniform([0, 0], [cols, rows])
        pts = start + np.cumsum(rng.normal(0, 12, (n, 2)), 0)
        draw = db if rng.random() < 0.4 else dd
        draw.line(
            [tuple(p) for p in pts],
            fill=int(rng.integers(120, 256)),
            width=int(rng.integers(1, 4)),
            joint="curve",
        )
    # Scratches: long thin straight lines.
    for _ in range(int(rng.choice([0, 0, 1, 2, 3]))):
        p0 = rng.uniform([0, 0], [cols, rows])
        p1 = p0 + rng.normal(0, 0.15 * rows, 2)
        db.line((*p0, *p1), fill=int(rng.integers(40, 110)), width=1)
    scale = np.float32(1 / 255)
    return np.asarray(bright, np.float32) * scale, np.asarray(dark, np.float32) * scale


def _expose(att: np.ndarray, film: _Film, rng) -> np.ndarray:
    """Attenuation -> uint8 film [rows*3, cols*3]: exposure, blur, noise, marks, grain."""
    rows, cols = att.shape
    # Scatter and focal-spot blur: 1-2 passes of a [1, 2, 1] / 4 filter.
    for _ in range(int(rng.integers(1, 3))):
        att[1:-1] = 0.5 * att[1:-1] + 0.25 * (att[:-2] + att[2:])
        att[:, 1:-1] = 0.5 * att[:, 1:-1] + 0.25 * (att[:, :-2] + att[:, 2:])
    # Uneven exposure: a random gradient plus smooth blotches.
    yy = np.linspace(-1, 1, rows, dtype=np.float32)[:, None]
    xx = np.linspace(-1, 1, cols, dtype=np.float32)[None, :]
    gx, gy = rng.normal(0, 0.07, 2)
    step = film.spacing * _UPSAMPLE / 6.0  # blotches some 5 cm across
    off = rng.integers(0, 512, 2)
    ri = (np.arange(rows) * step).astype(np.int32) + off[0] & 511
    ci = (np.arange(cols) * step).astype(np.int32) + off[1] & 511
    blotch = _banks()["blobs"][np.ix_(ri, ci)]
    att *= 1.0 + np.float32(gx) * xx + np.float32(gy) * yy + np.float32(0.04) * blotch
    k = np.float32(rng.uniform(0.8, 1.6))
    img = 1.0 - np.exp(-k * att)
    # Exposure and scanner window adapt to the film, as a radiographer and a
    # digitiser operator would: black point near the air, white point near the
    # densest bone.
    sample = img[::4, ::4]
    lo, hi = np.percentile(sample, [rng.uniform(0.0, 3.0), rng.uniform(99.0, 99.95)])
    # Bone is rarely burnt out to white on film.
    hi += rng.uniform(0.05, 0.35) * (hi - lo)
    img = np.clip((img - np.float32(lo)) / np.float32(max(hi - lo, 1e-3)), 0, 1)
    img **= np.float32(rng.uniform(0.7, 1.5))
    # Vignetting of the scanner lamp.
    vig = np.float32(rng.uniform(0.0, 0.25))
    img *= 1.0 - vig * (xx**2 + yy**2) / 2
    # Quantum noise, stronger where fewer photons reach the film (bone).
    sigma = np.float32(rng.uniform(0.008, 0.03))
    img += sigma * (0.4 + img) * _crop(_banks()["quantum"], rows, cols, rng)
    bright, dark = _artefacts(rows, cols, film, rng)
    img = img * (1.0 - 0.9 * dark) + 0.85 * bright * (1.0 - img)
    small = Image.fromarray(np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    big = np.asarray(small.resize((cols * _UPSAMPLE, rows * _UPSAMPLE), Image.BILINEAR), np.int16)
    grain = _crop(_banks()["grain"], rows * _UPSAMPLE, cols * _UPSAMPLE, rng)
    out = big + grain * np.int16(rng.integers(1, 3))
    return np.clip(out, 0, 255).astype(np.uint8)


def _radiograph(spine: _Spine, film: _Film, view: str, labeled: np.ndarray, rng) -> Radiograph:
    image = _expose(_draw_body(film, spine, rng), film, rng)
    xy, visible = _truth(spine, film)
    return Radiograph(
        image=image,
        centroids=np.where(visible[:, None], xy, 0).astype(np.float32),
        labeled=labeled,
        truth_visible=visible,
        pixel_spacing_mm=float(film.spacing),
        view=view,
        fractured=spine.fractured[_FIRST : _FIRST + _K].copy(),
    )


def _truth(spine: _Spine, film: _Film) -> tuple[np.ndarray, np.ndarray]:
    """T4..L4 centroids in film pixels [13, 2] and whether each lies inside the film [13]."""
    xy = film.to_film(spine.centroid[_FIRST : _FIRST + _K]) / film.spacing
    h, w = film.rows * _UPSAMPLE, film.cols * _UPSAMPLE
    visible = (xy[:, 0] >= 0) & (xy[:, 0] < w) & (xy[:, 1] >= 0) & (xy[:, 1] < h)
    return xy, visible


def participant(seed: int, index: int) -> tuple[Radiograph, Radiograph]:
    """The upper and lower radiograph of virtual participant `index`.

    Deterministic from (seed, index) on any machine. T4..Ts are labelled on the
    upper film and Ts+1..L4 on the lower one, Ts drawn among the splits that
    keep every labelled vertebra visible.

    Args:
      seed: dataset seed, >= 0.
      index: participant number, >= 0.

    Returns:
      (upper, lower) Radiograph.
    """
    if not (isinstance(seed, (int, np.integer)) and isinstance(index, (int, np.integer))):
        raise TypeError(f"seed and index must be integers, got {seed!r} and {index!r}")
    if seed < 0 or index < 0:
        raise ValueError(f"seed and index must be >= 0, got {seed} and {index}")
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(index)]))
    spine = _make_spine(rng)
    # One scanner per participant: anterior side and digitiser pixel size.
    flip = -1.0 if rng.random() < 0.75 else 1.0
    spacing = float(rng.uniform(0.2, 0.26))
    films = {view: _place_film(spine, view, flip, spacing, rng) for view in ("upper", "lower")}
    up_vis = _truth(spine, films["upper"])[1]
    low_vis = _truth(spine, films["lower"])[1]
    # Split s: upper labels layers 0..s, lower s+1..12; both runs must be visible.
    splits = [s for s in range(_K - 1) if up_vis[: s + 1].all() and low_vis[s + 1 :].all()]
    if not splits:
        raise RuntimeError(f"participant {index} (seed {seed}): films leave no valid label split")
    s = int(rng.choice(splits))
    upper_labels = np.arange(_K) <= s
    return (
        _radiograph(spine, films["upper"], "upper", upper_labels, rng),
        _radiograph(spine, films["lower"], "lower", ~upper_labels, rng),
    )
