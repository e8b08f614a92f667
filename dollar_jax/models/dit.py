"""The Wan2.1 video diffusion transformer in Flax NNX.

Data layout is channels-last: latents [batch, frames, height, width, channels]. The architecture follows
diffusers' WanTransformer3DModel exactly (parity-tested against it), with three TPU-minded changes:
  * the 3D patch embedding is a matmul over flattened patches (same weights as the Conv3d, reshaped);
  * the blocks are built with stacked weights (a leading "layers" axis) and run with `jax.lax.scan` under a
    named rematerialisation policy, so compile time does not grow with depth;
  * every parameter and key activation carries logical axis names (dollar_jax/parallel/rules.py); video
    tokens are padded to a multiple of the context axis (masked in attention, cut off at the end).

Numerics follow the reference: LayerNorms, the timestep path and the shift/scale/gate modulation run in
float32; matmuls run in `config.dtype`; parameters are stored in `config.param_dtype`.
"""

from __future__ import annotations

import math

import einops
import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from dollar_jax.models.attention import (SPLASH_RESIDUALS, apply_rope, attention, resolve_kernel,
                                         rope_tables)
from dollar_jax.models.dit_config import DiTConfig
from dollar_jax.models.layers import Dense, LayerNorm, RMSNorm, gelu_tanh, layer_norm, param, sinusoidal_embedding, zeros
from dollar_jax.parallel.sharding import constrain, shard_count

TOKENS = ("act_batch", "act_length", "act_embed")
TEXT_TOKENS = ("act_batch", "act_text_length", "act_embed")


def _remat_policy(name: str, kernel: str):
    """The named rematerialisation policy of each scanned block (`kernel`: the resolved attention kernel)."""
    cp = jax.checkpoint_policies
    # What attention's backward needs: q, k, v (after the rotary embedding) and, for splash, its output and
    # log-sum-exp (SPLASH_RESIDUALS); the other kernels' backward recomputes its statistics from q and k, so they
    # keep their output instead (the output projection's input).
    attention_names = ("attention_qkv", SPLASH_RESIDUALS) if kernel.startswith("splash") else \
        ("attention_qkv", "attention_out")
    return {
        "full": cp.nothing_saveable,
        # Keep the outputs of weight matmuls (projections, MLP), recompute attention and elementwise work.
        "minimal": cp.dots_with_no_batch_dims_saveable,
        # Keep only the attention outputs, recompute everything else (with splash its forward kernel re-runs in
        # the backward pass to rebuild the log-sum-exp: save_attention_residuals avoids that).
        "save_attention": cp.save_only_these_names("attention_out"),
        # Keep what attention's backward reads, so no attention forward runs twice; recompute the rest.
        "save_attention_residuals": cp.save_only_these_names(*attention_names),
        # The same tensors, moved to host memory after the forward pass and back for the backward.
        "offload_attention": cp.save_and_offload_only_these_names(
            names_which_can_be_saved=(), names_which_can_be_offloaded=attention_names, offload_src="device",
            offload_dst="pinned_host"),
    }[name]


