"""launch/tpu_pod.py and launch/gpu.py: the commands their dry runs print, input errors, and the local
multi-process runner (with a stand-in interpreter). No gcloud, ssh or JAX needed."""

import os
import shlex
import stat
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "launch", "tpu_pod.py")
GPU = os.path.join(ROOT, "launch", "gpu.py")
CONFIG = "configs/wan21_distill.py:1.3b"


@pytest.fixture
def fake_bin(tmp_path):
    """A PATH where gcloud/ssh/git/tar/bash only leave a mark: a dry run must not call any of them."""
    d = tmp_path / "bin"
    d.mkdir()
    for name in ("gcloud", "ssh", "git", "tar", "bash", "sh"):
        f = d / name
        f.write_text(f"#!/bin/sh\necho {name} >> {tmp_path / 'called'}\n")
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return tmp_path


def launch(script, *args, path_dir=None, env=None):
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if path_dir is not None:
        e["PATH"] = str(path_dir / "bin")
    e.update(env or {})
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=e, timeout=60,
                          check=False)


def with_dry_run(args) -> list[str]:
    """args with --dry_run before any '--' (what follows '--' goes to the program)."""
    args = list(args)
    i = args.index("--") if "--" in args else len(args)
    return args[:i] + ["--dry_run"] + args[i:]


def dry(script, *args, **kw) -> list[list[str]]:
    """argv of every printed command (each line must survive shlex.split)."""
    r = launch(script, *with_dry_run(args), **kw)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    assert lines and all(line.startswith("+ ") for line in lines), r.stdout
    return [shlex.split(line[2:]) for line in lines]


def fails(script, *args, match: str):
    r = launch(script, *with_dry_run(args))
    assert r.returncode != 0
    assert match in r.stderr, r.stderr
    assert "+ " not in r.stdout


def option(argv, name):
    return argv[argv.index(name) + 1]


def bash_syntax_ok(script: str):
    r = subprocess.run(["bash", "-n", "-c", script], capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr


TPU_ARGS = ("--name", "dollar", "--zone", "us-east5-a")


# ---- TPU ---------------------------------------------------------------------------------------------------
def test_tpu_create_delete_logs(fake_bin):
    (create,) = dry(TPU, "create", *TPU_ARGS, "--accelerator", "v5p-32", "--version", "tpu-ubuntu2204-base",
                    "--project", "proj", "--spot", path_dir=fake_bin)
    assert create[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "dollar"]
    assert {"--zone=us-east5-a", "--accelerator-type=v5p-32", "--version=tpu-ubuntu2204-base", "--project=proj",
            "--spot"} <= set(create)
    (delete,) = dry(TPU, "delete", *TPU_ARGS, path_dir=fake_bin)
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "dollar"] and "--quiet" in delete
    assert "--zone=us-east5-a" in delete
    (logs,) = dry(TPU, "logs", *TPU_ARGS, path_dir=fake_bin)
    assert logs[4] == "ssh" and "--worker=0" in logs and option(logs, "--command") == "tail -n 200 -f ~/dollar.log"
    (stop,) = dry(TPU, "stop", *TPU_ARGS, path_dir=fake_bin)
    assert "--worker=all" in stop and "pkill -INT" in option(stop, "--command")
    assert not (fake_bin / "called").exists()


def test_tpu_setup_copies_to_every_worker(fake_bin):
    pack, scp, ssh = dry(TPU, "setup", *TPU_ARGS, path_dir=fake_bin)
    assert pack[:4] == ["git", "-C", ROOT, "ls-files"] and "tar" in pack
    tarball = pack[-1]
    assert tarball.endswith(".tar.gz") and os.path.isabs(tarball)
    assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
    assert scp[5] == tarball and scp[6] == "dollar:dollar-jax.tar.gz" and "--worker=all" in scp
    assert ssh[4:6] == ["ssh", "dollar"] and "--worker=all" in ssh
    script = option(ssh, "--command")
    assert "tar -xzf ~/dollar-jax.tar.gz -C ~/dollar-jax" in script
    assert 'pip install -U "jax[tpu]" -e ~/dollar-jax' in script
    bash_syntax_ok(script)
    assert not (fake_bin / "called").exists()


