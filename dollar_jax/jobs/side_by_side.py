"""Independent stages run side by side, each in a process of its own (the three students, say).

Why processes: on 2 CPU cores one XLA:CPU training loop keeps the cores about 80% busy (its small ops, the
per-step host work and the compiler leave gaps), so two loops in separate processes finish 18% sooner than
one after the other (BENCHMARKS.md, "Stages side by side"). Threads in one process gain nothing: they share one
XLA client and its thread pool. Each process computes exactly what the stage computes alone: the programs,
seeds and data order are the stage's own.

Each stage runs in a fresh `spawn`ed interpreter with the parent's environment (XLA_FLAGS, huge pages) and the
persistent compilation cache. A SIGTERM to the parent (a preemption) is passed on to every running stage, which
saves its step and stops; the group then raises `Preempted`, as a single stage would. A stage that fails stops
the others the same way (their checkpoints are kept) and its exception is raised in the parent.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    fn: Callable  # a module-level function (it is pickled into the stage's process)
    args: tuple


def _child(conn, stage: Stage, compilation_cache: tuple[str, str]) -> None:
    import logging

    from dollar_jax import compilation_cache as cache
    from dollar_jax.train.preemption import Preempted

    logging.getLogger("dollar_jax").setLevel(logging.INFO)
    cache.enable(*compilation_cache)
    t = time.perf_counter()
    try:
        out = stage.fn(*stage.args)
        conn.send(("ok", out, time.perf_counter() - t))
    except Preempted as e:
        conn.send(("preempted", e.step, time.perf_counter() - t))
    except BaseException as e:  # noqa: BLE001 - every failure goes back to the parent, which re-raises it
        try:
            pickle.dumps(e)
            conn.send(("error", e, traceback.format_exc()))
        except Exception:  # noqa: BLE001 - an exception that cannot be pickled travels as its text
            conn.send(("error", RuntimeError(f"{type(e).__name__}: {e}"), traceback.format_exc()))
    finally:
        conn.close()


def run(stages: list[Stage], max_running: int, compilation_cache: tuple[str, str] = ("", "")) -> dict:
    """Runs `stages` in processes, at most `max_running` at a time, in the order given. Returns {name: (result,
    seconds)}: each stage's return value and its own wall time. `compilation_cache`: compilation_cache.enable's
    (setting, workdir) for every stage."""
    from dollar_jax.train.preemption import Preempted

    ctx = multiprocessing.get_context("spawn")
    waiting, running, results = list(stages), {}, {}
    failure, preempted_at, signalled = None, None, []

    def stop_running():
        for proc, _conn in running.values():
            if proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)

    def on_sigterm(*_):
        signalled.append(True)
        stop_running()

    previous = signal.signal(signal.SIGTERM, on_sigterm) if _main_thread() else None
    try:
        while waiting or running:
            while waiting and len(running) < max_running and not (failure or preempted_at or signalled):
                stage = waiting.pop(0)
                parent_end, child_end = ctx.Pipe(duplex=False)
                proc = ctx.Process(target=_child, args=(child_end, stage, compilation_cache), name=stage.name)
                proc.start()
                child_end.close()
                running[stage.name] = (proc, parent_end)
            if not running:
                break
            ready = set(multiprocessing.connection.wait(
                [c for _, c in running.values()] + [p.sentinel for p, _ in running.values()]))
            for name, (proc, conn) in list(running.items()):
                if conn not in ready and proc.sentinel not in ready:
                    continue
                try:
                    kind, value, extra = conn.recv()
                except EOFError:  # the process ended without a word: killed, out of memory
                    kind, value, extra = "died", None, ""
                proc.join()
                conn.close()
                del running[name]
                if kind == "ok":
                    results[name] = (value, extra)
                elif kind == "preempted":
                    preempted_at = value if preempted_at is None else min(preempted_at, value)
                elif kind == "died" and signalled:
                    pass  # stopped by the SIGTERM before it had a step to save
                elif failure is None:
                    if kind == "died":
                        value = RuntimeError(f"stage {name!r} ended with exit status {proc.exitcode} and no result")
                    failure = (name, value, extra)
                    stop_running()  # the others save their step and stop; what they saved is kept
    finally:
        stop_running()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    if failure is not None:
        name, error, text = failure
        if text:
            print(f"[demo] stage {name!r} failed in its process:\n{text}", flush=True)
        raise error
    if preempted_at is not None:
        raise Preempted(preempted_at)
    if signalled:  # nothing was training: end as a SIGTERM would have ended the stages run in this process
        os.kill(os.getpid(), signal.SIGTERM)
    return results


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
