"""Entry point: python -m dollar_jax.main --config=configs/<file>.py[:arg] --workdir=DIR [--config.key=value ...]

Runs config.job. Every job resumes from what DIR already holds and skips stages whose outputs exist.
Exit status: 0 done; 75 (EX_TEMPFAIL) preempted (SIGTERM or the TPU runtime's preemption notice) after
saving the step in progress: run the same command again to resume (launch/ supervisors do); other: an error.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Work directory (a local path or gs://bucket/...): checkpoints, "
                                "metrics, samples, reports.")
from dollar_jax.cli_errors import define_verbose_flag  # noqa: E402

_VERBOSE = define_verbose_flag()
flags.mark_flags_as_required(["config", "workdir"])


def run_job(config, workdir: str):
    """Dispatch config.job (importing only what the job needs)."""
    from dollar_jax.config import validate

    validate(config)
    job = config.job
    if config.embedded_world and job in ("autoencoder", "precompute", "teacher", "distill"):
        from dollar_jax.jobs import autoencoder, world_data

        world_data.build_videos(config, workdir)
        autoencoder.run(config, workdir)
        if job in ("precompute", "teacher", "distill"):
            from dollar_jax.jobs import precompute

            precompute.run(config, workdir)
        if job == "distill" and not config.distill.teacher:  # an explicit teacher folder is used as given
            from dollar_jax.jobs import teacher

            teacher.run(config, workdir)
    if job == "teacher":
        from dollar_jax.jobs import teacher

        return teacher.run(config, workdir)
    if job == "distill":
        from dollar_jax.jobs import distill

        return distill.run(config, workdir)
    if job == "demo":
        from dollar_jax.jobs import demo

        return demo.run(config, workdir)
    if job == "precompute" and not config.embedded_world:
        raise ValueError("job 'precompute' builds the embedded world's latents; for real videos use "
                         "tools/precompute_latents.py")
    return None


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)  # Orbax/tfds chatter
    logging.getLogger("dollar_jax").setLevel(logging.INFO)
    from dollar_jax import storage

    storage.makedirs(_WORKDIR.value)  # a local folder; gs://bucket/... workdirs are used as they are
    config = _CONFIG.value
    from dollar_jax.parallel.distributed import DistributedConfigError, describe, maybe_initialize

    try:  # before anything touches a JAX backend
        started = maybe_initialize(config.distributed)
    except DistributedConfigError as e:
        raise app.UsageError(str(e)) from None
    if started:
        print(f"[dollar] {describe()}", flush=True)
    from dollar_jax import compilation_cache
    from dollar_jax.train.preemption import PREEMPTED_EXIT_CODE, Preempted

    compilation_cache.enable(config.compilation_cache, _WORKDIR.value)
    try:
        run_job(config, _WORKDIR.value)
    except Preempted as e:
        # The checkpoint of the step in progress is written; the launcher's supervisor restarts on this code.
        print(f"[dollar] {e}; exiting with status {PREEMPTED_EXIT_CODE} (restart to resume)", flush=True)
        return PREEMPTED_EXIT_CODE
    return 0


if __name__ == "__main__":
    from dollar_jax.cli_errors import run_absl
    from dollar_jax.host_allocator import reexec_with_huge_pages

    reexec_with_huge_pages()  # XLA:CPU's per-step buffers on huge pages (host_allocator.py says why)

    sys.exit(run_absl(main))
