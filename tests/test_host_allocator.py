"""The huge-page tunable reaches the processes that run XLA:CPU steps, once, without losing other tunables."""

import os
import subprocess
import sys

import pytest

from dollar_jax.host_allocator import OPT_OUT, TUNABLE, _glibc, with_huge_pages

pytestmark = pytest.mark.skipif(not _glibc(), reason="glibc tunables only")


def test_the_tunable_joins_the_callers_and_respects_theirs_and_the_opt_out():
    assert with_huge_pages({})["GLIBC_TUNABLES"] == TUNABLE
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"})["GLIBC_TUNABLES"] == \
        f"glibc.malloc.arena_max=2:{TUNABLE}"
    assert with_huge_pages({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})["GLIBC_TUNABLES"] == "glibc.malloc.hugetlb=0"
    assert "GLIBC_TUNABLES" not in with_huge_pages({OPT_OUT: "0"})


def test_a_process_reexecutes_once_with_it_in_its_start_environment():
    code = ("import os, sys; from dollar_jax.host_allocator import reexec_with_huge_pages; print('start', flush=True);"
            " reexec_with_huge_pages(); print(open('/proc/self/environ').read().split(chr(0)).count("
            f"'GLIBC_TUNABLES={TUNABLE}'), sys.argv[1:])")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    out = subprocess.run([sys.executable, "-c", code, "an-argument"], env=env, capture_output=True, text=True,
                         check=True).stdout.split("\n")
    assert out[:3] == ["start", "start", "1 ['an-argument']"], out  # one re-exec, arguments kept
    env[OPT_OUT] = "0"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert out.split("\n")[:2] == ["start", "0 []"], out
