"""Attention for the video DiT: 3D rotary position embedding and the attention kernels.

Layout everywhere: q, k, v are [batch, tokens, heads, head_dim] ("BTNH").
Kernels, chosen by `DiTConfig.attention`:
  auto   - by `jax.default_backend()`: splash on TPU, cuDNN on GPU (bf16/fp16 compute with a head_dim cuDNN
           takes, else xla), xla on CPU; so one config runs on every backend.
  xla    - plain einsum/softmax attention with float32 softmax; runs everywhere and is the reference.
  cudnn  - fused flash attention through `jax.nn.dot_product_attention(implementation="cudnn")` (GPU only,
           bf16/fp16, head_dim a multiple of 8 and <= 128; padding keys masked with key_value_seq_lengths).
  splash - Pallas splash (flash) attention (TPU only); token counts that are not a multiple of its block
           are padded and the padding is masked out with segment ids.
  splash_interpret - the same Pallas kernel run by the Pallas interpreter: slow, for testing the kernel
           path on CPU.

Under a mesh the kernel runs inside `shard_map`, one call per device on its local block: batch over the
data axes, heads over `tensor`, and (context parallelism) query tokens over `context`. With a context axis
each device all-gathers the keys and values of its self-attention (the video is tens of thousands of tokens;
the all-gather moves K and V once per layer, which is cheap next to T^2 attention), while queries, the
T^2 work and the outputs stay split. Cross-attention keys (text) are short and replicated, so they are not
gathered. Pallas kernels cannot be partitioned by XLA, which is the other reason for the explicit map.

Padded keys: the DiT pads its video tokens to a multiple of the context axis (32,760 tokens on context=16
become 32,768, rather than replicating every token 16x); `kv_valid` says how many keys are real, and every
kernel masks the rest (xla: a mask on the logits, splash: segment ids, cudnn: key_value_seq_lengths).
"""

from __future__ import annotations

import functools
import logging

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from dollar_jax.parallel.sharding import fitted_spec

log = logging.getLogger(__name__)
ATTENTION_KERNELS = ("auto", "xla", "cudnn", "splash", "splash_interpret")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)
# Splash block sizes under "auto": the largest of these that the padded token count admits.
_SPLASH_BLOCKS = (512, 256, 128)
# Named splash tilings (DiTConfig.splash_block_sizes). Each is a published tuning, not one measured here:
#   v6e - maxdiffusion's README, "Flash Block Sizes", tuned for Trillium (v6e).
SPLASH_PRESETS = {
    "v6e": dict(q=2048, kv=1024, kv_compute=1024, q_dkv=2048, kv_dkv=1024, kv_dkv_compute=1024),
}
_SPLASH_FIELDS = ("q", "kv", "kv_compute", "q_dkv", "kv_dkv", "kv_dkv_compute", "q_dq", "kv_dq")
# The name of splash's residuals (its output and log-sum-exp) for remat policies (models/dit.py).
SPLASH_RESIDUALS = "attention_residuals"


def rope_axis_dims(head_dim: int) -> tuple[int, int, int]:
    """How Wan splits head_dim over (frames, height, width): h = w = 2 * (d // 6), t gets the rest."""
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


