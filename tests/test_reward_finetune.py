"""Latent reward fine-tuning on the session's trained world: the LRM's fit, and the bookkeeping at weight 0. That the
LRM raises the true reward is checked on the quick demo's students (tests/test_demo.py), which train that comparison
with the EMA and the optimiser state on the device; with them in host memory (distill_config's placement) the reward
path runs here only at weight 0, where no L_FT step exists."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from test_distill import distill_config

from dollar_jax.data import arrays_dataset
from dollar_jax.eval import world_eval
from dollar_jax.checkpoint import load_autoencoder
from dollar_jax.jobs import distill as distill_job
from dollar_jax.paths import Paths
from dollar_jax.losses.reward import lrm_regression_loss, pearson
from dollar_jax.models.reward_models import LatentRewardModel, LRMConfig
from dollar_jax.rewards import make_reward
from dollar_jax.train.flops import is_throughput_metric
from dollar_jax.train.loop import train
from dollar_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def reward_config(config, steps=4, repeat_captions=4, **reward):
    """test_distill.py's run with the latent reward on."""
    c = distill_config(config, steps=steps, repeat_captions=repeat_captions)
    c.reward.update(dict(enabled=True, name="colourfulness", lrm_batch_size=8, label_lag=2))
    c.reward.update(reward)
    return c


def _labelled(config, workdir, split, count, reward):
    paths = Paths.of(config, workdir)
    source = arrays_dataset.open_split(paths.data, config.data.latents, split)
    examples = [source[i] for i in range(count)]
    z = np.stack([e["latents"] for e in examples])
    text = np.stack([e["text"] for e in examples])
    captions = [e["caption"].decode() for e in examples]
    videos = world_eval.decode(load_autoencoder(paths.autoencoder), z)
    return z, text, reward(videos, captions)


def test_lrm_fits_a_known_reward_on_held_out_latents(world_run):
    config, workdir = world_run
    reward = make_reward("colourfulness")
    z, text, scores = _labelled(config, workdir, "train", 1024, reward)
    vz, vtext, vscores = _labelled(config, workdir, "validation", 128, reward)
    model = LatentRewardModel(LRMConfig(kind="frame", latent_channels=z.shape[-1]), rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(model)
    tx = optax.adam(1e-3)
    opt = tx.init(params)

    @jax.jit
    def step(params, opt, z, t, s):
        def loss_fn(p):
            return lrm_regression_loss(nnx.merge(graphdef, p), z, t, s, jnp.ones_like(s))[0]

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt = tx.update(grads, opt, params)
        return optax.apply_updates(params, updates), opt, loss

    for i in range(400):
        idx = np.random.default_rng(i).integers(0, len(z), 64)
        params, opt, _ = step(params, opt, z[idx], text[idx], scores[idx])
    predictions = nnx.merge(graphdef, params)(vz, vtext)
    assert float(pearson(predictions, jnp.asarray(vscores))) >= 0.9


def _rows(run_dir):
    # Wall-clock throughput (TFLOP/s, MFU) differs between runs; everything else must not.
    return [{k: v for k, v in r.items() if not is_throughput_metric(k)} for r in read_metrics(run_dir)
            if "loss_generator" in r]


def test_zero_weight_non_differentiable_reward_leaves_distillation_unchanged_and_resumes_exactly(world_run, distill_run,
                                                                                                    tmp_path):
    # A non-differentiable reward (JPEG size) is labelled on the host and learned by the LRM; at weight 0 no L_FT
    # step exists, and the student must come out bit for bit as without the reward (the LRM and the labeller
    # draw from streams of their own). L_FT at weight 1 is exercised by the quick demo's VSD+CD+LRM student
    # (tests/test_demo.py) and, with an exact two-host resume, by tests/test_reward_multihost.py.
    config, workdir = world_run
    plain, _, shared = distill_run  # test_distill.py's run, trained once for the session
    with_lrm = reward_config(config, steps=plain.distill.steps, weight=0.0, name="jpeg_compressibility")
    run_plain, run_lrm = str(tmp_path / "plain"), str(tmp_path / "lrm")
    shutil.copytree(shared, run_plain)
    s_plain = train(distill_job.make_job(plain, workdir), plain, run_plain)  # finished: its last checkpoint
    s_lrm = train(distill_job.make_job(with_lrm, workdir), with_lrm, run_lrm)
    for a, b in zip(jax.tree.leaves(s_plain.params["student"]), jax.tree.leaves(s_lrm.params["student"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    rows_plain, rows = _rows(run_plain), _rows(run_lrm)
    for key in ("loss_generator", "loss_fake", "grad_norm_student"):
        assert [r[key] for r in rows_plain] == [r[key] for r in rows]
    assert [r["lrm_active"] for r in rows] == [0, 0, 1, 1, 1, 1]  # lag 2: step 3 trains on step 1's labels
    assert all(np.isfinite(r["loss_lrm"]) for r in rows)
    # The labeller's labelled latents are part of the checkpoint: resuming from step 4 replays exactly.
    shutil.rmtree(os.path.join(run_lrm, "checkpoints", "6"))
    train(distill_job.make_job(with_lrm, workdir), with_lrm, run_lrm)
    assert _rows(run_lrm) == rows
