"""Evaluate models in the embedded world: adherence, diversity, reward, distance, speed - one fixed protocol.

Every model sees the same prompts and the same initial noise (P prompts x K samples each), so differences
come from the models alone. Numbers are computed from the run, never from constants.

The prompts are the world's *seen* compositions (`world.prompt_set`), followed by every held-out one
(`world.held_out_prompts`, none in any training or validation clip). A row's numbers are the seen prompts';
its "held_out" entry scores the held-out prompts apart (compositional generalisation).
"""

from __future__ import annotations

import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dollar_jax.checkpoint import (load_autoencoder, load_dit, load_world_encoder, read_model_folder_config,
                                   teacher_parameterisation)
from dollar_jax.compile_effort import light_jit, normal
from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.pipeline import eval_batches
from dollar_jax.data.text import text_encoder
from dollar_jax.data.world import world_config
from dollar_jax.eval import video_io, world_eval
from dollar_jax.eval.diversity import frechet_distance, vendi_score
from dollar_jax.eval.generate import SamplerSpec, make_generate, student_sampler, teacher_spec
from dollar_jax.paths import Paths
from dollar_jax.rewards import make_reward


@dataclasses.dataclass
class Entry:
    """One row of the tables: a model folder sampled with one sampler."""

    name: str  # e.g. "VSD+CD (4 steps)"
    model: str  # "teacher" | "student" ...
    folder: str
    spec: SamplerSpec


def entries_for(folder: str, label: str, steps, guidance: float, convention: str) -> list[Entry]:
    _, blob = read_model_folder_config(folder, "dit")
    schedule, _, _ = teacher_parameterisation(folder)
    if "student" not in blob:
        return [Entry(f"{label} ({steps[0]} steps, CFG {guidance})", label, folder,
                      teacher_spec(schedule, steps[0], guidance, convention))]
    return [Entry(f"{label} ({n} step{'s' * (n > 1)})", label, folder, student_sampler(blob["student"], n))
            for n in steps]


