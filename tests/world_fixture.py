"""One embedded-world pipeline per test session: videos -> autoencoder -> latents -> teacher.

Built once (about three minutes on 2 CPU cores) and shared by every test that needs a trained world, so
no test module retrains what another already trained.
"""

from __future__ import annotations

import os

from dollar_jax.config import base_config, embedded_world


def world_test_config(workdir: str, **overrides):
    """The tests' world: the quick model and a smaller dataset, an autoencoder past the reconstruction bar
    (400 steps at twice the default learning rate: 25.6 dB validation PSNR, against test_world_pipeline's 25;
    600 at the default gave 25.7, 350 at twice it 25.2) and a teacher trained long enough to follow colour and
    size."""
    c = embedded_world(base_config(), quick=True)
    c.world.update(dict(num_train=2048, num_val=128, held_out_combinations=4))  # as configs/demo.py:quick
    c.autoencoder.update(dict(steps=400, learning_rate=6e-3))
    c.data.dir = os.path.join(workdir, "data")
    c.autoencoder.dir = os.path.join(workdir, "autoencoder")
    c.teacher.dir = os.path.join(workdir, "teacher")
    c.job = "teacher"
    c.teacher.update(dict(steps=1000, batch_size=32, ema_decay=0.995))
    c.teacher.optim.warmup_steps = 50
    c.mesh.update(dict(data=1, fsdp=1, context=1, tensor=1))  # one device: faster than 8 virtual ones on 2 cores
    c.sampling.every_steps = 0
    c.checkpoint.every_steps = 500
    c.log_every_steps = 50
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
