"""Encode the world's clips into the dataset every diffusion job reads: latents + text embeddings.

The result has exactly the layout tools/precompute_latents.py writes for real videos (Wan VAE latents and
umT5 embeddings), so the teacher and distillation jobs cannot tell the embedded world from a real one.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.pipeline import eval_batches
from dollar_jax.data.text import WordEncoder
from dollar_jax.jobs import autoencoder as autoencoder_job
from dollar_jax.jobs.common import Paths, world_config

NULL_TEXT_FILE = "null_text.npy"


def text_encoder(config) -> WordEncoder:
    return WordEncoder(config.text.max_length, config.text.dim, config.text.seed)


def latent_spec(latent_shape, text_shape, extra_ints=()) -> dict:
    spec = {"latents": ("tensor", tuple(latent_shape), "float32"), "text": ("tensor", tuple(text_shape), "float32"),
            "caption": ("text",)}
    spec.update({k: ("int",) for k in extra_ints})
    return spec


def save_null_text(data_dir: str, name: str, null_text: np.ndarray) -> None:
    os.makedirs(os.path.join(data_dir, name), exist_ok=True)
    np.save(os.path.join(data_dir, name, NULL_TEXT_FILE), null_text.astype(np.float32))


def load_null_text(data_dir: str, name: str) -> np.ndarray:
    path = os.path.join(data_dir, name, NULL_TEXT_FILE)
    if not os.path.exists(path):
        raise arrays_dataset.DatasetError(f"{path} is missing: the dataset has no unconditional text embedding")
    return np.load(path)


def run(config, workdir: str) -> str:
    """Write <data>/<config.data.latents> from the video dataset and the trained autoencoder (skip if present)."""
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    name = config.data.latents
    encoder = text_encoder(config)
    if arrays_dataset.exists(paths.data, name):
        return arrays_dataset.dataset_path(paths.data, name)
    ae = autoencoder_job.load(paths.autoencoder)
    latent_shape = ae.config.latent_shape(wcfg.num_frames, wcfg.height, wcfg.width)
    encode = jax.jit(lambda m, v: m.encode(v))

    def examples(split):
        source = arrays_dataset.open_split(paths.data, config.data.videos, split)
        for batch in eval_batches(source, 128):
            latents = np.asarray(encode(ae, batch["video"]), np.float32)
            captions = [c.decode() if isinstance(c, bytes) else str(c) for c in batch["caption"]]
            text = encoder.encode(captions)
            for i, caption in enumerate(captions):
                ex = {"latents": latents[i], "text": text[i], "caption": caption}
                ex.update({k: int(batch[k][i]) for k in world.FACTORS})
                yield ex

    spec = latent_spec(latent_shape, (encoder.max_length, encoder.dim), world.FACTORS)
    save_null_text(paths.data, name, encoder.null())  # first: a finished dataset always has its null text
    path = arrays_dataset.write(paths.data, name, spec, {"train": lambda: examples("train"),
                                                        "validation": lambda: examples("validation")},
                                description="Shapes-world latents (autoencoder) and text embeddings (WordEncoder)")
    return path
