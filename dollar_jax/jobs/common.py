"""What every model folder a job exports says about how to condition and decode it."""

from __future__ import annotations

from dollar_jax.paths import Paths


def conditioning_sections(config, workdir: str, latent_shape, text_shape) -> dict:
    """What a model folder needs to generate on its own: latent and text-embedding shapes (the umT5 length a
    real model was trained with), and in the embedded world the text encoder's settings and where the
    autoencoder lives (so `python -m dollar_jax.sample` can decode)."""
    out = {"latents": {"shape": list(latent_shape), "text_shape": list(text_shape)}}
    if config.embedded_world:
        w = config.world
        out["text"] = {"encoder": "world_words", "max_length": config.text.max_length, "dim": config.text.dim,
                       "seed": config.text.seed}
        out["world"] = {"autoencoder": Paths.of(config, workdir).autoencoder, "num_frames": w.num_frames,
                        "height": w.height, "width": w.width}
    return out
