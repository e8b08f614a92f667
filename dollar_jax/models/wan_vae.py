"""Wan2.1's video VAE (diffusers' `AutoencoderKLWan`) in Flax NNX, channels-last.

Videos [B, T, H, W, 3] in [-1, 1] <-> latents [B, F, H/8, W/8, z_dim] with T = 1 + 4 (F - 1) for Wan2.1's
(False, True, True) temporal downsampling. The architecture: causal 3D convolutions (3 frames, zero padded
in front, never behind), RMS norms over channels, residual blocks, one single-head spatial attention block in
the middle of each half, and 2x (spatial) / 2x2x (spatio-temporal) resampling.

Streaming (the feature cache). Like the reference, the encoder sees the first frame alone and then chunks of
4 frames; the decoder sees the first latent frame alone and then one latent frame at a time (configurable:
`decode_chunk`). Every causal convolution keeps the last two frames of its input for the next chunk, and the
temporal resamplers keep one frame (downsampling) or two (upsampling). The first chunk is special in the
reference and here: temporal downsampling passes it through unchanged, temporal upsampling passes it
through without doubling it (and the next chunk sees zeros, diffusers' "Rep" marker). Chunks after the first
all have the same shape, so they run under one `lax.scan`: memory holds one chunk's activations, and one
compilation serves any clip length. The cache is a plain list of arrays, filled in call order
(`FeatureCache`), which makes it the scan carry.

Parameter names mirror diffusers' module names so that the conversion table (dollar_jax/convert/wan_vae.py)
is a handful of rules. Wan2.2's VAE (`is_residual`, `patch_size`) is not implemented and is refused.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from dollar_jax.models.layers import Conv, ones, param

CACHE_FRAMES = 2  # a 3-frame causal kernel needs the previous chunk's last two input frames
ENCODE_FIRST, ENCODE_STEP = 1, 4  # the reference's encoder chunks: frame 0, then 4 frames at a time

# Wan2.1's per-channel latent statistics (diffusers' AutoencoderKLWan defaults, z_dim 16).
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)


class WanVAEConfigError(ValueError):
    """A VAE config this implementation cannot build (unknown key, Wan2.2 features, bad values)."""


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: base_dim
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temperal_downsample: tuple[bool, ...] = (False, True, True)  # (sic: diffusers' spelling)
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    in_channels: int = 3
    out_channels: int = 3
    # Numerics and streaming: not part of the weights; may be overridden at load time.
    dtype: str = "float32"  # compute dtype (norms always run in float32)
    param_dtype: str = "float32"
    encode_chunk: int = 4  # video frames per encoder chunk after the first; a multiple of 4
    decode_chunk: int = 1  # latent frames per decoder chunk after the first (1 = the reference's schedule)

    # diffusers config keys we read, and those that must hold a value we support.
    DIFFUSERS_KEYS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
                      "latents_mean", "latents_std", "in_channels", "out_channels")
    # Keys that change nothing at inference (dropout) or only restate the architecture (scale factors).
    DIFFUSERS_IGNORED = ("dropout", "scale_factor_temporal", "scale_factor_spatial", "clip_output")

    def __post_init__(self):
        n_levels = len(self.dim_mult)
        if len(self.temperal_downsample) != n_levels - 1:
            raise WanVAEConfigError(f"temperal_downsample needs {n_levels - 1} entries for dim_mult "
                                    f"{list(self.dim_mult)}, got {list(self.temperal_downsample)}")
        if sum(self.temperal_downsample) > 2:
            raise WanVAEConfigError("at most 2 temporal downsamplings: the reference encodes 4 frames per chunk")
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise WanVAEConfigError(f"latents_mean/latents_std need z_dim={self.z_dim} entries, got "
                                    f"{len(self.latents_mean)}/{len(self.latents_std)}")
        if self.encode_chunk < ENCODE_STEP or self.encode_chunk % ENCODE_STEP:
            raise WanVAEConfigError(f"encode_chunk must be a positive multiple of 4, got {self.encode_chunk}")
        if self.decode_chunk < 1:
            raise WanVAEConfigError(f"decode_chunk must be >= 1, got {self.decode_chunk}")

    @classmethod
    def from_diffusers(cls, d: dict, **numerics) -> WanVAEConfig:
        """From an AutoencoderKLWan config.json (dict). Wan2.2 options and unknown keys are errors."""
        unknown = sorted(k for k in d if not k.startswith("_") and k not in cls.DIFFUSERS_KEYS + cls.DIFFUSERS_IGNORED
                         and k not in ("is_residual", "patch_size", "attn_scales"))
        if unknown:
            raise WanVAEConfigError(f"unknown AutoencoderKLWan config keys {unknown}")
        if d.get("is_residual") or d.get("patch_size") not in (None, 1):
            raise WanVAEConfigError("Wan2.2's VAE (is_residual / patch_size) is not implemented; only Wan2.1's")
        if d.get("attn_scales"):
            raise WanVAEConfigError(f"attn_scales={d['attn_scales']} is not supported (diffusers' encoder cannot "
                                    "run attention blocks inside its down blocks either)")
        kwargs = {k: d[k] for k in cls.DIFFUSERS_KEYS if k in d}
        for k in ("dim_mult", "temperal_downsample", "latents_mean", "latents_std"):
            if k in kwargs:
                kwargs[k] = tuple(kwargs[k])
        if "z_dim" in kwargs and "latents_mean" not in kwargs:
            raise WanVAEConfigError("the config has z_dim but no latents_mean/latents_std")
        return cls(**kwargs, **numerics)

    FIELDS = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "temperal_downsample",
              "latents_mean", "latents_std", "in_channels", "out_channels", "dtype", "param_dtype",
              "encode_chunk", "decode_chunk")

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in ((k, getattr(self, k)) for k in self.FIELDS)}

    @classmethod
    def from_dict(cls, d: dict) -> WanVAEConfig:
        unknown = sorted(set(d) - set(cls.FIELDS))
        if unknown:
            raise WanVAEConfigError(f"unknown wan_vae config keys {unknown}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})

    def replace(self, **kw) -> WanVAEConfig:
        return dataclasses.replace(self, **kw)

    @property
    def temporal_factor(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_factor(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)

    def latent_shape(self, num_frames: int, height: int, width: int) -> tuple[int, int, int, int]:
        check_frames(num_frames)
        s = self.spatial_factor
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        return 1 + (num_frames - 1) // self.temporal_factor, height // s, width // s, self.z_dim

    def num_frames(self, latent_frames: int) -> int:
        return 1 + (latent_frames - 1) * self.temporal_factor


def check_frames(num_frames: int) -> None:
    if num_frames < 1 or (num_frames - 1) % ENCODE_STEP:
        raise ValueError(f"the Wan VAE encodes 1 + 4k frames (frame 0, then chunks of 4), got {num_frames}")


# ---- the feature cache ------------------------------------------------------------------------------------


class FeatureCache:
    """What each causal layer keeps from the previous chunk, as a list in call order.

    Each layer calls `take()` (the previous chunk's entry, or None in the first chunk) and then `put()` (its
    entry for the next chunk). `entries` after a chunk is the carry for the next one.
    """

    def __init__(self, previous: list | None = None):
        self.previous = previous
        self.entries: list[jax.Array] = []

    def take(self) -> jax.Array | None:
        return None if self.previous is None else self.previous[len(self.entries)]

    def put(self, x: jax.Array) -> None:
        self.entries.append(x)


def causal_conv(conv: Conv, x: jax.Array, cache: FeatureCache) -> jax.Array:
    """A 3-frame causal convolution over one chunk: the previous chunk's last two input frames (zeros in the
    first chunk, i.e. causal zero padding) are prepended, and this chunk's are kept."""
    prev = cache.take()
    if prev is None:
        prev = jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype)
    xp = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
    cache.put(xp[:, -CACHE_FRAMES:])
    return conv(xp)


