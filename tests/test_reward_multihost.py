"""Latent reward fine-tuning across 2 jax.distributed processes on CPU: each host labels its own rows and
keeps its labeller window; the checkpoint holds both windows (the host item's process axis), and a resume
replays the same steps exactly.

The session's trained world is only a working prerequisite (its data, autoencoder and teacher are read, never
written): what is tested is the multi-host bookkeeping, not quality (tests/test_demo.py's
LRM-raises-the-reward test and tests/test_reward_finetune.py's LRM fit cover that)."""

import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from processes import run as run_processes
from processes import train_step_entries

from dollar_jax.train.flops import is_throughput_metric
from dollar_jax.train.metrics import read_metrics

pytestmark = pytest.mark.slow


def _rows(run_dir):
    return [{k: v for k, v in r.items() if not is_throughput_metric(k)} for r in read_metrics(run_dir)
            if "loss_generator" in r]


def test_two_hosts_label_their_own_rows_checkpoint_and_resume_exactly(world_run, tmp_path):
    (config, _), run = world_run, str(tmp_path / "run")
    args = [sys.executable, "-m", "dollar_jax.main", "--config=configs/world_distill.py:quick", f"--workdir={run}",
            "--config.embedded_world=False", f"--config.data.dir={config.data.dir}",
            f"--config.autoencoder.dir={config.autoencoder.dir}", f"--config.distill.teacher={config.teacher.dir}",
            "--config.distill.steps=6", "--config.distill.batch_size=8", "--config.distill.fake_updates=1",
            "--config.reward.enabled=True", "--config.reward.name=colourfulness", "--config.reward.lrm_batch_size=8",
            "--config.reward.label_lag=2", "--config.log_every_steps=1", "--config.checkpoint.every_steps=2",
            "--config.checkpoint.keep=5", "--config.sampling.every_steps=0", "--config.mesh.fsdp=-1",
            "--config.tensorboard=False", "--config.step_compile=light",
            # The reward alone (no VSD, no CD): the bookkeeping under test is the labeller's and the LRM's, and the
            # step without the DOLLAR terms compiles in half the time (17 s against 32 s per process, quiet).
            "--config.distill.vsd_weight=0", "--config.distill.cd_weight=0"]
    run_processes(args, processes=2, devices_per_process=2)
    cache = os.path.join(run, "compilation_cache")  # the default: in the workdir, one entry per process
    entries = train_step_entries(cache)
    assert len(entries) == 2, entries
    run_dir = os.path.join(run, "runs", "student")
    rows = _rows(run_dir)
    assert [r["lrm_active"] for r in rows] == [0, 0, 1, 1, 1, 1]  # lag 2: step 3 trains on step 1's labels

    host = os.path.join(run_dir, "checkpoints", "4", "host")
    saved = ocp.StandardCheckpointer().metadata(host).item_metadata.tree
    assert saved["latents"].shape[:2] == (2, 4)  # [host, live steps 1-4, ...]
    arrays = ocp.StandardCheckpointer().restore(host, jax.tree.map(lambda m: np.zeros(m.shape, m.dtype), saved))
    np.testing.assert_array_equal(arrays["steps"], [[1, 2, 3, 4], [1, 2, 3, 4]])
    assert not np.array_equal(arrays["latents"][0], arrays["latents"][1])  # each host its own rows

    # Resume from step 4 (with both windows): steps 5 and 6 must come out the same.
    shutil.rmtree(os.path.join(run_dir, "checkpoints", "6"))
    shutil.rmtree(os.path.join(run, "student"))  # the exported model: with it the job counts as done
    outputs = run_processes(args, processes=2, devices_per_process=2)
    assert "resumed from step 4" in outputs[0], outputs[0][-2000:]
    assert _rows(run_dir) == rows
    assert train_step_entries(cache) == entries  # both processes loaded the step instead of compiling it
