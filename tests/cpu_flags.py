"""XLA flags for every test process (pytest's own and the subprocesses tests start), in one place.

- N virtual CPU devices, for the sharding tests.
- Collective rendezvous timeouts raised from XLA's default (seconds): with 8 virtual devices on 2 loaded cores,
  one device's thread can reach an all-reduce minutes after the others, and XLA then aborts the whole process
  ("Termination timeout ... exceeded"), which pytest-xdist reports as a lost worker.
- XLA:CPU's concurrency-optimised scheduler off: with it, the DOLLAR step with fresh fake samples on 8 virtual
  devices (data 2 x fsdp 2 x tensor 2) deadlocked on its first step, one device waiting in an all-gather
  while the other seven waited in a collective-permute (seen in CI and reproduced here: hung on the first try,
  3 of 3 runs finished with it off). CPU test runs only; GPU and TPU runtimes order collectives themselves.
- LLVM optimisation level 1 instead of 2: the tests' arrays are tiny, so compiling dominates running; level 1
  compiles the DOLLAR step in about half the time (measured in BENCHMARKS.md, "test suite") and gives the same
  numbers on the tests' steps. Programs are still deterministic, and every test compares like with like.
"""

COMMON = ("--xla_cpu_collective_call_warn_stuck_timeout_seconds=300 "
          "--xla_cpu_collective_call_terminate_timeout_seconds=1800 "
          "--xla_cpu_collective_timeout_seconds=1800 "
          "--xla_cpu_enable_concurrency_optimized_scheduler=false "
          "--xla_backend_optimization_level=1")


def xla_flags(devices: int) -> str:
    return f"--xla_force_host_platform_device_count={devices} {COMMON}"
