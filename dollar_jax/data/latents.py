"""The latents dataset every diffusion job reads: (latents [F, H, W, C], text [L, D], caption) per clip, plus
the unconditional text embedding beside it. Written by jobs/precompute.py (embedded world) and
tools/precompute_latents.py (Wan VAE + umT5); read by the teacher and distillation jobs."""

from __future__ import annotations

import io
import os

import numpy as np
from etils import epath

from dollar_jax import storage
from dollar_jax.data import arrays_dataset

NULL_TEXT_FILE = "null_text.npy"


def latent_spec(latent_shape, text_shape, extra_ints=()) -> dict:
    spec = {"latents": ("tensor", tuple(latent_shape), "float32"), "text": ("tensor", tuple(text_shape), "float32"),
            "caption": ("text",)}
    spec.update({k: ("int",) for k in extra_ints})
    return spec


def save_null_text(data_dir: str, name: str, null_text: np.ndarray) -> None:
    path = storage.join(data_dir, name, NULL_TEXT_FILE)
    storage.makedirs(os.path.dirname(path))
    with epath.Path(path).open("wb") as f:
        np.save(f, null_text.astype(np.float32))


def load_null_text(data_dir: str, name: str) -> np.ndarray:
    path = storage.join(data_dir, name, NULL_TEXT_FILE)
    if not storage.exists(path):
        raise arrays_dataset.DatasetError(f"{path} is missing: the dataset has no unconditional text embedding")
    return np.load(io.BytesIO(epath.Path(path).read_bytes()))


def check_dataset_fits(config, data_dir: str, dit) -> tuple:
    """The latents dataset must match the model's channels and text width; say which field does not."""
    shapes = arrays_dataset.feature_shapes(data_dir, config.data.latents)
    for key in ("latents", "text"):
        if key not in shapes or shapes[key][0] != "tensor":
            raise arrays_dataset.DatasetError(f"Dataset {config.data.latents!r} has no array field {key!r}")
    latent_shape, text_shape = shapes["latents"][1], shapes["text"][1]
    for key, stored, want in (("latent_shape", latent_shape, config.data.latent_shape),
                              ("text_shape", text_shape, config.data.text_shape)):
        if want and tuple(want) != tuple(stored):
            raise arrays_dataset.DatasetError(
                f"Dataset {config.data.latents!r} holds {key.split('_')[0]} of shape {tuple(stored)}, but "
                f"config.data.{key} is {tuple(want)}")
    if len(latent_shape) != 4 or latent_shape[-1] != dit.in_channels:
        raise arrays_dataset.DatasetError(
            f"Dataset {config.data.latents!r}: latents are {latent_shape}, the model needs [F, H, W, "
            f"{dit.in_channels}] (config.model.in_channels)")
    if len(text_shape) != 2 or text_shape[-1] != dit.text_dim:
        raise arrays_dataset.DatasetError(
            f"Dataset {config.data.latents!r}: text embeddings are {text_shape}, the model needs [L, "
            f"{dit.text_dim}] (config.model.text_dim)")
    return tuple(latent_shape), tuple(text_shape)
