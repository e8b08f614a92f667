"""tools/precompute_latents.py: videos + captions -> Wan-VAE latents + umT5 embeddings, with tiny random
models built offline (diffusers AutoencoderKLWan, transformers UMT5EncoderModel, a WordLevel tokenizer)."""

import csv
import importlib.util
import os
import shutil

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")
pytest.importorskip("transformers")

from dollar_jax.data import arrays_dataset
from dollar_jax.data.real_videos import (
    PrecomputeError,
    cache_file,
    list_videos,
    precompute,
)
from dollar_jax.data.latents import load_null_text

pytestmark = pytest.mark.torch

WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right", "blurry"]
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
FRAMES, SIZE, TEXT_LEN = 5, 16, 8
CAPTIONS = {"a": "a red circle moving left", "b": "a blue square", "c": "blue circle moving right",
            "d": "a red   square moving left", "e": "square"}


def _load_tool():
    path = os.path.join(os.path.dirname(__file__), "..", "tools", "precompute_latents.py")
    spec = importlib.util.spec_from_file_location("precompute_latents_tool", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    import wan_reference

    return wan_reference.save_tiny_wan_encoders(tmp_path_factory.mktemp("weights"), WORDS, LATENTS_MEAN, LATENTS_STD)


def _videos(folder, rng):
    import imageio.v2 as imageio

    os.makedirs(folder, exist_ok=True)
    clips = {"a": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8),  # exact size: parity check
             "b": rng.integers(0, 256, (FRAMES + 2, 20, 28, 3), dtype=np.uint8),  # wide, extra frames
             "c": rng.integers(0, 256, (FRAMES, 24, 16, 3), dtype=np.uint8),  # tall
             "d": rng.integers(0, 256, (FRAMES, SIZE, SIZE, 3), dtype=np.uint8),
             "e": rng.integers(0, 256, (FRAMES, 18, 18, 3), dtype=np.uint8)}
    ext = {"a": ".npy", "b": ".gif", "c": ".npy", "d": ".mp4", "e": ".gif"}
    for key, clip in clips.items():
        path = os.path.join(folder, key + ext[key])
        if ext[key] == ".npy":
            np.save(path, clip)
        elif ext[key] == ".gif":
            imageio.mimwrite(path, list(clip), duration=100, loop=0)
        else:
            imageio.mimwrite(path, list(clip), fps=8, macro_block_size=1)
        with open(os.path.join(folder, key + ".txt"), "w") as f:
            f.write(CAPTIONS[key] + "\n")
    return clips


def _args(weights, videos, out, **kw):
    return {"videos": videos, "vae": weights["vae"], "text_encoder": weights["text_encoder"],
            "tokenizer": weights["tokenizer"], "out": out, "name": "latents", "frames": FRAMES, "height": SIZE,
            "width": SIZE, "max_text_length": TEXT_LEN, "negative_prompt": "blurry", "validation_fraction": 0.3,
            "batch_size": 2, "progress": False} | kw


@pytest.fixture(scope="module")
def built(weights, tmp_path_factory):
    root = tmp_path_factory.mktemp("real")
    videos, out = str(root / "videos"), str(root / "data")
    clips = _videos(videos, np.random.default_rng(0))
    a = _args(weights, videos, out)
    argv = ["--videos", videos, "--vae", a["vae"], "--text_encoder", a["text_encoder"], "--tokenizer",
            a["tokenizer"], "--out", out, "--frames", str(FRAMES), "--height", str(SIZE), "--width", str(SIZE),
            "--max_text_length", str(TEXT_LEN), "--negative_prompt", "blurry", "--validation_fraction", "0.3",
            "--batch_size", "2", "--no_progress"]
    assert _load_tool().main(argv) == 0
    return {"videos": videos, "out": out, "clips": clips, "args": a}


def _examples(out):
    rows = {}
    for split in ("train", "validation"):
        source = arrays_dataset.open_split(out, "latents", split)
        for i in range(len(source)):
            ex = source[i]
            caption = ex["caption"].decode() if isinstance(ex["caption"], bytes) else str(ex["caption"])
            rows[caption] = ex
    return rows


