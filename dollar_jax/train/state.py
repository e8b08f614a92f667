"""The multi-model train state and the roles that give it meaning.

A *role* is one model in a job: its NNX graph definition, the logical axes of its parameters, its
optimiser (None for a frozen model such as the teacher) and its EMA rate. The *state* is a single pytree
holding every role's parameters, optimiser state and EMA copy, plus the step and the base RNG key: one
object that is sharded, donated to the jitted step, and checkpointed as a whole.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.experimental.compute_on import compute_on
from jax.sharding import Mesh

from dollar_jax.models.layers import logical_axes
from dollar_jax.models.lora import lora_merge
from dollar_jax.parallel.sharding import in_memory, replicated, shard_count, to_memory, tree_shardings


@dataclasses.dataclass(frozen=True, eq=False)
class Role:
    name: str
    graphdef: Any
    axes: Any  # pure-dict tree of logical-axis tuples, same structure as the params
    optimizer: optax.GradientTransformation | None = None  # None: frozen
    ema_decay: float | None = None
    static: Any = None  # non-parameter variables (e.g. normalisation statistics), constant during training
    # An optimiser-only role updates another role's parameters with its own optimiser state (the L_FT step
    # of the student): it holds no parameters of its own, only opt_state[name].
    params_of: str | None = None

    @property
    def param_owner(self) -> str:
        return self.params_of or self.name
    # Memory switches (they change storage, not the update rule): the dtype the role's trained parameters and
    # its EMA copy are stored in (None: as initialised), and whether each optimiser update guards itself
    # against non-finite gradients (else the step keeps a whole old copy of the state, `keep_if_finite`).
    param_dtype: str | None = None
    ema_dtype: str | None = None
    ema_memory: str = "device"  # or "host": the EMA copy waits in pinned host memory between steps
    opt_memory: str = "device"  # or "host": the optimiser state lives in pinned host memory, updated there
    guard_updates: bool = False
    # A LoRA role (models/lora.py) trains low-rank adapters over another model's frozen parameters: its params
    # are the adapters, its module needs that base, and this is the adapters' scale (alpha / rank).
    lora_scale: float | None = None

    @property
    def trainable(self) -> bool:
        return self.optimizer is not None

    def module(self, params, base=None):
        """The NNX module with the given parameters (use inside jitted functions). A LoRA role's `params` are
        its adapters, applied to `base` (the frozen model's parameters)."""
        if self.lora_scale is not None:
            if base is None:
                raise ValueError(f"role {self.name!r} is a LoRA over a frozen model: pass its base parameters")
            params = lora_merge(base, params, self.lora_scale)
        if self.static is None:
            return nnx.merge(self.graphdef, params)
        return nnx.merge(self.graphdef, params, self.static)


def split_model(name: str, model: nnx.Module, optimizer=None, ema_decay=None, **switches) -> tuple[Role, dict]:
    """A role and its initial parameters (pure dict) from a concrete or abstract NNX module. `switches` are
    Role's memory fields (param_dtype, ema_dtype, ema_memory, opt_memory, guard_updates)."""
    graphdef, params, static = nnx.split(model, nnx.Param, ...)
    static_pure = static if len(jax.tree.leaves(static)) else None
    role = Role(name, graphdef, logical_axes(params), optimizer, ema_decay, static_pure, **switches)
    return role, nnx.to_pure_dict(params)


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: completed steps
    rng: jax.Array  # uint32[2] base key; each step uses fold_in(rng, step)
    params: dict[str, Any]
    opt_state: dict[str, Any]
    ema: dict[str, Any]

    def step_key(self) -> jax.Array:
        return jax.random.fold_in(jax.random.wrap_key_data(self.rng), self.step)


def _cast(tree, dtype: str | None, copy: bool = False):
    """Floating leaves cast to `dtype` (None: unchanged)."""
    def one(a):
        if dtype is not None and jnp.issubdtype(a.dtype, jnp.floating):
            return a.astype(dtype)
        return jnp.copy(a) if copy else a
    return jax.tree.map(one, tree)


def init_state(roles: Mapping[str, Role], params: Mapping[str, Any], seed: int) -> TrainState:
    """Pure: optimiser states and EMA copies from the initial parameters (jit it with out_shardings)."""
    params = {n: _cast(p, roles[n].param_dtype) if n in roles else p for n, p in params.items()}
    opt_state = {n: r.optimizer.init(params[r.param_owner]) for n, r in roles.items() if r.trainable}
    ema = {n: _cast(params[n], r.ema_dtype, copy=True) for n, r in roles.items() if r.ema_decay is not None}
    return TrainState(step=jnp.zeros((), jnp.int32), rng=jax.random.key_data(jax.random.key(seed)),
                      params=dict(params), opt_state=opt_state, ema=ema)


def state_shardings(roles: Mapping[str, Role], abstract: TrainState, mesh: Mesh) -> TrainState:
    """NamedShardings for every leaf: parameters, EMA and optimiser moments follow the rules table."""
    rep = replicated(mesh)
    params = {n: tree_shardings(mesh, abstract.params[n], roles[n].axes) for n in abstract.params}
    ema = {n: in_memory(params[n], roles[n].ema_memory) for n in abstract.ema}
    # Moments sharded like the parameters, scalars replicated; in the role's memory.
    opt_state = {n: in_memory(_param_like(opt, abstract.params[roles[n].param_owner], params[roles[n].param_owner],
                                          rep), roles[n].opt_memory)
                 for n, opt in abstract.opt_state.items()}
    return TrainState(step=rep, rng=rep, params=params, opt_state=opt_state, ema=ema)


def _param_like(opt_state, params, like_params_value, other_value):
    """A tree shaped like an optimiser state's top levels: `like_params_value` (a tree shaped like the parameters:
    their shardings, their logical axes) for every subtree shaped like the parameters (moments, in whatever
    dtype), `other_value` for everything else (step counts, scalars). Structural, so nothing runs
    (optax.tree_map_params calls init eagerly, which cannot run on a TPU topology planned from a CPU host)."""
    treedef = jax.tree.structure(params)
    shapes = [a.shape for a in jax.tree.leaves(params)]

    def like_params(x) -> bool:
        return (jax.tree.structure(x) == treedef
                and [getattr(a, "shape", None) for a in jax.tree.leaves(x)] == shapes)

    return jax.tree.map(lambda x: like_params_value if like_params(x) else other_value, opt_state,
                        is_leaf=like_params)


def _opt_state_axes(role: Role, opt_state, params):
    """The logical axes of an optimiser state: the parameters' for their moments, none for the rest."""
    return _param_like(opt_state, params, role.axes, None)


def optimizer_step(role: Role, params, opt_state, grads, update_scale=None) -> tuple[dict, Any, jax.Array]:
    """One optimiser update: (new params, new optimiser state, global gradient norm). `update_scale` (a scalar)
    multiplies the update before it is applied (L_FT's ramp).

    With `role.guard_updates`, an update whose gradients are not all finite leaves the parameters and the
    optimiser state as they were (optax.apply_if_finite's idea, without its counters): the select fuses into
    the update, so no second copy of the state is kept alive. With `role.opt_memory` "host" the state is updated
    where it lives (`_host_update`)."""
    if role.opt_memory == "host":
        return _host_update(role, params, opt_state, grads, update_scale)
    updates, new_opt_state = role.optimizer.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, _scaled(updates, update_scale))
    if role.guard_updates:
        finite = all_finite(grads)
        new_params, new_opt_state = select_if(finite, (new_params, new_opt_state), (params, opt_state))
    return new_params, new_opt_state, optax.global_norm(grads)