def test_tpu_run_same_command_on_all_workers(fake_bin):
    (ssh,) = dry(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "gs://bucket/run", "--env", "A=1",
                 "--env", "LIBTPU_INIT_ARGS=--xla_tpu_x=true", "--", "--config.distill.steps=10", path_dir=fake_bin)
    assert ssh[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "dollar"]
    assert "--worker=all" in ssh and "--zone=us-east5-a" in ssh
    script = option(ssh, "--command")
    bash_syntax_ok(script)
    prog = f"python -m dollar_jax.main --config={CONFIG} --workdir=gs://bucket/run --config.distill.steps=10"
    assert f"A=1 LIBTPU_INIT_ARGS=--xla_tpu_x=true nohup {prog} > ~/dollar.log 2>&1" in script
    assert script.startswith("cd ~/dollar-jax && . ~/dollar-venv/bin/activate && ")
    assert "DOLLAR_PROCESS_ID" not in script  # the TPU runtime gives each worker its id
    assert not (fake_bin / "called").exists()


def test_tpu_run_round_trips_spaces(fake_bin):
    (ssh,) = dry(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/mnt/my run", "--env", "XLA_FLAGS=--a --b",
                 "--", "--config.distill.name=with space", "--config.x=it's", path_dir=fake_bin)
    words = shlex.split(option(ssh, "--command"))  # what the worker's shell sees
    assert "XLA_FLAGS=--a --b" in words
    assert words[words.index("nohup") + 1:words.index(">")] == [
        "python", "-m", "dollar_jax.main", f"--config={CONFIG}", "--workdir=/mnt/my run",
        "--config.distill.name=with space", "--config.x=it's"]


