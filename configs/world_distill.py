"""Distil the embedded world's teacher into a 4-step student (VSD + CD, the paper's weights).

    python -m dollar_jax.main --config=configs/world_distill.py --workdir=/tmp/world
    python -m dollar_jax.main --config=configs/world_distill.py:quick --workdir=/tmp/world_quick
    variants: ":vsd" (VSD only), ":cd" (CD only); combine with quick as ":quick,vsd".

Trains the world and its teacher first if the workdir lacks them.
"""

from dollar_jax.config import base_config, embedded_world, variant_flags

VARIANTS = ("quick", "vsd", "cd")


def get_config(arg: str | None = None):
    flags = variant_flags(arg, VARIANTS)
    quick = "quick" in flags
    c = embedded_world(base_config(), quick)
    c.job = "distill"
    c.sampling.every_steps = 20 if quick else 200
    c.checkpoint.every_steps = 20 if quick else 200
    c.log_every_steps = 5 if quick else 20
    if "vsd" in flags:
        c.distill.cd_weight, c.distill.name = 0.0, "student_vsd"
    if "cd" in flags:
        c.distill.vsd_weight, c.distill.name = 0.0, "student_cd"
    return c
