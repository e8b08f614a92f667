"""The one table that maps logical axis names to mesh axes.

Models name every parameter dimension and every key activation dimension with a *logical* axis
("embed", "heads", "act_batch", ...). Nothing in the models mentions a mesh axis. This table is the only
place where the two meet, so changing the parallelism strategy is an edit here (or a config override of
`config.sharding_rules`), never a change to model code.

Mesh axes (see mesh.py):
  data    - pure data parallelism: parameters replicated, batch split.
  fsdp    - fully sharded data parallelism: batch split *and* parameters split along their "embed" dim.
  context - sequence/context parallelism: video tokens split (long clips are tens of thousands of tokens);
            parameters are split over it too (with fsdp), the batch is not: fewer clips than devices work.
  tensor  - tensor (model) parallelism: attention heads and MLP hidden units split.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

# A rule maps one logical name to None (replicated), one mesh axis, or a tuple of mesh axes.
Rule = tuple[str, str | tuple[str, ...] | None]

DEFAULT_RULES: tuple[Rule, ...] = (
    # ---- parameters -----------------------------------------------------------------------------------
    ("layers", None),  # the scanned layer axis stays whole on every device
    # Model width: FSDP shards it, over the context axis as well. Context-parallel devices hold different
    # tokens of the same clips, so they need the same weights at the same time: gathering them over
    # (fsdp, context) costs no more than over fsdp, and the state is no longer replicated on the context
    # axis (Wan2.1-14B on 32 chips with context=4: 4x less state per chip). The batch stays on data x fsdp.
    ("embed", ("fsdp", "context")),
    ("heads", "tensor"),  # heads * head_dim of q/k/v/o projections and their RMS norms
    ("mlp", "tensor"),  # feed-forward hidden units
    ("patch", None),  # flattened input patch (p_t * p_h * p_w * C)
    ("patch_out", None),  # flattened output patch
    ("text_embed", None),  # width of the incoming text embeddings (4096 for umT5)
    ("time_freq", None),  # sinusoidal timestep features
    ("modulation", None),  # the 6-way (or 2-way) shift/scale/gate table
    ("norm", None),  # affine LayerNorm parameters
    ("conv_in", None),  # small CNNs (autoencoder, latent reward model): replicated
    ("conv_out", None),
    ("kernel_spatial", None),
    # ---- activations ----------------------------------------------------------------------------------
    ("act_batch", ("data", "fsdp")),
    ("act_length", "context"),  # video tokens
    ("act_text_length", None),  # text tokens are few: keep them whole
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_head_dim", None),
    ("act_channels", None),
    ("act_frames", None),
    ("act_height", None),
    ("act_width", None),
)

_RULES: contextvars.ContextVar[tuple[Rule, ...]] = contextvars.ContextVar("dollar_rules", default=DEFAULT_RULES)


def current_rules() -> tuple[Rule, ...]:
    return _RULES.get()


@contextlib.contextmanager
def axis_rules(rules: Sequence[Sequence] | None) -> Iterator[tuple[Rule, ...]]:
    """Use `rules` (e.g. from `config.sharding_rules`) instead of the default table inside the block."""
    if rules is None:
        yield current_rules()
        return
    normalized = tuple(_normalize(r) for r in rules)
    token = _RULES.set(normalized)
    try:
        yield normalized
    finally:
        _RULES.reset(token)


def _normalize(rule: Sequence) -> Rule:
    if len(rule) != 2 or not isinstance(rule[0], str):
        raise ValueError(f"A sharding rule is (logical_name, mesh_axes); got {rule!r}")
    name, target = rule
    if target is None or isinstance(target, str):
        return (name, target)
    return (name, tuple(target))
