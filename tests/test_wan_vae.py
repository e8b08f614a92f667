"""The Flax Wan VAE against diffusers' AutoencoderKLWan (built tiny and random on CPU), its conversion, model
folders and the accelerator decoder of the reward labeller.

Compilation dominates this file's time on CPU, so the jitted encode/decode functions are built once per
model and compiled at XLA backend optimisation level 0 (about 3.5x faster to compile; the computation, and so
what is compared, is the same).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from dollar_jax.checkpoint import CheckpointError, load_wan_vae  # noqa: E402
from dollar_jax.convert import ConversionError  # noqa: E402
from dollar_jax.convert import safetensors_io as st  # noqa: E402
from dollar_jax.convert.wan_vae import load_diffusers_vae  # noqa: E402
from dollar_jax.models.wan_vae import WanVAEConfig, WanVAEConfigError  # noqa: E402

pytestmark = pytest.mark.torch

FAST_COMPILE = {"xla_backend_optimization_level": 0}
RTOL = 1e-4
CONFIGS = {
    # Wan2.1's structure (8x spatial, 4x temporal: [False, True, True]) at a tiny width.
    "wan21": dict(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                  temperal_downsample=[False, True, True],
                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.5, 2.0, 1.0]),
    # Temporal downsampling first, a spatial-only level, 2 res blocks, its own decoder width.
    "other": dict(base_dim=12, decoder_base_dim=8, z_dim=8, dim_mult=[1, 2, 2], num_res_blocks=2,
                  temperal_downsample=[True, False],
                  latents_mean=[0.0] * 8, latents_std=[1.0] * 8),
}
SIZE = {"wan21": (16, 16), "other": (8, 12)}


def rel_err(ours, ref) -> float:
    ref = ref.detach().numpy() if hasattr(ref, "detach") else np.asarray(ref)
    return float(np.max(np.abs(np.asarray(ours) - ref)) / np.max(np.abs(ref)))


def to_torch(x) -> "torch.Tensor":  # channels-last [B, T, H, W, C] -> [B, C, T, H, W]
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 4, 1, 2, 3)))


def to_flax(x) -> np.ndarray:
    return x.detach().numpy().transpose(0, 2, 3, 4, 1)


class Pair:
    """The torch reference, its saved folder, and the Flax model with jitted encode/decode."""

    def __init__(self, name, root):
        torch.manual_seed(len(name))
        self.torch = __import__("diffusers").AutoencoderKLWan(**CONFIGS[name]).eval()
        with torch.no_grad():  # non-trivial norm scales (diffusers initialises them to one)
            for key, p in self.torch.named_parameters():
                if key.endswith("gamma"):
                    p.mul_(1 + 0.2 * torch.randn_like(p))
        self.folder = str(root / name)
        self.torch.save_pretrained(self.folder)
        self.flax = load_diffusers_vae(self.folder)
        self._fns = {}

    def run(self, method: str, x, vae=None):
        vae = vae or self.flax
        graphdef, state = nnx.split(vae)
        key = (method, vae.config)
        if key not in self._fns:
            self._fns[key] = jax.jit(lambda s, x: getattr(nnx.merge(graphdef, s), method)(x),
                                     compiler_options=FAST_COMPILE)
        return self._fns[key](state, jnp.asarray(x))

    def torch_encode(self, video):
        with torch.no_grad():
            return self.torch.encode(to_torch(video)).latent_dist

    def torch_decode(self, latents):
        with torch.no_grad():
            return self.torch.decode(to_torch(latents)).sample


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_vae")
    return {name: Pair(name, root) for name in CONFIGS}


def random_video(batch, frames, size, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, frames, *size, 3)).astype(np.float32)


@pytest.mark.parametrize("name,frames,batch", [("wan21", 1, 1), ("wan21", 5, 1), ("wan21", 9, 1), ("other", 9, 2)])
def test_encode_matches_diffusers(pairs, name, frames, batch):
    pair = pairs[name]
    video = random_video(batch, frames, SIZE[name])
    mean, logvar = pair.run("encode_moments", video)
    ref = pair.torch_encode(video)
    cfg = pair.flax.config
    assert mean.shape == (batch, *cfg.latent_shape(frames, *SIZE[name]))
    assert rel_err(mean, to_flax(ref.mean)) < RTOL
    assert rel_err(logvar, to_flax(ref.logvar)) < RTOL


@pytest.mark.parametrize("name,latent_frames,batch", [("wan21", 1, 1), ("wan21", 2, 1), ("wan21", 3, 1),
                                                      ("other", 3, 2)])
def test_decode_matches_diffusers(pairs, name, latent_frames, batch):
    pair = pairs[name]
    h, w = (s // pair.flax.config.spatial_factor for s in SIZE[name])
    z = np.random.default_rng(1).normal(size=(batch, latent_frames, h, w, pair.flax.config.z_dim)).astype(np.float32)
    video = pair.run("decode", z)
    ref = pair.torch_decode(z)
    assert video.shape == (batch, pair.flax.config.num_frames(latent_frames), *SIZE[name], 3)
    assert rel_err(video, to_flax(ref)) < RTOL
    assert float(jnp.max(jnp.abs(video))) > 0.05  # not a degenerate all-zero decode


def test_chunked_streaming_of_long_clips(pairs):
    """Several frames per scanned chunk plus a shorter remainder chunk (the feature cache carried across
    both) give diffusers' frame-by-frame results."""
    pair = pairs["wan21"]
    z = np.random.default_rng(2).normal(size=(1, 6, 2, 2, 4)).astype(np.float32)
    chunked = load_diffusers_vae(pair.folder, decode_chunk=2)  # 5 frames after the first: 2 + 2 + 1
    assert rel_err(pair.run("decode", z, chunked), to_flax(pair.torch_decode(z))) < RTOL

    video = random_video(1, 13, SIZE["wan21"], seed=3)
    chunked = load_diffusers_vae(pair.folder, encode_chunk=8)  # 12 frames after the first: 8 + 4
    mean, _ = pair.run("encode_moments", video, chunked)
    assert rel_err(mean, to_flax(pair.torch_encode(video).mean)) < RTOL


