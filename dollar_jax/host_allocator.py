"""Transparent huge pages for the host allocator, so XLA:CPU's per-step buffers cost few page faults.

XLA:CPU allocates each execution's temporary buffer with posix_memalign from a pool thread and frees it when the
step ends (247 MB for the embedded world's teacher step at batch 32). glibc serves a request that large with a
fresh mmap and unmaps it on free, so every step first-touches the whole buffer again: 60,000 page faults of 4 KiB
per step, and about 0.15 s of kernel time per 0.2 s step on 2 cores (measured with perf and strace, BENCHMARKS.md,
"Host allocator"). With glibc's `glibc.malloc.hugetlb=1` tunable (glibc >= 2.35) those mappings are advised as
transparent huge pages (2 MiB): 300 teacher steps fault 39x less (18.6 M -> 0.48 M, start-up included), compute
the same numbers, and the world teacher's step takes 0.146 s instead of 0.211 s.

glibc reads tunables once, when the process starts, so the setting must be in the environment before Python
starts: `python -m dollar_jax.main` re-executes itself once with it (same PID, same arguments), and tests set
it for their processes with `with_huge_pages`. Keeping one arena or disabling mmap (`MALLOC_ARENA_MAX=1`,
`MALLOC_MMAP_MAX_=0`) also removed the faults but slowed XLA's compiler 16% (arena lock contention).

Accelerator hosts gain nothing (device buffers are not malloc'd) and lose nothing. A kernel whose transparent
huge pages are "never" ignores the advice. `DOLLAR_HUGE_PAGES=0` turns it off.
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "DOLLAR_HUGE_PAGES"


def _glibc() -> bool:
    return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def with_huge_pages(env: dict[str, str]) -> dict[str, str]:
    """`env` with the tunable added to GLIBC_TUNABLES (other tunables kept; an explicit hugetlb setting wins)."""
    env = dict(env)
    if env.get(OPT_OUT) == "0" or not _glibc():
        return env
    tunables = [t for t in env.get("GLIBC_TUNABLES", "").split(":") if t]
    if not any(t.startswith("glibc.malloc.hugetlb=") for t in tunables):
        env["GLIBC_TUNABLES"] = ":".join(tunables + [TUNABLE])
    return env


def reexec_with_huge_pages() -> None:
    """Re-execute this Python process with the tunable in its environment, unless it already has it (or has
    opted out, or is not on glibc). Call before anything starts threads or touches a JAX backend."""
    env = with_huge_pages(os.environ)
    if env.get("GLIBC_TUNABLES") == os.environ.get("GLIBC_TUNABLES"):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
