"""dollar-jax: DOLLAR few-step video distillation (VSD + consistency distillation + latent reward) in JAX/Flax."""

__version__ = "0.1.0"
