"""Preemption: notice it, agree on a step across hosts, and let the loop save that step and stop.

Spot/preemptible TPU VMs and SLURM send SIGTERM some seconds to minutes before the machine goes away.

- One process: a SIGTERM handler sets a flag; the loop checks it after every step, saves the step it just
  finished and raises Preempted.
- Several processes (jax.distributed): the hosts must stop at the SAME step, or their checkpoints would
  mix steps. JAX's preemption service (on by default with jax.distributed) catches SIGTERM on any host and
  agrees on a sync step through the coordinator; orbax.checkpoint.multihost.reached_preemption(step) returns
  True on every host at that step. Our own handler is not installed then (it would replace the runtime's).

main.py turns Preempted into exit status PREEMPTED_EXIT_CODE, which launch/ supervisors read as "restart me".
"""

from __future__ import annotations

import logging
import signal
import threading

import jax

log = logging.getLogger(__name__)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: a temporary failure, the caller is invited to retry


class Preempted(Exception):
    """Training stopped after saving step `step` because the machine is being taken away."""

    def __init__(self, step: int):
        super().__init__(f"preempted: saved the checkpoint of step {step}")
        self.step = step


class PreemptionWatch:
    """`reached(step)`: must be called once per step, with increasing steps, on every host."""

    def __init__(self):
        self.signalled = False
        self._previous = None
        self._multihost = jax.process_count() > 1
        if not self._multihost and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame):  # noqa: ARG002 - signal handler signature
        if not self.signalled:
            log.warning("SIGTERM received: saving at the end of the current step, then stopping")
        self.signalled = True

    def reached(self, step: int) -> bool:
        if self._multihost:
            import orbax.checkpoint as ocp

            return bool(ocp.multihost.reached_preemption(step))
        return self.signalled

    def close(self) -> None:
        """Give SIGTERM back to whoever had it (after training, a SIGTERM ends the process as usual)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None