class Attention(nnx.Module):
    """Multi-head attention with RMS q/k-norm across all heads (Wan's 'rms_norm_across_heads')."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        dim, kw = cfg.inner_dim, dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.to_q = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_k = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_v = Dense(dim, dim, ("embed", "heads"), **kw)
        self.to_out = Dense(dim, dim, ("heads", "embed"), **kw)
        self.norm_q = RMSNorm(dim, cfg.eps, rngs=rngs, param_dtype=kw["param_dtype"], axis_name="heads")
        self.norm_k = RMSNorm(dim, cfg.eps, rngs=rngs, param_dtype=kw["param_dtype"], axis_name="heads")
        self.heads = cfg.num_attention_heads
        self.kernel = cfg.attention
        self.splash_blocks = cfg.splash_block_sizes

    def __call__(self, x: jax.Array, context: jax.Array | None = None, rope=None,
                 kv_valid: int | None = None) -> jax.Array:
        kv_in, kv_len = (x, "act_length") if context is None else (context, "act_text_length")
        q = self.norm_q(self.to_q(x))
        k = self.norm_k(self.to_k(kv_in))
        v = self.to_v(kv_in)
        q, k, v = (einops.rearrange(a, "b t (n h) -> b t n h", n=self.heads) for a in (q, k, v))
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", kv_len, "act_heads", "act_head_dim"))
        v = constrain(v, ("act_batch", kv_len, "act_heads", "act_head_dim"))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q, k, v = (checkpoint_name(a, "attention_qkv") for a in (q, k, v))
        out = attention(q, k, v, self.kernel, self_attention=context is None,
                        kv_valid=kv_valid if context is None else None, splash_blocks=self.splash_blocks)
        out = checkpoint_name(out, "attention_out")
        return self.to_out(einops.rearrange(out, "b t n h -> b t (n h)"))


class FeedForward(nnx.Module):
    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=jnp.dtype(cfg.param_dtype))
        self.fc_in = Dense(cfg.inner_dim, cfg.ffn_dim, ("embed", "mlp"), **kw)
        self.fc_out = Dense(cfg.ffn_dim, cfg.inner_dim, ("mlp", "embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = constrain(gelu_tanh(self.fc_in(x)), ("act_batch", "act_length", "act_mlp"))
        return self.fc_out(h)


class WanBlock(nnx.Module):
    """Self-attention (modulated), cross-attention to text, feed-forward (modulated)."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        pdt = jnp.dtype(cfg.param_dtype)
        self.attn1 = Attention(cfg, rngs=rngs)
        self.attn2 = Attention(cfg, rngs=rngs)
        self.norm2 = LayerNorm(cfg.inner_dim, cfg.eps, rngs=rngs, param_dtype=pdt) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(cfg, rngs=rngs)
        init = lambda key, shape, dtype: (jax.random.normal(key, shape) / math.sqrt(shape[-1])).astype(dtype)
        self.scale_shift_table = param(rngs, init, (6, cfg.inner_dim), ("modulation", "embed"), pdt)
        self.eps = cfg.eps

    def __call__(self, h: jax.Array, context: jax.Array, modulation: jax.Array, rope,
                 valid_tokens: int | None = None) -> jax.Array:
        # modulation: [B, 6, D] float32 from the timestep; the per-layer table is added here.
        mod = self.scale_shift_table[...].astype(jnp.float32)[None] + modulation
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i : i + 1] for i in range(6))
        dtype = h.dtype

        x = (layer_norm(h, self.eps) * (1 + scale) + shift).astype(dtype)
        h = (h.astype(jnp.float32) + self.attn1(x, rope=rope, kv_valid=valid_tokens).astype(jnp.float32) * gate).astype(dtype)
        h = constrain(h, TOKENS)

        x = (self.norm2(h) if self.norm2 is not None else h.astype(jnp.float32)).astype(dtype)
        h = h + self.attn2(x, context=context).astype(dtype)
        h = constrain(h, TOKENS)

        x = (layer_norm(h, self.eps) * (1 + c_scale) + c_shift).astype(dtype)
        h = (h.astype(jnp.float32) + self.ffn(x).astype(jnp.float32) * c_gate).astype(dtype)
        return constrain(h, TOKENS)


