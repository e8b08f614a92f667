"""Multi-host start: call jax.distributed.initialize when the environment says this is one of several processes."""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger(__name__)

# Set by launch/ scripts (GPU hosts) or by the TPU runtime (pods: initialize() discovers everything itself).
_ENV = ("DOLLAR_COORDINATOR", "DOLLAR_NUM_PROCESSES", "DOLLAR_PROCESS_ID")


def maybe_initialize() -> bool:
    """Initialise JAX's multi-controller runtime when running multi-process; returns True if it did.

    - GPU/CPU hosts: DOLLAR_COORDINATOR=host:port, DOLLAR_NUM_PROCESSES, DOLLAR_PROCESS_ID (launch/gpu.py).
    - TPU pod slices: TPU_WORKER_HOSTNAMES with more than one host -> initialize() auto-detects.
    """
    if all(k in os.environ for k in _ENV):
        jax.distributed.initialize(
            coordinator_address=os.environ["DOLLAR_COORDINATOR"],
            num_processes=int(os.environ["DOLLAR_NUM_PROCESSES"]),
            process_id=int(os.environ["DOLLAR_PROCESS_ID"]),
        )
    elif len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        jax.distributed.initialize()
    else:
        return False
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True
