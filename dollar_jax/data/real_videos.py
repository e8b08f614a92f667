"""Real videos + captions -> the latents dataset every diffusion job reads (Wan VAE latents, umT5 embeddings).

`precompute(...)` (and its command line, tools/precompute_latents.py) works in two stages:

1. Encode. Every video is read (``.mp4``, ``.gif`` or ``.npy`` holding uint8 ``[F, H, W, 3]``), cut to its
   first ``frames`` frames, center-cropped to the target aspect ratio and resized (bilinear) to
   ``height x width``, mapped from uint8 RGB to ``[-1, 1]`` and encoded with diffusers' ``AutoencoderKLWan``.
   The latent is the *mean* of the VAE's posterior (``vae.encode(x).latent_dist.mean``: deterministic, no
   sampling noise), normalised as diffusers' Wan pipelines do, ``(z - latents_mean) / latents_std`` per
   channel (the inverse of `dollar_jax.rewards.decoders.wan_vae_decoder`), and stored channels-last
   ``[F', H', W', C]``. The caption is cleaned like Wan's pipeline (`prompt_clean`), tokenised (padding to
   ``max_text_length``, truncation) and run through the ``UMT5EncoderModel``; as in Wan's pipeline the
   first ``seq_len`` (attention-mask sum) embeddings are kept and the rest zeroed: ``[L, D]`` float32.
   Each video becomes one ``.npz`` in the cache folder, written atomically, so an interrupted run resumes
   where it stopped (cached videos are not read again).
2. Write. The cache becomes the ArrayRecord dataset ``<out>/<name>/1.0.0`` (splits train/validation by a
   hash of each video's path, `arrays_dataset.write`, fields of `jobs.precompute.latent_spec`), with the
   embedding of ``negative_prompt`` as its null text (`jobs.precompute.save_null_text`).

A finished dataset is never rebuilt: delete ``<out>/<name>`` (and the cache, if settings changed) first.
Weights are only read from local folders (``from_pretrained(path, local_files_only=True)``).
"""

from __future__ import annotations

import csv as csv_module
import dataclasses
import hashlib
import json
import logging
import os
from collections.abc import Sequence

import numpy as np

from dollar_jax import storage
from dollar_jax.data import arrays_dataset

log = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (".mp4", ".gif", ".npy")
TEMPORAL_GROUP = 4  # Wan's VAE encodes the first frame alone, then groups of 4 frames
CACHE_SETTINGS = "settings.json"
CACHE_NULL_TEXT = "null_text.npz"
DTYPES = ("float32", "bfloat16", "float16")


class PrecomputeError(ValueError):
    """Bad inputs, settings or weights for precomputing latents; the message names the file or flag."""


@dataclasses.dataclass(frozen=True)
class VideoItem:
    key: str  # path relative to the videos folder / CSV (posix): cache name and split hash
    path: str
    caption: str


# ----------------------------------------------------------------------------------------------- inputs


