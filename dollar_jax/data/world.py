"""The procedural shapes world: captioned toy videos, and the oracle that reads their factors back from pixels.

The whole method (teacher pre-training, distillation, reward fine-tuning) is trained and *measured* in this
world on a couple of CPU cores. A clip is one saturated shape moving in a straight line over a dark, noisy
grey background; its caption states four factors ("a large red circle moving left"). Everything else
(start position, exact speed and size, colour jitter, background level and noise) is a nuisance drawn from
the clip's own random stream, so a model must follow the caption to get the factors right, and a generated
clip can be scored by reading the factors back (`read_factors`) and comparing them with the prompt's
(`adherence`).

The oracle scores *imperfect* samples, so every feature it uses is chosen to survive blur, noise and
brightness or colour drift:
  * foreground: per-channel excess over the frame's median (the background), lightly smoothed, thresholded
    at half the clip's peak excess (a half-maximum contour sits on a blurred edge), then the largest
    8-connected component per frame (specks ignored);
  * colour: hue of the mean foreground excess in the opponent plane (orthogonal to grey), which neither a
    grey offset nor a brightness change can move; nearest palette hue;
  * shape: third and fourth complex moments of the shape's soft mass (the excess projected on its colour)
    normalised by its area; unlike bounding-box fill they are unchanged by blur (SHAPE_FEATURES);
  * direction: least-squares velocity of the mass centroid;
  * size: median area. Shapes of one size have equal *area* whatever their shape, so area alone decides.
A factor the oracle cannot read (no shape, a grey shape, a shape standing still) reads as -1, which matches
no prompt: an unreadable sample never earns adherence by chance.
Geometry is specified in pixels of a 32-pixel frame and scales with min(height, width).

Pure NumPy: datasets are written and clips scored on the host.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
from collections.abc import Iterator, Mapping

import numpy as np

FACTORS = ("colour", "shape", "direction", "size")

# Saturated colours with one "on" and one "off" level, so their hues lie exactly 60 degrees apart in the
# opponent plane: the widest margin six hues allow.
PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.9, 0.1, 0.1),
    "yellow": (0.9, 0.9, 0.1),
    "green": (0.1, 0.9, 0.1),
    "cyan": (0.1, 0.9, 0.9),
    "blue": (0.1, 0.1, 0.9),
    "magenta": (0.9, 0.1, 0.9),
}

# Oracle shape features: scale-free complex central moments of the shape's mass, z = x + iy (y down),
# normalised by its area A. Third and fourth moments are unchanged by an isotropic blur, so they survive the
# softness of generated samples where bounding-box fill does not. For the shapes as rendered (axis-aligned
# square of side a; isosceles triangle, apex up, base = height = b):
#   Im mu3 / A^1.5: circle 0, square 0, triangle 13 sqrt(8) / 540   (only the triangle is lopsided)
#   Re mu4 / A^2:   circle 0, square -1/60, triangle 1/540           (the square's corners lie on diagonals)
# Divided by the triangle's mu3 and the square's mu4 they become "triangularity" and "squareness":
_TRIANGLE_MU3 = 13 * math.sqrt(8) / 540
_SQUARE_MU4 = -1 / 60
SHAPE_FEATURES: dict[str, tuple[float, float]] = {
    "circle": (0.0, 0.0),
    "square": (0.0, 1.0),
    "triangle": (1.0, -1 / 9),
}

# Unit motion per direction, image coordinates (x right, y down: "up" is y decreasing).
DIRECTIONS: dict[str, tuple[float, float]] = {"left": (-1.0, 0.0), "right": (1.0, 0.0), "up": (0.0, -1.0),
                                              "down": (0.0, 1.0)}

_PLURAL = {"colour": "colours", "shape": "shapes", "direction": "directions", "size": "sizes"}
_REFERENCE_SIDE = 32.0  # geometry fields are in pixels of a frame this size


@dataclasses.dataclass(frozen=True)
class WorldConfig:
    num_frames: int = 8
    height: int = 32
    width: int = 32
    colours: tuple[str, ...] = ("red", "green", "blue", "yellow", "magenta", "cyan")
    shapes: tuple[str, ...] = ("circle", "square", "triangle")
    directions: tuple[str, ...] = ("left", "right", "up", "down")
    sizes: tuple[str, ...] = ("small", "large")
    # Equal-area ("equivalent circle") radius of each size, in reference pixels; jittered by +-size_jitter.
    size_radii: tuple[float, ...] = (4.0, 7.0)
    size_jitter: float = 0.1
    # Speed in reference pixels per frame; capped per clip so that the shape never leaves the frame.
    speed_range: tuple[float, float] = (1.0, 2.0)
    margin: float = 1.0  # reference pixels kept clear between the shape and the frame's edge
    colour_jitter: float = 0.06  # per-channel uniform jitter of the palette colour
    brightness_range: tuple[float, float] = (0.85, 1.0)  # global gain of the shape's colour
    background_max: float = 40 / 255  # background grey level ~ U(0, background_max)
    background_noise: float = 3 / 255  # std of per-pixel, per-channel Gaussian background noise
    # Factor combinations kept out of every split, so that evaluation can ask for compositions the models
    # never saw (`held_out_combinations`); 0 keeps the old world, clip for clip.
    held_out_combinations: int = 0

    def __post_init__(self):
        for name, known in (("colours", PALETTE), ("shapes", SHAPE_FEATURES), ("directions", DIRECTIONS)):
            unknown = [v for v in getattr(self, name) if v not in known]
            if unknown:
                raise ValueError(f"WorldConfig.{name}: unknown {unknown}; known: {sorted(known)}")
        for factor in FACTORS:
            values = self.values(factor)
            if not values or len(set(values)) != len(values):
                raise ValueError(f"WorldConfig.{_PLURAL[factor]} must be non-empty and distinct: {values}")
        if len(self.size_radii) != len(self.sizes):
            raise ValueError(f"WorldConfig.size_radii {self.size_radii} needs one radius per size {self.sizes}")
        if self.num_frames < 2:
            raise ValueError("WorldConfig.num_frames must be >= 2 (a direction needs motion)")
        if not 0 < self.speed_range[0] <= self.speed_range[1]:
            raise ValueError(f"WorldConfig.speed_range must be 0 < low <= high, got {self.speed_range}")
        # The slowest, largest clip must still move far enough for the oracle to read its direction.
        largest = max(_half_extent(s, max(self.size_radii) * (1 + self.size_jitter)) for s in self.shapes)
        room = _REFERENCE_SIDE - 2 * (largest + self.margin)
        travel = min(self.speed_range[0] * (self.num_frames - 1), room)
        if travel < 1.5 * _MIN_TRAVEL:
            raise ValueError(f"WorldConfig: the slowest, largest shape travels only {travel:.1f} reference px "
                             f"over {self.num_frames} frames (room {room:.1f}); the oracle needs "
                             f"{1.5 * _MIN_TRAVEL:.0f}: raise speed_range or num_frames, or shrink size_radii")
        held_out_set(self)  # raises when the vocabularies cannot spare that many combinations

    @property
    def scale(self) -> float:
        """Pixels per reference pixel: the geometry is designed at 32x32 and scales with the frame."""
        return min(self.height, self.width) / _REFERENCE_SIDE

    def values(self, factor: str) -> tuple[str, ...]:
        """The vocabulary of one factor (indices refer to this tuple)."""
        return getattr(self, _PLURAL[factor])


# ----------------------------------------------------------------------------------------------- captions


def sample_factors(rng: np.random.Generator, cfg: WorldConfig) -> dict[str, int]:
    """Independent uniform factors (indices into the config's tuples)."""
    return {f: int(rng.integers(len(cfg.values(f)))) for f in FACTORS}


def caption(factors: Mapping[str, int], cfg: WorldConfig) -> str:
    size, colour, shape, direction = (cfg.values(f)[int(factors[f])] for f in ("size", "colour", "shape",
                                                                                  "direction"))
    article = "an" if size[0] in "aeiou" else "a"
    return f"{article} {size} {colour} {shape} moving {direction}"


def parse_caption(text: str, cfg: WorldConfig) -> dict[str, int]:
    """Inverse of `caption` (case and spacing insensitive); a ValueError names the word it cannot place."""
    words = text.lower().split()
    if len(words) != 6:
        raise ValueError(f"Caption {text!r} has {len(words)} words; expected 'a <size> <colour> <shape> "
                         f"moving <direction>'")
    slots = [("article", ("a", "an")), ("size", cfg.sizes), ("colour", cfg.colours), ("shape", cfg.shapes),
             ("verb", ("moving",)), ("direction", cfg.directions)]
    out = {}
    for word, (slot, vocab) in zip(words, slots):
        if word not in vocab:
            raise ValueError(f"Caption {text!r}: unknown {slot} word {word!r}; expected one of {list(vocab)}")
        if slot in FACTORS:
            out[slot] = vocab.index(word)
    return out


# ---------------------------------------------------------------------------------------------- rendering


def _half_extent(shape: str, radius: float) -> float:
    """Half the side of the shape's bounding box, for an equal-area radius (area = pi r^2 for every shape)."""
    if shape == "circle":
        return radius
    if shape == "square":
        return radius * math.sqrt(math.pi) / 2  # side^2 = pi r^2
    return radius * math.sqrt(2 * math.pi) / 2  # triangle with base = height b: b^2 / 2 = pi r^2


def _signed_distance(shape: str, dx: np.ndarray, dy: np.ndarray, radius: float) -> np.ndarray:
    """Signed distance (negative inside) from the shape centred at the origin; exact enough near edges."""
    half = _half_extent(shape, radius)
    if shape == "circle":
        return np.hypot(dx, dy) - half
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - half
    # Apex (0, -half), base corners (+-half, half): the sloped sides have outward normals (+-2, -1)/sqrt(5).
    # The bounding box's planes are added because beyond the sharp apex the sides alone would underestimate
    # the distance (anti-aliasing would then smear the tip across the margin).
    sides = (2 * np.abs(dx) - (dy + half)) / math.sqrt(5)
    return np.maximum(np.maximum(sides, np.abs(dy) - half), np.abs(dx) - half)


def render(factors: Mapping[str, int], rng: np.random.Generator, cfg: WorldConfig) -> np.ndarray:
    """One clip, uint8 [T, H, W, 3]; the nuisances come from `rng`."""
    t_len, h, w = cfg.num_frames, cfg.height, cfg.width
    shape = cfg.shapes[factors["shape"]]
    vx, vy = DIRECTIONS[cfg.directions[factors["direction"]]]
    s = cfg.scale

    radius = cfg.size_radii[factors["size"]] * s * rng.uniform(1 - cfg.size_jitter, 1 + cfg.size_jitter)
    half, margin = _half_extent(shape, radius), cfg.margin * s
    # Keep the whole shape inside the frame: cap the speed by the room along the motion axis, then start
    # where the full path fits.
    along = w if vx else h
    room = along - 2 * (half + margin)
    speed = min(rng.uniform(*cfg.speed_range) * s, room / (t_len - 1))
    travel = speed * (t_len - 1)
    lo_x, hi_x = half + margin, w - half - margin
    lo_y, hi_y = half + margin, h - half - margin
    x0 = rng.uniform(lo_x, max(lo_x, hi_x - travel)) if vx else rng.uniform(lo_x, hi_x)
    y0 = rng.uniform(lo_y, max(lo_y, hi_y - travel)) if vy else rng.uniform(lo_y, hi_y)
    if vx < 0:
        x0 = w - x0  # mirror the start so a leftward path also fits
    if vy < 0:
        y0 = h - y0
    t = np.arange(t_len, dtype=np.float64)[:, None, None]
    cx, cy = x0 + vx * speed * t, y0 + vy * speed * t

    ys, xs = np.mgrid[0:h, 0:w] + 0.5  # pixel centres
    # Anti-aliased coverage: a sub-pixel position moves the edge smoothly, as in a real (or generated) video.
    alpha = np.clip(0.5 - _signed_distance(shape, xs - cx, ys - cy, radius), 0.0, 1.0)[..., None]

    colour = np.asarray(PALETTE[cfg.colours[factors["colour"]]])
    colour = np.clip(colour + rng.uniform(-cfg.colour_jitter, cfg.colour_jitter, 3), 0, 1)
    colour = colour * rng.uniform(*cfg.brightness_range)
    level = rng.uniform(0.0, cfg.background_max)
    noise = rng.normal(0.0, cfg.background_noise, (t_len, h, w, 3))
    video = level + alpha * (colour - level) + noise
    return np.round(np.clip(video, 0.0, 1.0) * 255).astype(np.uint8)


def generate(seed: int, count: int, cfg: WorldConfig, start: int = 0) -> Iterator[dict]:
    """Examples start .. start+count-1; example i depends only on (seed, i), so shards and splits reproduce.

    Held-out combinations are redrawn from the clip's own stream: no split ever shows one, and a world
    without held-out combinations draws exactly the clips it always did.
    """
    held = held_out_set(cfg)
    for i in range(start, start + count):
        rng = np.random.default_rng([seed, i])
        factors = sample_factors(rng, cfg)
        while held and _combo(factors) in held:
            factors = sample_factors(rng, cfg)
        yield {"video": render(factors, rng, cfg), "caption": caption(factors, cfg), **factors}


def prompt_set(cfg: WorldConfig, count: int, seed: int = 0) -> list[dict[str, int]]:
    """A fixed, balanced set of *seen* factor combinations for evaluation (never a held-out one).

    Each factor runs through shuffled blocks holding every value once, so any count has each value
    floor or ceil(count / len(values)) times; each factor has its own stream, so a shorter set is a prefix
    of a longer one. Held-out combinations are skipped in that stream (the balance is then off by the few
    skipped), so the set stays a prefix of a longer one.
    """
    held, length = held_out_set(cfg), count
    while True:
        columns = {}
        for k, factor in enumerate(FACTORS):
            rng = np.random.default_rng([seed, k])
            n = len(cfg.values(factor))
            blocks = [rng.permutation(n) for _ in range(-(-length // n))]
            columns[factor] = np.concatenate(blocks)[:length] if blocks else np.zeros(0, int)
        combos = [{f: int(columns[f][i]) for f in FACTORS} for i in range(length)]
        seen = [c for c in combos if _combo(c) not in held]
        if len(seen) >= count:
            return seen[:count]
        length += count - len(seen)


# --------------------------------------------------------------------------- held-out compositions

_HELD_OUT_SEED = 20241220  # fixed: the held-out set depends on the vocabularies and the count only


def _combo(factors: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(int(factors[f]) for f in FACTORS)


@functools.cache
def held_out_set(cfg: WorldConfig) -> frozenset[tuple[int, ...]]:
    """The world's held-out combinations, as (colour, shape, direction, size) index tuples.

    Drawn in a fixed shuffled order, taking a combination only while every *pair* of factor values it holds
    keeps another combination in training: every value, and every pair of values, is still seen, so a
    held-out prompt asks for a new composition of known parts, never for an unseen word.
    """
    n = cfg.held_out_combinations
    if n < 0:
        raise ValueError(f"WorldConfig.held_out_combinations must be >= 0, got {n}")
    if n == 0:
        return frozenset()
    combos = list(itertools.product(*(range(len(cfg.values(f))) for f in FACTORS)))
    pairs = lambda c: [(i, j, c[i], c[j]) for i, j in itertools.combinations(range(len(FACTORS)), 2)]
    left = {}  # pair of values -> training combinations that still show it
    for c in combos:
        for p in pairs(c):
            left[p] = left.get(p, 0) + 1
    held = []
    for index in np.random.default_rng(_HELD_OUT_SEED).permutation(len(combos)):
        c = combos[index]
        if all(left[p] > 1 for p in pairs(c)):
            held.append(c)
            for p in pairs(c):
                left[p] -= 1
            if len(held) == n:
                return frozenset(held)
    raise ValueError(f"WorldConfig.held_out_combinations={n}: only {len(held)} of the {len(combos)} combinations "
                     f"can be held out with every pair of factor values still seen in training")


def held_out_prompts(cfg: WorldConfig) -> list[dict[str, int]]:
    """Every held-out combination once, in a fixed order: the held-out half of an evaluation."""
    return [dict(zip(FACTORS, c)) for c in sorted(held_out_set(cfg))]


# ------------------------------------------------------------------------------------------------- oracle

_PEAK_PERCENTILE = 99.5  # "peak" excess of a clip, robust to a few hot noise pixels
_MIN_CONTRAST = 0.1  # a clip whose peak excess is below this (in [0, 1] units) shows no shape
_MIN_AREA = 3.0  # reference pixels^2; a frame whose largest blob is smaller shows no shape
_WINDOW = 2.0  # reference pixels added around the blob for the moments: room for a blurred edge's tail
_MIN_CHROMA = 0.2  # |opponent colour| / |colour| below this is grey: no palette colour (the palette's ~0.55-0.8)
_MIN_TRAVEL = 2.0  # reference pixels; a centroid moving less over the whole clip has no direction
_CHUNK_PIXELS = 1 << 21  # bound the oracle's working memory


def _as_float(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.dtype == np.uint8:
        out = videos.astype(np.float32)
        out *= 1 / 255
        return out
    if videos.dtype.kind != "f":
        raise ValueError(f"videos must be uint8 or float in [0, 1], got {videos.dtype}")
    return videos.astype(np.float32)


def _smooth(x: np.ndarray) -> np.ndarray:
    """Separable [1, 2, 1] / 4 filter over the H and W axes of [..., H, W, C] (edges replicated)."""
    for axis in (-3, -2):
        x = np.moveaxis(x, axis, 0)
        out = 0.5 * x
        out[1:] += 0.25 * x[:-1]
        out[:-1] += 0.25 * x[1:]
        out[0] += 0.25 * x[0]
        out[-1] += 0.25 * x[-1]
        x = np.moveaxis(out, 0, axis)
    return x


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """[N, H, W] bool grown by `steps` pixels (3x3 neighbourhood per step)."""
    _, h, w = mask.shape
    for _ in range(steps):
        p = np.pad(mask, ((0, 0), (1, 1), (1, 1)))
        mask = np.logical_or.reduce([p[:, dy:dy + h, dx:dx + w] for dy in range(3) for dx in range(3)])
    return mask


def _largest_component(mask: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> the largest 8-connected component of each image (empty stays empty).

    Min-label propagation with pointer jumping over the foreground pixels only (a small fraction of the
    frame), vectorised over all images: each pixel's label is the index of a pixel of its component, and it
    shrinks until it is the component's smallest index; a few passes suffice.
    """
    n, h, w = mask.shape
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)))  # the zero border keeps images (and rows) apart
    pos = np.flatnonzero(padded)
    count = pos.size
    index = np.full(padded.size, -1, np.int64)
    index[pos] = np.arange(count)
    row = w + 2
    own = np.arange(count)
    neighbours = []
    for offset in (-row - 1, -row, -row + 1, -1, 1, row - 1, row, row + 1):
        nb = index[pos + offset]
        neighbours.append(np.where(nb >= 0, nb, own))
    labels = own
    while True:
        new = labels
        for nb in neighbours:
            new = np.minimum(new, labels[nb])
        new = new[new]  # jump: take the label of the pixel one's label names
        if np.array_equal(new, labels):
            break
        labels = new
    # Per image, the root with the most pixels.
    image = pos // (padded.size // n)
    sizes = np.bincount(labels, minlength=count)
    roots = np.flatnonzero(sizes)
    order = np.lexsort((-sizes[roots], image[roots]))
    first = np.unique(image[roots][order], return_index=True)[1]
    best = np.full(n, -1, np.int64)
    best[image[roots][order][first]] = roots[order][first]
    out = np.zeros(padded.size, bool)
    out[pos[labels == best[image]]] = True
    return out.reshape(padded.shape)[:, 1:-1, 1:-1]


def _opponent(rgb: np.ndarray) -> np.ndarray:
    """[..., 3] -> [..., 2] coordinates in the plane orthogonal to grey (red-green, yellow-blue)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.stack([(r - g) / math.sqrt(2), (r + g - 2 * b) / math.sqrt(6)], -1)


def _central_moments(mass: np.ndarray, order: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mass distributions [..., H, W] -> (total [...], centre [..., 2] (x, y), m [..., p, q]) where
    m[p, q] = mean of (x - cx)^p (y - cy)^q over the mass, p, q <= order; by matrix products, not per pixel."""
    h, w = mass.shape[-2:]
    x, y = np.arange(w) + 0.5, np.arange(h) + 0.5
    total = mass.sum((-2, -1))
    safe = np.where(np.abs(total) > 1e-9, total, np.nan)
    cx, cy = (mass.sum(-2) @ x) / safe, (mass.sum(-1) @ y) / safe
    powers = np.arange(order + 1)
    px = (x - np.nan_to_num(cx)[..., None])[..., None] ** powers  # [..., W, order + 1]
    py = (y - np.nan_to_num(cy)[..., None])[..., None] ** powers  # [..., H, order + 1]
    m = np.einsum("...hp,...hq->...pq", mass @ px, py) / safe[..., None, None]
    return total, np.stack([cx, cy], -1), m


def _median_over_frames(x: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """[B, T] -> [B] median over the valid frames; NaN where none is valid (np.nanmedian warns there)."""
    counts = valid.sum(1)
    x = np.sort(np.where(valid, x, np.nan), axis=1)  # NaNs sort last
    lo, hi = np.maximum((counts - 1) // 2, 0), counts // 2
    picked = 0.5 * (np.take_along_axis(x, lo[:, None], 1) + np.take_along_axis(x, hi[:, None], 1))[:, 0]
    return np.where(counts > 0, picked, np.nan)


def measure(videos: np.ndarray, cfg: WorldConfig) -> dict[str, np.ndarray]:
    """The oracle's raw per-clip features of videos [B, T, H, W, 3] (uint8, or float in [0, 1]).

    Returns {"hue_vector": [B, 2] opponent-plane colour (NaN if grey), "triangularity": [B], "squareness":
    [B] (see SHAPE_FEATURES), "area": [B] (pixels), "velocity": [B, 2] (pixels/frame, x right, y down; NaN
    if the shape stands still)}; features of clips that show no shape are NaN. Useful on its own to see
    *why* a generated clip is misread.
    """
    videos = _as_float(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise ValueError(f"videos must be [B, T, H, W, 3], got {videos.shape}")
    b, t_len, h, w, _ = videos.shape
    per_clip = max(1, _CHUNK_PIXELS // (t_len * h * w))
    parts = [_measure_chunk(videos[i:i + per_clip], cfg) for i in range(0, b, per_clip)]
    if not parts:
        return {"hue_vector": np.zeros((0, 2)), "triangularity": np.zeros(0), "squareness": np.zeros(0),
                "area": np.zeros(0), "velocity": np.zeros((0, 2))}
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def _measure_chunk(videos: np.ndarray, cfg: WorldConfig) -> dict[str, np.ndarray]:
    b, t_len, h, w, _ = videos.shape
    # Background = each frame's per-channel median (the shape covers well under half of a frame); the
    # excess over it is invariant to the background's level and tint.
    # A quarter of the pixels (every other row and column) estimates it as well, four times faster.
    background = np.median(videos[:, :, ::2, ::2].reshape(b, t_len, -1, 3), axis=2)[:, :, None, None, :]
    excess = videos - background

    # Foreground blob: brighter than the background in any channel (blue counts as much as yellow), after a
    # light smoothing that cuts pixel noise ~2.7x; half the clip's peak, where a blurred edge keeps its place.
    salience = _smooth(excess).max(-1)
    peak = np.percentile(salience.reshape(b, -1), _PEAK_PERCENTILE, axis=1)
    visible = peak >= _MIN_CONTRAST
    blob = salience > 0.5 * np.maximum(peak, _MIN_CONTRAST)[:, None, None, None]
    blob = _largest_component(blob.reshape(b * t_len, h, w)).reshape(b, t_len, h, w)
    area = blob.sum((2, 3)).astype(np.float64)
    valid = (area >= _MIN_AREA * cfg.scale**2) & visible[:, None]

    # colour: mean excess of the blob, in the opponent plane.
    fg = blob & valid[:, :, None, None]
    n_fg = fg.sum((1, 2, 3))
    mean_excess = np.einsum("bthw,bthwc->bc", fg.astype(np.float32), excess, dtype=np.float64)
    mean_excess /= np.maximum(n_fg, 1)[:, None]
    hue_vector = _opponent(mean_excess)
    # A grey blob has no hue to read; calling it the nearest colour would credit it by chance.
    grey = np.linalg.norm(hue_vector, axis=1) < _MIN_CHROMA * np.linalg.norm(mean_excess, axis=1)
    hue_vector[(n_fg == 0) | grey] = np.nan

    # Soft mass: the excess projected on the shape's own colour, in a window around the blob. It is linear
    # in the pixels, so a blur (an isotropic convolution) leaves its total mass and its third and fourth
    # complex central moments unchanged, and noise averages out instead of biasing it.
    tint = mean_excess / np.maximum(np.linalg.norm(mean_excess, axis=1, keepdims=True), 1e-12)
    window = _dilate(blob.reshape(b * t_len, h, w), max(1, round(_WINDOW * cfg.scale))).reshape(blob.shape)
    mass = np.einsum("bthwc,bc->bthw", excess, tint) * window  # float64: fourth powers of coordinates follow
    _, centre, m = _central_moments(mass, 4)
    # With z = x + iy (y down): Im mu3 = 3 m21 - m03 and Re mu4 = m40 - 6 m22 + m04; normalised by the blob's
    # area so that the features are scale-free (see SHAPE_FEATURES).
    safe_area = np.maximum(area, 1.0)
    triangularity = (3 * m[..., 2, 1] - m[..., 0, 3]) / safe_area**1.5 / _TRIANGLE_MU3
    squareness = (m[..., 4, 0] - 6 * m[..., 2, 2] + m[..., 0, 4]) / safe_area**2 / _SQUARE_MU4

    # direction: least-squares velocity of the centroid over the valid frames.
    weight = valid.astype(np.float64)
    frames = np.arange(t_len, dtype=np.float64)
    t_mean = (weight * frames).sum(1) / np.maximum(weight.sum(1), 1)
    dt = (frames - t_mean[:, None]) * weight
    var = (dt**2).sum(1)
    centre = np.where(valid[..., None], centre, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        velocity = np.einsum("bt,btk->bk", dt, centre) / var[:, None]
    # Fewer than two valid frames, or a shape that (nearly) stands still, has no direction.
    travel = np.linalg.norm(velocity, axis=1) * (t_len - 1)
    velocity[(var == 0) | ~(travel >= _MIN_TRAVEL * cfg.scale)] = np.nan

    return {"hue_vector": hue_vector, "triangularity": _median_over_frames(triangularity, valid),
            "squareness": _median_over_frames(squareness, valid), "area": _median_over_frames(area, valid),
            "velocity": velocity}


def _nearest(features: np.ndarray, prototypes: np.ndarray) -> np.ndarray:
    """Index of the nearest prototype (Euclidean) per row; -1 where a feature is NaN."""
    d = ((features[:, None, :] - prototypes[None]) ** 2).sum(-1)
    out = np.argmin(np.where(np.isnan(d), np.inf, d), axis=1)
    return np.where(np.isnan(features).any(-1), -1, out)


def read_factors_batch(videos: np.ndarray, cfg: WorldConfig) -> dict[str, np.ndarray]:
    """The oracle: videos [B, T, H, W, 3] -> {factor: [B] int} predicted indices; -1 where no shape is seen."""
    m = measure(videos, cfg)
    # colour: nearest palette hue (unit vectors in the opponent plane: a brightness change only scales it).
    protos = _opponent(np.asarray([PALETTE[c] for c in cfg.colours]))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    hue = m["hue_vector"] / np.maximum(np.linalg.norm(m["hue_vector"], axis=1, keepdims=True), 1e-12)
    colour = _nearest(hue, protos)
    shape = _nearest(np.stack([m["triangularity"], m["squareness"]], -1),
                     np.asarray([SHAPE_FEATURES[s] for s in cfg.shapes]))
    # direction: the unit motion with the largest projection of the velocity (= larger |slope| axis and sign).
    units = np.asarray([DIRECTIONS[d] for d in cfg.directions])
    scores = m["velocity"] @ units.T
    direction = np.where(np.isnan(scores).any(-1), -1, np.argmax(np.nan_to_num(scores, nan=-np.inf), -1))
    # size: nearest in log-area (thresholds at the geometric means of neighbouring sizes' areas).
    log_areas = np.log(np.pi * (np.asarray(cfg.size_radii) * cfg.scale) ** 2)[:, None]
    size = _nearest(np.log(m["area"])[:, None], log_areas)
    return {"colour": colour, "shape": shape, "direction": direction, "size": size}


def read_factors(video: np.ndarray, cfg: WorldConfig) -> dict[str, int]:
    """The oracle on one clip [T, H, W, 3] (uint8, or float in [0, 1]); -1 for a factor it cannot read."""
    return {k: int(v[0]) for k, v in read_factors_batch(np.asarray(video)[None], cfg).items()}


def adherence(videos: np.ndarray, factors: Mapping[str, np.ndarray], cfg: WorldConfig) -> dict[str, float]:
    """Fraction of clips whose oracle reading matches the intended factor, per factor, and "all" four.

    `factors` may carry other keys (a whole batch from `generate` works); the factors in FACTORS it has are
    scored and "all" requires every one of them to match.
    """
    read = read_factors_batch(videos, cfg)
    scored = [f for f in FACTORS if f in factors]
    if not scored:
        raise ValueError(f"adherence: factors has none of {FACTORS}")
    hits = {f: read[f] == np.asarray(factors[f]).reshape(-1) for f in scored}
    out = {f: float(h.mean()) for f, h in hits.items()}
    out["all"] = float(np.logical_and.reduce([hits[f] for f in scored]).mean())
    return out


def world_config(config) -> WorldConfig:
    """The world of `config.world` (frames, resolution, held-out combinations; the vocabularies are fixed)."""
    c = config.world
    return WorldConfig(num_frames=c.num_frames, height=c.height, width=c.width,
                       held_out_combinations=c.held_out_combinations)