def _scaled(updates, scale):
    return updates if scale is None else jax.tree.map(lambda u: u * scale.astype(u.dtype), updates)


def _host_update(role: Role, params, opt_state, grads, update_scale=None) -> tuple[dict, Any, jax.Array]:
    """`optimizer_step` for an optimiser state in pinned host memory (ZeRO-Offload's split): the gradients (and
    the parameters, which XLA drops again when the update does not read them) are copied out, the host runs the
    optimiser and keeps its new state, and only the update comes back to be added on the device. The device
    then never holds the moments: an Adam second moment is one parameter copy (2.6 GiB for Wan2.1-1.3B in
    bf16). Needs per-update NaN guards (`guard_updates`): the host keeps its old state on a non-finite update."""
    if not role.guard_updates:
        raise ValueError(f"role {role.name!r}: an optimiser state in host memory guards its own updates; "
                         "set config.distill.nan_guard='update'")
    finite = all_finite(grads)
    grads_host = to_memory(grads, role.axes, "host")
    params_host = to_memory(params, role.axes, "host")
    finite_host = to_memory(finite, None, "host")

    def update(g, state, p, ok):
        updates, new_state = role.optimizer.update(g, state, p)
        return updates, select_if(ok, new_state, state)

    with compute_on("device_host"):
        updates, new_opt_state = jax.jit(update)(grads_host, opt_state, params_host, finite_host)
    # Pinned to host memory: what the update makes from constants (optax's step counts) is typed device memory.
    new_opt_state = to_memory(new_opt_state, _opt_state_axes(role, opt_state, params), "host")
    updates = _scaled(to_memory(updates, role.axes, "device"), update_scale)
    new_params = select_if(finite, optax.apply_updates(params, updates), params)
    return new_params, new_opt_state, optax.global_norm(grads)


def apply_gradients(state: TrainState, role: Role, grads) -> tuple[dict, Any, jax.Array]:
    """`optimizer_step` on the role's parameters and optimiser state held in `state`."""
    return optimizer_step(role, state.params[role.param_owner], state.opt_state[role.name], grads)


def ema_on_device(role: Role, ema):
    """Inside the step: the role's EMA copy where the device can read it (the CD target): a copy in from host
    memory when `role.ema_memory` is "host", alive only until its last read."""
    if ema is None or role.ema_memory == "device":
        return ema
    return to_memory(ema, role.axes, "device")


