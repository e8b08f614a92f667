"""Stages side by side in processes (dollar_jax/jobs/side_by_side.py): results, failures and preemption.

The stages here are plain functions (module-level, so that the spawned processes can import them). The demo's own
side-by-side bookkeeping runs here on a function of dollar_jax/jobs/demo.py; tests/test_demo.py checks the stages
the demo hands to side_by_side.run and runs the quick demo's stages in one process (the same numbers, less CPU)."""

import json
import os
import signal
import threading
import time

import pytest

from dollar_jax.jobs import side_by_side
from dollar_jax.jobs.side_by_side import Stage
from dollar_jax.train.preemption import Preempted


def _square(x):
    return x * x, os.getpid()


def _fail(message, after=None):
    """Raises ValueError(message); with `after`, once that file exists (a stage beside it has started)."""
    deadline = time.time() + 60
    while after and not os.path.exists(after) and time.time() < deadline:
        time.sleep(0.05)
    raise ValueError(message)


def _train_until_sigterm(folder, name, step):
    """A stand-in for a training loop: on SIGTERM it 'saves' `step` and raises Preempted, as train() does."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(True))
    open(os.path.join(folder, f"{name}.started"), "w").close()
    deadline = time.time() + 60
    while not stop and time.time() < deadline:
        time.sleep(0.05)
    if not stop:
        raise TimeoutError(f"{name} was never told to stop")
    open(os.path.join(folder, f"{name}.saved"), "w").write(str(step))
    raise Preempted(step)


def test_results_come_back_each_from_its_own_process():
    out = side_by_side.run([Stage(f"s{i}", _square, (i,)) for i in range(3)], max_running=2)
    assert {name: value for name, ((value, _), _) in out.items()} == {"s0": 0, "s1": 1, "s2": 4}
    pids = {pid for (_, pid), _ in out.values()}
    assert len(pids) == 3 and os.getpid() not in pids
    assert all(seconds >= 0 for _, seconds in out.values())


def test_a_failing_stage_stops_the_others_and_its_error_is_raised_here(tmp_path):
    folder = str(tmp_path)
    stages = [Stage("trainer", _train_until_sigterm, (folder, "trainer", 7)),
              # It fails once the trainer is training: before its SIGTERM handler a stage just ends, with
              # nothing to save; the point here is that a running one is told to stop and saves.
              Stage("broken", _fail, ("config.distill.steps must be positive",
                                      os.path.join(folder, "trainer.started")))]
    with pytest.raises(ValueError, match="config.distill.steps must be positive"):
        side_by_side.run(stages, max_running=2)
    # The running trainer was told to stop and saved its step (nothing it had is lost).
    assert open(os.path.join(folder, "trainer.saved")).read() == "7"


def test_sigterm_reaches_every_stage_and_the_group_is_preempted(tmp_path):
    folder = str(tmp_path)
    stages = [Stage(f"t{i}", _train_until_sigterm, (folder, f"t{i}", 10 + i)) for i in range(2)]
    stages.append(Stage("later", _square, (3,)))  # waits for a free slot: never started once preempted

    def preempt_when_started():
        deadline = time.time() + 120
        while time.time() < deadline and not all(os.path.exists(os.path.join(folder, f"t{i}.started"))
                                                  for i in range(2)):
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    before = signal.getsignal(signal.SIGTERM)
    threading.Thread(target=preempt_when_started, daemon=True).start()
    with pytest.raises(Preempted) as e:
        side_by_side.run(stages, max_running=2)
    assert e.value.step == 10  # the earliest step saved: a restart resumes every stage from its own checkpoint
    assert sorted(f for f in os.listdir(folder) if f.endswith(".saved")) == ["t0.saved", "t1.saved"]
    assert signal.getsignal(signal.SIGTERM) == before  # the parent's own handler is back


def test_the_demos_stages_side_by_side_time_each_and_skip_finished_ones(tmp_path, capsys):
    """demo.Stages.run_side_by_side, the path of config.demo.side_by_side > 1: stages that are not done run in
    processes of their own (here a function of the demo module itself, as the students' stages are), each one's
    time and its neighbours go to demo_timings.json, and a finished stage is announced and not run."""
    from dollar_jax.jobs import demo

    stages = demo.Stages(str(tmp_path), ["a", "done", "b", "report"])
    out = stages.run_side_by_side([("a", Stage("a", demo.speed_repeats, (21, 2))), ("done", None),
                                   ("b", Stage("b", _square, (3,)))], max_running=2, compilation_cache=("", ""))
    assert out["a"] == 10 and out["b"][0] == 9 and out["b"][1] != os.getpid() and out["done"] is None
    printed = capsys.readouterr().out
    assert "stage 1/4: a (side by side)" in printed and "stage 2/4: done (already done)" in printed
    timings = json.load(open(tmp_path / "demo_timings.json"))
    assert timings["a"]["beside"] == ["b"] and timings["b"]["beside"] == ["a"] and "done" not in timings
    assert timings["a + b"]["side_by_side"] == ["a", "b"] and timings["a + b"]["seconds"] >= timings["a"]["seconds"]
