"""Writing videos for people to look at: GIF (Pillow) and MP4 (imageio-ffmpeg), single clips or grids.

Paths may be on object stores (gs://): the file is written locally, then uploaded (storage.local_file).
"""

from __future__ import annotations

import numpy as np

from dollar_jax import storage


def to_uint8(video) -> np.ndarray:
    v = np.asarray(video)
    if v.dtype == np.uint8:
        return v
    return (np.clip(v.astype(np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def grid(videos, columns: int | None = None, upscale: int = 1, gap: int = 1) -> np.ndarray:
    """[N, T, H, W, 3] -> one [T, rows*H', cols*W', 3] clip (nearest-neighbour upscaled, white gaps)."""
    v = to_uint8(videos)
    if upscale > 1:
        v = v.repeat(upscale, axis=2).repeat(upscale, axis=3)
    n, t, h, w, c = v.shape
    cols = columns or int(np.ceil(np.sqrt(n)))
    rows = int(np.ceil(n / cols))
    out = np.full((t, rows * (h + gap) - gap, cols * (w + gap) - gap, c), 255, np.uint8)
    for i in range(n):
        r, k = divmod(i, cols)
        out[:, r * (h + gap): r * (h + gap) + h, k * (w + gap): k * (w + gap) + w] = v[i]
    return out


def write_gif(path: str, video, fps: int = 8) -> str:
    from PIL import Image

    frames = [Image.fromarray(f) for f in to_uint8(video)]
    with storage.local_file(path) as local:
        frames[0].save(local, format="GIF", save_all=True, append_images=frames[1:], duration=int(1000 / fps), loop=0)
    return path


def write_mp4(path: str, video, fps: int = 8) -> str:
    import imageio.v2 as imageio

    v = to_uint8(video)
    # H.264 wants even sizes; pad with white.
    t, h, w, c = v.shape
    v = np.pad(v, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
    with storage.local_file(path) as local:
        imageio.mimwrite(local, list(v), fps=fps, codec="libx264", macro_block_size=1, quality=8)
    return path


def write_video(path_without_ext: str, video, fps: int = 8) -> list[str]:
    """Both formats; returns the paths written."""
    return [write_gif(path_without_ext + ".gif", video, fps), write_mp4(path_without_ext + ".mp4", video, fps)]
