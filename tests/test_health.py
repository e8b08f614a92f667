"""Training health: alarms fire on collapsed, static, saturated and drifting samples and stay quiet on data."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dollar_jax.config import base_config
from dollar_jax.data import world
from dollar_jax.data.pipeline import train_dataset
from dollar_jax.losses.vsd import vsd_loss
from dollar_jax.diffusion.schedules import make_schedule
from dollar_jax.train.health import ALARMS, health_metrics, warn_on_alarms

HEALTH = base_config().health
metrics = jax.jit(health_metrics, static_argnums=(2, 3))


def _world_clips(seed: int, count: int = 16) -> np.ndarray:
    """Real clips of the embedded world as [-1, 1] floats [B, F, H, W, 3] (pixel space: health statistics
    are defined on any [B, F, H, W, C] array)."""
    clips = [e["video"] for e in world.generate(seed, count, world.WorldConfig(height=16, width=16))]
    return np.stack(clips).astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def clips():
    return _world_clips(0), _world_clips(1)


class _Health:
    """Hashable stand-in for config.health (static argument of the jitted metrics)."""

    def __init__(self, section):
        self.__dict__.update(section.to_dict())

    def __hash__(self):
        return hash(tuple(sorted(self.__dict__.items())))

    def __eq__(self, other):
        return self.__dict__ == other.__dict__


H = _Health(HEALTH)


def _alarms(samples, data, group_size=1) -> set:
    m = metrics(jnp.asarray(samples), jnp.asarray(data), H, group_size)
    return {a for a in ALARMS if float(m[a]) == 1.0}


def test_quiet_on_data_and_each_alarm_fires_on_its_failure(clips):
    data, other = clips
    assert _alarms(other, data) == set()  # other real clips look like data
    assert _alarms(other, data, group_size=4) == set()
    rng = np.random.default_rng(0)
    collapsed = np.broadcast_to(other[:1], other.shape) + 0.01 * rng.standard_normal(other.shape)
    assert "alarm_collapse" in _alarms(collapsed, data)
    static = np.broadcast_to(other[:, :1], other.shape)
    assert _alarms(static, data) == {"alarm_static"}
    mean = data.mean(axis=(0, 1, 2, 3))
    saturated = mean + 5.0 * (other - mean)  # same mean, blown-up contrast
    assert "alarm_saturation" in _alarms(saturated, data)
    assert "alarm_mean_drift" not in _alarms(saturated, data)
    drifted = other + data.std(axis=(0, 1, 2, 3))  # one data std brighter in every channel
    assert "alarm_mean_drift" in _alarms(drifted, data)
    assert not {"alarm_collapse", "alarm_static"} & _alarms(drifted, data)


def test_within_prompt_collapse_is_seen_only_with_repeated_captions(clips):
    data, other = clips
    # Four prompts, each with one sample repeated: the batch still varies across prompts.
    one_per_prompt = np.repeat(other[::4], 4, axis=0)
    assert _alarms(one_per_prompt, data, group_size=1) == set()
    assert _alarms(one_per_prompt, data, group_size=4) == {"alarm_collapse"}
    m = metrics(jnp.asarray(one_per_prompt), jnp.asarray(data), H, 4)
    assert float(m["sample_diversity_within"]) == 0.0 and float(m["sample_diversity"]) > 0.1


def test_warnings_name_the_alarm_and_its_numbers(caplog):
    means = {"alarm_static": 0.75, "alarm_collapse": 0.25, "sample_motion": 0.001, "data_motion": 0.2}
    with caplog.at_level(logging.WARNING):
        raised = warn_on_alarms(40, means, HEALTH)
    assert raised == ["alarm_static"]  # collapse was raised on too few steps of the window
    assert "step 40: alarm_static: samples are static (motion 0.001; data 0.2)" in caplog.text
    assert "alarm_collapse" not in caplog.text


def test_repeated_captions_fill_consecutive_rows():
    source = [{"latents": np.full((2,), i, np.float32), "caption": f"caption {i}".encode()} for i in range(10)]
    batches = iter(train_dataset(source, 8, seed=0, repeat_rows=4))
    for _ in range(3):
        b = next(batches)
        assert b["latents"].shape == (8, 2)
        groups = b["latents"][:, 0].reshape(2, 4)
        assert (groups == groups[:, :1]).all() and groups[0, 0] != groups[1, 0]
        assert list(b["caption"][:4]) == [b["caption"][0]] * 4
    with pytest.raises(ValueError, match="divisible"):
        train_dataset(source, 8, seed=0, repeat_rows=3)


def test_vsd_reports_its_normaliser_and_the_denoisers_predictions():
    schedule = make_schedule("vp")
    x = jax.random.normal(jax.random.key(0), (2, 2, 4, 4, 3))
    real = lambda x_t, t: (jnp.full_like(x_t, 0.5), x_t)
    fake = lambda x_t, t: (jnp.full_like(x_t, -0.25), x_t)
    _, aux = jax.jit(lambda x, key: vsd_loss(x, real, fake, key, schedule, 20.0, 980.0))(x, jax.random.key(1))
    np.testing.assert_allclose(aux["vsd_normaliser"], jnp.mean(jnp.abs(x - 0.5)), rtol=1e-6)
    np.testing.assert_allclose(aux["vsd_real_fake_gap"], 0.75, rtol=1e-6)
    assert float(aux["x0_real_mean"]) == 0.5 and float(aux["x0_fake_mean"]) == -0.25
    assert float(aux["x0_real_std"]) == 0.0


@pytest.mark.slow
def test_quiet_on_world_latents_and_in_the_distillation_metrics(world_run, distill_run):
    """On the session's world: real latents raise no alarm, and the DOLLAR step logs every health metric
    with repeated captions."""
    from dollar_jax.data import arrays_dataset
    from dollar_jax.data.pipeline import eval_batches
    from dollar_jax.paths import Paths
    from dollar_jax.train.metrics import read_metrics

    config, workdir = world_run
    source = arrays_dataset.open_split(Paths.of(config, workdir).data, config.data.latents, "validation")
    latents = next(iter(eval_batches(source, 64, 64)))["latents"]
    assert _alarms(latents[32:], latents[:32]) == set()
    assert _alarms(latents[32:], latents[:32], group_size=4) == set()

    c, _, run = distill_run  # test_distill.py's run (captions in groups of 4), trained once for the session
    rows = [r for r in read_metrics(run) if "loss_generator" in r]
    assert len(rows) == c.distill.steps
    for key in (*ALARMS, "sample_diversity_within", "sample_saturation", "sample_mean_drift", "vsd_normaliser",
                "x0_real_mean", "x0_fake_std"):
        assert all(key in row and np.isfinite(row[key]) for row in rows), key


def test_report_tabulates_the_share_of_steps_alarmed(tmp_path):
    import json

    from dollar_jax.eval.report import health_section

    rows = [dict(step=s, alarm_collapse=float(s > 6), alarm_static=0.0, alarm_saturation=0.5, alarm_mean_drift=0.0,
                 sample_diversity=0.1, data_diversity=0.4, sample_motion=0.2, data_motion=0.2) for s in range(1, 9)]
    (tmp_path / "vsd").mkdir()
    with open(tmp_path / "vsd" / "metrics.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    lines = health_section({"teacher": str(tmp_path / "teacher"), "VSD": str(tmp_path / "vsd")})
    assert "| VSD | 0.25 / 1.00 | 0.00 / 0.00 | 0.50 / 0.50 | 0.00 / 0.00 | 0.25 | 1.00 |" in lines
    assert not any(line.startswith("| teacher") for line in lines)


@pytest.mark.slow  # tracing the whole step: 288 s on 2 cores at load ~38 (not measured on an idle machine)
def test_the_distillation_step_reports_health_and_vsd_statistics():
    """Traced abstractly (nothing compiled or allocated): the step of the local Wan config with the paper's
    text LRM and repeated captions outputs every health metric and alarm."""

    from dollar_jax.config import config_from_file, dit_config
    from dollar_jax.parallel import make_mesh
    from dollar_jax.train.planner import abstract_distill_step

    config = config_from_file("configs/wan21_distill.py:local,reward")
    config.distill.update(dict(batch_size=4, repeat_captions=4, fake_updates=1))
    mesh = make_mesh(dict(data=1, fsdp=1, context=1, tensor=1))
    with jax.set_mesh(mesh):
        planned = abstract_distill_step(config, dit_config(config), mesh)
        _, out = jax.eval_shape(planned.step.train_step, planned.state, planned.frozen, planned.batch)
    for key in (*ALARMS, "sample_diversity", "sample_diversity_within", "sample_motion", "sample_saturation",
                "data_saturation", "sample_mean_drift", "vsd_normaliser", "vsd_real_fake_gap", "x0_real_mean",
                "x0_real_std", "x0_fake_mean", "x0_fake_std", "loss_lrm", "loss_ft"):
        assert key in out and out[key].shape == (), key
    assert sum(a.size for a in jax.tree.leaves(planned.state.params["lrm"])) == 763_009