def test_bad_frame_counts_and_configs():
    vae_cfg = WanVAEConfig(base_dim=8, z_dim=4, dim_mult=(1, 2), temperal_downsample=(True,),
                           latents_mean=(0.0,) * 4, latents_std=(1.0,) * 4)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        vae_cfg.latent_shape(6, 16, 16)
    with pytest.raises(WanVAEConfigError, match="Wan2.2"):
        WanVAEConfig.from_diffusers({**CONFIGS["wan21"], "is_residual": True})
    with pytest.raises(WanVAEConfigError, match="unknown AutoencoderKLWan config keys \\['base_channels'\\]"):
        WanVAEConfig.from_diffusers({**CONFIGS["wan21"], "base_channels": 8})
    with pytest.raises(WanVAEConfigError, match="temperal_downsample needs 1 entries"):
        WanVAEConfig.from_diffusers({**CONFIGS["wan21"], "dim_mult": [1, 2]})


def _write_folder(pair, root, edit):
    """A copy of `pair`'s folder whose tensors went through edit(dict of numpy arrays)."""
    folder = str(root)
    os.makedirs(folder, exist_ok=True)
    shutil.copy(os.path.join(pair.folder, "config.json"), folder)
    tensors = {k: v.detach().numpy().copy() for k, v in pair.torch.state_dict().items()}
    edit(tensors)
    st.write_file(os.path.join(folder, "diffusion_pytorch_model.safetensors"), tensors)
    return folder


def test_conversion_names_missing_misshaped_and_nan_tensors(pairs, tmp_path):
    pair = pairs["wan21"]
    gone, bent, bad = "decoder.up_blocks.1.upsamplers.0.time_conv.weight", "encoder.mid_block.attentions.0.proj.weight", \
        "decoder.norm_out.gamma"

    folder = _write_folder(pair, tmp_path / "missing", lambda t: t.pop(gone))
    with pytest.raises(ConversionError, match=f"missing: {gone}"):
        load_diffusers_vae(folder)

    def reshape(t):
        t[bent] = t[bent][:, :-1]

    folder = _write_folder(pair, tmp_path / "misshaped", reshape)
    with pytest.raises(ConversionError, match=f"mis-shaped: {bent}: source shape"):
        load_diffusers_vae(folder)

    def poison(t):
        t[bad][0] = np.nan

    folder = _write_folder(pair, tmp_path / "nan", poison)
    with pytest.raises(ConversionError, match=f"tensor {bad} holds NaN"):
        load_diffusers_vae(folder)


def test_convert_tool_writes_a_model_folder(pairs, tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "convert_weights", os.path.join(os.path.dirname(__file__), "..", "tools", "convert_weights.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)

    pair = pairs["other"]
    dst = str(tmp_path / "vae_flax")
    assert tool.main(["--kind=vae", "--src", pair.folder, "--dst", dst]) == 0
    with open(os.path.join(dst, "config.json")) as f:
        assert json.load(f)["wan_vae"]["decoder_base_dim"] == 8
    loaded = load_wan_vae(dst)
    assert loaded.config == pair.flax.config
    ours, theirs = nnx.to_pure_dict(nnx.state(loaded)), nnx.to_pure_dict(nnx.state(pair.flax))
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), ours, theirs)
    # An existing destination is kept unless --overwrite.
    assert tool.main(["--kind=vae", "--src", pair.folder, "--dst", dst]) == 1
    assert load_wan_vae(dst, decode_chunk=3).config.decode_chunk == 3
    # A folder of something else is named as such.
    other = tmp_path / "not_a_vae"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"dit": {}}))
    with pytest.raises(CheckpointError, match="neither a 'wan_vae' section"):
        load_wan_vae(str(other))


def test_flax_reward_decoder_matches_the_torch_one(pairs):
    """reward.decoder='wan_vae_flax' de-normalises like tools/precompute_latents.py and gives the torch
    decoder's uint8 frames (3 clips in batches of 2: the padded last batch is dropped)."""
    from dollar_jax.rewards.decoders import make_decoder

    pair = pairs["wan21"]
    latents = np.random.default_rng(4).normal(size=(3, 1, 2, 2, 4)).astype(np.float32)
    ours = make_decoder("wan_vae_flax", vae_path=pair.folder)(latents)
    theirs = make_decoder("wan_vae", vae_path=pair.folder)(latents)
    assert ours.dtype == np.uint8 and ours.shape == theirs.shape == (3, 1, 16, 16, 3)
    assert np.max(np.abs(ours.astype(int) - theirs.astype(int))) <= 1
    assert np.std(ours) > 1.0