@functools.lru_cache(maxsize=64)
def rope_tables(head_dim: int, grid: tuple[int, int, int], theta: float, max_seq_len: int):
    """cos/sin tables [tokens, head_dim // 2] (float32) for a (frames, height, width) token grid.

    Computed in float64 with NumPy at trace time: the grid is static, so the tables are constants.
    """
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    if max(grid) > max_seq_len:
        raise ValueError(f"token grid {grid} exceeds rope_max_seq_len={max_seq_len}")
    angles_per_axis = []
    for dim, n in zip(rope_axis_dims(head_dim), grid):
        freqs = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles_per_axis.append(np.outer(np.arange(n, dtype=np.float64), freqs))  # [n, dim/2]
    f, h, w = grid
    a_t = np.broadcast_to(angles_per_axis[0][:, None, None, :], (f, h, w, angles_per_axis[0].shape[1]))
    a_h = np.broadcast_to(angles_per_axis[1][None, :, None, :], (f, h, w, angles_per_axis[1].shape[1]))
    a_w = np.broadcast_to(angles_per_axis[2][None, None, :, :], (f, h, w, angles_per_axis[2].shape[1]))
    angles = np.concatenate([a_t, a_h, a_w], axis=-1).reshape(f * h * w, head_dim // 2)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, T, N, H] by per-token angles [T, H/2]."""
    dtype = x.dtype
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    x1, x2 = pairs[..., 0], pairs[..., 1]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(dtype)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: int | None = None) -> jax.Array:
    """The reference. Keys at positions >= `kv_valid` (padding) get no weight."""
    scale = 1.0 / np.sqrt(q.shape[-1])
    logits = jnp.einsum("bqnh,bknh->bnqk", q, k, preferred_element_type=jnp.float32) * scale
    if kv_valid is not None and kv_valid < k.shape[1]:
        logits = jnp.where(jnp.arange(k.shape[1]) < kv_valid, logits, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bnqk,bknh->bqnh", weights, v)


def cudnn_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: int | None = None) -> jax.Array:
    """cuDNN flash attention, BTNH in and out (no transposes). Padding keys are cut by sequence lengths."""
    check_cudnn_inputs(q)
    lengths = None
    if kv_valid is not None and kv_valid < k.shape[1]:
        lengths = jnp.full((k.shape[0],), kv_valid, jnp.int32)
    return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")


def cudnn_supports(dtype, head_dim: int) -> bool:
    return jnp.dtype(dtype) in tuple(map(jnp.dtype, CUDNN_DTYPES)) and head_dim % 8 == 0 and head_dim <= 128


def check_cudnn_inputs(q: jax.Array) -> None:
    if not cudnn_supports(q.dtype, q.shape[-1]):
        raise ValueError(f"attention='cudnn' needs bfloat16/float16 inputs and head_dim a multiple of 8 up to 128; "
                         f"got {q.dtype} and head_dim {q.shape[-1]} (set model.dtype=bfloat16, or attention='xla')")


def resolve_kernel(kernel: str, dtype, head_dim: int) -> str:
    """The kernel `auto` stands for on this backend; any other name is returned as given."""
    if kernel != "auto":
        return kernel
    backend = _platform()
    if backend == "tpu":
        return "splash"
    if backend == "gpu":
        if cudnn_supports(dtype, head_dim):
            return "cudnn"
        _log_once(f"attention='auto' on GPU uses xla: cuDNN needs bfloat16/float16 and head_dim a multiple of 8 "
                  f"up to 128 (got {jnp.dtype(dtype)}, head_dim {head_dim})")
    return "xla"


@functools.lru_cache(maxsize=None)
def _log_once(message: str) -> None:
    log.warning(message)


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


def parse_splash_blocks(spec: str) -> dict[str, int] | None:
    """DiTConfig.splash_block_sizes -> requested block sizes (None: "auto").

    "auto", a preset name (SPLASH_PRESETS), or "q=2048,kv=1024,kv_compute=512" with any of the fields
    q, kv, kv_compute (forward) and q_dkv, kv_dkv, kv_dkv_compute, q_dq, kv_dq (backward; each defaults to its
    forward counterpart). Every size is a multiple of 128; kv_compute divides kv.
    """
    if spec == "auto":
        return None
    if spec in SPLASH_PRESETS:
        sizes = dict(SPLASH_PRESETS[spec])
    else:
        sizes = {}
        for item in spec.split(","):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in _SPLASH_FIELDS or not value.strip().isdigit():
                raise ValueError(f"splash_block_sizes={spec!r}: expected 'auto', a preset {sorted(SPLASH_PRESETS)} "
                                 f"or name=size pairs with names from {_SPLASH_FIELDS}")
            sizes[name] = int(value)
    for name in ("q", "kv"):
        sizes.setdefault(name, 512)
    sizes.setdefault("kv_compute", sizes["kv"])
    for backward, forward in (("q_dkv", "q"), ("kv_dkv", "kv"), ("kv_dkv_compute", "kv_compute"), ("q_dq", "q"),
                              ("kv_dq", "kv")):
        sizes.setdefault(backward, sizes[forward])
    bad = {k: v for k, v in sizes.items() if v <= 0 or v % 128}
    if bad:
        raise ValueError(f"splash_block_sizes={spec!r}: block sizes must be positive multiples of 128, got {bad}")
    for compute, whole in (("kv_compute", "kv"), ("kv_dkv_compute", "kv_dkv")):
        if sizes[whole] % sizes[compute]:
            raise ValueError(f"splash_block_sizes={spec!r}: {compute}={sizes[compute]} must divide "
                             f"{whole}={sizes[whole]}")
    return sizes


