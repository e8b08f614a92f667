"""Text conditioning for the embedded world.

Real runs encode prompts once, offline, with umT5 (PyTorch) and store the embeddings with the latents
(tools/precompute_latents.py). The embedded world needs the same interface without a 5B-parameter encoder:
`WordEncoder` maps each word to a fixed pseudo-random vector (seeded by the word itself) and pads the
sequence with zeros to `max_length`, exactly the layout of Wan's padded umT5 output [L, D]. The
unconditional ("null") embedding is the encoding of the empty prompt: all zeros.
"""

from __future__ import annotations

import hashlib

import numpy as np


class WordEncoder:
    def __init__(self, max_length: int = 8, dim: int = 32, seed: int = 0):
        self.max_length, self.dim, self.seed = int(max_length), int(dim), int(seed)
        self._cache: dict[str, np.ndarray] = {}

    def _word(self, word: str) -> np.ndarray:
        if word not in self._cache:
            digest = hashlib.sha256(f"{self.seed}:{word}".encode()).digest()
            rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
            self._cache[word] = (rng.standard_normal(self.dim) / np.sqrt(self.dim)).astype(np.float32)
        return self._cache[word]

    def encode_one(self, prompt: str) -> np.ndarray:
        words = prompt.lower().split()
        if len(words) > self.max_length:
            raise ValueError(f"Prompt {prompt!r} has {len(words)} words; the encoder's max_length is "
                             f"{self.max_length} (config.text.max_length)")
        out = np.zeros((self.max_length, self.dim), np.float32)
        for i, w in enumerate(words):
            out[i] = self._word(w)
        return out

    def encode(self, prompts) -> np.ndarray:
        """[B] prompts -> [B, max_length, dim] float32."""
        return np.stack([self.encode_one(p) for p in prompts])

    def null(self) -> np.ndarray:
        """[max_length, dim] embedding of the empty prompt (the unconditional input for CFG)."""
        return self.encode_one("")


def text_encoder(config) -> WordEncoder:
    """The embedded world's encoder with the settings of `config.text`."""
    return WordEncoder(config.text.max_length, config.text.dim, config.text.seed)
