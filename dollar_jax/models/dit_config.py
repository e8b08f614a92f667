"""Sizes and numerics of the Wan2.1-compatible video DiT."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from typing import Any

REMAT_POLICIES = ("none", "full", "minimal", "save_attention", "save_attention_residuals", "offload_attention")
DTYPES = ("float32", "bfloat16")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Architecture (names follow diffusers' WanTransformer3DModel config) plus JAX-side numerics."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 12
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 8960
    num_layers: int = 30
    cross_attn_norm: bool = True
    eps: float = 1e-6
    rope_max_seq_len: int = 1024
    rope_theta: float = 10000.0
    # JAX side: storage and compute dtypes, rematerialisation of each scanned block, attention kernel.
    param_dtype: str = "float32"
    dtype: str = "float32"
    remat_policy: str = "none"
    attention: str = "xla"
    # Tiling of the splash kernels: "auto", a preset (attention.SPLASH_PRESETS) or "q=2048,kv=1024,...".
    splash_block_sizes: str = "auto"

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3:
            raise ValueError(f"patch_size must have 3 entries (t, h, w), got {self.patch_size}")
        for name in ("param_dtype", "dtype"):
            if getattr(self, name) not in DTYPES:
                raise ValueError(f"DiTConfig.{name} must be one of {DTYPES}, got {getattr(self, name)!r}")
        if self.remat_policy not in REMAT_POLICIES:
            raise ValueError(f"DiTConfig.remat_policy must be one of {REMAT_POLICIES}, got {self.remat_policy!r}")
        from dollar_jax.models.attention import ATTENTION_KERNELS, parse_splash_blocks

        if self.attention not in ATTENTION_KERNELS:
            raise ValueError(f"DiTConfig.attention must be one of {ATTENTION_KERNELS}, got {self.attention!r}")
        parse_splash_blocks(self.splash_block_sizes)  # a bad tiling fails here, not at the first step
        if self.attention_head_dim % 2:
            raise ValueError("attention_head_dim must be even (rotary embedding works on pairs)")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    def replace(self, **changes) -> DiTConfig:
        return dataclasses.replace(self, **changes)

    # ---- (de)serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DiTConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"Unknown DiTConfig keys {unknown}; known keys: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_diffusers(cls, cfg: Mapping[str, Any], **numerics) -> DiTConfig:
        """From a diffusers WanTransformer3DModel config.json (text-to-video models)."""
        unsupported = {
            k: cfg.get(k)
            for k in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len")
            if cfg.get(k) is not None
        }
        if unsupported:
            raise ValueError(f"Image-conditioned Wan models are not supported (config has {unsupported})")
        if cfg.get("qk_norm", "rms_norm_across_heads") not in ("rms_norm_across_heads", True):
            raise ValueError(f"Only qk_norm='rms_norm_across_heads' is supported, got {cfg.get('qk_norm')!r}")
        keys = ("patch_size", "num_attention_heads", "attention_head_dim", "in_channels", "out_channels",
                "text_dim", "freq_dim", "ffn_dim", "num_layers", "cross_attn_norm", "eps", "rope_max_seq_len")
        kwargs = {k: cfg[k] for k in keys if k in cfg and cfg[k] is not None}
        if cfg.get("out_channels") is None and "in_channels" in cfg:
            kwargs["out_channels"] = cfg["in_channels"]
        return cls(**kwargs, **numerics)

    @classmethod
    def from_original_wan(cls, cfg: Mapping[str, Any], **numerics) -> DiTConfig:
        """From the config.json of an original Wan2.1 checkpoint (keys dim, num_heads, in_dim, ...)."""
        if cfg.get("model_type", "t2v") != "t2v":
            raise ValueError(f"Only text-to-video Wan models are supported, got model_type={cfg['model_type']!r}")
        if tuple(cfg.get("window_size", (-1, -1))) != (-1, -1):
            raise ValueError("Windowed attention (window_size != (-1, -1)) is not supported")
        dim, heads = int(cfg["dim"]), int(cfg["num_heads"])
        if dim % heads:
            raise ValueError(f"dim={dim} is not divisible by num_heads={heads}")
        return cls(
            patch_size=tuple(cfg.get("patch_size", (1, 2, 2))),
            num_attention_heads=heads,
            attention_head_dim=dim // heads,
            in_channels=int(cfg.get("in_dim", 16)),
            out_channels=int(cfg.get("out_dim", 16)),
            text_dim=int(cfg.get("text_dim", 4096)),
            freq_dim=int(cfg.get("freq_dim", 256)),
            ffn_dim=int(cfg["ffn_dim"]),
            num_layers=int(cfg["num_layers"]),
            cross_attn_norm=bool(cfg.get("cross_attn_norm", True)),
            eps=float(cfg.get("eps", 1e-6)),
            **numerics,
        )


# Presets. The Wan2.1 sizes are those of the released checkpoints; "tiny" is for tests and the CPU world.
PRESETS: dict[str, DiTConfig] = {
    "tiny": DiTConfig(num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4, text_dim=32,
                      freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64),
    "wan2.1-1.3b": DiTConfig(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=30),
    "wan2.1-14b": DiTConfig(num_attention_heads=40, attention_head_dim=128, ffn_dim=13824, num_layers=40),
}


def preset(name: str, **overrides) -> DiTConfig:
    if name not in PRESETS:
        raise ValueError(f"Unknown DiT preset {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name].replace(**overrides)