def _fit_block(block: int, length: int) -> int:
    """`block`, shrunk (in steps of 128) for a sequence shorter than it, so short ones are not padded to it."""
    return min(block, _round_up(length, 128))


def _divisor_block(block: int, whole: int) -> int:
    """The largest multiple of 128 that is <= `block` and divides `whole` (a multiple of 128)."""
    return next(b for b in range(min(block, whole), 0, -128) if whole % b == 0)


def splash_tiling(tq: int, tk: int, spec: str = "auto"):
    """(padded_q, padded_k, BlockSizes) for `tq` queries and `tk` keys under DiTConfig.splash_block_sizes.

    "auto" pads to a multiple of 128 (of 512 beyond 512 tokens) and takes the largest of 512/256/128 that
    divides it. Explicit sizes are shrunk for sequences shorter than a block (Wan's 512 text tokens under a
    2048-token query block), and the sequence is padded to a whole number of the largest block on its side.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash

    sizes = parse_splash_blocks(spec)
    if sizes is None:
        padded_q, padded_k = (_round_up(t, 128) if t <= 512 else _round_up(t, 512) for t in (tq, tk))
        bq = next(b for b in _SPLASH_BLOCKS if padded_q % b == 0)
        bk = next(b for b in _SPLASH_BLOCKS if padded_k % b == 0)
        sizes = dict(q=bq, kv=bk, kv_compute=bk, q_dkv=bq, kv_dkv=bk, kv_dkv_compute=bk, q_dq=bq, kv_dq=bk)
    else:
        q_names, k_names = ("q", "q_dkv", "q_dq"), ("kv", "kv_dkv", "kv_dq")
        sizes = dict(sizes)
        for name in q_names:
            sizes[name] = _fit_block(sizes[name], tq)
        for name in k_names:
            sizes[name] = _fit_block(sizes[name], tk)
        padded_q = _round_up(tq, max(sizes[n] for n in q_names))
        padded_k = _round_up(tk, max(sizes[n] for n in k_names))
        for name in q_names:  # every block must divide the padded length (a smaller one may not)
            sizes[name] = _divisor_block(sizes[name], padded_q)
        for name in k_names:
            sizes[name] = _divisor_block(sizes[name], padded_k)
        sizes["kv_compute"] = _divisor_block(sizes["kv_compute"], sizes["kv"])
        sizes["kv_dkv_compute"] = _divisor_block(sizes["kv_dkv_compute"], sizes["kv_dkv"])
    blocks = splash.BlockSizes(
        block_q=sizes["q"], block_kv=sizes["kv"], block_kv_compute=sizes["kv_compute"], block_q_dkv=sizes["q_dkv"],
        block_kv_dkv=sizes["kv_dkv"], block_kv_dkv_compute=sizes["kv_dkv_compute"], block_q_dq=sizes["q_dq"],
        block_kv_dq=sizes["kv_dq"])
    return padded_q, padded_k, blocks


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False,
                     kv_valid: int | None = None, block_sizes: str = "auto") -> jax.Array:
    """Pallas splash attention on one device's block, [B, Tq, N, H] x [B, Tk, N, H] -> [B, Tq, N, H].

    Splash needs token counts in whole blocks (>= 128); Wan's 81-frame 480p clip has 32760 tokens, so both
    sides are padded, padded keys (and keys at positions >= `kv_valid`) get segment id 1 and every query
    segment 0: no real query sees padding. The kernel's output and log-sum-exp (what its backward needs
    besides q, k, v) carry the checkpoint name SPLASH_RESIDUALS, so a remat policy can keep them instead of
    re-running the forward kernel in the backward pass.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    (_, tq, heads, head_dim), tk = q.shape, k.shape[1]
    padded_q, padded_k, blocks = splash_tiling(tq, tk, block_sizes)
    mask = masks.MultiHeadMask([masks.FullMask((padded_q, padded_k)) for _ in range(heads)])
    kernel = splash.make_splash_mha(mask, head_shards=1, q_seq_shards=1, block_sizes=blocks, interpret=interpret,
                                    residual_checkpoint_name=SPLASH_RESIDUALS)
    segments = splash.SegmentIds(q=jnp.zeros((padded_q,), jnp.int32),
                                 kv=(jnp.arange(padded_k) >= min(tk, kv_valid or tk)).astype(jnp.int32))

    def heads_first(x, length):  # [B, T, N, H] -> [B, N, T_padded, H]
        return jnp.swapaxes(jnp.pad(x, ((0, 0), (0, length - x.shape[1]), (0, 0), (0, 0))), 1, 2)

    qs = heads_first(q * jnp.asarray(1.0 / np.sqrt(head_dim), q.dtype), padded_q)  # splash does not scale
    out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segments))(
        qs, heads_first(k, padded_k), heads_first(v, padded_k))
    return jnp.swapaxes(out, 1, 2)[:, :tq]


