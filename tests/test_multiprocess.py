"""Two processes with jax.distributed on CPU run the real train loop together and match one process.

The same teacher run (3 steps on a small random latents dataset, FSDP over 4 devices) is started once as a
single process with 4 virtual devices and once as 2 processes x 2 devices that find each other through
DOLLAR_COORDINATOR. Every host reads only its rows of each global batch, host 0 alone writes metrics, and
both write their checkpoint shards; the losses of every step must agree.
"""

import json
import os

import jax
import numpy as np
import pytest
from processes import run as run_processes, teacher_args, write_random_latents

pytestmark = pytest.mark.slow
STEPS = 3


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_random_latents(str(tmp_path_factory.mktemp("mp_data")))


def _run(workdir, data_dir, processes: int, devices_per_process: int):
    args = teacher_args(workdir, data_dir, STEPS, f"--config.checkpoint.every_steps={STEPS}",
                        "--config.checkpoint.asynchronous=False")
    return run_processes(args, processes, devices_per_process)


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