def test_tpu_invalid_input(fake_bin):
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, match="--workdir")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--env", "NOEQUALS", match="KEY=VALUE")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--env", "1X=2", match="not a valid")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--env", "DOLLAR_PROCESS_ID=0",
          match="runtime provides")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--config.a=1", match="after '--'")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--", "positional", match="not a flag")
    fails(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/w", "--", "--workdir=/x", match="--workdir")
    fails(TPU, "create", "--name", "Bad_Name", "--zone", "z", match="--name")
    fails(TPU, "create", *TPU_ARGS, "--accelerator", "h100", match="--accelerator")
    fails(TPU, "delete", "--zone", "z", match="--name")
    fails(TPU, "logs", *TPU_ARGS, "--worker", "x", match="--worker")
    # --dry_run after '--' would run for real and hand the flag to the program
    r = launch(TPU, "delete", *TPU_ARGS, "--", "--dry_run", path_dir=fake_bin)
    assert r.returncode != 0 and "'--'" in r.stderr and not r.stdout
    assert not (fake_bin / "called").exists()


def test_tpu_gs_workdir_is_used_as_is_and_a_gcsfuse_mount_warns(fake_bin):
    r = launch(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "gs://b/run", "--dry_run", path_dir=fake_bin)
    assert r.returncode == 0 and "warning" not in r.stderr and "--workdir=gs://b/run" in r.stdout
    r = launch(TPU, "run", *TPU_ARGS, "--config", CONFIG, "--workdir", "/gcs/b/run", "--dry_run", path_dir=fake_bin)
    assert r.returncode == 0 and "warning" in r.stderr and "gs://BUCKET" in r.stderr


# ---- GPU ---------------------------------------------------------------------------------------------------
def test_gpu_single_host(fake_bin):
    (cmd,) = dry(GPU, "--config", CONFIG, "--workdir", "/w", "--gpus", "0,1,2,3", "--env", "NCCL_DEBUG=WARN",
                 "--", "--config.model.attention=cudnn", path_dir=fake_bin)
    assert cmd[:2] == ["NCCL_DEBUG=WARN", "CUDA_VISIBLE_DEVICES=0,1,2,3"]
    assert cmd[2] == sys.executable
    assert cmd[3:] == ["-m", "dollar_jax.main", f"--config={CONFIG}", "--workdir=/w", "--config.model.attention=cudnn"]
    (cmd,) = dry(GPU, "--config", CONFIG, "--workdir", "/w", path_dir=fake_bin)
    assert not any("CUDA_VISIBLE_DEVICES" in a for a in cmd)
    assert not (fake_bin / "called").exists()


def test_gpu_multi_host(fake_bin):
    hosts = ["gpu-a", "gpu-b", "10.0.0.7"]
    cmds = dry(GPU, "--hosts", ",".join(hosts), "--coordinator_port", "1234", "--ssh_user", "me", "--gpus", "0,1",
               "--config", CONFIG, "--workdir", "/shared/my run", "--", "--config.x=a b", path_dir=fake_bin)
    assert len(cmds) == len(hosts)
    progs = set()
    for i, (cmd, host) in enumerate(zip(cmds, hosts, strict=True)):
        assert cmd[:2] == ["ssh", f"me@{host}"] and len(cmd) == 3
        bash_syntax_ok(cmd[2])
        words = shlex.split(cmd[2])
        assert words[:3] == ["cd", "~/dollar-jax", "&&"]
        assert {"DOLLAR_COORDINATOR=gpu-a:1234", f"DOLLAR_NUM_PROCESSES={len(hosts)}", f"DOLLAR_PROCESS_ID={i}",
                "CUDA_VISIBLE_DEVICES=0,1"} <= set(words)
        progs.add(tuple(words[words.index("nohup") + 1:words.index(">")]))
        assert words[words.index(">") + 1] == f"~/dollar-process{i}.log"
    assert progs == {("python", "-m", "dollar_jax.main", f"--config={CONFIG}", "--workdir=/shared/my run",
                      "--config.x=a b")}
    cmds = dry(GPU, "--hosts", "a,b", "--coordinator_host", "10.1.1.1", "--remote_dir", "~/my dir", "--python",
               "~/venv/bin/python", "--config", CONFIG, "--workdir", "/w", path_dir=fake_bin)
    assert [c[1] for c in cmds] == ["a", "b"]
    assert all("DOLLAR_COORDINATOR=10.1.1.1:12355" in c[2] for c in cmds)
    assert cmds[0][2].startswith("cd ~/'my dir' && ") and " nohup ~/venv/bin/python -m dollar_jax.main" in cmds[0][2]
    assert not (fake_bin / "called").exists()


def test_gpu_local_processes_on_cpu(fake_bin):
    cmds = dry(GPU, "--local_processes", "2", "--cpu_devices_per_process", "4", "--config", CONFIG, "--workdir",
               "/w", path_dir=fake_bin, env={"XLA_FLAGS": "--xla_force_host_platform_device_count=8 --xla_foo=1"})
    assert len(cmds) == 2
    ports = set()
    for i, cmd in enumerate(cmds):
        assert cmd[-1] == "&"
        env = dict(w.split("=", 1) for w in cmd[:cmd.index(sys.executable)])
        assert env["DOLLAR_PROCESS_ID"] == str(i) and env["DOLLAR_NUM_PROCESSES"] == "2"
        assert env["JAX_PLATFORMS"] == "cpu"
        assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=4"
        assert env["PJRT_NPROC"] == "16"  # a client thread pool 4 devices' collectives cannot exhaust
        host, port = env["DOLLAR_COORDINATOR"].split(":")
        assert host == "localhost"
        ports.add(port)
    assert len(ports) == 1
    cmds = dry(GPU, "--local_processes", "2", "--gpus", "0,1,2,3", "--coordinator_port", "4321", "--config", CONFIG,
               "--workdir", "/w", path_dir=fake_bin)
    assert ["CUDA_VISIBLE_DEVICES=0,1" in c for c in cmds] == [True, False]
    assert "CUDA_VISIBLE_DEVICES=2,3" in cmds[1] and all("DOLLAR_COORDINATOR=localhost:4321" in c for c in cmds)


def test_gpu_invalid_input():
    base = ("--config", CONFIG, "--workdir", "/w")
    fails(GPU, "--config", CONFIG, match="--workdir")
    fails(GPU, *base, "--hosts", "a,b,a", match="duplicate host(s) a")
    fails(GPU, *base, "--hosts", "a,,b", match="empty host")
    fails(GPU, *base, "--hosts", "me@a", match="--ssh_user")
    fails(GPU, *base, "--env", "NCCL_DEBUG", match="KEY=VALUE")
    fails(GPU, *base, "--env", "DOLLAR_PROCESS_ID=3", match="set by the launcher")
    fails(GPU, *base, "--gpus", "0,0", match="duplicate GPU")
    fails(GPU, *base, "--gpus", "0,x", match="GPU indices")
    fails(GPU, *base, "--gpus", "0,1,2", "--local_processes", "2", match="evenly")
    fails(GPU, *base, "--hosts", "a", "--local_processes", "2", match="exclude each other")
    fails(GPU, *base, "--hosts", "a", "--cpu_devices_per_process", "2", match="this machine")
    fails(GPU, *base, "--ssh_user", "me", match="needs --hosts")
    fails(GPU, *base, "--hosts", "a", "--coordinator_port", "70000", match="port")
    fails(GPU, *base, "--config.x=1", match="after '--'")
    fails(GPU, *base, "--", "--config", match="--config/--workdir")


@pytest.fixture
def stand_in(tmp_path):
    """An 'interpreter' that reports its process id, fails as process $FAIL_ID, else sleeps $SLEEP seconds."""
    f = tmp_path / "python"
    f.write_text('#!/bin/sh\necho "id=$DOLLAR_PROCESS_ID n=$DOLLAR_NUM_PROCESSES args=$*"\n'
                 'if [ "$DOLLAR_PROCESS_ID" = "$FAIL_ID" ]; then exit 3; fi\nexec sleep "$SLEEP"\n')
    f.chmod(f.stat().st_mode | stat.S_IEXEC)
    return str(f)


def test_gpu_local_processes_wait_and_fail(stand_in):
    args = ("--python", stand_in, "--local_processes", "3", "--config", CONFIG, "--workdir", "/w")
    r = launch(GPU, *args, env={"FAIL_ID": "none", "SLEEP": "0"})
    assert r.returncode == 0, r.stderr
    for i in range(3):
        assert f"[process {i}] id={i} n=3 args=-m dollar_jax.main --config={CONFIG} --workdir=/w" in r.stdout
    t = time.monotonic()
    r = launch(GPU, *args, env={"FAIL_ID": "1", "SLEEP": "60"})
    assert r.returncode == 3 and "process 1 exited with status 3" in r.stderr
    assert time.monotonic() - t < 20  # the others were stopped, not waited for


# ---- restarts after preemption -----------------------------------------------------------------------------
FAKE_GCLOUD = r'''#!/usr/bin/env python3
"""gcloud stand-in: logs its argv; `describe` answers the next state of the scenario, the exit-status ssh the
next list of worker statuses; everything else succeeds."""
import json, os, sys
d = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(d, "calls.jsonl"), "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
path = os.path.join(d, "scenario.json")
s = json.load(open(path))
def pop(key):
    v = s[key][0] if len(s[key]) == 1 else s[key].pop(0)
    json.dump(s, open(path, "w"))
    return v
if "describe" in sys.argv:
    state = pop("states")
    print(state)
    sys.exit(1 if state == "MISSING" else 0)
if "ssh" in sys.argv and "dollar.exit 2>" in sys.argv[-1]:
    print("\n".join(map(str, pop("exits"))))
'''


def supervised(tmp_path, states, exits, *args):
    d = tmp_path / "bin"
    d.mkdir(parents=True)
    for name, text in (("gcloud", FAKE_GCLOUD), ("git", "#!/bin/sh\n"), ("tar", "#!/bin/sh\n")):
        (d / name).write_text(text)
        (d / name).chmod(0o755)
    (d / "scenario.json").write_text(__import__("json").dumps({"states": states, "exits": exits}))
    r = launch(TPU, "supervise", *TPU_ARGS, "--queued", "--spot", "--poll_s", "0", "--config", CONFIG,
               "--workdir", "gs://b/run", *args, env={"PATH": f"{d}:{os.environ['PATH']}"})
    calls = [__import__("json").loads(line) for line in (d / "calls.jsonl").read_text().splitlines()]
    return r, calls


def what(argv) -> str:
    """A short name for a gcloud call: describe, create, delete, scp, setup, job, statuses."""
    if "ssh" in argv:
        command = argv[-1]
        return "statuses" if "dollar.exit 2>" in command else "job" if "dollar_jax.main" in command else "setup"
    return next(v for v in ("describe", "create", "delete", "scp") if v in argv)


def test_tpu_supervise_requeues_a_preempted_spot_slice_and_resumes(tmp_path):
    r, calls = supervised(tmp_path, ["ACTIVE", "SUSPENDED", "WAITING_FOR_RESOURCES", "ACTIVE"],
                          [[75, 75], [0, 0]])
    assert r.returncode == 0, r.stderr
    assert [what(c) for c in calls] == ["describe", "job", "statuses",  # preempted: both saved and exited 75
                                        "describe", "delete", "create",  # the suspended Spot slice is queued again
                                        "describe", "describe", "scp", "setup", "job", "statuses"]
    delete, create = calls[4], calls[5]
    assert delete[:4] == ["compute", "tpus", "queued-resources", "delete"] and "--force" in delete
    assert create[:4] == ["compute", "tpus", "queued-resources", "create"] and "--spot" in create
    assert calls[1] == calls[10]  # the same command: the job resumes from its checkpoints
    assert "preempted (restart 1 of 100)" in r.stderr


def test_tpu_supervise_stops_on_a_real_failure_and_after_max_restarts(tmp_path):
    r, calls = supervised(tmp_path / "a", ["ACTIVE"], [[1, 0]])
    assert r.returncode == 1 and "not restarting" in r.stderr
    assert [what(c) for c in calls] == ["describe", "job", "statuses", "describe"]
    r, calls = supervised(tmp_path / "b", ["ACTIVE"], [[75, 75]], "--max_restarts", "1")
    assert r.returncode == 1 and "after --max_restarts=1" in r.stderr
    assert [what(c) for c in calls].count("job") == 2


def test_tpu_queued_create_status_delete(fake_bin):
    (create,) = dry(TPU, "create", *TPU_ARGS, "--accelerator", "v6e-64", "--queued", "--spot", path_dir=fake_bin)
    assert create[:6] == ["gcloud", "compute", "tpus", "queued-resources", "create", "dollar"]
    assert {"--node-id=dollar", "--accelerator-type=v6e-64", "--spot"} <= set(create)
    (status,) = dry(TPU, "status", *TPU_ARGS, "--queued", path_dir=fake_bin)
    assert status[3:5] == ["queued-resources", "describe"] and "--format=value(state.state)" in status
    (delete,) = dry(TPU, "delete", *TPU_ARGS, "--queued", path_dir=fake_bin)
    assert delete[3:5] == ["queued-resources", "delete"] and "--force" in delete
    assert not (fake_bin / "called").exists()


def test_preempted_exit_code_agrees_with_the_package():
    sys.path.insert(0, os.path.join(ROOT, "launch"))
    import common

    from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE

    assert common.PREEMPTED_EXIT_CODE == PREEMPTED_EXIT_CODE


def test_gpu_restarts_after_preemption(tmp_path):
    f = tmp_path / "python"  # exits 75 (preempted) on its first two runs, then 0
    f.write_text(f'#!/bin/sh\necho run >> {tmp_path}/runs\n[ "$(wc -l < {tmp_path}/runs)" -ge 3 ] || exit 75\n')
    f.chmod(0o755)
    r = launch(GPU, "--python", str(f), "--max_restarts", "5", "--config", CONFIG, "--workdir", "/w")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "runs").read_text().count("run") == 3 and "restart 2 of 5" in r.stderr
    (tmp_path / "runs").unlink()
    r = launch(GPU, "--python", str(f), "--max_restarts", "1", "--config", CONFIG, "--workdir", "/w")
    assert r.returncode == 75


