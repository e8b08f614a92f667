"""Encode the world's clips into the dataset every diffusion job reads: latents + text embeddings.

The result has exactly the layout tools/precompute_latents.py writes for real videos (Wan VAE latents and
umT5 embeddings), so the teacher and distillation jobs cannot tell the embedded world from a real one.
"""

from __future__ import annotations

import numpy as np

from dollar_jax.compile_effort import light_jit
from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.pipeline import eval_batches
from dollar_jax.checkpoint import load_autoencoder
from dollar_jax.data.latents import latent_spec, save_null_text
from dollar_jax.data.text import text_encoder
from dollar_jax.data.world import world_config
from dollar_jax.paths import Paths


def run(config, workdir: str) -> str:
    """Write <data>/<config.data.latents> from the video dataset and the trained autoencoder (skip if present)."""
    paths, wcfg = Paths.of(config, workdir), world_config(config)
    name = config.data.latents
    encoder = text_encoder(config)
    if arrays_dataset.exists(paths.data, name):
        return arrays_dataset.dataset_path(paths.data, name)
    ae = load_autoencoder(paths.autoencoder)
    latent_shape = ae.config.latent_shape(wcfg.num_frames, wcfg.height, wcfg.width)
    encode = light_jit(lambda m, v: m.encode(v))

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
