"""Pixel rewards, the CLIP preference adapter, the labeller's determinism, and the LRM architectures."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dollar_jax.data import world
from dollar_jax.models.reward_models import (LRM_KINDS, PAPER_KINDS, LatentRewardModel, LRMConfig, make_lrm,
                                             parameter_count)
from dollar_jax.rewards import make_reward, registered
from dollar_jax.rewards.labeller import Labeller

CFG = world.WorldConfig()
CLIPS = list(world.generate(0, 12, CFG))
VIDEOS = np.stack([c["video"] for c in CLIPS])
PROMPTS = [c["caption"] for c in CLIPS]


def test_builtin_rewards_are_registered_and_validate_input():
    assert {"colourfulness", "jpeg_compressibility", "bright_pixel_fraction", "world_adherence",
            "clip_preference"} <= set(registered())
    with pytest.raises(ValueError, match="Unknown reward"):
        make_reward("aesthetics_v9")
    with pytest.raises(ValueError, match="uint8 videos"):
        make_reward("colourfulness")(VIDEOS.astype(np.float32), PROMPTS)


def test_colourfulness_prefers_saturated_over_grey():
    grey = VIDEOS.mean(axis=-1, keepdims=True).repeat(3, axis=-1).astype(np.uint8)
    r = make_reward("colourfulness")
    assert np.all(r(VIDEOS, PROMPTS) > r(grey, PROMPTS) + 0.05)


def test_jpeg_compressibility_is_a_non_differentiable_size():
    rng = np.random.default_rng(0)
    noisy = np.clip(VIDEOS.astype(np.int16) + rng.integers(-60, 60, VIDEOS.shape), 0, 255).astype(np.uint8)
    r = make_reward("jpeg_compressibility")
    flat = np.zeros_like(VIDEOS)
    assert np.all(r(flat, PROMPTS) > r(VIDEOS, PROMPTS)) and np.all(r(VIDEOS, PROMPTS) > r(noisy, PROMPTS))


def test_world_adherence_reward_reads_the_caption():
    r = make_reward("world_adherence")
    np.testing.assert_array_equal(r(VIDEOS, PROMPTS), 1.0)
    shifted = PROMPTS[1:] + PROMPTS[:1]
    assert r(VIDEOS, shifted).mean() < 0.8
    assert 0.0 <= make_reward("bright_pixel_fraction")(VIDEOS, PROMPTS).min() <= 1.0


def _slow(reward, delay):
    def slowed(videos, prompts):
        time.sleep(delay)
        return reward(videos, prompts)

    return slowed


def _run_labeller(delay, steps=12, restore_at=None):
    decode = lambda z: (np.clip(z[..., :3], 0, 1) * 255).astype(np.uint8)
    reward = _slow(lambda v, p: v.mean(axis=(1, 2, 3, 4)) / 255.0, delay)
    lab = Labeller(decode, reward, lag=2, window=3, seed=5)
    rng = np.random.default_rng(0)
    batches = []
    for step in range(1, steps + 1):
        b = lab.batch(step, 4)
        batches.append(None if b is None else b["score"].copy())
        z = rng.uniform(0, 1, (3, 2, 2, 2, 4)).astype(np.float32)
        lab.submit(step, z, np.zeros((3, 2, 5), np.float32), ["p"] * 3)
        if restore_at == step:  # checkpoint, then continue in a fresh labeller as a resumed run would
            state = lab.state()
            lab.close()
            lab = Labeller(decode, reward, lag=2, window=3, seed=5)
            lab.restore(state)
    lab.close()
    return batches


def test_labeller_batches_do_not_depend_on_its_speed_and_survive_restore():
    fast, slow = _run_labeller(0.0), _run_labeller(0.05)
    assert fast[0] is None and fast[1] is None and fast[2] is not None  # lag 2: step 3 sees step 1's labels
    for a, b in zip(fast, slow):
        assert (a is None and b is None) or np.array_equal(a, b)
    resumed = _run_labeller(0.0, restore_at=6)
    for a, b in zip(fast, resumed):
        assert (a is None and b is None) or np.array_equal(a, b)


def test_labeller_stores_bf16_and_each_text_once():
    import ml_dtypes

    lab = Labeller(lambda z: z, lambda v, p: v.reshape(len(v), -1).mean(axis=1), lag=1, window=2, seed=0)
    z = np.arange(4 * 3, dtype=np.float32).reshape(4, 3) / 7  # latents 0, 1 real; 2, 3 the student's
    text = np.asarray([[10.0], [20.0]], np.float32)  # latent i goes with text i % 2
    with pytest.raises(ValueError, match="cannot share"):
        lab.submit(1, z[:3], text, ["a"] * 3)
    lab.submit(1, z, text, ["a", "b", "a", "b"])
    state = lab.state()
    assert state["latents"].dtype == ml_dtypes.bfloat16 and state["latents"].shape == (1, 4, 3)
    assert state["text"].shape == (1, 2, 1)
    b = lab.batch(2, 16)
    for latent, t in zip(b["latents"], b["text"]):
        row = int(np.argmin(np.abs(z.astype(ml_dtypes.bfloat16).astype(np.float32) - latent).sum(axis=1)))
        assert t[0] == text[row % 2, 0]
    lab.close()


def test_labeller_reports_a_failing_reward():
    def broken(videos, prompts):
        raise ZeroDivisionError("bad reward")

    lab = Labeller(lambda z: z, broken, lag=1, window=2)
    lab.submit(1, np.zeros((2, 1)), np.zeros((2, 1)), ["a", "b"])
    with pytest.raises(RuntimeError, match="bad reward"):
        lab.batch(2, 2)
    lab.close()


def test_lrm_variants_shapes_and_the_papers_layout():
    for kind in LRM_KINDS:
        graphdef, state = nnx.split(make_lrm(LRMConfig(kind=kind, latent_channels=16, first_stride=2),
                                             rngs=nnx.Rngs(0)))
        out = jax.jit(lambda s, z, t: nnx.merge(graphdef, s)(z, t))(state, jnp.ones((3, 4, 8, 8, 16)),
                                                                  jnp.ones((3, 8, 32)))
        assert out.shape == (3,) and bool(jnp.all(jnp.isfinite(out)))
    # The project's dense-1x1 "frame" variant on 4-channel latents: 173,057 parameters.
    m = LatentRewardModel(LRMConfig(kind="frame", latent_channels=4), rngs=nnx.Rngs(0))
    assert parameter_count(m) == 173_057
    # Frames are scored independently and averaged: permuting frames leaves the score unchanged.
    z = jax.random.normal(jax.random.key(0), (2, 4, 8, 8, 4))
    graphdef, state = nnx.split(m)
    both = jax.jit(lambda s, z: (nnx.merge(graphdef, s)(z), nnx.merge(graphdef, s)(z[:, ::-1])))(state, z)
    np.testing.assert_allclose(*both, rtol=1e-5)


def test_clip_preference_adapter_on_a_tiny_local_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    import json

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1, "!": 2}
    words = ["a</w>", "red</w>", "blue</w>", "circle</w>", "square</w>", "moving</w>", "left</w>", "large</w>"]
    for w in words:
        vocab[w] = len(vocab)
    letters = sorted({ch for w in words for ch in w.replace("</w>", "")})
    for ch in letters:
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(tmp_path)
    transformers.CLIPTokenizer(str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")).save_pretrained(tmp_path)
    reward = make_reward("clip_preference", path=str(tmp_path), frames=2)
    scores = reward(VIDEOS[:4], PROMPTS[:4])
    assert scores.shape == (4,) and np.all(np.isfinite(scores))
    np.testing.assert_allclose(reward(VIDEOS[:4], PROMPTS[:4]), scores, rtol=1e-6)  # deterministic
    other = reward(VIDEOS[:4], ["a blue square"] * 4)
    assert not np.allclose(other, scores)  # the prompt matters
    with pytest.raises(FileNotFoundError):
        make_reward("clip_preference", path=str(tmp_path / "missing"))


def test_paper_lrm_parameter_counts_are_the_papers_table():
    """Table 8.1 of the paper: 189,441 (image) and 763,009 (text-conditioned) at C = 16, D = 4096."""
    image = make_lrm(LRMConfig(kind="paper_image", latent_channels=16), rngs=nnx.Rngs(0))
    text = make_lrm(LRMConfig(kind="paper_text", latent_channels=16, text_dim=4096), rngs=nnx.Rngs(0))
    assert parameter_count(image) == 189_441
    assert parameter_count(text) == 763_009
    # The decomposition (module docstring): the text model adds exactly the text linear and Wq, Wk, Wv.
    assert parameter_count(text) - parameter_count(image) == 4096 * 128 + 128 + 3 * 128 * 128
    with pytest.raises(ValueError, match="make_lrm"):
        LatentRewardModel(LRMConfig(kind="paper_image"), rngs=nnx.Rngs(0))


def test_paper_lrms_score_frames_independently_and_read_the_text():
    z = jax.random.normal(jax.random.key(0), (2, 3, 8, 8, 16))
    text = jax.random.normal(jax.random.key(1), (2, 5, 24)).at[:, 3:].set(0.0)  # 2 padding tokens
    for kind in PAPER_KINDS:
        graphdef, state = nnx.split(make_lrm(LRMConfig(kind=kind, latent_channels=16, text_dim=24, first_stride=2),
                                             rngs=nnx.Rngs(0)))

        @jax.jit
        def scores(state, z, text):
            m = nnx.merge(graphdef, state)
            frames = m(z.reshape(6, 1, *z.shape[2:]), jnp.repeat(text, 3, axis=0)).reshape(2, 3)
            padded = jnp.concatenate([text, jnp.zeros((2, 4, 24))], axis=1)
            return dict(score=m(z, text), reversed=m(z[:, ::-1], text), frames=frames, padded=m(z, padded),
                        other_text=m(z, text.at[:, :3].multiply(-1.0)))

        s = scores(state, z, text)
        np.testing.assert_allclose(s["score"], s["reversed"], rtol=1e-5)  # frames scored independently ...
        np.testing.assert_allclose(s["score"], s["frames"].mean(axis=1), rtol=1e-5, atol=1e-6)  # ... and averaged
        # Padding tokens are masked (more padding, same score); the real tokens change the text model's score.
        np.testing.assert_allclose(s["score"], s["padded"], rtol=1e-5, atol=1e-6)
        if kind == "paper_text":
            assert float(jnp.max(jnp.abs(s["other_text"] - s["score"]))) > 1e-4
        else:
            np.testing.assert_allclose(s["other_text"], s["score"], rtol=1e-6)
