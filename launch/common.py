"""What launch/gpu.py and launch/tpu_pod.py share: the commands they print and run, remote shell quoting, and
the checks of --env and of the flags after '--'. Standard library only."""

from __future__ import annotations

import dataclasses
import os
import re
import shlex
import sys
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCHER_ENV = ("DOLLAR_COORDINATOR", "DOLLAR_NUM_PROCESSES", "DOLLAR_PROCESS_ID")
# dollar_jax.main's exit status after a preemption (checkpoint saved): "run me again". The same number as
# dollar_jax/train/preemption.py (launchers do not import the package; a test checks they agree).
PREEMPTED_EXIT_CODE = 75
ENV_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


# ---- commands ----------------------------------------------------------------------------------------------
@dataclasses.dataclass
class Command:
    """argv run directly (with env set for this command only), or (for a pipeline) a bash script."""

    argv: list[str] | None = None
    env: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    background: bool = False  # started alongside the others (local processes)
    script: str | None = None

    def __str__(self) -> str:
        if self.script is not None:
            s = self.script
        else:
            s = " ".join([f"{k}={shlex.quote(v)}" for k, v in self.env] + [shlex.join(self.argv)])
        return s + " &" if self.background else s


def announce(c: Command) -> None:
    print(f"+ {c}", flush=True)


def execute(commands: list[Command], dry_run: bool, run: Callable[[Command], int]) -> int:
    """Print each command before running it with `run`; stop at the first failure. dry_run: print only."""
    for c in commands:
        announce(c)
        if dry_run:
            continue
        rc = run(c)
        if rc != 0:
            print(f"error: command failed with exit status {rc}: {c}", file=sys.stderr)
            return rc
    return 0


def remote_path(path: str) -> str:
    """Shell-quote a remote path but keep a leading ~/ unquoted so the remote shell expands it."""
    if path == "~":
        return path
    if path.startswith("~/"):
        rest = path[2:]
        return "~/" + (shlex.quote(rest) if rest else "")
    return shlex.quote(path)


def main_argv(config: str, workdir: str, extra: list[str]) -> list[str]:
    """dollar_jax.main's arguments (after the interpreter)."""
    return ["-m", "dollar_jax.main", f"--config={config}", f"--workdir={workdir}", *extra]


def background_script(env: list[tuple[str, str]], prog: str, log: str) -> str:
    """Remote shell: start `prog` (already quoted) with `env` under nohup, all its output to `log`."""
    started = f"nohup {prog} > {log} 2>&1 < /dev/null"
    if env:
        started = " ".join(f"{k}={shlex.quote(v)}" for k, v in env) + f" {started}"
    # The braces background only the program (all its streams redirected): ssh returns at once.
    return f"{{ {started} & }} && echo \"$(hostname): started pid $!, log {log}\""


# ---- arguments ---------------------------------------------------------------------------------------------
def split_extra(argv: list[str]) -> tuple[list[str], list[str]]:
    """The launcher's own arguments and the flags after '--' (for dollar_jax.main)."""
    if "--" in argv:
        i = argv.index("--")
        return argv[:i], argv[i + 1:]
    return argv, []


def check_unknown(unknown: list[str], fail) -> None:
    if unknown:
        hint = " (config overrides go after '--')" if any(u.startswith("--config.") for u in unknown) else ""
        fail(f"unrecognized arguments: {' '.join(unknown)}{hint}")


def parse_env(items: list[str], fail, launcher_owned: str) -> list[tuple[str, str]]:
    """--env K=V items as (K, V) pairs; `launcher_owned` is the error for a key in LAUNCHER_ENV."""
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            fail(f"--env {item!r}: expected KEY=VALUE")
        if not ENV_KEY_RE.match(key):
            fail(f"--env {item!r}: {key!r} is not a valid environment variable name")
        if key in LAUNCHER_ENV:
            fail(f"--env {key}: {launcher_owned}")
        out.append((key, value))
    return out


def check_extra(extra: list[str], fail) -> None:
    for a in extra:
        if a == "--dry_run":
            fail("--dry_run after '--' would go to dollar_jax.main: put it before '--'")
        if not a.startswith("-"):
            fail(f"extra argument {a!r} after '--' is not a flag (expected e.g. --config.distill.steps=100)")
        if a.split("=", 1)[0] in ("--config", "--workdir"):
            fail(f"{a!r} after '--': give --config/--workdir to the launcher, not as extra flags")