# ---- layers -----------------------------------------------------------------------------------------------


class RMSNorm(nnx.Module):
    """diffusers' WanRMS_norm: x / max(||x||_2, 1e-12) * sqrt(C) * gamma over channels, float32 math."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.gamma = param(rngs, ones, (dim,), ("norm",), param_dtype)
        self.scale = dim**0.5

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        y = x32 / jnp.maximum(norm, 1e-12) * self.scale * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _conv(cin: int, cout: int, window, rngs, numerics, strides=None, pad=None) -> Conv:
    """A VALID convolution with explicit zero padding `pad` per spatial axis (the time axis is padded by the
    cache, never here)."""
    pad = pad if pad is not None else [(0, 0)] * len(window)
    return Conv(cin, cout, window, rngs=rngs, strides=strides, padding=list(pad), **numerics)


def _conv3(cin: int, cout: int, rngs, numerics) -> Conv:
    return _conv(cin, cout, (3, 3, 3), rngs, numerics, pad=[(0, 0), (1, 1), (1, 1)])


def _per_frame(fn: Callable, x: jax.Array) -> jax.Array:
    """Apply a 2D layer to every frame of [B, T, H, W, C]."""
    b, t = x.shape[:2]
    y = fn(x.reshape(b * t, *x.shape[2:]))
    return y.reshape(b, t, *y.shape[1:])


class ResidualBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, *, rngs: nnx.Rngs, numerics: dict):
        pd = numerics["param_dtype"]
        self.norm1 = RMSNorm(cin, rngs=rngs, param_dtype=pd)
        self.conv1 = _conv3(cin, cout, rngs, numerics)
        self.norm2 = RMSNorm(cout, rngs=rngs, param_dtype=pd)
        self.conv2 = _conv3(cout, cout, rngs, numerics)
        self.conv_shortcut = _conv(cin, cout, (1, 1, 1), rngs, numerics) if cin != cout else None

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        h = self.conv_shortcut(x) if self.conv_shortcut is not None else x
        x = causal_conv(self.conv1, jax.nn.silu(self.norm1(x)), cache)
        x = causal_conv(self.conv2, jax.nn.silu(self.norm2(x)), cache)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame (no attention across time)."""

    def __init__(self, dim: int, *, rngs: nnx.Rngs, numerics: dict):
        self.norm = RMSNorm(dim, rngs=rngs, param_dtype=numerics["param_dtype"])
        self.to_qkv = _conv(dim, 3 * dim, (1, 1), rngs, numerics)
        self.proj = _conv(dim, dim, (1, 1), rngs, numerics)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        qkv = self.to_qkv(self.norm(x).reshape(b * t, h, w, c)).reshape(b * t, h * w, 1, 3 * c)
        q, k, v = jnp.split(qkv, 3, axis=-1)
        y = jax.nn.dot_product_attention(q, k, v).reshape(b * t, h, w, c)
        return x + self.proj(y).reshape(b, t, h, w, c)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs, numerics: dict):
        self.resnets = nnx.List([ResidualBlock(dim, dim, rngs=rngs, numerics=numerics) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, rngs=rngs, numerics=numerics)])

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        x = self.resnets[0](x, cache)
        return self.resnets[1](self.attentions[0](x), cache)


