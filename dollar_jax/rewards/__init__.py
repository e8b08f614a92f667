"""Pixel rewards (any Python function of decoded videos and prompts) and the labeller that feeds the LRM."""

from dollar_jax.rewards import pixel  # noqa: F401  (registers the built-in rewards)
from dollar_jax.rewards.base import Reward, make_reward, register, registered


def _register_optional():
    # The CLIP adapter imports torch lazily, inside its constructor; registering it costs nothing.
    from dollar_jax.rewards import clip_preference  # noqa: F401


_register_optional()

__all__ = ["Reward", "make_reward", "register", "registered"]
