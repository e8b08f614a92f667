"""Multi-host start: decide whether this process is one of several, and call jax.distributed.initialize.

Where users run and how each is recognised (without importing a JAX backend, which must not start before
initialize() is called):

- explicit coordinator (GPU hosts, launch/gpu.py; any cluster): DOLLAR_COORDINATOR=host:port,
  DOLLAR_NUM_PROCESSES, DOLLAR_PROCESS_ID. All three or none: a partial set stops with the missing names.
- GKE TPU pods: TPU_WORKER_HOSTNAMES lists more than one host; initialize() reads the rest from the env.
- Cloud TPU VMs (queued resources, `gcloud compute tpus tpu-vm create`): nothing in the environment, but
  libtpu is installed and the chips are visible as /dev/accel* (v4, v5p) or /dev/vfio/* (v5e, v6e).
  initialize() asks the metadata server for the workers (MaxText and maxdiffusion call it unconditionally
  on TPU; a single-host slice is a cluster of one). Without it a slice runs as N unrelated processes and
  Orbax's multi-process checkpointers refuse to save.
- SLURM: SLURM_JOB_ID with SLURM_NTASKS > 1 (one task per host or per GPU); initialize() reads the node
  list and task ids itself.

A switch forces or skips it: config.distributed or the DOLLAR_DISTRIBUTED environment variable
("auto" | "on" | "off"; the environment wins, so a launcher or a user can override a config file).
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
from collections.abc import Callable, Mapping

log = logging.getLogger(__name__)

EXPLICIT_ENV = ("DOLLAR_COORDINATOR", "DOLLAR_NUM_PROCESSES", "DOLLAR_PROCESS_ID")  # set by launch/gpu.py
MODES = ("auto", "on", "off")
LIBTPU_MODULES = ("libtpu", "libtpu_nightly")  # pip packages that carry the TPU runtime
TPU_DEVICE_GLOBS = ("/dev/accel*", "/dev/vfio/[0-9]*")


class DistributedConfigError(ValueError):
    """The environment describes a cluster only partly (or inconsistently)."""


@dataclasses.dataclass(frozen=True)
class Cluster:
    """How to start: `kind` names the environment; `kwargs` go to jax.distributed.initialize."""

    kind: str  # "explicit" | "gke_tpu" | "cloud_tpu" | "slurm" | "forced"
    kwargs: dict = dataclasses.field(default_factory=dict)


def _has_libtpu() -> bool:
    return any(importlib.util.find_spec(m) is not None for m in LIBTPU_MODULES)


def _tpu_devices() -> list[str]:
    return [p for pattern in TPU_DEVICE_GLOBS for p in glob.glob(pattern)]


def _positive_int(env: Mapping[str, str], key: str, minimum: int) -> int:
    try:
        value = int(env[key])
    except ValueError:
        raise DistributedConfigError(f"{key}={env[key]!r} is not an integer") from None
    if value < minimum:
        raise DistributedConfigError(f"{key}={value} must be >= {minimum}")
    return value


def detect(env: Mapping[str, str] | None = None, mode: str = "auto", has_libtpu: Callable[[], bool] = _has_libtpu,
           tpu_devices: Callable[[], list[str]] = _tpu_devices) -> Cluster | None:
    """The cluster this process belongs to, or None for a single process. Pure: reads only its arguments."""
    env = os.environ if env is None else env
    mode = env.get("DOLLAR_DISTRIBUTED", mode) or "auto"
    if mode not in MODES:
        raise DistributedConfigError(f"distributed mode {mode!r} (config.distributed / DOLLAR_DISTRIBUTED) must be "
                                     f"one of {MODES}")
    if mode == "off":
        return None
    given = [k for k in EXPLICIT_ENV if env.get(k)]
    if given:
        missing = [k for k in EXPLICIT_ENV if k not in given]
        if missing:
            raise DistributedConfigError(f"{', '.join(given)} set but {', '.join(missing)} missing: an explicit "
                                         f"cluster needs all of {', '.join(EXPLICIT_ENV)} (launch/gpu.py sets them)")
        if ":" not in env["DOLLAR_COORDINATOR"]:
            raise DistributedConfigError(f"DOLLAR_COORDINATOR={env['DOLLAR_COORDINATOR']!r}: expected host:port")
        n = _positive_int(env, "DOLLAR_NUM_PROCESSES", 1)
        i = _positive_int(env, "DOLLAR_PROCESS_ID", 0)
        if i >= n:
            raise DistributedConfigError(f"DOLLAR_PROCESS_ID={i} must be < DOLLAR_NUM_PROCESSES={n}")
        return Cluster("explicit", dict(coordinator_address=env["DOLLAR_COORDINATOR"], num_processes=n, process_id=i))
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return Cluster("gke_tpu")
    if env.get("SLURM_JOB_ID") and env.get("SLURM_NTASKS"):
        if _positive_int(env, "SLURM_NTASKS", 1) > 1:
            return Cluster("slurm")
    if has_libtpu() and tpu_devices():
        # JAX_PLATFORMS=cpu on a TPU VM (tools, tests) means the user does not want the TPU: stay single.
        platforms = env.get("JAX_PLATFORMS", "")
        if not platforms or "tpu" in platforms:
            return Cluster("cloud_tpu")
    if mode == "on":
        return Cluster("forced")  # JAX's own cluster detection must find it (or it raises)
    return None


def maybe_initialize(mode: str = "auto", env: Mapping[str, str] | None = None, **detect_kwargs) -> bool:
    """Initialise JAX's multi-controller runtime when `detect` finds a cluster; returns True if it did.

    Must run before anything touches a JAX backend (jax.devices(), a jit, an array)."""
    import jax

    cluster = detect(env, mode, **detect_kwargs)
    if cluster is None:
        return False
    if jax.distributed.is_initialized():
        return True  # already started (a caller's own initialize, or a second job in this process)
    log.info("jax.distributed: starting (%s)", cluster.kind)
    try:
        jax.distributed.initialize(**cluster.kwargs)
    except Exception as e:  # noqa: BLE001 - say which environment we thought this was, then re-raise
        raise RuntimeError(f"jax.distributed.initialize failed for a {cluster.kind} cluster ({e}); set "
                           "DOLLAR_DISTRIBUTED=off to run this host as a single process") from e
    return True  # the caller prints describe(): one line per process


def describe() -> str:
    """One line: process index/count and local/global devices."""
    import jax

    return (f"process {jax.process_index()} of {jax.process_count()}: {jax.local_device_count()} local / "
            f"{jax.device_count()} global devices")
