"""Pixel rewards: one interface, `reward(videos_uint8 [N, T, H, W, 3], prompts [N]) -> scores [N]`.

Plain Python/NumPy on the host; no gradient is ever needed (the latent reward model carries the gradient),
so rewards may be non-differentiable (JPEG size, counts, thresholds, external programs).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np


class Reward(Protocol):
    name: str

    def __call__(self, videos: np.ndarray, prompts: Sequence[str]) -> np.ndarray: ...


_REGISTRY: dict[str, Callable[..., Reward]] = {}


def register(name: str):
    def wrap(factory):
        _REGISTRY[name] = factory
        return factory

    return wrap


def make_reward(name: str, **kwargs) -> Reward:
    """A reward by registered name (dollar_jax/rewards/*.py), e.g. "colourfulness", "jpeg_compressibility"."""
    if name not in _REGISTRY:
        raise ValueError(f"Unknown reward {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def registered() -> list[str]:
    return sorted(_REGISTRY)


def check_videos(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"Rewards take uint8 videos [N, T, H, W, 3], got {videos.dtype} {videos.shape}")
    return videos
