"""Where each job finds its inputs and puts its outputs, derived from (config, workdir) in one place."""

from __future__ import annotations

import dataclasses
import os

from dollar_jax.data.world import WorldConfig


@dataclasses.dataclass(frozen=True)
class Paths:
    workdir: str
    data: str
    autoencoder: str
    teacher: str

    @classmethod
    def of(cls, config, workdir: str) -> Paths:
        workdir = os.path.abspath(workdir)
        return cls(
            workdir=workdir,
            data=os.path.abspath(config.data.dir) if config.data.dir else os.path.join(workdir, "data"),
            autoencoder=os.path.abspath(config.autoencoder.dir) if config.autoencoder.dir
            else os.path.join(workdir, "autoencoder"),
            teacher=os.path.abspath(config.teacher.dir) if config.teacher.dir else os.path.join(workdir, "teacher"),
        )

    def run(self, name: str) -> str:
        """The work directory of one training run (its checkpoints and metrics)."""
        return os.path.join(self.workdir, "runs", name)


def world_config(config) -> WorldConfig:
    w = config.world
    return WorldConfig(num_frames=w.num_frames, height=w.height, width=w.width)


def conditioning_sections(config, workdir: str, latent_shape) -> dict:
    """What a model folder needs to generate on its own: latent shape, and in the embedded world the text
    encoder's settings and where the autoencoder lives (so `python -m dollar_jax.sample` can decode)."""
    out = {"latents": {"shape": list(latent_shape)}}
    if config.embedded_world:
        w = config.world
        out["text"] = {"encoder": "world_words", "max_length": config.text.max_length, "dim": config.text.dim,
                       "seed": config.text.seed}
        out["world"] = {"autoencoder": Paths.of(config, workdir).autoencoder, "num_frames": w.num_frames,
                        "height": w.height, "width": w.width}
    return out
