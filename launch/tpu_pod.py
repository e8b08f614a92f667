#!/usr/bin/env python3
"""Cloud TPU VM pod slices: create, set up, run dollar_jax.main on every worker, follow the log, delete.

    python launch/tpu_pod.py create --name dollar --zone us-east5-a --accelerator v5p-32 [--spot]
    python launch/tpu_pod.py setup  --name dollar --zone us-east5-a
    python launch/tpu_pod.py run    --name dollar --zone us-east5-a --config configs/wan21_distill.py:1.3b \\
        --workdir gs://bucket/run [--env K=V ...] -- --config.data.dir=gs://bucket/latents
    python launch/tpu_pod.py logs   --name dollar --zone us-east5-a [--worker 0]
    python launch/tpu_pod.py stop   --name dollar --zone us-east5-a
    python launch/tpu_pod.py delete --name dollar --zone us-east5-a

Every command is printed (prefixed with "+ ") before it runs; --dry_run prints them and runs nothing.
`run` starts the same command on every worker: jax.distributed.initialize() finds the coordinator and the
process id from the TPU runtime (dollar_jax/parallel/distributed.py). Standard library only.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import tempfile

if os.path.dirname(os.path.abspath(__file__)) not in sys.path:  # launch/common.py, whatever the cwd
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common

REMOTE_DIR = "~/dollar-jax"  # the code on every worker
REMOTE_VENV = "~/dollar-venv"  # its virtual environment (pyproject wants Python >= 3.11; Ubuntu 22.04 has 3.10)
REMOTE_TARBALL = "dollar-jax.tar.gz"  # in the remote home directory
LOG = "~/dollar.log"


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


def ssh(args, worker: str, command: str) -> common.Command:
    return common.Command(gcloud("ssh", args) + [f"--worker={worker}", "--command", command])


# ---- subcommands -------------------------------------------------------------------------------------------
def create_commands(args) -> list[common.Command]:
    argv = gcloud("create", args) + [f"--accelerator-type={args.accelerator}", f"--version={args.version}"]
    if args.spot:
        argv.append("--spot")
    return [common.Command(argv)]


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
    return [common.Command(gcloud("delete", args) + ["--quiet"])]


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
    sub = p.add_subparsers(dest="cmd", required=True, metavar="{create,setup,run,logs,stop,delete}")

    def subcommand(name: str, help: str) -> argparse.ArgumentParser:
        s = subs[name] = sub.add_parser(name, help=help)
        s.add_argument("--name", required=True, help="TPU VM name")
        s.add_argument("--zone", required=True, help="e.g. us-east5-a")
        s.add_argument("--project", default=None, help="GCP project (default: gcloud's configured one)")
        s.add_argument("--dry_run", action="store_true", help="print the commands, run nothing")
        return s

    s = subcommand("create", "create the pod slice")
    s.add_argument("--accelerator", default="v5p-32", help="accelerator type (default v5p-32)")
    s.add_argument("--version", default="tpu-ubuntu2204-base", help="TPU VM runtime version")
    s.add_argument("--spot", action="store_true", help="Spot capacity (can be preempted)")

    s = subcommand("setup", "copy this repository to every worker and install it with jax[tpu]")
    s.add_argument("--repo_dir", default=common.REPO, help="repository to copy (default: this one)")
    s.add_argument("--python", default="python3.11", help="interpreter for the workers' venv (>= 3.11)")

    s = subcommand("run", "start dollar_jax.main on every worker (in the background)")
    s.add_argument("--config", required=True, help="configs/<file>.py[:variant], relative to the repository")
    s.add_argument("--workdir", required=True, help="work directory every worker sees (shared storage)")
    s.add_argument("--env", action="append", default=[], metavar="K=V", help="environment variable (repeatable)")

    s = subcommand("logs", "follow ~/dollar.log of one worker")
    s.add_argument("--worker", default="0", help="worker index (default 0) or 'all'")

    subcommand("stop", "interrupt dollar_jax.main on every worker")
    subcommand("delete", "delete the pod slice")
    return p, subs


def parse(argv: list[str]):
    argv, extra = common.split_extra(argv)
    parser, subs = build_parser()
    args, unknown = parser.parse_known_args(argv)
    fail = subs[args.cmd].error
    common.check_unknown(unknown, fail)
    if extra and args.cmd != "run":
        fail(f"'{args.cmd}' takes no extra flags after '--'")
    if not NAME_RE.match(args.name):
        fail(f"--name {args.name!r}: lowercase letters, digits and hyphens, starting with a letter")
    if args.cmd == "create" and not ACCELERATOR_RE.match(args.accelerator):
        fail(f"--accelerator {args.accelerator!r}: expected a type like v5p-32, v5litepod-16, v6e-64")
    if args.cmd == "setup" and not os.path.isdir(os.path.join(os.path.abspath(args.repo_dir), ".git")):
        fail(f"--repo_dir {args.repo_dir!r} is not the root of a git checkout")
    if args.cmd == "logs" and not (args.worker == "all" or args.worker.isdigit()):
        fail(f"--worker {args.worker!r}: a worker index (0, 1, ...) or 'all'")
    if args.cmd == "run":
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
        "delete": lambda: delete_commands(args),
    }[args.cmd]()
    rc = common.execute(commands, args.dry_run, run_command)
    if rc == 0 and args.cmd == "run" and not args.dry_run:
        print(f"follow: python launch/tpu_pod.py logs --name {args.name} --zone {args.zone}", file=sys.stderr)
    return rc


if __name__ == "__main__":
    sys.exit(main())
