"""DOLLAR on the embedded world: VSD + CD distillation jointly with latent-reward fine-tuning.

    python -m dollar_jax.main --config=configs/world_dollar.py --workdir=/tmp/world
    python -m dollar_jax.main --config=configs/world_dollar.py:quick --workdir=/tmp/world_quick
    variants (comma-separated after ':'): quick, jpeg (the non-differentiable JPEG-compressibility reward)

The reward is the world's vividness (saturated colour, independent of shape size) unless a variant says otherwise; any registered reward works via
--config.reward.name=... (see dollar_jax/rewards).
"""

from dollar_jax.config import base_config, embedded_world, variant_flags

VARIANTS = ("quick", "jpeg")


def get_config(arg: str | None = None):
    flags = variant_flags(arg, VARIANTS)
    quick = "quick" in flags
    c = embedded_world(base_config(), quick)
    c.job = "distill"
    c.distill.name = "student_dollar"
    c.reward.enabled = True
    c.reward.name = "jpeg_compressibility" if "jpeg" in flags else "vividness"
    c.reward.lrm_batch_size = 16 if quick else 32
    c.sampling.every_steps = 20 if quick else 150
    c.checkpoint.every_steps = 20 if quick else 150
    c.log_every_steps = 5 if quick else 20
    return c
