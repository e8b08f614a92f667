#!/usr/bin/env python3
"""Cloud TPU VM pod slices: create, set up, run dollar_jax.main on every worker, follow the log, delete.

    python launch/tpu_pod.py create --name dollar --zone us-east5-a --accelerator v5p-32 [--spot] [--queued]
    python launch/tpu_pod.py setup  --name dollar --zone us-east5-a
    python launch/tpu_pod.py run    --name dollar --zone us-east5-a --config configs/wan21_distill.py:1.3b \\
        --workdir gs://bucket/run [--env K=V ...] -- --config.data.dir=gs://bucket/latents
    python launch/tpu_pod.py logs   --name dollar --zone us-east5-a [--worker 0]
    python launch/tpu_pod.py stop   --name dollar --zone us-east5-a
    python launch/tpu_pod.py status --name dollar --zone us-east5-a [--queued]
    python launch/tpu_pod.py delete --name dollar --zone us-east5-a [--queued]
    # all of it, restarting after preemptions: (re)create, set up, run in the foreground, repeat
    python launch/tpu_pod.py supervise --name dollar --zone us-east5-a --accelerator v5p-32 --queued --spot \
        --config configs/wan21_distill.py:1.3b --workdir WORKDIR -- --config.data.dir=DATA

Every command is printed (prefixed with "+ ") before it runs; --dry_run prints them and runs nothing.
`run` starts the same command on every worker: jax.distributed.initialize() finds the coordinator and the
process id from the TPU runtime (dollar_jax/parallel/distributed.py). Standard library only.

--queued creates the slice as a queued resource (`gcloud compute tpus queued-resources create`), the way to
get Spot capacity: the request waits until capacity exists. A preempted Spot slice does not come back by
itself (its queued resource turns SUSPENDED / the node PREEMPTED): `supervise` deletes it, queues it again,
sets the new workers up and restarts the job, which resumes from its last checkpoint. It restarts when every
worker's dollar_jax.main exited with 75 (preempted, checkpoint saved) or the slice went away, and stops on
success or on any other failure (a bug: restarting would fail again).
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # launch/common.py, whatever the cwd
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

REMOTE_DIR = "~/dollar-jax"  # the code on every worker
REMOTE_VENV = "~/dollar-venv"  # its virtual environment (pyproject wants Python >= 3.11; Ubuntu 22.04 has 3.10)
REMOTE_TARBALL = "dollar-jax.tar.gz"  # in the remote home directory
LOG = "~/dollar.log"
EXIT_FILE = "~/dollar.exit"  # supervise: each worker's exit status of its last run
HEALTHY = ("ACTIVE", "READY")  # queued resource / node states in which the workers run
WAITING = ("ACCEPTED", "WAITING_FOR_RESOURCES", "PROVISIONING", "CREATING", "STARTING", "RESTARTING", "REPAIRING")
# Any other state (SUSPENDED, FAILED, PREEMPTED, TERMINATED, STOPPED, MISSING): delete and create again.


# ---- commands ----------------------------------------------------------------------------------------------
def run_command(c: common.Command) -> int:
    """Run a command (a script with bash -o pipefail) in the foreground."""
    if c.script is not None:
        return subprocess.run(["bash", "-o", "pipefail", "-c", c.script], check=False).returncode
    try:
        return subprocess.run(c.argv, check=False).returncode
    except FileNotFoundError:
        print(f"error: {c.argv[0]!r} not found on PATH", file=sys.stderr)
        return 127


def gcloud(verb: str, args, *positional: str) -> list[str]:
    """gcloud compute tpus tpu-vm VERB POSITIONAL... --zone=Z [--project=P] (POSITIONAL defaults to the name)."""
    argv = ["gcloud", "compute", "tpus", "tpu-vm", verb, *(positional or (args.name,)), f"--zone={args.zone}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv


def queued(verb: str, args) -> list[str]:
    """gcloud compute tpus queued-resources VERB NAME --zone=Z [--project=P] (the queued resource has the
    node's name)."""
    argv = ["gcloud", "compute", "tpus", "queued-resources", verb, args.name, f"--zone={args.zone}"]
    if args.project:
        argv.append(f"--project={args.project}")
    return argv


def ssh(args, worker: str, command: str) -> common.Command:
    return common.Command(gcloud("ssh", args) + [f"--worker={worker}", "--command", command])


# ---- subcommands -------------------------------------------------------------------------------------------
def create_commands(args) -> list[common.Command]:
    if args.queued:
        argv = queued("create", args) + [f"--node-id={args.name}", f"--accelerator-type={args.accelerator}",
                                         f"--runtime-version={args.version}"]
    else:
        argv = gcloud("create", args) + [f"--accelerator-type={args.accelerator}", f"--version={args.version}"]
    if args.spot:
        argv.append("--spot")
    return [common.Command(argv)]


def status_commands(args) -> list[common.Command]:
    """One word: the queued resource's state (ACTIVE, WAITING_FOR_RESOURCES, SUSPENDED...) or the node's."""
    if args.queued:
        return [common.Command(queued("describe", args) + ["--format=value(state.state)"])]
    return [common.Command(gcloud("describe", args) + ["--format=value(state)"])]


def tarball_path(name: str) -> str:
    return os.path.join(tempfile.gettempdir(), f"dollar-jax-{name}.tar.gz")


def setup_script(python: str) -> str:
    """What every worker runs: Python >= 3.11 if missing, unpack the code, one venv with jax[tpu] + the package.

    jax[tpu] and the package are installed by one pip call so that jax stays inside pyproject's range and
    libtpu matches that jax."""
    py, d, venv = shlex.quote(python), common.remote_path(REMOTE_DIR), common.remote_path(REMOTE_VENV)
    install_python = (f"sudo add-apt-repository -y ppa:deadsnakes/ppa && sudo apt-get update -q && "
                      f"sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q {py} {py}-venv")
    return " && ".join([
        "set -e",
        f"{{ command -v {py} >/dev/null || {{ {install_python}; }}; }}",
        f"mkdir -p {d}",
        f"tar -xzf ~/{REMOTE_TARBALL} -C {d}",
        f"rm -f ~/{REMOTE_TARBALL}",
        f"{py} -m venv {venv}",
        f". {venv}/bin/activate",
        "pip install -q -U pip",
        f"pip install -U \"jax[tpu]\" -e {d}",
        "python -c \"import dollar_jax, jax; print(jax.__version__)\"",
    ])


def setup_commands(args) -> list[common.Command]:
    repo = os.path.abspath(args.repo_dir)
    tarball = tarball_path(args.name)
    # Tracked and untracked-but-not-ignored files of the working tree (never .git), as they are on disk now.
    pack = (f"git -C {shlex.quote(repo)} ls-files -z --cached --others --exclude-standard | "
            f"tar -C {shlex.quote(repo)} --null -T - -czf {shlex.quote(tarball)}")
    scp = common.Command(gcloud("scp", args, tarball, f"{args.name}:{REMOTE_TARBALL}") + ["--worker=all"])
    return [common.Command(script=pack), scp, ssh(args, "all", setup_script(args.python))]


def run_script(args, extra: list[str]) -> str:
    prog = shlex.join(["python", *common.main_argv(args.config, args.workdir, extra)])
    return (f"cd {common.remote_path(REMOTE_DIR)} && . {common.remote_path(REMOTE_VENV)}/bin/activate && "
            f"{common.background_script(args.env, prog, LOG)}")


def run_commands(args, extra: list[str]) -> list[common.Command]:
    return [ssh(args, "all", run_script(args, extra))]


def logs_commands(args) -> list[common.Command]:
    return [ssh(args, args.worker, f"tail -n 200 -f {LOG}")]


def stop_commands(args) -> list[common.Command]:
    # SIGINT: Python unwinds (the train loop's `finally` waits for a checkpoint being written). The pattern's
    # [d] keeps it from matching the remote shell that runs pkill.
    return [ssh(args, "all", "pkill -INT -f \"python -m [d]ollar_jax[.]main\" || echo \"$(hostname): not running\"")]


def delete_commands(args) -> list[common.Command]:
    if args.queued:  # --force also deletes the node the queued resource created
        return [common.Command(queued("delete", args) + ["--force", "--quiet"])]
    return [common.Command(gcloud("delete", args) + ["--quiet"])]


# ---- supervise: run to the end across preemptions ------------------------------------------------------------
def foreground_script(args, extra: list[str]) -> str:
    """Every worker: run dollar_jax.main to its end (output appended to the log), then record its exit status."""
    prog = shlex.join(["python", *common.main_argv(args.config, args.workdir, extra)])
    env = "".join(f"{k}={shlex.quote(v)} " for k, v in args.env)
    return (f"cd {common.remote_path(REMOTE_DIR)} && . {common.remote_path(REMOTE_VENV)}/bin/activate && "
            f"rm -f {EXIT_FILE} && {{ {env}{prog} >> {LOG} 2>&1 < /dev/null; echo $? > {EXIT_FILE}; }}")


def exit_status_command(args) -> common.Command:
    return ssh(args, "all", f"cat {EXIT_FILE} 2>/dev/null || echo missing")


def capture(c: common.Command) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(c.argv, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        return subprocess.CompletedProcess(c.argv, 127, "", f"{c.argv[0]!r} not found on PATH")


def slice_state(args) -> str:
    (c,) = status_commands(args)
    r = capture(c)
    words = r.stdout.split()
    return words[-1].upper() if r.returncode == 0 and words else "MISSING"


def exit_statuses(args) -> list[int | None]:
    """Each worker's recorded exit status (None: no record, e.g. a worker that was replaced)."""
    r = capture(exit_status_command(args))
    if r.returncode != 0:
        return []
    return [int(w) if w.isdigit() else None for w in r.stdout.split() if w.isdigit() or w == "missing"]


def ensure_slice(args) -> bool | None:
    """Wait for a healthy slice, (re)creating it when it is missing or gone. True: it was (re)created (the
    workers need setup); False: it was there; None: not healthy within --wait_s."""
    created, deadline = False, time.monotonic() + args.wait_s if args.wait_s else None
    while True:
        state = slice_state(args)
        print(f"[supervise] {args.name}: {state}", file=sys.stderr, flush=True)
        if state in HEALTHY:
            return created
        if state not in WAITING:
            commands = (delete_commands(args) if state != "MISSING" else []) + create_commands(args)
            if common.execute(commands, False, run_command) != 0:
                return None
            created = True
            continue
        if deadline is not None and time.monotonic() > deadline:
            return None
        time.sleep(args.poll_s)


def supervise(args, extra: list[str]) -> int:
    setup_needed = args.setup
    for attempt in range(args.max_restarts + 1):
        created = ensure_slice(args)
        if created is None:
            print(f"error: slice {args.name} not ready (see `status`); giving up", file=sys.stderr)
            return 1
        if created or setup_needed:
            rc = common.execute(setup_commands(args), False, run_command)
            if rc != 0:
                return rc
            setup_needed = False
        job = ssh(args, "all", foreground_script(args, extra))
        common.announce(job)
        run_command(job)  # its status is that of ssh; the workers' own statuses are read next
        codes = exit_statuses(args)
        print(f"[supervise] exit statuses: {codes}", file=sys.stderr, flush=True)
        if codes and all(c == 0 for c in codes):
            return 0
        preempted = bool(codes) and all(c in (0, common.PREEMPTED_EXIT_CODE) for c in codes)
        if not preempted and slice_state(args) in HEALTHY:
            print(f"error: the job failed on a healthy slice (exit statuses {codes}); not restarting. See "
                  f"python launch/tpu_pod.py logs --name {args.name} --zone {args.zone}", file=sys.stderr)
            return 1
        print(f"[supervise] preempted (restart {attempt + 1} of {args.max_restarts})", file=sys.stderr, flush=True)
    print(f"error: still preempted after --max_restarts={args.max_restarts} restarts", file=sys.stderr)
    return 1


def supervise_plan(args, extra: list[str]) -> list[common.Command]:
    """What one round of `supervise` runs (its dry run): state, create, setup, the job, its exit statuses."""
    return (status_commands(args) + create_commands(args) + setup_commands(args)
            + [ssh(args, "all", foreground_script(args, extra)), exit_status_command(args)])


# ---- arguments ---------------------------------------------------------------------------------------------
NAME_RE = re.compile(r"^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$")
ACCELERATOR_RE = re.compile(r"^v\d+[a-z]*-\d+$")  # v4-32, v5p-32, v5litepod-16, v6e-64


def warn(msg: str) -> None:
    print(f"warning: {msg}", file=sys.stderr)


def check_run(args, fail) -> None:
    if not args.config.strip():
        fail("--config is empty")
    if not args.workdir.strip():
        fail("--workdir is empty")
    cfg_file = args.config.split(":", 1)[0]
    if not os.path.isabs(cfg_file) and not os.path.exists(os.path.join(common.REPO, cfg_file)):
        warn(f"config file {cfg_file!r} is not in {common.REPO}; the workers run it from {REMOTE_DIR}")
    if args.workdir.startswith("/gcs/"):
        warn("a gcsfuse mount cannot rename directories on flat buckets, which local-path checkpoints need: "
             "pass the bucket itself (--workdir gs://BUCKET/...), which dollar_jax opens directly.")
    elif "://" not in args.workdir and not os.path.isabs(args.workdir) and not args.workdir.startswith("~"):
        warn(f"--workdir {args.workdir!r} is relative: it resolves under {REMOTE_DIR} on each worker")


def build_parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    """The parser and each subcommand's parser (for errors with that subcommand's usage line)."""
    subs: dict[str, argparse.ArgumentParser] = {}
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True,
                           metavar="{create,setup,run,logs,stop,status,delete,supervise}")

    def subcommand(name: str, help: str) -> argparse.ArgumentParser:
        s = subs[name] = sub.add_parser(name, help=help)
        s.add_argument("--name", required=True, help="TPU VM name")
        s.add_argument("--zone", required=True, help="e.g. us-east5-a")
        s.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
        s.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        return s

    def queued_flag(s):
        s.add_argument("--queued", action="store_true", help="the slice is a queued resource (see create)")

    def create_args(s):
        s.add_argument("--accelerator", default="v5p-32", help="accelerator type (default v5p-32)")
        s.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
        s.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")
        s.add_argument("--queued", action="store_true",
                       help="create through a queued resource (waits for capacity; the way to get Spot slices)")

    def setup_args(s):
        s.add_argument("--repo_dir", default=common.REPO, help="repository to copy (default: this one)")
        s.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")

    def run_args(s):
        s.add_argument("--config", required=True, help="configs/<file>.py[:variant], relative to the repository")
        s.add_argument("--workdir", required=True, help="work directory every worker sees (shared storage)")
        s.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")

    create_args(subcommand("create", "create the pod slice"))
    setup_args(subcommand("setup", "copy this repository to every worker and install it with jax[tpu]"))
    run_args(subcommand("run", "start dollar_jax.main on every worker (in the background)"))

    s = subcommand("logs", "follow ~/dollar.log of one worker")
    s.add_argument("--worker", default="0", help="worker index (default 0) or 'all'")

    subcommand("stop", "interrupt dollar_jax.main on every worker")
    queued_flag(subcommand("status", "print the slice's state"))
    queued_flag(subcommand("delete", "delete the pod slice"))

    s = subcommand("supervise", "create/set up the slice and run the job to its end, restarting after preemptions")
    create_args(s)
    setup_args(s)
    run_args(s)
    s.add_argument("--setup", action="store_true", help="set the workers up before the first run (a slice the "
                                                        "supervisor creates is always set up)")
    s.add_argument("--max_restarts", type=int, default=100, help="give up after this many restarts (default 100)")
    s.add_argument("--poll_s", type=float, default=60.0, help="seconds between state checks while waiting")
    s.add_argument("--wait_s", type=float, default=0.0, help="give up waiting for capacity after this long (0: never)")
    return p, subs


def parse(argv: list[str]):
    argv, extra = common.split_extra(argv)
    parser, subs = build_parser()
    args, unknown = parser.parse_known_args(argv)
    fail = subs[args.cmd].error
    common.check_unknown(unknown, fail)
    if extra and args.cmd not in ("run", "supervise"):
        fail(f"'{args.cmd}' takes no extra flags after '--'")
    if not NAME_RE.match(args.name):
        fail(f"--name {args.name!r}: lowercase letters, digits and hyphens, starting with a letter")
    if args.cmd in ("create", "supervise") and not ACCELERATOR_RE.match(args.accelerator):
        fail(f"--accelerator {args.accelerator!r}: expected a type like v5p-32, v5litepod-16, v6e-64")
    if args.cmd in ("setup", "supervise") and not os.path.exists(os.path.join(os.path.abspath(args.repo_dir), ".git")):
        fail(f"--repo_dir {args.repo_dir!r} is not the root of a git checkout")
    if args.cmd == "supervise" and (args.max_restarts < 0 or args.poll_s < 0 or args.wait_s < 0):
        fail("--max_restarts, --poll_s and --wait_s must not be negative")
    if args.cmd == "logs" and not (args.worker == "all" or args.worker.isdigit()):
        fail(f"--worker {args.worker!r}: a worker index (0, 1, ...) or 'all'")
    if args.cmd in ("run", "supervise"):
        args.env = common.parse_env(
            args.env, fail, "on a TPU pod the runtime provides the coordinator and process ids; do not set it")
        common.check_extra(extra, fail)
        check_run(args, fail)
    return args, extra


def main(argv: list[str] | None = None) -> int:
    args, extra = parse(sys.argv[1:] if argv is None else argv)
    commands = {
        "create": lambda: create_commands(args),
        "setup": lambda: setup_commands(args),
        "run": lambda: run_commands(args, extra),
        "logs": lambda: logs_commands(args),
        "stop": lambda: stop_commands(args),
        "status": lambda: status_commands(args),
        "delete": lambda: delete_commands(args),
        "supervise": lambda: supervise_plan(args, extra),
    }[args.cmd]()
    if args.cmd == "supervise" and not args.dry_run:
        return supervise(args, extra)
    rc = common.execute(commands, args.dry_run, run_command)
    if rc == 0 and args.cmd == "run" and not args.dry_run:
        print(f"follow: python launch/tpu_pod.py logs --name {args.name} --zone {args.zone}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
