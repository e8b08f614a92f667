"""Helpers for tests that start dollar_jax.main in subprocesses (one or several jax.distributed processes)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
from cpu_flags import cpu_test_env

from dollar_jax.data import arrays_dataset
from dollar_jax.data.latents import latent_spec, save_null_text
from dollar_jax.train.flops import is_throughput_metric

ROOT = os.path.join(os.path.dirname(__file__), "..")
LATENT_SHAPE, TEXT_SHAPE = (4, 8, 8, 16), (8, 32)  # the quick world model's input shapes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def write_random_latents(root: str, train: int = 64) -> str:
    """A small latents dataset of random clips at `root` (dataset name "latents")."""
    rng = np.random.default_rng(0)

    def examples(n):
        for i in range(n):
            yield {"latents": rng.standard_normal(LATENT_SHAPE).astype(np.float32),
                   "text": rng.standard_normal(TEXT_SHAPE).astype(np.float32), "caption": f"clip {i}"}

    save_null_text(root, "latents", np.zeros(TEXT_SHAPE, np.float32))
    arrays_dataset.write(root, "latents", latent_spec(LATENT_SHAPE, TEXT_SHAPE),
                         {"train": lambda: examples(train), "validation": lambda: examples(8)})
    return root


def teacher_args(workdir: str, data_dir: str, steps: int, *extra: str) -> list[str]:
    """dollar_jax.main on the quick world teacher, reading `data_dir`'s random latents; metrics.jsonl only."""
    return [sys.executable, "-m", "dollar_jax.main", "--config=configs/world_teacher.py:quick",
            f"--workdir={workdir}", "--config.embedded_world=False", f"--config.data.dir={data_dir}",
            "--config.data.latents=latents", f"--config.teacher.steps={steps}", "--config.teacher.batch_size=8",
            "--config.log_every_steps=1", "--config.sampling.every_steps=0", "--config.mesh.fsdp=-1",
            "--config.tensorboard=False",  # no TensorFlow import: 7 s less per process start
            "--config.step_compile=light", *extra]  # a few steps: compiling dominates


def start(args: list[str], processes: int, devices_per_process: int, **env) -> list[subprocess.Popen]:
    """Start `args` as `processes` jax.distributed processes (or one plain process), CPU devices only."""
    base = dict(os.environ, **cpu_test_env(devices_per_process), **env)
    port = free_port()
    procs = []
    for pid in range(processes):
        e = dict(base)
        if processes > 1:
            e.update(DOLLAR_COORDINATOR=f"localhost:{port}", DOLLAR_NUM_PROCESSES=str(processes),
                     DOLLAR_PROCESS_ID=str(pid))
        # Own process group: a test can signal a process without reaching pytest.
        procs.append(subprocess.Popen(args, cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                      text=True, start_new_session=True))
    return procs


def finish(procs: list[subprocess.Popen], expect: int | None = 0, timeout: float = 1800) -> list[str]:
    """Wait for every process; assert each exit status is `expect` (None: any). Returns their outputs.
    On a timeout every process is killed (none is left running after the test)."""
    try:
        outputs = [p.communicate(timeout=timeout)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
        raise
    if expect is not None:
        for p, out in zip(procs, outputs):
            assert p.returncode == expect, f"exit status {p.returncode}:\n{out[-3000:]}"
    return outputs


def run(args, processes=1, devices_per_process=4, expect=0, **env) -> list[str]:
    return finish(start(args, processes, devices_per_process, **env), expect)


def metric_rows(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def wait_for(condition, procs, timeout: float = 1200, what: str = "") -> None:
    """Poll `condition()` until true; fail (killing `procs`) on timeout or if a process ends first."""
    deadline = time.time() + timeout
    while not condition():
        for p in procs:
            if p.poll() is not None:
                raise AssertionError(f"process ended (status {p.returncode}) before {what}:\n"
                                     f"{p.communicate()[0][-3000:]}")
        if time.time() > deadline:
            for p in procs:
                os.killpg(p.pid, signal.SIGKILL)
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def losses(workdir) -> list[dict]:
    """Every per-step teacher training metric row, without wall-clock ones (they differ between runs)."""
    rows = metric_rows(os.path.join(workdir, "runs", "teacher"))
    return [{k: v for k, v in r.items() if not is_throughput_metric(k)} for r in rows if "loss" in r]


def last_logged_step(workdir) -> int:
    rows = losses(workdir)
    return rows[-1]["step"] if rows else 0


def checkpoint_steps(workdir) -> list[int]:
    d = os.path.join(workdir, "runs", "teacher", "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def train_step_entries(cache: str) -> list[str]:
    """The train step's entries in a compilation-cache folder (one per process on CPU: compilation_cache.py)."""
    return sorted(n for n in os.listdir(cache) if n.startswith("jit_train_step-"))


def teacher_weights(workdir) -> list[np.ndarray]:
    from flax import nnx

    from dollar_jax.checkpoint import load_dit

    return [np.asarray(x) for x in jax.tree.leaves(nnx.state(load_dit(os.path.join(workdir, "teacher")), nnx.Param))]


def assert_same_run(a, b):
    assert losses(a) == losses(b)  # exact float equality of every logged metric, every step
    for x, y in zip(teacher_weights(a), teacher_weights(b), strict=True):
        np.testing.assert_array_equal(x, y)