class WorldBenchmark:
    def __init__(self, config, workdir: str, prompts: int = 16, samples_per_prompt: int = 8, seed: int = 0,
                 reward: str = "vividness"):
        self.config, self.workdir = config, workdir
        self.paths, self.wcfg = Paths.of(config, workdir), world_config(config)
        self.encoder = text_encoder(config)
        combos = world.prompt_set(self.wcfg, prompts, seed) + world.held_out_prompts(self.wcfg)
        self.groups = np.repeat(np.arange(len(combos)), samples_per_prompt)
        self.seen = self.groups < prompts  # clips of seen prompts; the rest are held-out compositions
        self.factors = {f: np.asarray([combos[g][f] for g in self.groups]) for f in world.FACTORS}
        self.captions = [world.caption(combos[g], self.wcfg) for g in self.groups]
        self.text = self.encoder.encode(self.captions)
        self.null = np.broadcast_to(self.encoder.null(), self.text.shape)
        shape = arrays_dataset.feature_shapes(self.paths.data, config.data.latents)["latents"][1]
        self.latent_shape = tuple(shape)
        # The held-out prompts' noise has its own key: the seen prompts' noise is what it was without them.
        self.noise = jnp.concatenate([normal(jax.random.key(seed + 100 + k), (n, *shape))
                                      for k, n in enumerate((int(self.seen.sum()), int((~self.seen).sum()))) if n])
        self.ae = load_autoencoder(self.paths.autoencoder)
        self.evaluator = load_world_encoder(self.paths.world_encoder(config))
        self._features = light_jit(lambda m, v: m.features(v))
        self._samplers: dict = {}
        self.reward_name = reward
        self.reward = make_reward(reward)
        source = arrays_dataset.open_split(self.paths.data, config.data.videos, "validation")
        batches = list(eval_batches(source, 128))
        self.real = np.concatenate([b["video"] for b in batches])
        self.real_captions = [c.decode() for b in batches for c in b["caption"]]
        self.real_features = self.features(self.real)
        self.feature_mean = self.real_features.mean(axis=0)

    def features(self, videos: np.ndarray) -> np.ndarray:
        """Evaluation-encoder features, L2-normalised (the cosine geometry the Vendi score uses too)."""
        f = np.concatenate([np.asarray(self._features(self.evaluator, videos[i:i + 128]))
                            for i in range(0, len(videos), 128)])
        return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)

    def data_row(self) -> dict:
        """Real clips: the reference for reward and distance (distance between two halves of the data)."""
        half = len(self.real) // 2
        return {"name": "data (validation clips)", "adherence": {f: 1.0 for f in world.FACTORS} | {"mean": 1.0, "all": 1.0},
                "reward": float(np.mean(self.reward(self.real, self.real_captions))),
                "frechet_distance": frechet_distance(self.real_features[:half], self.real_features[half:])}

    def _sampler(self, entry: Entry):
        """(jitted sampler, parameters) for an entry. Samplers are shared by entries with the same architecture,
        parameterisation and sampler spec (every student at n steps): traced and compiled once per evaluation."""
        schedule, prediction_type, _ = teacher_parameterisation(entry.folder)
        graphdef, params = nnx.split(load_dit(entry.folder))
        key = (graphdef, schedule, prediction_type, entry.spec)
        if key not in self._samplers:
            self._samplers[key] = make_generate(lambda p: nnx.merge(graphdef, p), schedule, prediction_type,
                                                entry.spec)
        return self._samplers[key], params

    def generate(self, entry: Entry, rng_seed: int = 1) -> np.ndarray:
        generate, params = self._sampler(entry)
        return np.asarray(generate(params, self.noise, jnp.asarray(self.text), jnp.asarray(self.null),
                                   jax.random.key(rng_seed)))

    def evaluate(self, entry: Entry, out_dir: str | None = None) -> dict:
        all_videos = world_eval.decode(self.ae, self.generate(entry))
        row = self._score(entry, all_videos[self.seen], self.groups[self.seen],
                          {f: v[self.seen] for f, v in self.factors.items()},
                          [c for c, s in zip(self.captions, self.seen) if s])
        if not self.seen.all():
            held = ~self.seen
            read = world.read_factors_batch(all_videos[held], self.wcfg)
            hits = np.stack([read[f] == self.factors[f][held] for f in world.FACTORS])
            groups = self.groups[held]
            row["held_out"] = {
                "prompts": int(len(np.unique(groups))),
                "adherence": {f: float(h.mean()) for f, h in zip(world.FACTORS, hits)}
                | {"all": float(hits.all(0).mean()), "mean": float(hits.mean())},
                "per_prompt": {"adherence": [float(hits.mean(0)[groups == g].mean()) for g in np.unique(groups)]},
            }
        if out_dir is not None:
            slug = "".join(c if c.isalnum() else "_" for c in entry.name.lower()).strip("_")
            first = all_videos[np.unique(self.groups, return_index=True)[1]]  # one sample per prompt
            row["grid"] = os.path.relpath(video_io.write_gif(os.path.join(out_dir, f"{slug}.gif"),
                                                             video_io.grid(first, columns=4, upscale=3)), out_dir)
            video_io.write_mp4(os.path.join(out_dir, f"{slug}.mp4"), video_io.grid(first, columns=4, upscale=3))
        return row

    def _score(self, entry: Entry, videos: np.ndarray, groups: np.ndarray, factors: dict, captions: list) -> dict:
        """The table's numbers for the seen prompts' clips."""
        adherence = world.adherence(videos, factors, self.wcfg)
        read = world.read_factors_batch(videos, self.wcfg)
        per_clip = np.mean([read[f] == factors[f] for f in world.FACTORS], axis=0)
        rewards = np.asarray(self.reward(videos, captions), np.float64)
        features = self.features(videos)
        pixels = videos.reshape(len(videos), -1).astype(np.float32) / 255.0
        prompts = np.unique(groups)
        per_prompt = {  # for paired comparisons between models with standard errors over prompts
            "adherence": [float(per_clip[groups == g].mean()) for g in prompts],
            "reward": [float(rewards[groups == g].mean()) for g in prompts],
            # Features are centred on the real clips' mean: the kernel then sees how samples differ, not the
            # direction all clips of this world share.
            "vendi_features": [vendi_score(features[groups == g] - self.feature_mean) for g in prompts],
            "vendi_pixels": [vendi_score(pixels[groups == g]) for g in prompts],
        }
        return {
            "name": entry.name, "model": entry.model, "folder": entry.folder, "steps": len(entry.spec.timesteps),
            "network_evaluations": entry.spec.network_evaluations,
            "adherence": {f: float(adherence[f]) for f in world.FACTORS}
            | {"all": float(adherence["all"]), "mean": float(np.mean([adherence[f] for f in world.FACTORS]))},
            "vendi_pixels": float(np.mean(per_prompt["vendi_pixels"])),
            "vendi_features": float(np.mean(per_prompt["vendi_features"])),
            "reward": float(rewards.mean()),
            "frechet_distance": frechet_distance(features, self.real_features),
            "per_prompt": per_prompt,
        }

    # ---- speed ---------------------------------------------------------------------------------------------
    def speed(self, entry: Entry, repeats: int = 21, batch: int = 1) -> dict:
        """Wall time for `batch` videos: diffusion only, and end to end (text encoding + diffusion + decoding).
        Median over `repeats` runs after a warm-up (compilation excluded)."""
        generate, params = self._sampler(entry)
        # The decoder runs where the DiT's output lives (the model's mesh), as it would in a served pipeline.
        sharding = jax.tree.leaves(params)[0].sharding
        if isinstance(sharding, jax.sharding.NamedSharding):
            sharding = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        ae_graph, ae_state = nnx.split(self.ae)
        ae_state = jax.device_put(ae_state, sharding)
        decode = light_jit(lambda state, z: nnx.merge(ae_graph, state).decode(z))
        prompt, noise, key = self.captions[:batch], self.noise[:batch], jax.random.key(0)
        null = jnp.asarray(self.null[:batch])

        def diffusion(text):
            return generate(params, noise, text, null, key)

        def end_to_end():
            text = jnp.asarray(self.encoder.encode(prompt))
            video = decode(ae_state, diffusion(text))
            return np.asarray(jnp.clip(video, 0, 1) * 255).astype(np.uint8)

        text = jnp.asarray(self.encoder.encode(prompt))
        jax.block_until_ready(diffusion(text))
        end_to_end()
        t_diff, t_e2e = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            jax.block_until_ready(diffusion(text))
            t_diff.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            end_to_end()
            t_e2e.append(time.perf_counter() - t0)
        return {"name": entry.name, "network_evaluations": entry.spec.network_evaluations, "batch": batch,
                "diffusion_s": float(np.median(t_diff)), "end_to_end_s": float(np.median(t_e2e))}