def _read_caption(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read().strip()


def list_videos(videos: str | None = None, csv: str | None = None) -> list[VideoItem]:
    """Videos and captions from a folder (``name.ext`` + ``name.txt``, searched recursively) or a CSV
    (columns ``video,caption``; relative paths are relative to the CSV), sorted by key."""
    if (videos is None) == (csv is None):
        raise PrecomputeError("Give exactly one of --videos DIR or --csv FILE")
    items = []
    if videos is not None:
        if not os.path.isdir(videos):
            raise PrecomputeError(f"--videos {videos}: no such folder")
        for root, dirs, files in os.walk(videos):
            dirs.sort()
            for file in sorted(files):
                stem, ext = os.path.splitext(file)
                if ext.lower() not in VIDEO_EXTENSIONS:
                    continue
                path = os.path.join(root, file)
                caption_path = os.path.join(root, stem + ".txt")
                if not os.path.isfile(caption_path):
                    raise PrecomputeError(f"Video {path} has no caption file {caption_path}")
                items.append(VideoItem(os.path.relpath(path, videos).replace(os.sep, "/"), path,
                                       _read_caption(caption_path)))
        if not items:
            raise PrecomputeError(f"--videos {videos}: no video files ({', '.join(VIDEO_EXTENSIONS)})")
    else:
        if not os.path.isfile(csv):
            raise PrecomputeError(f"--csv {csv}: no such file")
        base = os.path.dirname(os.path.abspath(csv))
        with open(csv, newline="", encoding="utf-8") as f:
            reader = csv_module.DictReader(f)
            missing = {"video", "caption"} - set(reader.fieldnames or ())
            if missing:
                raise PrecomputeError(f"CSV {csv} lacks column(s) {sorted(missing)} (has {reader.fieldnames})")
            seen = set()
            for line, row in enumerate(reader, start=2):
                rel = (row["video"] or "").strip()
                if not rel:
                    raise PrecomputeError(f"CSV {csv} line {line}: empty 'video'")
                path = os.path.normpath(os.path.join(base, rel))
                if not os.path.isfile(path):
                    raise PrecomputeError(f"CSV {csv} line {line}: video {path} does not exist")
                if os.path.splitext(path)[1].lower() not in VIDEO_EXTENSIONS:
                    raise PrecomputeError(f"CSV {csv} line {line}: {path} is not one of {VIDEO_EXTENSIONS}")
                key = os.path.relpath(path, base).replace(os.sep, "/")
                if key in seen:
                    raise PrecomputeError(f"CSV {csv} line {line}: video {rel} is listed twice")
                seen.add(key)
                items.append(VideoItem(key, path, (row["caption"] or "").strip()))
        if not items:
            raise PrecomputeError(f"CSV {csv} lists no videos")
    return sorted(items, key=lambda it: it.key)


def read_video(path: str, frames: int) -> np.ndarray:
    """The first `frames` frames of a video as uint8 ``[frames, H, W, 3]``; an error if it has fewer."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".npy":
            video = np.load(path, mmap_mode="r")
            video = np.array(video[:frames] if video.ndim else video)  # a writable copy of the first frames
        else:
            import imageio.v2 as imageio

            reader = imageio.get_reader(path)
            try:
                video = []
                for frame in reader:
                    video.append(np.asarray(frame))
                    if len(video) == frames:
                        break
            finally:
                reader.close()
            video = np.stack(video) if video else np.zeros((0, 1, 1, 3), np.uint8)
    except Exception as e:
        raise PrecomputeError(f"Cannot read video {path}: {type(e).__name__}: {e}") from e
    if video.ndim == 3:  # grayscale
        video = video[..., None]
    if video.ndim != 4 or video.shape[-1] not in (1, 3, 4):
        raise PrecomputeError(f"Video {path} has shape {video.shape}; expected [frames, H, W, 3] (RGB)")
    if video.dtype != np.uint8:
        raise PrecomputeError(f"Video {path} has dtype {video.dtype}; expected uint8 RGB")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    video = video[..., :3]
    if len(video) < frames:
        raise PrecomputeError(f"Video {path} has only {len(video)} frames; --frames asks for the first {frames}")
    return np.ascontiguousarray(video)


def crop_box(h: int, w: int, height: int, width: int) -> tuple[int, int, int, int]:
    """(top, left, crop_h, crop_w): the largest centered region of a h x w frame with aspect width/height."""
    if w * height > h * width:  # too wide: crop the sides
        crop_h, crop_w = h, max(1, round(h * width / height))
    else:
        crop_h, crop_w = max(1, round(w * height / width)), w
    return (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w


def preprocess(video: np.ndarray, height: int, width: int):
    """uint8 ``[F, H, W, 3]`` -> float32 torch ``[3, F, height, width]`` in [-1, 1] (center crop + bilinear)."""
    import torch

    top, left, ch, cw = crop_box(video.shape[1], video.shape[2], height, width)
    x = torch.from_numpy(np.ascontiguousarray(video[:, top:top + ch, left:left + cw])).permute(0, 3, 1, 2).float()
    if (ch, cw) != (height, width):
        x = torch.nn.functional.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                                            antialias=True).clamp(0, 255)
    return (x / 127.5 - 1.0).permute(1, 0, 2, 3).contiguous()


def check_frames(frames: int) -> None:
    if frames < 1 or (frames - 1) % TEMPORAL_GROUP:
        k = max(0, (frames - 1) // TEMPORAL_GROUP)
        raise PrecomputeError(
            f"--frames must be 1 + 4k for Wan's VAE (it encodes the first frame alone, then groups of 4 frames); "
            f"got {frames}, try {1 + TEMPORAL_GROUP * k} or {1 + TEMPORAL_GROUP * (k + 1)}")


def is_validation(key: str, fraction: float) -> bool:
    """Deterministic split: the video's path hashed to [0, 1)."""
    return int(hashlib.sha256(key.encode()).hexdigest()[:16], 16) / 2.0 ** 64 < fraction


def split_keys(keys: Sequence[str], fraction: float) -> dict[str, list[str]]:
    """train/validation by `is_validation`; with fraction > 0 and >= 2 videos, neither split is empty
    (the video hashing lowest/highest moves over)."""
    keys = sorted(keys)
    val = [k for k in keys if is_validation(k, fraction)]
    train = [k for k in keys if not is_validation(k, fraction)]
    if fraction > 0 and len(keys) >= 2:
        rank = sorted(keys, key=lambda k: hashlib.sha256(k.encode()).hexdigest())
        if not val:
            val, train = [rank[0]], [k for k in keys if k != rank[0]]
        elif not train:
            train, val = [rank[-1]], [k for k in keys if k != rank[-1]]
    return {"train": train, "validation": sorted(val)}


# ----------------------------------------------------------------------------------------------- models


def _local_folder(path: str | None, flag: str) -> str:
    if not path:
        raise PrecomputeError(f"{flag} is required (a local folder of weights)")
    if not os.path.isdir(path):
        raise PrecomputeError(f"{flag} {path}: no such folder (weights are only read from local folders)")
    return path


def _load(flag: str, path: str, load):
    _local_folder(path, flag)
    try:
        return load(path)
    except Exception as e:
        raise PrecomputeError(f"{flag} {path}: cannot load ({type(e).__name__}: {e})") from e


def _torch_dtype(dtype: str):
    import torch

    if dtype not in DTYPES:
        raise PrecomputeError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    return getattr(torch, dtype)


class WanEncoders:
    """diffusers' AutoencoderKLWan + transformers' UMT5EncoderModel and tokenizer, from local folders."""

    def __init__(self, vae: str | None, text_encoder: str, tokenizer: str | None = None, dtype: str = "float32",
                 device: str = "auto", max_text_length: int = 512):
        """`vae=None` loads the text side only (what `dollar_jax.sample` needs to encode prompts)."""
        import torch
        from diffusers import AutoencoderKLWan
        from transformers import AutoTokenizer, UMT5EncoderModel

        tokenizer = tokenizer or text_encoder
        self.dtype = _torch_dtype(dtype)
        self.device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device)
        self.max_text_length = max_text_length
        self.text_encoder = _load("--text_encoder", text_encoder, lambda p: UMT5EncoderModel.from_pretrained(
            p, dtype=self.dtype, local_files_only=True)).to(self.device).eval()
        self.tokenizer = _load("--tokenizer", tokenizer,
                               lambda p: AutoTokenizer.from_pretrained(p, local_files_only=True))
        self.vae = None
        if vae is None:
            return
        self.vae = _load("--vae", vae, lambda p: AutoencoderKLWan.from_pretrained(
            p, torch_dtype=self.dtype, local_files_only=True)).to(self.device).eval()
        cfg = self.vae.config
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(1, -1, 1, 1, 1)
        self.latents_std = torch.tensor(cfg.latents_std, dtype=torch.float32).view(1, -1, 1, 1, 1)
        if self.latents_mean.shape[1] != cfg.z_dim or self.latents_std.shape[1] != cfg.z_dim:
            raise PrecomputeError(f"--vae {vae}: latents_mean/latents_std have {self.latents_mean.shape[1]}/"
                                  f"{self.latents_std.shape[1]} entries, z_dim is {cfg.z_dim}")
        self.spatial_factor = 2 ** (len(cfg.dim_mult) - 1) * (cfg.patch_size or 1)

    def check_size(self, height: int, width: int) -> None:
        f = self.spatial_factor
        if height % f or width % f:
            raise PrecomputeError(f"--height {height} and --width {width} must be multiples of {f} (the VAE's "
                                  f"spatial downsampling)")

    def encode_videos(self, pixels) -> np.ndarray:
        """float ``[B, 3, F, H, W]`` in [-1, 1] -> normalised posterior means, float32 ``[B, F', H', W', C]``."""
        import torch

        with torch.inference_mode():
            z = self.vae.encode(pixels.to(self.device, self.dtype)).latent_dist.mean.float().cpu()
            z = (z - self.latents_mean) / self.latents_std
        return z.permute(0, 2, 3, 4, 1).contiguous().numpy()

    def encode_text(self, captions: Sequence[str]) -> np.ndarray:
        """Captions -> float32 ``[B, max_text_length, D]``, zero after each caption's tokens (as Wan's pipeline)."""
        import torch
        from diffusers.pipelines.wan.pipeline_wan import prompt_clean

        tokens = self.tokenizer([prompt_clean(c) for c in captions], padding="max_length",
                                max_length=self.max_text_length, truncation=True, add_special_tokens=True,
                                return_attention_mask=True, return_tensors="pt")
        ids, mask = tokens.input_ids, tokens.attention_mask
        with torch.inference_mode():
            emb = self.text_encoder(ids.to(self.device), mask.to(self.device)).last_hidden_state.float().cpu()
        seq_lens = mask.gt(0).sum(dim=1)
        keep = torch.arange(emb.shape[1])[None, :] < seq_lens[:, None]
        return (emb * keep[..., None]).numpy()


