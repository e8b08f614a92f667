"""Pixel rewards (any Python function of decoded videos and prompts) and the labeller that feeds the LRM."""

from dollar_jax.rewards import pixel  # noqa: F401  (registers the built-in rewards)
from dollar_jax.rewards.base import Reward, make_reward, register, registered


def _register_optional():
    # The CLIP adapter imports torch lazily, inside its constructor; registering it costs nothing.
    from dollar_jax.rewards import clip_preference  # noqa: F401


_register_optional()



def reward_from_config(config) -> Reward:
    """The reward named by config.reward.name, with the settings it needs from the config."""
    r = config.reward
    kwargs = {}
    if r.name == "clip_preference":
        kwargs["path"] = r.path
    if r.name == "world_adherence":
        w = config.world
        kwargs.update(num_frames=w.num_frames, height=w.height, width=w.width)
    return make_reward(r.name, **kwargs)


__all__ = ["Reward", "make_reward", "register", "registered", "reward_from_config"]