def test_dataset_shapes_and_splits(built):
    out = built["out"]
    shapes = arrays_dataset.feature_shapes(out, "latents")
    # base_dim 8, dim_mult [1, 1]: 2x spatial and (with temperal_downsample [True]) 1 + 4/2 latent frames.
    assert shapes == {"latents": ("tensor", (3, SIZE // 2, SIZE // 2, 4), "float32"),
                      "text": ("tensor", (TEXT_LEN, 16), "float32"), "caption": ("text",)}
    sizes = [len(arrays_dataset.open_split(out, "latents", s)) for s in ("train", "validation")]
    assert sum(sizes) == 5 and min(sizes) >= 1
    assert set(_examples(out)) == set(CAPTIONS.values())


def test_latents_are_normalised_posterior_means(built, weights):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(weights["vae"]).eval()
    x = torch.from_numpy(built["clips"]["a"]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1.0
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mean
    mean = torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    std = torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1)
    want = ((z - mean) / std)[0].permute(1, 2, 3, 0).numpy()
    got = _examples(built["out"])[CAPTIONS["a"]]["latents"]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert all(np.isfinite(ex["latents"]).all() for ex in _examples(built["out"]).values())


def test_text_embeddings_zero_after_tokens_and_null_text(built, weights):
    from transformers import UMT5EncoderModel

    encoder = UMT5EncoderModel.from_pretrained(weights["text_encoder"]).eval()
    rows = _examples(built["out"])
    for caption, ex in rows.items():
        n = len(caption.split()) + 1  # words + </s>
        ids = torch.tensor([[WORDS.index(w) for w in caption.split()] + [1] + [0] * (TEXT_LEN - n)])
        with torch.no_grad():
            want = encoder(ids, (torch.arange(TEXT_LEN) < n).long()[None]).last_hidden_state[0]
        np.testing.assert_allclose(ex["text"][:n], want[:n].numpy(), rtol=1e-4, atol=1e-5)
        assert np.abs(ex["text"][:n]).sum(-1).min() > 0
        assert not ex["text"][n:].any()
    null = load_null_text(built["out"], "latents")
    assert null.shape == (TEXT_LEN, 16) and null.dtype == np.float32
    assert np.abs(null[:2]).sum(-1).min() > 0 and not null[2:].any()  # "blurry </s>"


def test_resume_skips_cached_videos(built):
    out, args = built["out"], built["args"]
    assert precompute(**args)["status"] == "exists"
    cache = os.path.join(out, "latents.cache")
    files = {k: cache_file(cache, k + ext) for k, ext in
             (("a", ".npy"), ("b", ".gif"), ("c", ".npy"), ("d", ".mp4"), ("e", ".gif"))}
    assert all(os.path.exists(f) for f in files.values())
    before = _examples(out)
    # An interrupted run: the dataset never got written and one video was not cached yet.
    shutil.rmtree(os.path.join(out, "latents"))
    os.remove(files["c"])
    mtimes = {k: os.stat(f).st_mtime_ns for k, f in files.items() if k != "c"}
    summary = precompute(**args)
    assert (summary["status"], summary["encoded"], summary["cached"]) == ("written", 1, 4)
    assert {k: os.stat(f).st_mtime_ns for k, f in files.items() if k != "c"} == mtimes
    after = _examples(out)
    for caption, ex in before.items():
        np.testing.assert_allclose(after[caption]["latents"], ex["latents"], rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(after[caption]["text"], ex["text"])
    # Other settings against the same cache are refused, not mixed in.
    shutil.rmtree(os.path.join(out, "latents"))
    with pytest.raises(PrecomputeError, match="other settings"):
        precompute(**args | {"height": 8, "width": 8})


def test_clear_errors(weights, tmp_path):
    videos, out = str(tmp_path / "videos"), str(tmp_path / "data")
    os.makedirs(videos)
    np.save(os.path.join(videos, "short.npy"), np.zeros((3, SIZE, SIZE, 3), np.uint8))
    args = _args(weights, videos, out)
    with pytest.raises(PrecomputeError, match=r"short\.npy has no caption file .*short\.txt"):
        precompute(**args)
    with open(os.path.join(videos, "short.txt"), "w") as f:
        f.write("a red circle")
    with pytest.raises(PrecomputeError, match=r"1 \+ 4k.*got 4, try 1 or 5"):
        precompute(**args | {"frames": 4})
    with pytest.raises(PrecomputeError, match=r"--vae .*nowhere: no such folder"):
        precompute(**args | {"vae": str(tmp_path / "nowhere")})
    with pytest.raises(PrecomputeError, match=r"short\.npy has only 3 frames"):
        precompute(**args)
    with open(os.path.join(videos, "broken.gif"), "wb") as f:
        f.write(b"not a gif")
    with open(os.path.join(videos, "broken.txt"), "w") as f:
        f.write("square")
    with pytest.raises(PrecomputeError, match=r"Cannot read video .*broken\.gif"):
        precompute(**args)


def test_csv_input(built, tmp_path):
    rows = [("videos/b.gif", "a blue square"), (os.path.join(built["videos"], "a.npy"), "red, \"quoted\"")]
    shutil.copytree(built["videos"], tmp_path / "videos")
    with open(tmp_path / "list.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["video", "caption"])
        writer.writerows(rows)
    items = list_videos(csv=str(tmp_path / "list.csv"))
    by_caption = {it.caption: it for it in items}  # relative paths are relative to the CSV, absolute ones kept
    assert set(by_caption) == {"a blue square", 'red, "quoted"'}
    assert by_caption["a blue square"].key == "videos/b.gif"
    assert by_caption["a blue square"].path == os.path.join(str(tmp_path), "videos", "b.gif")
    assert os.path.samefile(by_caption['red, "quoted"'].path, os.path.join(built["videos"], "a.npy"))
    with open(tmp_path / "bad.csv", "w") as f:
        f.write("file,text\nvideos/b.gif,x\n")
    with pytest.raises(PrecomputeError, match=r"lacks column\(s\) \['caption', 'video'\]"):
        list_videos(csv=str(tmp_path / "bad.csv"))
    with open(tmp_path / "missing.csv", "w") as f:
        f.write("video,caption\nvideos/nothing.mp4,x\n")
    with pytest.raises(PrecomputeError, match=r"line 2: video .*nothing\.mp4 does not exist"):
        list_videos(csv=str(tmp_path / "missing.csv"))
