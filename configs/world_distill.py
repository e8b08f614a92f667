"""Distil the embedded world's teacher into a 4-step student (VSD + CD, the paper's weights).

    python -m dollar_jax.main --config=configs/world_distill.py --workdir=/tmp/world
    python -m dollar_jax.main --config=configs/world_distill.py:quick --workdir=/tmp/world_quick
    variants: ":vsd" (VSD only), ":cd" (CD only), ":grids" (one student trained on the 4-, 2- and 1-step
    grids at once; without it each step count is thinned from the 4-step grid); combine as ":quick,vsd".

Trains the world and its teacher first if the workdir lacks them.
"""

from dollar_jax.config import base_config, embedded_world, variant_flags

VARIANTS = ("quick", "vsd", "cd", "grids")


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
    if "grids" in flags:
        c.distill.student_grids = ((999.0, 749.0, 499.0, 249.0), (999.0, 499.0), (999.0,))
        c.distill.name = c.distill.name + "_grids"
    return c
