"""The environment of every test process (pytest's own and the subprocesses tests start), in one place.

- N virtual CPU devices and a client thread pool their collectives cannot exhaust: launch/gpu.py's cpu_env,
  the environment users get from `launch/gpu.py --cpu_devices_per_process`. Without the larger pool the
  8-device DOLLAR step hung in CI (seven devices waiting in a collective for an eighth that had no thread)
  and two-process runs with 2 devices each aborted; cpu_pool_threads there says how it was reproduced.
- Collective rendezvous timeouts raised from XLA's defaults (seconds): on 2 loaded cores one device can reach
  a collective well after the others, and XLA then aborts the whole process, which pytest-xdist reports as a
  lost worker. Ten minutes still ends a real hang long before CI's limit.
- LLVM optimisation level 1 instead of 2: the tests' arrays are tiny, so compiling dominates running; level 1
  compiles the DOLLAR step in about half the time (measured in BENCHMARKS.md, "Test suite") and gives the same
  numbers on the tests' steps. Programs are still deterministic, and every test compares like with like.
"""

import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch"))
from gpu import CPU_DEVICES_FLAG, cpu_env  # noqa: E402

COMMON = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=600 "
          "--xla_cpu_collective_timeout_seconds=600 "
          "--xla_backend_optimization_level=1")


def cpu_test_env(devices: int, xla_flags: str = COMMON) -> dict[str, str]:
    """JAX_PLATFORMS, XLA_FLAGS and PJRT_NPROC for a test process with `devices` virtual CPU devices."""
    return dict(cpu_env(devices, xla_flags))


def requested_devices(xla_flags: str, default: int) -> int:
    """The device count an XLA_FLAGS string asks for, or `default`."""
    counts = [f.split("=", 1)[1] for f in xla_flags.split() if f.startswith(CPU_DEVICES_FLAG + "=")]
    return int(counts[-1]) if counts else default
