"""Rewards computed from pixels alone: colourfulness, JPEG compressibility, a thresholded count, and the
embedded world's caption adherence (the oracle's factor checks)."""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np

from dollar_jax.rewards.base import check_videos, register


@register("colourfulness")
class Colourfulness:
    """Hasler & Suesstrunk's colourfulness (2003) per frame, averaged over frames, divided by 100.

    sigma_rgyb + 0.3 mu_rgyb over rg = R - G and yb = (R + G)/2 - B: saturated, contrasted content scores
    high, grey or washed-out content low. A stand-in for aesthetic/preference rewards in the embedded world.
    """

    name = "colourfulness"

    def __call__(self, videos: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        v = check_videos(videos).astype(np.float32)
        r, g, b = v[..., 0], v[..., 1], v[..., 2]
        rg, yb = r - g, 0.5 * (r + g) - b
        axes = (2, 3)
        std = np.sqrt(rg.var(axis=axes) + yb.var(axis=axes))
        mean = np.sqrt(rg.mean(axis=axes) ** 2 + yb.mean(axis=axes) ** 2)
        return ((std + 0.3 * mean) / 100.0).mean(axis=1)


@register("vividness")
class Vividness:
    """Chroma (max - min channel, in [0, 1]) of each frame's k most vivid pixels, averaged.

    Unlike colourfulness it does not grow with the coloured *area*, so it rewards saturated, clean colour
    without pushing shapes to grow (which would break the caption's size). k = 16 pixels per 32x32 frame,
    scaled with the frame area: fewer than the smallest shape covers.
    """

    name = "vividness"

    def __init__(self, pixels_per_1024: int = 16):
        self.k = int(pixels_per_1024)

    def __call__(self, videos: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        v = check_videos(videos).astype(np.float32) / 255.0
        chroma = (v.max(axis=-1) - v.min(axis=-1)).reshape(v.shape[0], v.shape[1], -1)
        k = max(1, round(self.k * chroma.shape[-1] / 1024))
        top = -np.sort(-chroma, axis=-1)[..., :k]
        return top.mean(axis=(1, 2)).astype(np.float32)


@register("sharpness")
class Sharpness:
    """Edge sharpness: the mean of each frame's k largest neighbour differences (max over channels).

    Generated clips are blurrier than real ones (the autoencoder decodes imperfect latents softly), so this
    is the embedded world's stand-in for an image-quality reward. k = 24 per 32x32 frame (scaled with the
    area) is below the edge length of the smallest shape, so a larger shape does not score higher.
    """

    name = "sharpness"

    def __init__(self, edges_per_1024: int = 24):
        self.k = int(edges_per_1024)

    def __call__(self, videos: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        v = check_videos(videos).astype(np.float32) / 255.0
        n, t = v.shape[:2]
        gx = np.abs(np.diff(v, axis=3)).max(axis=-1).reshape(n, t, -1)
        gy = np.abs(np.diff(v, axis=2)).max(axis=-1).reshape(n, t, -1)
        g = np.concatenate([gx, gy], axis=-1)
        k = max(1, round(self.k * v.shape[2] * v.shape[3] / 1024))
        return (-np.sort(-g, axis=-1)[..., :k]).mean(axis=(1, 2)).astype(np.float32)


@register("jpeg_compressibility")
class JpegCompressibility:
    """Minus the JPEG size of the frames in kilobytes per frame (quality 75): simpler videos score higher.

    The reward of DDPO's compressibility experiment; it has no gradient at all.
    """

    name = "jpeg_compressibility"

    def __init__(self, quality: int = 75):
        self.quality = int(quality)

    def __call__(self, videos: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        from PIL import Image

        videos = check_videos(videos)
        out = np.zeros(len(videos), np.float32)
        for i, clip in enumerate(videos):
            size = 0
            for frame in clip:
                buf = io.BytesIO()
                Image.fromarray(frame).save(buf, format="JPEG", quality=self.quality)
                size += buf.tell()
            out[i] = -size / 1024.0 / len(clip)
        return out


@register("bright_pixel_fraction")
class BrightPixelFraction:
    """Fraction of pixels whose brightest channel exceeds a threshold (a thresholded count: no gradient)."""

    name = "bright_pixel_fraction"

    def __init__(self, threshold: int = 128):
        self.threshold = int(threshold)

    def __call__(self, videos: np.ndarray, prompts: Sequence[str] = ()) -> np.ndarray:
        v = check_videos(videos)
        return (v.max(axis=-1) > self.threshold).mean(axis=(1, 2, 3)).astype(np.float32)


@register("world_adherence")
class WorldAdherence:
    """Fraction of the caption's four factors (colour, shape, direction, size) the oracle reads from pixels."""

    name = "world_adherence"

    def __init__(self, num_frames: int = 8, height: int = 32, width: int = 32):
        from dollar_jax.data.world import WorldConfig

        self.cfg = WorldConfig(num_frames=num_frames, height=height, width=width)

    def __call__(self, videos: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        from dollar_jax.data import world

        videos = check_videos(videos)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        read = world.read_factors_batch(videos, self.cfg)
        wanted = [world.parse_caption(p, self.cfg) for p in prompts]
        hits = np.stack([read[f] == np.asarray([w[f] for w in wanted]) for f in world.FACTORS], axis=1)
        return hits.mean(axis=1).astype(np.float32)
