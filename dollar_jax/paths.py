"""Where each job finds its inputs and puts its outputs, derived from (config, workdir) in one place."""

from __future__ import annotations

import dataclasses
import os


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

    def world_encoder(self, config) -> str:
        """The embedded world's evaluation encoder (a model folder)."""
        e = config.world_encoder
        return os.path.abspath(e.dir) if e.dir else os.path.join(self.workdir, "world_encoder")
