"""Pre-train the tiny teacher DiT on the embedded shapes world (VP schedule, conjugate velocity, text dropout).

    python -m dollar_jax.main --config=configs/world_teacher.py --workdir=/tmp/world
    python -m dollar_jax.main --config=configs/world_teacher.py:quick --workdir=/tmp/world_quick   # seconds

Builds what it needs first (videos -> autoencoder -> latents) and skips what the workdir already has.
"""

from dollar_jax.config import base_config, embedded_world


def get_config(arg: str | None = None):
    quick = arg == "quick"
    if arg not in (None, "", "quick"):
        raise ValueError(f"Unknown variant {arg!r}; use configs/world_teacher.py or configs/world_teacher.py:quick")
    c = embedded_world(base_config(), quick)
    c.job = "teacher"
    c.sampling.every_steps = 100 if quick else 1000
    c.checkpoint.every_steps = 50 if quick else 500
    return c
