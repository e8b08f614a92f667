"""The shapes world: determinism, captions, and an oracle that reads true factors (also from degraded clips)
and wrong ones as wrong."""

import functools
import itertools

import numpy as np
import pytest

from dollar_jax.data import world
from dollar_jax.data.world import FACTORS, WorldConfig

CFG = WorldConfig()
CONFIGS = [(32, 8), (32, 16), (64, 8), (64, 16)]  # (height = width, frames)
COUNT = 300


@functools.cache
def clips(side: int, frames: int, count: int = COUNT, seed: int = 0):
    """(cfg, videos uint8 [N, T, H, W, 3], factors {name: [N]}), generated once per session."""
    cfg = WorldConfig(num_frames=frames, height=side, width=side)
    examples = list(world.generate(seed, count, cfg))
    videos = np.stack([e["video"] for e in examples])
    videos.flags.writeable = False  # shared between tests
    return cfg, videos, {f: np.asarray([e[f] for e in examples]) for f in FACTORS}


def gaussian_blur(videos: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur over H and W of [N, T, H, W, C] floats (edges replicated), as two matrix products."""
    radius = int(np.ceil(3 * sigma))
    kernel = np.exp(-0.5 * (np.arange(-radius, radius + 1) / sigma) ** 2)
    kernel /= kernel.sum()

    def operator(n):  # [n, n]: row i mixes pixels i - radius .. i + radius, clamped to the edge
        m = np.zeros((n, n), np.float32)
        for offset, k in zip(range(-radius, radius + 1), kernel):
            np.add.at(m, (np.arange(n), np.clip(np.arange(n) + offset, 0, n - 1)), k)
        return m

    h, w = videos.shape[2:4]
    planes = np.moveaxis(videos, -1, 2)  # [N, T, C, H, W]
    return np.moveaxis(operator(h) @ planes @ operator(w).T, 2, -1)


# ----------------------------------------------------------------------------------------- config, captions


def test_config_rejects_what_it_cannot_render_or_read():
    with pytest.raises(ValueError, match="purple"):
        WorldConfig(colours=("red", "purple"))
    with pytest.raises(ValueError, match="size_radii"):
        WorldConfig(sizes=("small", "medium", "large"))
    with pytest.raises(ValueError, match="room"):
        WorldConfig(size_radii=(4.0, 14.0))  # no room to move
    with pytest.raises(ValueError, match="travels"):
        WorldConfig(num_frames=3)  # too little motion to read a direction
    WorldConfig(sizes=("small", "medium", "large"), size_radii=(3.0, 5.0, 7.0))  # extensible


def test_captions_round_trip():
    for combo in itertools.product(*(range(len(CFG.values(f))) for f in FACTORS)):
        factors = dict(zip(FACTORS, combo))
        text = world.caption(factors, CFG)
        assert world.parse_caption(text, CFG) == factors
    assert world.caption({"colour": 0, "shape": 0, "direction": 0, "size": 1}, CFG) == "a large red circle moving left"
    assert world.parse_caption("  A Large RED circle  moving left ", CFG) == {
        "colour": 0, "shape": 0, "direction": 0, "size": 1}


@pytest.mark.parametrize("text, word", [("a huge red circle moving left", "huge"),
                                        ("a large red circle moving sideways", "sideways"),
                                        ("a large pink circle moving left", "pink"),
                                        ("a large red circle walking left", "walking")])
def test_parse_caption_names_the_bad_word(text, word):
    with pytest.raises(ValueError, match=word):
        world.parse_caption(text, CFG)


def test_parse_caption_rejects_the_wrong_length():
    with pytest.raises(ValueError, match="words"):
        world.parse_caption("a large red circle", CFG)


# --------------------------------------------------------------------------------------------- generation


def test_generate_is_deterministic_per_example():
    five, ten = list(world.generate(3, 5, CFG)), list(world.generate(3, 10, CFG))
    again = list(world.generate(3, 5, CFG))
    for a, b, c in zip(five, ten, again):
        np.testing.assert_array_equal(a["video"], b["video"])
        np.testing.assert_array_equal(a["video"], c["video"])
        assert a["caption"] == b["caption"] == c["caption"]
    # A shard starting at example 5 holds exactly examples 5..9.
    for a, b in zip(world.generate(3, 5, CFG, start=5), ten[5:]):
        np.testing.assert_array_equal(a["video"], b["video"])
    other = list(world.generate(4, 5, CFG))
    assert all(not np.array_equal(a["video"], b["video"]) for a, b in zip(five, other))


def test_examples_have_the_declared_layout():
    for ex in world.generate(0, 20, CFG):
        assert ex["video"].dtype == np.uint8 and ex["video"].shape == (8, 32, 32, 3)
        factors = {f: ex[f] for f in FACTORS}
        assert all(isinstance(v, int) for v in factors.values())
        assert ex["caption"] == world.caption(factors, CFG)
        assert world.parse_caption(ex["caption"], CFG) == factors


@pytest.mark.parametrize("side, frames", CONFIGS)
def test_shapes_stay_inside_the_frame(side, frames):
    _, videos, _ = clips(side, frames)
    v = videos[:100].astype(np.float32) / 255
    excess = (v - np.median(v[:, :, ::2, ::2], axis=(2, 3), keepdims=True)).max(-1)  # [N, T, H, W]
    border = np.concatenate([excess[:, :, 0], excess[:, :, -1], excess[:, :, :, 0], excess[:, :, :, -1]], -1)
    assert border.max() < 0.1  # background noise only: no shape pixel touches the edge
    assert excess.max(axis=(2, 3)).min() > 0.4  # and every frame shows the shape


def test_factors_are_roughly_uniform():
    _, _, factors = clips(32, 8)
    for f in FACTORS:
        counts = np.bincount(factors[f], minlength=len(CFG.values(f)))
        assert counts.min() > 0.6 * COUNT / len(counts), (f, counts)


# ------------------------------------------------------------------------------------------------- oracle


@pytest.mark.parametrize("side, frames", CONFIGS)
def test_oracle_reads_rendered_clips(side, frames):
    cfg, videos, factors = clips(side, frames)
    scores = world.adherence(videos, factors, cfg)
    assert scores == {f: 1.0 for f in (*FACTORS, "all")}, scores


def test_read_factors_on_one_clip_and_on_floats():
    cfg, videos, factors = clips(32, 8)
    for i in range(5):
        assert world.read_factors(videos[i], cfg) == {f: int(factors[f][i]) for f in FACTORS}
        assert world.read_factors(videos[i].astype(np.float64) / 255, cfg) == world.read_factors(videos[i], cfg)


@pytest.mark.parametrize("side, frames", [(32, 8), (64, 8)])
def test_oracle_survives_blur_noise_and_dimming(side, frames):
    cfg, videos, factors = clips(side, frames)
    rng = np.random.default_rng(0)
    degraded = gaussian_blur(videos.astype(np.float32) / 255, sigma=1.0)
    degraded = degraded + 0.05 * rng.standard_normal(degraded.shape, dtype=np.float32)
    degraded = np.clip(degraded * 0.8, 0.0, 1.0)
    scores = world.adherence(degraded, factors, cfg)
    assert all(scores[f] >= 0.95 for f in FACTORS), scores


def test_oracle_reads_a_recoloured_shape_as_the_new_colour():
    cfg, videos, factors = clips(32, 8)
    rotate = [1, 2, 0]  # new red = old green, ...: every palette colour becomes another palette colour
    recoloured = videos[..., rotate]
    names = list(cfg.colours)
    expected = [names.index(next(n for n in names if world.PALETTE[n] == tuple(np.asarray(world.PALETTE[c])[rotate])))
                for c in names]
    assert all(e != i for i, e in enumerate(expected))
    read = world.read_factors_batch(recoloured, cfg)
    np.testing.assert_array_equal(read["colour"], np.asarray(expected)[factors["colour"]])
    for f in ("shape", "direction", "size"):
        np.testing.assert_array_equal(read[f], factors[f])


def test_oracle_reads_a_reversed_clip_as_the_opposite_direction():
    cfg, videos, factors = clips(32, 8)
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}
    flip = np.asarray([cfg.directions.index(opposite[d]) for d in cfg.directions])
    read = world.read_factors_batch(videos[:, ::-1], cfg)
    np.testing.assert_array_equal(read["direction"], flip[factors["direction"]])
    assert world.adherence(videos[:, ::-1], factors, cfg)["direction"] == 0.0


def test_adherence_to_wrong_factors_is_chance_or_nothing():
    cfg, videos, factors = clips(32, 8)
    rng = np.random.default_rng(0)
    shuffled = {f: rng.permutation(v) for f, v in factors.items()}
    scores = world.adherence(videos, shuffled, cfg)
    for f in FACTORS:
        chance = float(np.sum((np.bincount(factors[f]) / COUNT) ** 2))  # P(a random partner shares the value)
        assert abs(scores[f] - chance) < 0.08, (f, scores[f], chance)
    assert scores["all"] < 0.05
    wrong = {f: (v + 1) % len(cfg.values(f)) for f, v in factors.items()}
    assert world.adherence(videos, wrong, cfg) == {f: 0.0 for f in (*FACTORS, "all")}


def test_oracle_declines_what_it_cannot_see():
    cfg, videos, factors = clips(32, 8)
    clip = videos[0].astype(np.float32) / 255
    truth = {f: int(factors[f][0]) for f in FACTORS}
    blank = np.broadcast_to(np.median(clip, axis=(0, 1, 2)), clip.shape)
    assert world.read_factors(blank, cfg) == {f: -1 for f in FACTORS}
    grey = np.repeat(clip.mean(-1, keepdims=True), 3, -1)  # a grey shape: no colour, the rest is readable
    assert world.read_factors(grey, cfg) == {**truth, "colour": -1}
    still = np.repeat(clip[:1], cfg.num_frames, 0)  # a frozen clip: no direction
    assert world.read_factors(still, cfg) == {**truth, "direction": -1}


def test_adherence_takes_a_batch_and_scores_the_factors_it_has():
    cfg, videos, factors = clips(32, 8)
    batch = {"video": videos[:10], "caption": ["x"] * 10, **{f: v[:10] for f, v in factors.items()}}
    assert world.adherence(batch["video"], batch, cfg)["all"] == 1.0
    partial = world.adherence(videos[:10], {"colour": factors["colour"][:10]}, cfg)
    assert partial == {"colour": 1.0, "all": 1.0}
    with pytest.raises(ValueError):
        world.adherence(videos[:10], {"caption": batch["caption"]}, cfg)


# ------------------------------------------------------------------------------------------------ prompts


@pytest.mark.parametrize("count", [1, 10, 48, 100, 257])
def test_prompt_set_is_balanced(count):
    prompts = world.prompt_set(CFG, count)
    assert len(prompts) == count
    for f in FACTORS:
        n = len(CFG.values(f))
        counts = np.bincount([p[f] for p in prompts], minlength=n)
        assert counts.max() - counts.min() <= 1 and counts.min() >= count // n - 1, (f, counts)


def test_prompt_set_is_deterministic_and_prefix_stable():
    assert world.prompt_set(CFG, 50, seed=1) == world.prompt_set(CFG, 50, seed=1)
    assert world.prompt_set(CFG, 100, seed=1)[:50] == world.prompt_set(CFG, 50, seed=1)
    assert world.prompt_set(CFG, 50, seed=1) != world.prompt_set(CFG, 50, seed=2)
    # Enough prompts cover most combinations rather than repeating a few.
    combos = {tuple(p.values()) for p in world.prompt_set(CFG, 288)}
    assert len(combos) > 100


# ---------------------------------------------------------------------------------- held-out compositions

HELD = WorldConfig(held_out_combinations=40)  # many, so that a leak would show in a few hundred clips


def test_held_out_set_is_fixed_nested_and_keeps_every_value_and_pair_seen():
    held = world.held_out_set(HELD)
    assert len(held) == 40 and held == world.held_out_set(WorldConfig(held_out_combinations=40))
    assert world.held_out_set(WorldConfig(held_out_combinations=6)) <= held  # a smaller set is part of a larger
    assert world.held_out_set(CFG) == frozenset()
    seen = set(itertools.product(*(range(len(CFG.values(f))) for f in FACTORS))) - held
    for i, j in itertools.combinations(range(len(FACTORS)), 2):
        for a, b in itertools.product(range(len(CFG.values(FACTORS[i]))), range(len(CFG.values(FACTORS[j])))):
            assert any(c[i] == a and c[j] == b for c in seen), (FACTORS[i], a, FACTORS[j], b)
    assert sorted(tuple(p[f] for f in FACTORS) for p in world.held_out_prompts(HELD)) == sorted(held)
    with pytest.raises(ValueError, match="held_out_combinations"):
        WorldConfig(held_out_combinations=140)
    with pytest.raises(ValueError, match="held_out_combinations"):
        WorldConfig(held_out_combinations=-1)


def test_seen_prompts_and_clips_never_hold_a_held_out_combination():
    held = world.held_out_set(HELD)
    prompts = world.prompt_set(HELD, 100)
    assert len(prompts) == 100 and prompts[:40] == world.prompt_set(HELD, 40)
    assert not {tuple(p[f] for f in FACTORS) for p in prompts} & held
    # Without held-out combinations the clips are exactly the old world's (same stream).
    for a, b in zip(world.generate(3, 5, WorldConfig(held_out_combinations=0)), world.generate(3, 5, CFG)):
        np.testing.assert_array_equal(a["video"], b["video"])


def test_built_dataset_leaks_no_held_out_combination(tmp_path):
    """The dataset as the jobs build it: no training or validation caption is a held-out composition."""
    from dollar_jax.config import base_config
    from dollar_jax.data import arrays_dataset
    from dollar_jax.jobs import world_data

    c = base_config()
    c.world.update(dict(height=16, width=16, num_train=300, num_val=60, held_out_combinations=40))
    world_data.build_videos(c, str(tmp_path))  # into <workdir>/data
    held = {world.caption(p, HELD) for p in world.held_out_prompts(HELD)}
    for split, count in (("train", 300), ("validation", 60)):
        source = arrays_dataset.open_split(str(tmp_path / "data"), c.data.videos, split)
        captions = {source[i]["caption"].decode() for i in range(len(source))}
        assert len(source) == count and not captions & held, split
        assert len(captions) > count // 4  # many seen combinations drawn: a leak had every chance to show
    c.world.held_out_combinations = 6  # a dataset built for another held-out set is refused, not reused
    with pytest.raises(arrays_dataset.DatasetError, match="held-out"):
        world_data.build_videos(c, str(tmp_path))
