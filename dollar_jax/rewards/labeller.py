"""The labeller: decode latents, score them with a pixel reward, keep them for latent-reward-model training.

It runs beside the training step, in a background thread with a bounded queue: each step submits the
latents it wants labelled (real data latents and the student's single-step x0 predictions) and goes on;
the thread decodes (no gradient), scores on the host, and appends the labelled chunk.

Determinism (exact resume, identical runs): what a step trains on must not depend on how fast the thread
is. So step s samples only from chunks submitted at steps in (s - lag - window, s - lag], waiting for chunk
s - lag if the thread is behind, with an RNG seeded by (seed, s). The thread only appends; chunks older
than any future step can use are dropped. `state()` (saved with every checkpoint) flushes the queue and
returns the live chunks; `restore()` puts them back.

Memory: a chunk keeps its latents and text embeddings in bfloat16 (the LRM is a small CNN; bf16 inputs cost
it nothing measurable) and the text once per clip, however many latents share it (real and student latents
of one step have the same prompts). At most label_window + label_lag + 1 chunks are live, so per host
    bytes ~ (window + lag + 1) * rows * (latents_per_row * 2 * prod(latent_shape) + 2 * prod(text_shape) + 8)
(config.reward documents it for the reward job). Multi-host: every host labels its own rows and keeps its
own chunks; the checkpoint stores each host's state separately (train/checkpointing.py).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence

import ml_dtypes
import numpy as np

log = logging.getLogger(__name__)
STORE_DTYPE = ml_dtypes.bfloat16  # latents and text embeddings while they wait in the window


class Labeller:
    def __init__(self, decode: Callable[[np.ndarray], np.ndarray], reward: Callable, *, lag: int = 1,
                 window: int = 64, seed: int = 0, max_pending: int = 4):
        if lag < 1 or window < 1:
            raise ValueError("Labeller needs lag >= 1 and window >= 1")
        self.decode, self.reward = decode, reward
        self.lag, self.window, self.seed = lag, window, seed
        self._chunks: dict[int, dict[str, np.ndarray]] = {}  # source step -> labelled arrays
        self._pending: set[int] = set()  # submitted, not yet labelled
        self._dropped_upto = 0  # chunks of steps <= this are dropped: no later batch can sample them
        self._done = threading.Condition()
        self._queue: queue.Queue = queue.Queue(maxsize=max_pending)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._work, name="labeller", daemon=True)
        self._thread.start()

    # ---- the worker ------------------------------------------------------------------------------------
    def _work(self):
        while True:
            item = self._queue.get()
            if item is None:
                return
            step, latents, text, prompts = item
            if latents is None:  # a skipped step
                with self._done:
                    self._chunks[step] = None
                    self._pending.discard(step)
                    self._done.notify_all()
                continue
            try:
                latents = np.asarray(latents, np.float32)
                videos = self.decode(latents)
                scores = np.asarray(self.reward(videos, prompts), np.float32)
                if scores.shape != (len(latents),) or not np.all(np.isfinite(scores)):
                    raise ValueError(f"reward returned {scores.shape} / non-finite values for {len(latents)} clips")
                chunk = {"latents": latents.astype(STORE_DTYPE), "text": np.asarray(text).astype(STORE_DTYPE),
                         "score": scores}
            except BaseException as e:  # noqa: BLE001 - reported to the training thread on its next call
                with self._done:
                    self._error = e
                    self._done.notify_all()
                return
            with self._done:
                self._chunks[step] = chunk
                self._pending.discard(step)
                self._done.notify_all()

    def _raise_if_failed(self):
        if self._error is not None:
            raise RuntimeError(f"The labeller failed: {self._error!r}") from self._error

    # ---- the training side -----------------------------------------------------------------------------
    def submit(self, step: int, latents, text, prompts: Sequence[str]) -> None:
        """Queue latents [N, ...] (NumPy or addressable jax arrays), text [M, L, D] and N prompts for step `step`.

        M divides N: latent i goes with text i % M (the real and the student latents of a step share M texts)."""
        self._raise_if_failed()
        if len(prompts) != len(latents):
            raise ValueError(f"{len(latents)} latents but {len(prompts)} prompts")
        if len(text) == 0 or len(latents) % len(text):
            raise ValueError(f"{len(latents)} latents cannot share {len(text)} text rows (latent i uses text i % M)")
        with self._done:
            self._pending.add(int(step))
        self._queue.put((int(step), latents, text, list(prompts)))

    def skip(self, step: int) -> None:
        """Record that step `step` has nothing to label (it was not finite): an empty chunk, so that later steps
        waiting for it go on."""
        self._raise_if_failed()
        with self._done:
            self._pending.add(int(step))
        self._queue.put((int(step), None, None, None))  # through the queue: chunks complete in step order

    def _eligible(self, step: int) -> list[int]:
        hi, lo = step - self.lag, step - self.lag - self.window
        return sorted(s for s in self._chunks if lo < s <= hi and self._chunks[s] is not None)

    def batch(self, step: int, size: int) -> dict[str, np.ndarray] | None:
        """A deterministic training batch for step `step`, or None when no labelled data can exist yet.

        Every step from 1 on submits one chunk; the call waits for chunk `step - lag` so that the answer never
        depends on the thread's speed.
        """
        target = step - self.lag
        with self._done:
            must = target if target >= 1 else None
            if must is not None and must not in self._chunks and must <= self._dropped_upto:
                # Waiting would never end: batches are drawn in step order, and this chunk is already dropped.
                raise ValueError(f"labeller batch for step {step} needs step {must}'s labels, dropped when a later "
                                 f"step's batch was drawn (batches must be drawn in step order)")
            while must is not None and must not in self._chunks and self._error is None:
                self._done.wait(timeout=1.0)
            self._raise_if_failed()
            for s in [s for s in self._chunks if s <= target - self.window]:
                del self._chunks[s]  # no step from here on can sample these
            self._dropped_upto = max(self._dropped_upto, target - self.window)
            chunks = [self._chunks[s] for s in self._eligible(step)]
        if not chunks:
            return None
        rows = len(chunks[0]["score"])  # every step submits the same number of rows
        rng = np.random.default_rng([self.seed, step])
        total = rows * len(chunks)
        idx = rng.choice(total, size=size, replace=total < size)
        which, row = np.divmod(idx, rows)
        pick = lambda key, r: np.stack([chunks[c][key][i] for c, i in zip(which, r)]).astype(np.float32)
        return {"latents": pick("latents", row), "score": pick("score", row),
                "text": pick("text", row % len(chunks[0]["text"]))}

    def flush(self) -> None:
        """Wait until everything submitted is labelled (or raise the worker's error)."""
        with self._done:
            while self._pending and self._error is None:
                self._done.wait(timeout=1.0)
            self._raise_if_failed()

    def state(self) -> dict:
        """Every live labelled chunk, after finishing the queued work, stacked by source step:
        {"steps": [K], "latents": [K, N, ...], "text": [K, M, L, D], "score": [K, N]} (only "steps" when K = 0).

        The same shapes on every host (same steps, same rows per host): train/checkpointing.py stores each
        host's copy as its row of an array with a process axis."""
        self.flush()
        with self._done:
            live = sorted(s for s, c in self._chunks.items() if c is not None)
            skipped = sorted(s for s, c in self._chunks.items() if c is None)
            # Skipped steps are saved too: a resumed step waiting for one of them must not wait forever. Orbax
            # cannot save zero-size arrays, so an empty list is saved as [-1] (no step is negative).
            out = {"steps": np.asarray(live or [-1], np.int32), "skipped": np.asarray(skipped or [-1], np.int32)}
            for key in ("latents", "text", "score") if live else ():
                out[key] = np.stack([self._chunks[s][key] for s in live])
        return out

    def restore(self, state: dict) -> None:
        steps = [s for s in np.asarray(state["steps"]).tolist() if s >= 0]  # [-1]: none (see `state`)
        with self._done:
            self._chunks = {int(s): {"latents": np.asarray(state["latents"][i]).astype(STORE_DTYPE),
                                     "text": np.asarray(state["text"][i]).astype(STORE_DTYPE),
                                     "score": np.asarray(state["score"][i], np.float32)}
                            for i, s in enumerate(steps)}
            self._chunks.update({int(s): None for s in np.asarray(state.get("skipped", [])).tolist() if s >= 0})

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=60)