# ----------------------------------------------------------------------------------------------- cache


def cache_file(cache: str, key: str) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in os.path.splitext(key)[0])[-80:]
    return os.path.join(cache, f"{stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}.npz")


def _save_npz(path: str, **arrays) -> None:
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)


def _check_settings(cache: str, settings: dict) -> None:
    path = os.path.join(cache, CACHE_SETTINGS)
    if os.path.exists(path):
        with open(path) as f:
            stored = json.load(f)
        diff = {k: (stored.get(k), v) for k, v in settings.items() if stored.get(k) != v}
        if diff:
            raise PrecomputeError(
                f"Cache {cache} was built with other settings ("
                + ", ".join(f"{k}: {a!r} there, {b!r} now" for k, (a, b) in diff.items())
                + "); pass another --cache or delete it")
        return
    os.makedirs(cache, exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(settings, f, indent=1)
    os.replace(tmp, path)


def _null_text_cached(cache: str, negative_prompt: str) -> np.ndarray | None:
    path = os.path.join(cache, CACHE_NULL_TEXT)
    if not os.path.exists(path):
        return None
    with np.load(path) as z:
        return z["text"] if str(z["prompt"]) == negative_prompt else None


# ----------------------------------------------------------------------------------------------- main


def precompute(*, videos: str | None = None, csv: str | None = None, vae: str, text_encoder: str,
               tokenizer: str | None = None, out: str, name: str = "latents", frames: int, height: int, width: int,
               max_text_length: int = 512, negative_prompt: str = "", validation_fraction: float = 0.05,
               batch_size: int = 1, dtype: str = "float32", cache: str | None = None, device: str = "auto",
               progress: bool = True) -> dict:
    """Build ``<out>/<name>`` from videos + captions (see the module docstring). Returns a summary:
    ``path``, ``status`` ('exists' | 'written'), ``encoded`` / ``cached`` (videos encoded now / found in the
    cache), split sizes, ``latent_shape`` and ``text_shape``."""
    from dollar_jax.data.latents import latent_spec, save_null_text

    path = arrays_dataset.dataset_path(out, name)
    if arrays_dataset.exists(out, name):
        log.info("Dataset %s already exists; nothing to do (delete it to rebuild)", path)
        return {"path": path, "status": "exists", "encoded": 0, "cached": 0}
    check_frames(frames)
    if height < 1 or width < 1:
        raise PrecomputeError(f"--height and --width must be positive, got {height} x {width}")
    if not 0.0 <= validation_fraction < 1.0:
        raise PrecomputeError(f"--validation_fraction must be in [0, 1), got {validation_fraction}")
    if batch_size < 1 or max_text_length < 1:
        raise PrecomputeError("--batch_size and --max_text_length must be >= 1")
    tokenizer = tokenizer or text_encoder
    for flag, folder in (("--vae", vae), ("--text_encoder", text_encoder), ("--tokenizer", tokenizer)):
        _local_folder(folder, flag)
    _torch_dtype(dtype)
    items = list_videos(videos, csv)
    if cache is None and storage.is_remote(out):  # the per-video cache is local files: keep it on this host
        cache = os.path.join(storage.cache_root(), "precompute", out.replace("://", "/"), f"{name}.cache")
    cache = cache or os.path.join(out, f"{name}.cache")
    if storage.is_remote(cache):
        raise PrecomputeError(f"--cache {cache}: the encoding cache must be a local folder")
    _check_settings(cache, {
        "frames": frames, "height": height, "width": width, "max_text_length": max_text_length, "dtype": dtype,
        "vae": os.path.abspath(vae), "text_encoder": os.path.abspath(text_encoder),
        "tokenizer": os.path.abspath(tokenizer),
        "latents": "posterior mean, (z - latents_mean) / latents_std, [F, H, W, C]"})

    # Stage 1: encode what is not cached yet.
    todo = [it for it in items if not os.path.exists(cache_file(cache, it.key))]
    null_text = _null_text_cached(cache, negative_prompt)
    encoders = None
    if todo or null_text is None:
        encoders = WanEncoders(vae, text_encoder, tokenizer, dtype=dtype, device=device,
                               max_text_length=max_text_length)
        encoders.check_size(height, width)
    if null_text is None:
        null_text = encoders.encode_text([negative_prompt])[0]
        _save_npz(os.path.join(cache, CACHE_NULL_TEXT), text=null_text, prompt=np.array(negative_prompt))
    log.info("%d videos, %d cached, %d to encode (cache %s)", len(items), len(items) - len(todo), len(todo), cache)
    if todo:
        import torch
        from tqdm.auto import tqdm

        bar = tqdm(total=len(items), initial=len(items) - len(todo), unit="video", desc="encoding",
                   disable=not progress)
        try:
            for start in range(0, len(todo), batch_size):
                batch = todo[start:start + batch_size]
                pixels = torch.stack([preprocess(read_video(it.path, frames), height, width) for it in batch])
                latents = encoders.encode_videos(pixels)
                text = encoders.encode_text([it.caption for it in batch])
                for i, it in enumerate(batch):
                    _save_npz(cache_file(cache, it.key), latents=latents[i], text=text[i],
                              caption=np.array(it.caption), key=np.array(it.key))
                bar.update(len(batch))
        finally:
            bar.close()
    del encoders

    # Stage 2: the dataset, from the cache.
    shapes = {}
    for it in items:
        with np.load(cache_file(cache, it.key)) as z:
            got = {k: tuple(z[k].shape) for k in ("latents", "text")}
        if not shapes:
            shapes, first = got, it.key
        elif got != shapes:
            raise PrecomputeError(f"Cached {it.key} has shapes {got}, but {first} has {shapes} (mixed settings "
                                  f"in cache {cache}?)")
    if tuple(null_text.shape) != shapes["text"]:
        raise PrecomputeError(f"Null text {null_text.shape} does not match the captions' embeddings {shapes['text']}")
    by_key = {it.key: it for it in items}
    splits = split_keys(list(by_key), validation_fraction)

    def examples(split):
        for key in splits[split]:
            with np.load(cache_file(cache, key)) as z:
                yield {"latents": z["latents"].astype(np.float32), "text": z["text"].astype(np.float32),
                       "caption": str(z["caption"])}

    spec = latent_spec(shapes["latents"], shapes["text"])
    save_null_text(out, name, null_text)  # first: a finished dataset always has its null text
    arrays_dataset.write(out, name, spec, {s: (lambda s=s: examples(s)) for s in splits if splits[s]},
                         description=f"Wan VAE latents (normalised posterior means) and umT5 embeddings of "
                                     f"{len(items)} videos, {frames} frames at {height}x{width}")
    log.info("Wrote %s: train %d, validation %d", path, len(splits["train"]), len(splits["validation"]))
    return {"path": path, "status": "written", "encoded": len(todo), "cached": len(items) - len(todo),
            "train": len(splits["train"]), "validation": len(splits["validation"]),
            "latent_shape": list(shapes["latents"]), "text_shape": list(shapes["text"])}