_BACK_TO_BACK = """
import jax, jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
mesh = jax.make_mesh((2, 2, 2), ("a", "b", "c"), axis_types=(AxisType.Auto,) * 3)
rows, cols = NamedSharding(mesh, P(("a", "b", "c"))), NamedSharding(mesh, P(None, ("a", "b", "c")))
f = jax.jit(lambda x: jax.lax.with_sharding_constraint(jnp.roll(jax.lax.with_sharding_constraint(x, cols), 1, 1)
                                                       * 2.0 + x.sum(), rows))
xs = [jax.device_put(jnp.full((64, 64), float(i)), rows) for i in range(8)]
outs = [f(xs[i % 8]) for i in range(3000)]  # dispatched without waiting: many programs in flight
jax.block_until_ready(outs)
print("finished")
"""


def test_cpu_env_runs_back_to_back_collectives_on_8_devices():
    """The hang cpu_pool_threads prevents, as it was reproduced: with XLA's default pool this aborts after the
    collective timeout (3 of 3 runs); with cpu_env it finishes in seconds."""
    from cpu_flags import cpu_test_env

    env = dict(os.environ, **cpu_test_env(8, "--xla_cpu_collective_call_terminate_timeout_seconds=60 "
                                             "--xla_cpu_collective_timeout_seconds=60"))
    out = subprocess.run([sys.executable, "-c", _BACK_TO_BACK], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "finished" in out.stdout, out.stderr[-2000:]