class ConditionEmbedder(nnx.Module):
    """Timestep -> (temb [B, D], 6-way modulation [B, 6, D]) in float32; text [B, L, text_dim] -> [B, L, D]."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        pdt, dim = jnp.dtype(cfg.param_dtype), cfg.inner_dim
        f32 = dict(rngs=rngs, dtype=jnp.float32, param_dtype=pdt)
        cdt = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        self.time_linear_1 = Dense(cfg.freq_dim, dim, ("time_freq", "embed"), **f32)
        self.time_linear_2 = Dense(dim, dim, ("embed", "embed"), **f32)
        # Zero-initialised (adaLN-zero): a freshly initialised model starts as the identity on each block.
        self.time_proj = Dense(dim, 6 * dim, ("embed", "modulation"), kernel_init=zeros, **f32)
        self.text_linear_1 = Dense(cfg.text_dim, dim, ("text_embed", "embed"), **cdt)
        self.text_linear_2 = Dense(dim, dim, ("embed", "embed"), **cdt)
        self.freq_dim = cfg.freq_dim

    def __call__(self, timesteps: jax.Array, text: jax.Array):
        t_freq = sinusoidal_embedding(timesteps, self.freq_dim)
        temb = self.time_linear_2(jax.nn.silu(self.time_linear_1(t_freq)))
        modulation = self.time_proj(jax.nn.silu(temb)).reshape(temb.shape[0], 6, -1)
        context = self.text_linear_2(gelu_tanh(self.text_linear_1(text)))
        return temb, modulation, context


class WanDiT(nnx.Module):
    """Wan2.1 text-to-video transformer: (latents, timesteps, text embeddings) -> prediction."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        pdt, dim = jnp.dtype(cfg.param_dtype), cfg.inner_dim
        kw = dict(rngs=rngs, dtype=jnp.dtype(cfg.dtype), param_dtype=pdt)
        patch = math.prod(cfg.patch_size)
        self.patch_embedding = Dense(patch * cfg.in_channels, dim, ("patch", "embed"), **kw)
        self.condition_embedder = ConditionEmbedder(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs: nnx.Rngs) -> WanBlock:
            return WanBlock(cfg, rngs=rngs)

        self.blocks = make_blocks(rngs)
        # The output head computes in float32 whatever cfg.dtype (Wan runs its head under float32 autocast): the
        # prediction is what every loss and sampler step differences, where bf16 rounding would show.
        self.proj_out = Dense(dim, patch * cfg.out_channels, ("embed", "patch_out"), kernel_init=zeros,
                              **(kw | dict(dtype=jnp.float32)))
        init = lambda key, shape, dtype: (jax.random.normal(key, shape) / math.sqrt(shape[-1])).astype(dtype)
        self.scale_shift_table = param(rngs, init, (2, dim), ("modulation", "embed"), pdt)

    def token_grid(self, latent_shape) -> tuple[int, int, int]:
        _, f, h, w, _ = latent_shape
        pt, ph, pw = self.config.patch_size
        if f % pt or h % ph or w % pw:
            raise ValueError(
                f"Latent frames/height/width {(f, h, w)} must be divisible by the patch size {(pt, ph, pw)}"
            )
        return f // pt, h // ph, w // pw

    def _run_blocks(self, h, context, modulation, rope, valid_tokens=None):
        graphdef, stacked = nnx.split(self.blocks)

        def body(carry, layer_state):
            return nnx.merge(graphdef, layer_state)(carry, context, modulation, rope, valid_tokens), None

        cfg = self.config
        if cfg.remat_policy != "none":
            kernel = resolve_kernel(cfg.attention, jnp.dtype(cfg.dtype), cfg.attention_head_dim)
            body = jax.checkpoint(body, policy=_remat_policy(cfg.remat_policy, kernel), prevent_cse=False)
        h, _ = jax.lax.scan(body, h, stacked)
        return h

    def __call__(self, latents: jax.Array, timesteps: jax.Array, text: jax.Array) -> jax.Array:
        """latents [B, F, H, W, C_in], timesteps [B] (model units, 0..1000), text [B, L, text_dim]."""
        cfg = self.config
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"latents must be [B, F, H, W, {cfg.in_channels}], got {latents.shape}")
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"text embeddings must be [B, L, {cfg.text_dim}], got {text.shape}")
        grid = self.token_grid(latents.shape)
        pt, ph, pw = cfg.patch_size
        dtype = jnp.dtype(cfg.dtype)
        timesteps = jnp.broadcast_to(jnp.asarray(timesteps, jnp.float32), latents.shape[:1])

        x = einops.rearrange(latents, "b (f pt) (h ph) (w pw) c -> b (f h w) (pt ph pw c)", pt=pt, ph=ph, pw=pw)
        cos, sin = rope_tables(cfg.attention_head_dim, grid, cfg.rope_theta, cfg.rope_max_seq_len)
        # Tokens split over the context axis must divide it: pad them (32760 -> 32768 on context=16) rather
        # than replicate all of them; attention masks the padded keys, and the padding is cut off at the end.
        tokens = x.shape[1]
        padding = -tokens % shard_count("act_length")
        if padding:
            x = jnp.pad(x, ((0, 0), (0, padding), (0, 0)))
            cos = jnp.pad(cos, ((0, padding), (0, 0)), constant_values=1.0)  # rotation by 0 on padding
            sin = jnp.pad(sin, ((0, padding), (0, 0)))
        h = constrain(self.patch_embedding(x), TOKENS)
        temb, modulation, context = self.condition_embedder(timesteps, text.astype(dtype))
        context = constrain(context, TEXT_TOKENS)
        rope = (jnp.asarray(cos), jnp.asarray(sin))

        h = self._run_blocks(h, context, modulation, rope, tokens if padding else None)

        shift, scale = jnp.split(self.scale_shift_table[...].astype(jnp.float32)[None] + temb[:, None], 2, axis=1)
        h = layer_norm(h.astype(jnp.float32), cfg.eps) * (1 + scale) + shift  # float32 norm and head
        out = self.proj_out(h)[:, :tokens]
        f, hh, ww = grid
        return einops.rearrange(
            out, "b (f h w) (pt ph pw c) -> b (f pt) (h ph) (w pw) c", f=f, h=hh, w=ww, pt=pt, ph=ph, pw=pw
        )