class Resample(nnx.Module):
    """2x spatial down/upsampling per frame, with 2x temporal resampling for the '3d' modes."""

    MODES = ("downsample2d", "downsample3d", "upsample2d", "upsample3d")

    def __init__(self, dim: int, mode: str, out_dim: int | None = None, *, rngs: nnx.Rngs, numerics: dict):
        assert mode in self.MODES, mode
        self.mode = mode
        time_conv = None
        if mode.startswith("upsample"):
            # nearest 2x then a 3x3 conv; the reference halves the channels here.
            self.resample = _conv(dim, out_dim or dim // 2, (3, 3), rngs, numerics, pad=[(1, 1), (1, 1)])
            if mode == "upsample3d":  # each frame becomes two: 2 * dim channels, split in time afterwards
                time_conv = _conv(dim, 2 * dim, (3, 1, 1), rngs, numerics)
        else:
            # the reference pads right/bottom by one, then a stride-2 3x3 conv
            self.resample = _conv(dim, dim, (3, 3), rngs, numerics, strides=(2, 2), pad=[(0, 1), (0, 1)])
            if mode == "downsample3d":
                time_conv = _conv(dim, dim, (3, 1, 1), rngs, numerics, strides=(2, 1, 1))
        self.time_conv = time_conv

    def _upsample_time(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        prev = cache.take()
        if prev is None:
            # First chunk: not doubled; the next chunk's causal conv sees zeros (diffusers' "Rep").
            cache.put(jnp.zeros((x.shape[0], CACHE_FRAMES, *x.shape[2:]), x.dtype))
            return x
        xp = jnp.concatenate([prev.astype(x.dtype), x], axis=1)
        cache.put(xp[:, -CACHE_FRAMES:])
        y = self.time_conv(xp)  # [B, T, H, W, 2C]: channels [:C] -> frame 2t, [C:] -> frame 2t + 1
        b, t, h, w, c2 = y.shape
        return y.reshape(b, t, h, w, 2, c2 // 2).transpose(0, 1, 4, 2, 3, 5).reshape(b, 2 * t, h, w, c2 // 2)

    def _downsample_time(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        prev = cache.take()
        cache.put(x[:, -1:])
        if prev is None:  # first chunk (one frame): passed through
            return x
        # previous chunk's last frame + this chunk (an even number of frames): stride 2, no padding
        return self.time_conv(jnp.concatenate([prev.astype(x.dtype), x], axis=1))

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        if self.mode.startswith("upsample"):
            x = jnp.repeat(jnp.repeat(x, 2, axis=2), 2, axis=3)  # nearest-exact at an integer factor
        x = _per_frame(self.resample, x)
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return x


class UpBlock(nnx.Module):
    def __init__(self, cin: int, cout: int, num_res_blocks: int, mode: str | None, *, rngs: nnx.Rngs,
                 numerics: dict):
        dims = [cin] + [cout] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, rngs=rngs, numerics=numerics) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = nnx.List([Resample(cout, mode, rngs=rngs, numerics=numerics)] if mode else [])

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, cache)
        for up in self.upsamplers:
            x = up(x, cache)
        return x


class Encoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, numerics: dict):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = _conv3(cfg.in_channels, dims[0], rngs, numerics)
        blocks: list[nnx.Module] = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, rngs=rngs, numerics=numerics))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temperal_downsample[i] else "downsample2d"
                blocks.append(Resample(cout, mode, rngs=rngs, numerics=numerics))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], rngs=rngs, numerics=numerics)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs, param_dtype=numerics["param_dtype"])
        self.conv_out = _conv3(dims[-1], 2 * cfg.z_dim, rngs, numerics)

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        x = causal_conv(self.conv_in, x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache)


class Decoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs, numerics: dict):
        base = cfg.decoder_base_dim or cfg.base_dim
        mult = cfg.dim_mult
        dims = [base * u for u in (mult[-1], *mult[::-1])]
        upsample_time = cfg.temperal_downsample[::-1]
        self.conv_in = _conv3(cfg.z_dim, dims[0], rngs, numerics)
        self.mid_block = MidBlock(dims[0], rngs=rngs, numerics=numerics)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                cin //= 2  # the previous block's upsampler halved the channels
            mode = None
            if i != len(mult) - 1:
                mode = "upsample3d" if upsample_time[i] else "upsample2d"
            blocks.append(UpBlock(cin, cout, cfg.num_res_blocks, mode, rngs=rngs, numerics=numerics))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], rngs=rngs, param_dtype=numerics["param_dtype"])
        self.conv_out = _conv3(dims[-1], cfg.out_channels, rngs, numerics)

    def __call__(self, x: jax.Array, cache: FeatureCache) -> jax.Array:
        x = causal_conv(self.conv_in, x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return causal_conv(self.conv_out, jax.nn.silu(self.norm_out(x)), cache)


# ---- streaming over time ----------------------------------------------------------------------------------


def stream(step: Callable[[jax.Array, FeatureCache], jax.Array], x: jax.Array, first: int, chunk: int) -> jax.Array:
    """`step` over the time axis of `x` [B, T, ...]: frames [:first] with a fresh cache, then chunks of
    `chunk` frames under one lax.scan (the cache is the carry), then the shorter remainder, if any."""
    cache = FeatureCache()
    outputs = [step(x[:, :first], cache)]
    carry = cache.entries
    rest = x[:, first:]
    n = rest.shape[1] // chunk
    if n:
        xs = rest[:, : n * chunk].reshape(rest.shape[0], n, chunk, *rest.shape[2:]).swapaxes(0, 1)

        def body(carry, xc):
            c = FeatureCache(carry)
            y = step(xc, c)
            return c.entries, y

        carry, ys = jax.lax.scan(body, carry, xs)
        ys = ys.swapaxes(0, 1)
        outputs.append(ys.reshape(ys.shape[0], -1, *ys.shape[3:]))
    if rest.shape[1] % chunk:
        outputs.append(step(rest[:, n * chunk:], FeatureCache(carry)))
    return jnp.concatenate(outputs, axis=1) if len(outputs) > 1 else outputs[0]


class WanVAE(nnx.Module):
    """Wan2.1's VAE. Videos and latents are channels-last; latents here are *raw* (the posterior's mean);
    `normalize`/`denormalize` convert to and from the (z - mean) / std latents the diffusion models see."""

    def __init__(self, config: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = config
        numerics = {"dtype": jnp.dtype(config.dtype), "param_dtype": jnp.dtype(config.param_dtype)}
        z = config.z_dim
        self.encoder = Encoder(config, rngs=rngs, numerics=numerics)
        self.quant_conv = _conv(2 * z, 2 * z, (1, 1, 1), rngs, numerics)
        self.post_quant_conv = _conv(z, z, (1, 1, 1), rngs, numerics)
        self.decoder = Decoder(config, rngs=rngs, numerics=numerics)

    def encode_moments(self, video: jax.Array) -> tuple[jax.Array, jax.Array]:
        """(mean, log-variance) of the posterior, each [B, F, H/8, W/8, z_dim], float32."""
        check_frames(video.shape[1])
        x = video.astype(self.config.dtype)
        h = self.quant_conv(stream(self.encoder, x, ENCODE_FIRST, self.config.encode_chunk)).astype(jnp.float32)
        # diffusers' DiagonalGaussianDistribution clamps the log-variance to [-30, 20]
        return h[..., : self.config.z_dim], jnp.clip(h[..., self.config.z_dim:], -30.0, 20.0)

    def encode(self, video: jax.Array) -> jax.Array:
        """The posterior's mean (the reference's `latent_dist.mode()`), raw (not normalised)."""
        return self.encode_moments(video)[0]

    def decode(self, latents: jax.Array) -> jax.Array:
        """Raw latents [B, F, h, w, z_dim] -> video [B, 1 + 4 (F - 1), 8h, 8w, 3] in [-1, 1], float32."""
        x = self.post_quant_conv(latents.astype(self.config.dtype))
        video = stream(self.decoder, x, 1, self.config.decode_chunk)
        return jnp.clip(video.astype(jnp.float32), -1.0, 1.0)

    def _stats(self):
        shape = (1,) * 4 + (self.config.z_dim,)
        return (jnp.asarray(self.config.latents_mean, jnp.float32).reshape(shape),
                jnp.asarray(self.config.latents_std, jnp.float32).reshape(shape))

    def normalize(self, latents: jax.Array) -> jax.Array:
        """Raw -> (z - latents_mean) / latents_std, as tools/precompute_latents.py writes datasets."""
        mean, std = self._stats()
        return (latents.astype(jnp.float32) - mean) / std

    def denormalize(self, latents: jax.Array) -> jax.Array:
        mean, std = self._stats()
        return latents.astype(jnp.float32) * std + mean


__all__ = ["FeatureCache", "WanVAE", "WanVAEConfig", "WanVAEConfigError", "check_frames", "stream"]