def next_ema(role: Role, ema, params, finite: jax.Array):
    """The role's EMA after this step's update of `params`. An EMA in host memory is updated there (the host
    computes it from the new parameters, copied out), so it never returns to the device, and it keeps its old
    value when the step is not finite (`guard_state` then leaves it alone). A device EMA is guarded by
    `guard_state` with the rest of the state."""
    if role.ema_memory == "device":
        return update_ema(ema, params, role.ema_decay)
    params, finite = to_memory(params, role.axes, "host"), to_memory(finite, None, "host")
    with compute_on("device_host"):
        return jax.jit(lambda e, p, ok: select_if(ok, update_ema(e, p, role.ema_decay), e))(ema, params, finite)


def update_ema(ema, params, decay: float):
    return jax.tree.map(lambda e, p: (decay * e + (1.0 - decay) * p.astype(e.dtype)).astype(e.dtype), ema, params)


def select_if(ok: jax.Array, new, old):
    """`new` where the scalar `ok` holds, else `old`, leaf by leaf: every NaN guard's choice (it fuses into the
    computation of `new`, so no extra copy is kept)."""
    return jax.tree.map(lambda n, o: jnp.where(ok, n, o), new, old)


def all_finite(*trees) -> jax.Array:
    leaves = [x for t in trees for x in jax.tree.leaves(t)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def guard_state(roles: Mapping[str, Role], finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """The step's NaN/Inf guard, role by role: a role whose updates guard themselves (`guard_updates`) keeps its
    new parameters and optimiser state (a bad update already left them as they were); every other role, and
    every EMA copy, keeps its old values when the step was not finite (`keep_if_finite` for the whole state
    when no role guards itself)."""
    host_ema = {n for n in new.ema if roles[n].ema_memory == "host"}  # guarded where it lives (`next_ema`)
    if not any(r.guard_updates for r in roles.values()) and not host_ema:
        return keep_if_finite(finite, new, old)
    guarded = lambda n: n in roles and roles[n].guard_updates  # noqa: E731
    params = {n: p if guarded(n) else select_if(finite, p, old.params[n]) for n, p in new.params.items()}
    opt_state = {n: s if guarded(n) else select_if(finite, s, old.opt_state[n]) for n, s in new.opt_state.items()}
    ema = {n: e if n in host_ema else select_if(finite, e, old.ema[n]) for n, e in new.ema.items()}
    return new.replace(params=params, opt_state=opt_state, ema=ema)


def keep_if_finite(finite: jax.Array, new: TrainState, old: TrainState) -> TrainState:
    """The NaN/Inf guard: a step whose losses or gradients are not finite leaves the state as it was
    (only the step counter advances), so a bad batch can never poison parameters, moments or EMA."""
    return select_if(finite, new, old).replace(step=new.step)


def accumulated_value_and_grad(loss_fn, params, batch: tuple, keys: tuple, microbatches: int,
                               has_aux: bool = False):
    """value_and_grad of `loss_fn(params, *batch, *keys)` with respect to `params`, as the mean over
    `microbatches` equal chunks of the batch (a scan: one chunk's activations alive at a time).

    `batch` holds arrays with the batch as leading axis; with one chunk `keys` are used as given (the step is
    then exactly the unaccumulated one), otherwise chunk c draws with `jax.random.split(key, n)[c]` of each.
    Every chunk must still split over the mesh's batch shards (else each would be replicated: an error).
    `loss_fn` returns a scalar, or (scalar, aux) with `has_aux`; aux leaves with a batch axis are put back
    together, scalar ones averaged. A loss that is a mean over the batch's examples gives the whole batch's gradient.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)
    if microbatches == 1:
        return grad_fn(params, *batch, *keys)
    size = batch[0].shape[0]
    if size % microbatches:
        raise ValueError(f"a batch of {size} does not split into {microbatches} equal micro-batches (config."
                         "distill.microbatches, fake_microbatches and reward.ft_microbatches must divide the batch)")
    rows, shards = size // microbatches, shard_count("act_batch")
    if rows % shards:  # the mesh would replicate each micro-batch: no memory saved, the compute multiplied
        raise ValueError(f"{microbatches} micro-batches leave {rows} clip(s) each, which the mesh's {shards} batch "
                         "shards (data x fsdp) cannot split; use fewer micro-batches or a larger batch")
    chunked = [b.reshape(microbatches, rows, *b.shape[1:]) for b in batch]
    chunk_keys = [jax.random.split(k, microbatches) for k in keys]

    def one(total, inputs):
        value, grads = grad_fn(params, *inputs)
        return jax.tree.map(lambda t, g: t + g.astype(jnp.float32), total, grads), value

    # Summed in float32 whatever the parameters' dtype (a bf16 fake score's gradients too), then averaged.
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    total, values = jax.lax.scan(one, zeros, (*chunked, *chunk_keys))
    grads = jax.tree.map(lambda t, p: (t / microbatches).astype(p.dtype), total, params)

    def merge(v):  # [n, ...] per chunk -> the whole batch's
        return v.reshape(size, *v.shape[2:]) if v.ndim >= 2 and v.shape[1] == rows else jnp.mean(v, axis=0)

    return jax.tree.map(merge, values), grads
