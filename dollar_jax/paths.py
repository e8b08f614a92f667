"""Where each job finds its inputs and puts its outputs, derived from (config, workdir) in one place.

Any of them may be a local path (made absolute) or an object-store URL such as gs://bucket/run (kept as
given); see dollar_jax/storage.py.
"""

from __future__ import annotations

import dataclasses

from dollar_jax.storage import join, resolve


@dataclasses.dataclass(frozen=True)
class Paths:
    workdir: str
    data: str
    autoencoder: str
    teacher: str

    @classmethod
    def of(cls, config, workdir: str) -> Paths:
        workdir = resolve(workdir)
        return cls(
            workdir=workdir,
            data=resolve(config.data.dir) if config.data.dir else join(workdir, "data"),
            autoencoder=resolve(config.autoencoder.dir) if config.autoencoder.dir
            else join(workdir, "autoencoder"),
            teacher=resolve(config.teacher.dir) if config.teacher.dir else join(workdir, "teacher"),
        )

    def run(self, name: str) -> str:
        """The work directory of one training run (its checkpoints and metrics)."""
        return join(self.workdir, "runs", name)

    def world_encoder(self, config) -> str:
        """The embedded world's evaluation encoder (a model folder)."""
        e = config.world_encoder
        return resolve(e.dir) if e.dir else join(self.workdir, "world_encoder")