def _platform() -> str:
    """The platform the step is compiled for: the current mesh's devices (a TPU topology when the memory planner
    compiles ahead of time on a CPU host), else the default backend."""
    device = getattr(jax.sharding.get_abstract_mesh(), "abstract_device", None)
    return device.platform if device is not None else jax.default_backend()


def local_attention(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str = "xla",
                    kv_valid: int | None = None, splash_blocks: str = "auto") -> jax.Array:
    """Full (non-causal) attention on arrays this device holds whole; keys from `kv_valid` on are masked."""
    kernel = resolve_kernel(kernel, q.dtype, q.shape[-1])
    if kernel == "xla":
        return xla_attention(q, k, v, kv_valid)
    if kernel == "cudnn":
        if _platform() != "gpu":
            raise ValueError(f"attention='cudnn' needs a GPU (backend is {_platform()!r}); use 'auto' or 'xla'")
        return cudnn_attention(q, k, v, kv_valid)
    if kernel == "splash":
        if _platform() != "tpu":
            raise ValueError(f"attention='splash' needs a TPU (backend is {_platform()!r}); use 'auto' or "
                             "'xla' (or 'splash_interpret' to test the kernel path on CPU)")
        return splash_attention(q, k, v, kv_valid=kv_valid, block_sizes=splash_blocks)
    if kernel == "splash_interpret":
        return splash_attention(q, k, v, interpret=True, kv_valid=kv_valid, block_sizes=splash_blocks)
    raise ValueError(f"Unknown attention kernel {kernel!r}; choose one of {ATTENTION_KERNELS}")


def attention(q: jax.Array, k: jax.Array, v: jax.Array, kernel: str = "xla", self_attention: bool = True,
              kv_valid: int | None = None, splash_blocks: str = "auto") -> jax.Array:
    """Full attention, [B, Tq, N, H] x [B, Tk, N, H] -> [B, Tq, N, H], on the current mesh if there is one.

    Without a mesh (or with the xla kernel and no context axis, where XLA's partitioner does as well) the
    kernel runs directly. Otherwise it runs under `shard_map` with the layout of the module docstring.
    `kv_valid`: how many of the (global) keys are real; the rest are padding and get no weight.
    `splash_blocks`: the splash kernels' tiling (DiTConfig.splash_block_sizes).
    """
    kernel = resolve_kernel(kernel, q.dtype, q.shape[-1])
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return local_attention(q, k, v, kernel, kv_valid, splash_blocks)
    q_spec = fitted_spec(q.shape, ("act_batch", "act_length", "act_heads", "act_head_dim"), mesh)
    context_axes = q_spec[1]
    if kernel == "xla" and context_axes is None:
        return local_attention(q, k, v, kernel, kv_valid, splash_blocks)
    gather = self_attention and context_axes is not None
    # Keys/values: same batch and head split as the queries; tokens split like the queries' when they are
    # the same tokens (self-attention, then gathered inside), whole otherwise (text).
    kv_spec = PartitionSpec(q_spec[0], context_axes if gather else None, q_spec[2], None)
    if gather and k.shape[1] != q.shape[1]:
        raise ValueError(f"self-attention with {q.shape[1]} query and {k.shape[1]} key tokens")

    def per_device(q, k, v):
        if gather:
            k = jax.lax.all_gather(k, context_axes, axis=1, tiled=True)
            v = jax.lax.all_gather(v, context_axes, axis=1, tiled=True)
        return local_attention(q, k, v, kernel, kv_valid, splash_blocks)

    return jax.shard_map(per_device, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec), out_specs=q_spec,
                         check_vma=False)(q, k, v)
