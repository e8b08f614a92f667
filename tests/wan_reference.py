"""Tiny random diffusers WanTransformer3DModel references, saved the way users' checkpoints are."""

from __future__ import annotations

import json
import os

import numpy as np

torch = __import__("pytest").importorskip("torch")
diffusers = __import__("pytest").importorskip("diffusers")


def build_wan(seed: int = 0, **config):
    base = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=4, out_channels=4,
                text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=64)
    base.update(config)
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**base).eval()
    # Random init leaves some tables at zero-ish scales; perturb every parameter so that each one matters.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def save_diffusers(model, folder: str, max_shard_size: str | None = None) -> str:
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(folder, safe_serialization=True, **kwargs)
    return folder


# Diffusers -> original Wan names: the inverse of diffusers' convert_wan_transformer_to_diffusers.
_TO_ORIGINAL = [
    ("condition_embedder.time_embedder.linear_1", "time_embedding.0"),
    ("condition_embedder.time_embedder.linear_2", "time_embedding.2"),
    ("condition_embedder.text_embedder.linear_1", "text_embedding.0"),
    ("condition_embedder.text_embedder.linear_2", "text_embedding.2"),
    ("condition_embedder.time_proj", "time_projection.1"),
    ("attn1", "self_attn"),
    ("attn2", "cross_attn"),
    (".to_out.0.", ".o."),
    (".to_q.", ".q."),
    (".to_k.", ".k."),
    (".to_v.", ".v."),
    ("ffn.net.0.proj", "ffn.0"),
    ("ffn.net.2", "ffn.2"),
    ("proj_out", "head.head"),
]


def to_original_state_dict(state_dict: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in state_dict.items():
        new = key
        for a, b in _TO_ORIGINAL:
            new = new.replace(a, b)
        if new.startswith("blocks.") and ".norm2." in new:
            new = new.replace(".norm2.", ".norm3.")
        if new == "scale_shift_table":
            new = "head.modulation"
        elif new.endswith(".scale_shift_table"):
            new = new.replace(".scale_shift_table", ".modulation")
        out[prefix + new] = value
    return out


def original_config(model) -> dict:
    c = model.config
    return {"model_type": "t2v", "dim": c.num_attention_heads * c.attention_head_dim, "num_heads": c.num_attention_heads,
            "in_dim": c.in_channels, "out_dim": c.out_channels, "ffn_dim": c.ffn_dim, "freq_dim": c.freq_dim,
            "text_dim": c.text_dim, "num_layers": c.num_layers, "eps": c.eps, "patch_size": list(c.patch_size),
            "cross_attn_norm": c.cross_attn_norm, "window_size": [-1, -1], "qk_norm": True, "text_len": 512}


def save_original(model, folder: str, prefix: str = "") -> str:
    from safetensors.torch import save_file

    os.makedirs(folder, exist_ok=True)
    sd = {k: v.contiguous() for k, v in to_original_state_dict(model.state_dict(), prefix).items()}
    save_file(sd, os.path.join(folder, "diffusion_pytorch_model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(original_config(model), f)
    return folder


def torch_forward(model, latents_bfhwc: np.ndarray, timesteps: np.ndarray, text: np.ndarray) -> np.ndarray:
    """Run the reference on channels-last latents; returns channels-last output."""
    x = torch.from_numpy(np.ascontiguousarray(latents_bfhwc.transpose(0, 4, 1, 2, 3)))
    with torch.no_grad():
        out = model(x, torch.from_numpy(timesteps), torch.from_numpy(text), return_dict=False)[0]
    return out.numpy().transpose(0, 2, 3, 4, 1)


def relative_error(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - b)) / max(np.max(np.abs(b)), 1e-12))


def make_student_folder(flax_folder: str, dst: str, timesteps, latent_shape, text_shape) -> str:
    """A Wan-shaped student folder: converted weights plus the sections the distillation job writes."""
    from dollar_jax.checkpoint import PARAMS_DIR, abstract_dit, read_model_folder_config, restore_pytree
    from dollar_jax.checkpoint import write_model_folder
    from dollar_jax.models.dit_config import DiTConfig

    section, blob = read_model_folder_config(flax_folder, "dit")
    _, abstract, _ = abstract_dit(DiTConfig.from_dict(section))
    params = restore_pytree(os.path.join(flax_folder, PARAMS_DIR), abstract)
    return write_model_folder(dst, {
        "dit": section, "diffusion": blob["diffusion"],
        "student": {"timesteps": list(timesteps), "sigma_data": 0.5, "timestep_scale": 10.0},
        "latents": {"shape": list(latent_shape), "text_shape": list(text_shape)},
        "source": {"format": "dollar-jax-student"}}, params)


def save_tiny_wan_encoders(root, words, latents_mean, latents_std, text_dim: int = 16) -> dict[str, str]:
    """Tiny random Wan companions saved as local folders: diffusers AutoencoderKLWan (z_dim 4, 2x spatial and
    temporal), transformers UMT5EncoderModel (d_model `text_dim`) and a WordLevel tokenizer over `words`."""
    from diffusers import AutoencoderKLWan
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, UMT5Config, UMT5EncoderModel

    root = str(root)
    torch.manual_seed(0)
    AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 1], num_res_blocks=1, attn_scales=[],
                     temperal_downsample=[True], latents_mean=list(latents_mean),
                     latents_std=list(latents_std)).save_pretrained(os.path.join(root, "vae"))
    UMT5EncoderModel(UMT5Config(vocab_size=len(words), d_model=text_dim, d_kv=8, num_layers=1, num_heads=2,
                                d_ff=32, relative_attention_num_buckets=8)).save_pretrained(
        os.path.join(root, "text_encoder"))
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                            unk_token="<unk>").save_pretrained(os.path.join(root, "tokenizer"))
    return {k: os.path.join(root, k) for k in ("vae", "text_encoder", "tokenizer")}
