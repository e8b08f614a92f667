"""Build the shapes world's video dataset (tfds ArrayRecord): train and validation splits.

Neither split holds a held-out combination (world.held_out_set): those are for evaluation only."""

from __future__ import annotations

import logging
import os
import re
import sys

from dollar_jax.data import arrays_dataset, world
from dollar_jax.data.world import world_config
from dollar_jax.paths import Paths

log = logging.getLogger(__name__)

# Validation clips come from another seed stream than training clips (example i depends on (seed, i)).
VALIDATION_SEED_OFFSET = 1_000_003


def video_spec(cfg: world.WorldConfig) -> dict:
    spec = {"video": ("tensor", (cfg.num_frames, cfg.height, cfg.width, 3), "uint8"), "caption": ("text",)}
    spec.update({factor: ("int",) for factor in world.FACTORS})
    return spec


def check_held_out(data_dir: str, name: str, cfg: world.WorldConfig) -> None:
    """A dataset built with other held-out combinations would leak (or hide) compositions: refuse it.

    The count is read from the description the dataset was written with (`WorldConfig`'s repr); datasets
    from before held-out combinations existed have none."""
    found = re.search(r"held_out_combinations=(\d+)", arrays_dataset.description(data_dir, name))
    built = int(found.group(1)) if found else 0
    if built != cfg.held_out_combinations:
        raise arrays_dataset.DatasetError(
            f"Dataset {arrays_dataset.dataset_path(data_dir, name)} was built with {built} held-out combinations, "
            f"config.world.held_out_combinations is {cfg.held_out_combinations}: use a new data dir or match it")


def build_videos(config, workdir: str) -> str:
    """Write <data>/<config.data.videos> unless it exists (then check that it has this world's shape)."""
    paths, cfg = Paths.of(config, workdir), world_config(config)
    name, spec = config.data.videos, video_spec(cfg)
    if arrays_dataset.exists(paths.data, name):
        arrays_dataset.check_features(paths.data, name, spec)
        check_held_out(paths.data, name, cfg)
        return arrays_dataset.dataset_path(paths.data, name)
    if config.data.dir:  # an explicit folder without the dataset is often a typo: say so before building
        print(f"WARNING: config.data.dir={config.data.dir} holds no dataset {name!r}"
              f"{'' if os.path.isdir(paths.data) else ' (the folder does not exist)'}: building a new one there. "
              f"If you meant an existing dataset, stop and check the path.", file=sys.stderr, flush=True)
    seed = config.world.seed
    log.info("building %s: %d train + %d validation clips", name, config.world.num_train, config.world.num_val)
    return arrays_dataset.write(
        paths.data, name, spec,
        {"train": lambda: world.generate(seed, config.world.num_train, cfg),
         "validation": lambda: world.generate(seed + VALIDATION_SEED_OFFSET, config.world.num_val, cfg)},
        description=f"Procedural shapes world {cfg}",
    )
