#!/usr/bin/env python3
"""GPU hosts: one process per host drives all of that host's GPUs.

    # one host (all its GPUs, or the listed ones)
    python launch/gpu.py --config configs/wan21_distill.py:1.3b --workdir /shared/run [--gpus 0,1,2,3] \
        [--max_restarts 10]   # run again after a preemption (exit status 75: checkpoint saved)
    # several hosts over ssh: process i runs on the i-th host, the first host is the coordinator
    python launch/gpu.py --hosts gpu-a,gpu-b --coordinator_port 12355 [--ssh_user me] [--remote_dir ~/dollar-jax] \\
        --config configs/wan21_distill.py:1.3b --workdir /shared/run -- --config.model.attention=cudnn
    # K processes on this machine (coordinator on localhost): a multi-host run in miniature, e.g. on CPU
    python launch/gpu.py --local_processes 2 --cpu_devices_per_process 4 --config ... --workdir /tmp/run

Processes find each other through DOLLAR_COORDINATOR=host:port, DOLLAR_NUM_PROCESSES and DOLLAR_PROCESS_ID
(dollar_jax/parallel/distributed.py). Config overrides (--config.key=value) go after `--`. Every command is
printed (prefixed with "+ ") before it runs; --dry_run prints them and runs nothing. Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # launch/common.py, whatever the cwd
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

HOST_RE = re.compile(r"^[A-Za-z0-9_.:\-\[\]]+$")  # names, IPv4, [IPv6]
CPU_DEVICES_FLAG = "--xla_force_host_platform_device_count"
DEFAULT_PORT = 12355


# ---- commands ----------------------------------------------------------------------------------------------
def cpu_pool_threads(devices: int) -> int:
    """Threads for XLA:CPU's client pool (env PJRT_NPROC) with `devices` virtual devices.

    XLA sizes that pool max(cores, devices), and each device's share of a collective blocks one pool thread in
    its rendezvous until every device has arrived. When anything else holds a pool thread (another program in
    flight, a transfer), the last device never starts and the process hangs until XLA aborts it ("Termination
    timeout ... exceeded"). Reproduced with 8 devices on 2 cores: back-to-back sharded programs with collectives
    hung within 3,000 calls with the default pool, 3 of 3 times; with 2x and 4x the devices' threads, 20,000
    calls ran, and the DOLLAR step's time did not change (BENCHMARKS.md, "Test suite")."""
    return 4 * devices


def cpu_env(devices: int, base_xla_flags: str) -> list[tuple[str, str]]:
    """JAX on the CPU with `devices` virtual devices (replacing any device count already in XLA_FLAGS) and a
    client thread pool their collectives cannot exhaust (cpu_pool_threads)."""
    kept = [f for f in base_xla_flags.split() if not f.startswith(CPU_DEVICES_FLAG)]
    return [("JAX_PLATFORMS", "cpu"), ("XLA_FLAGS", " ".join(kept + [f"{CPU_DEVICES_FLAG}={devices}"])),
            ("PJRT_NPROC", str(cpu_pool_threads(devices)))]


def device_env(args, gpus: list[int] | None) -> list[tuple[str, str]]:
    env = [(k, v) for k, v in args.env if not (args.cpu_devices_per_process and k == "XLA_FLAGS")]
    if gpus is not None:
        env.append(("CUDA_VISIBLE_DEVICES", ",".join(map(str, gpus))))
    if args.cpu_devices_per_process:
        given = dict(args.env)
        env += [(k, v) for k, v in cpu_env(args.cpu_devices_per_process, given.get("XLA_FLAGS", os.environ.get(
            "XLA_FLAGS", ""))) if not (k == "PJRT_NPROC" and k in given)]  # the user's pool size wins
    return env


def distributed_env(coordinator: str, n: int, i: int) -> list[tuple[str, str]]:
    return [("DOLLAR_COORDINATOR", coordinator), ("DOLLAR_NUM_PROCESSES", str(n)), ("DOLLAR_PROCESS_ID", str(i))]


def single_host_commands(args, extra) -> list[common.Command]:
    argv = [args.python, *common.main_argv(args.config, args.workdir, extra)]
    return [common.Command(argv, device_env(args, args.gpus))]


def local_process_commands(args, extra) -> list[common.Command]:
    k = args.local_processes
    out = []
    for i in range(k):
        gpus = None if args.gpus is None else args.gpus[i * len(args.gpus) // k:(i + 1) * len(args.gpus) // k]
        env = distributed_env(f"localhost:{args.coordinator_port}", k, i) + device_env(args, gpus)
        argv = [args.python, *common.main_argv(args.config, args.workdir, extra)]
        out.append(common.Command(argv, env, background=True))
    return out


def remote_script(args, extra, env: list[tuple[str, str]], log: str) -> str:
    prog = f"{common.remote_path(args.python)} {shlex.join(common.main_argv(args.config, args.workdir, extra))}"
    return f"cd {common.remote_path(args.remote_dir)} && {common.background_script(env, prog, log)}"


def multi_host_commands(args, extra) -> list[common.Command]:
    n = len(args.hosts)
    coordinator = f"{args.coordinator_host or args.hosts[0]}:{args.coordinator_port}"
    out = []
    for i, host in enumerate(args.hosts):
        env = distributed_env(coordinator, n, i) + device_env(args, args.gpus)
        target = f"{args.ssh_user}@{host}" if args.ssh_user else host
        out.append(common.Command(["ssh", target, remote_script(args, extra, env, f"~/dollar-process{i}.log")]))
    return out


# ---- running -----------------------------------------------------------------------------------------------
def run_foreground(c: common.Command) -> int:
    try:
        p = subprocess.Popen(c.argv, env=dict(os.environ, **dict(c.env)))
    except FileNotFoundError:
        print(f"error: {c.argv[0]!r} not found", file=sys.stderr)
        return 127
    while True:
        try:
            return p.wait()
        except KeyboardInterrupt:  # the child got the SIGINT too: let it finish its checkpoint
            print("interrupted: waiting for the program to stop", file=sys.stderr)


def _pump(stream, prefix: str, lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sys.stdout.write(prefix + line)
            sys.stdout.flush()
    stream.close()


def _signal_group(p: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(p.pid, sig)  # the process group this launcher created for that child
    except (ProcessLookupError, PermissionError):
        pass


def run_together(commands: list[common.Command], dry_run: bool, grace_s: float = 30.0) -> int:
    """Start all commands at once (output prefixed with [process i]), wait for all of them. If one fails the
    others are stopped (they would wait for it forever at the next collective); returns the first failure."""
    for c in commands:
        common.announce(c)
    if dry_run:
        return 0
    procs, threads, lock = [], [], threading.Lock()
    for i, c in enumerate(commands):
        try:
            p = subprocess.Popen(c.argv, env=dict(os.environ, **dict(c.env)), stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                 start_new_session=True)
        except FileNotFoundError:
            print(f"error: {c.argv[0]!r} not found", file=sys.stderr)
            for q in procs:
                _signal_group(q, signal.SIGKILL)
            return 127
        procs.append(p)
        t = threading.Thread(target=_pump, args=(p.stdout, f"[process {i}] ", lock), daemon=True)
        t.start()
        threads.append(t)

    def stop_all(sig: int) -> None:
        for q in procs:
            if q.poll() is None:
                _signal_group(q, sig)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and None in [q.poll() for q in procs]:
            time.sleep(0.1)
        for q in procs:
            if q.poll() is None:
                _signal_group(q, signal.SIGKILL)
                q.wait()

    failed = None
    try:
        while None in [p.poll() for p in procs]:  # a list: poll every process, each time
            bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = bad[0]
                print(f"error: process {failed[0]} exited with status {failed[1]}; stopping the others",
                      file=sys.stderr)
                stop_all(signal.SIGTERM)
                break
            time.sleep(0.1)
    except KeyboardInterrupt:
        print("interrupted: stopping all processes", file=sys.stderr)
        stop_all(signal.SIGINT)
        return 130
    for t in threads:
        t.join()
    if failed is None:
        bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
        failed = bad[0] if bad else None
        if failed:
            print(f"error: process {failed[0]} exited with status {failed[1]}", file=sys.stderr)
    return 0 if failed is None else (failed[1] if failed[1] > 0 else 1)


# ---- arguments ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="configs/<file>.py[:variant]")
    p.add_argument("--workdir", required=True, help="work directory (multi-host: storage every host sees)")
    p.add_argument("--gpus", default=None, help="comma-separated GPU indices -> CUDA_VISIBLE_DEVICES")
    p.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")
    p.add_argument("--python", default=None,
                   help="interpreter (default: this one locally, `python` on remote hosts)")
    p.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
    m = p.add_argument_group("several hosts (ssh)")
    m.add_argument("--hosts", default=None, help="comma-separated hosts; process i runs on host i")
    m.add_argument("--coordinator_port", type=int, default=None,
                   help=f"coordinator port (default {DEFAULT_PORT}; with --local_processes a free port)")
    m.add_argument("--coordinator_host", default=None,
                   help="address the other hosts reach the first one at (default: the first host's name)")
    m.add_argument("--ssh_user", default=None, help="ssh user (default: ssh's)")
    m.add_argument("--remote_dir", default=None, help="repository on every host (default ~/dollar-jax)")
    lp = p.add_argument_group("several processes on this machine")
    lp.add_argument("--local_processes", type=int, default=None, help="start K processes here and wait for them")
    lp.add_argument("--cpu_devices_per_process", type=int, default=None,
                    help="run on the CPU with this many virtual devices per process (JAX_PLATFORMS=cpu)")
    p.add_argument("--max_restarts", type=int, default=0,
                   help=f"run again (it resumes) when the program exits with {common.PREEMPTED_EXIT_CODE}: "
                        "preempted after saving a checkpoint (SIGTERM). This machine only; default 0")
    return p


def parse_gpus(text: str, fail) -> list[int]:
    parts = [s.strip() for s in text.split(",")]
    if not all(s.isdigit() for s in parts):
        fail(f"--gpus {text!r}: expected comma-separated GPU indices, e.g. 0,1,2,3")
    gpus = [int(s) for s in parts]
    dup = sorted({g for g in gpus if gpus.count(g) > 1})
    if dup:
        fail(f"--gpus {text!r}: duplicate GPU index(es) {dup}")
    return gpus


def parse_hosts(text: str, fail) -> list[str]:
    hosts = [h.strip() for h in text.split(",")]
    if any(not h for h in hosts):
        fail(f"--hosts {text!r}: empty host name")
    for h in hosts:
        if "@" in h:
            fail(f"--hosts: {h!r}: give the user with --ssh_user, not user@host")
        if not HOST_RE.match(h):
            fail(f"--hosts: {h!r} is not a host name or address")
    dup = [h for i, h in enumerate(hosts) if h in hosts[:i]]
    if dup:
        fail(f"--hosts {text!r}: duplicate host(s) {', '.join(dict.fromkeys(dup))} (one process per host)")
    return hosts


def parse(argv: list[str]):
    argv, extra = common.split_extra(argv)
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    fail = parser.error
    common.check_unknown(unknown, fail)
    common.check_extra(extra, fail)
    if not args.config.strip() or not args.workdir.strip():
        fail("--config and --workdir must not be empty")
    args.env = common.parse_env(args.env, fail, "set by the launcher (use --hosts or --local_processes)")
    if args.gpus is not None:
        args.gpus = parse_gpus(args.gpus, fail)
        if "CUDA_VISIBLE_DEVICES" in dict(args.env):
            fail("--gpus and --env CUDA_VISIBLE_DEVICES=...: give one of them")
    if args.hosts is not None and args.local_processes is not None:
        fail("--hosts and --local_processes exclude each other")
    if args.max_restarts < 0:
        fail("--max_restarts must not be negative")
    if args.max_restarts and args.hosts is not None:
        fail("--max_restarts restarts processes on this machine; --hosts starts them in the background over ssh")
    if args.hosts is None:
        for name in ("coordinator_host", "ssh_user", "remote_dir"):
            if getattr(args, name) is not None:
                fail(f"--{name} needs --hosts")
    if args.cpu_devices_per_process is not None:
        if args.hosts is not None:
            fail("--cpu_devices_per_process is for processes on this machine, not --hosts")
        if args.cpu_devices_per_process < 1:
            fail("--cpu_devices_per_process must be at least 1")
        if args.gpus is not None:
            fail("--cpu_devices_per_process runs on the CPU: drop --gpus")
    if args.local_processes is not None:
        if args.local_processes < 1:
            fail("--local_processes must be at least 1")
        if args.gpus is not None and len(args.gpus) % args.local_processes:
            fail(f"--gpus: {len(args.gpus)} GPUs cannot be split evenly over {args.local_processes} processes")
    if args.coordinator_port is not None and not 1 <= args.coordinator_port <= 65535:
        fail(f"--coordinator_port {args.coordinator_port}: not a port number (1-65535)")
    if args.coordinator_port is None and args.hosts is None and args.local_processes is not None:
        args.coordinator_port = free_port()
    elif args.coordinator_port is None:
        args.coordinator_port = DEFAULT_PORT
    if args.hosts is not None:
        args.hosts = parse_hosts(args.hosts, fail)
        args.remote_dir = args.remote_dir or "~/dollar-jax"
        args.python = args.python or "python"
        if "://" not in args.workdir and not args.workdir.startswith("/"):
            print("warning: a relative --workdir is a different folder on each host: use gs://BUCKET/... or a "
                  "path every host mounts", file=sys.stderr)
    else:
        args.python = args.python or sys.executable
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    if args.hosts is not None:
        rc = common.execute(multi_host_commands(args, extra), args.dry_run, run_foreground)
        if rc == 0 and not args.dry_run:
            print(f"started {len(args.hosts)} processes; logs: ssh HOST tail -f '~/dollar-processI.log'",
                  file=sys.stderr)
        elif rc != 0:
            print("processes already started on earlier hosts will time out waiting for the missing ones",
                  file=sys.stderr)
        return rc
    for attempt in range(args.max_restarts + 1):
        if args.local_processes is not None:
            rc = run_together(local_process_commands(args, extra), args.dry_run)
        else:
            rc = common.execute(single_host_commands(args, extra), args.dry_run, run_foreground)
        if rc != common.PREEMPTED_EXIT_CODE:
            return rc
        if attempt < args.max_restarts:
            print(f"preempted (exit status {rc}, checkpoint saved): restart {attempt + 1} of {args.max_restarts}",
                  file=sys.stderr, flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
