"""Two processes with jax.distributed on CPU run the real train loop together and match one process.

The same teacher run (3 steps on a small random latents dataset, FSDP over 4 devices) is started once as a
single process with 4 virtual devices and once as 2 processes x 2 devices that find each other through
DOLLAR_COORDINATOR. Every host reads only its rows of each global batch, host 0 alone writes metrics, and
both write their checkpoint shards; the losses of every step must agree.
"""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from dollar_jax.data import arrays_dataset
from dollar_jax.data.latents import latent_spec, save_null_text

pytestmark = pytest.mark.slow
ROOT = os.path.join(os.path.dirname(__file__), "..")
STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mp_data"))
    rng = np.random.default_rng(0)
    latent_shape, text_shape = (4, 8, 8, 16), (8, 32)  # the quick world model's input shapes

    def examples(n):
        for i in range(n):
            yield {"latents": rng.standard_normal(latent_shape).astype(np.float32),
                   "text": rng.standard_normal(text_shape).astype(np.float32), "caption": f"clip {i}"}

    save_null_text(root, "latents", np.zeros(text_shape, np.float32))
    arrays_dataset.write(root, "latents", latent_spec(latent_shape, text_shape),
                         {"train": lambda: examples(64), "validation": lambda: examples(8)})
    return root


def _run(workdir, data_dir, processes: int, devices_per_process: int):
    args = [sys.executable, "-m", "dollar_jax.main", "--config=configs/world_teacher.py:quick", f"--workdir={workdir}",
            "--config.embedded_world=False", f"--config.data.dir={data_dir}", "--config.data.latents=latents",
            f"--config.teacher.steps={STEPS}", "--config.teacher.batch_size=8", "--config.log_every_steps=1",
            "--config.sampling.every_steps=0", f"--config.checkpoint.every_steps={STEPS}",
            "--config.checkpoint.asynchronous=False", "--config.mesh.fsdp=-1"]
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices_per_process}")
    port = _free_port()
    procs = []
    for pid in range(processes):
        if processes > 1:
            env = dict(env, DOLLAR_COORDINATOR=f"localhost:{port}", DOLLAR_NUM_PROCESSES=str(processes),
                       DOLLAR_PROCESS_ID=str(pid))
        procs.append(subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True))
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    return outputs


def _losses(workdir):
    with open(os.path.join(workdir, "runs", "teacher", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_two_processes_match_one(data_dir, tmp_path):
    single, multi = str(tmp_path / "single"), str(tmp_path / "multi")
    _run(single, data_dir, processes=1, devices_per_process=4)
    outputs = _run(multi, data_dir, processes=2, devices_per_process=2)
    for pid, out in enumerate(outputs):  # they really formed one 4-device runtime
        assert f"process {pid} of 2: 2 local / 4 global devices" in out, out[-2000:]
    want, got = _losses(single), _losses(multi)
    assert sorted(want) == sorted(got) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(want)], rtol=2e-4)
    # Both runs saved the final step; the multi-process checkpoint holds every host's shards.
    for run in (single, multi):
        assert str(STEPS) in os.listdir(os.path.join(run, "runs", "teacher", "checkpoints"))
        assert os.path.exists(os.path.join(run, "teacher", "config.json"))  # the exported model folder
    # The exported teachers (every host wrote its shards, host 0 the folder) hold the same weights.
    from flax import nnx

    from dollar_jax.checkpoint import load_dit

    a, b = (nnx.to_pure_dict(nnx.state(load_dit(os.path.join(r, "teacher")), nnx.Param)) for r in (single, multi))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-6)
