"""CLIP-family preference rewards (PickScore, HPSv2 in Hugging Face CLIP format) run in PyTorch.

    reward = make_reward("clip_preference", path="/weights/PickScore_v1", frames=4)

`path` is a local folder with a transformers `CLIPModel` (config.json + weights) and its tokenizer; nothing
is downloaded. HPSv2 is published as an OpenCLIP checkpoint: convert it to the transformers layout once,
offline, and point `path` at the result. Score per clip = logit_scale * cos(image, text), averaged over
`frames` frames spread evenly through the clip (as per-frame image rewards are applied to videos).
Pixel preprocessing (bicubic resize + centre crop to the model's image size, CLIP normalisation) is done
here in NumPy/torch so that no image-processor dependency is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dollar_jax.rewards.base import check_videos, register

CLIP_MEAN = np.asarray([0.48145466, 0.4578275, 0.40821073], np.float32)
CLIP_STD = np.asarray([0.26862954, 0.26130258, 0.27577711], np.float32)


@register("clip_preference")
class ClipPreference:
    name = "clip_preference"

    def __init__(self, path: str, frames: int = 4, device: str = "cpu", batch_size: int = 16):
        import os

        import torch
        from transformers import CLIPModel, CLIPTokenizer

        if not os.path.isdir(path):
            raise FileNotFoundError(f"clip_preference: {path} is not a local model folder")
        self.torch = torch
        self.model = CLIPModel.from_pretrained(path).to(device).eval()
        self.tokenizer = CLIPTokenizer.from_pretrained(path)
        self.size = int(self.model.config.vision_config.image_size)
        self.max_text = int(self.model.config.text_config.max_position_embeddings)
        self.frames, self.device, self.batch_size = int(frames), device, int(batch_size)

    def _pixels(self, frames: np.ndarray):
        torch = self.torch
        x = torch.from_numpy(frames.astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        h, w = x.shape[-2:]
        scale = self.size / min(h, w)
        x = torch.nn.functional.interpolate(x, size=(max(self.size, round(h * scale)), max(self.size, round(w * scale))),
                                            mode="bicubic", align_corners=False)
        top, left = (x.shape[-2] - self.size) // 2, (x.shape[-1] - self.size) // 2
        x = x[..., top:top + self.size, left:left + self.size].clamp(0, 1)
        return (x - torch.from_numpy(CLIP_MEAN)[:, None, None]) / torch.from_numpy(CLIP_STD)[:, None, None]

    def __call__(self, videos: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        torch = self.torch
        videos = check_videos(videos)
        if len(prompts) != len(videos):
            raise ValueError(f"{len(videos)} videos but {len(prompts)} prompts")
        idx = np.linspace(0, videos.shape[1] - 1, min(self.frames, videos.shape[1])).round().astype(int)
        scores = []
        with torch.no_grad():
            for start in range(0, len(videos), self.batch_size):
                clips, texts = videos[start:start + self.batch_size], list(prompts[start:start + self.batch_size])
                frames = clips[:, idx].reshape(-1, *clips.shape[2:])
                image = _features(self.model.get_image_features(pixel_values=self._pixels(frames).to(self.device)))
                tokens = self.tokenizer(texts, padding=True, truncation=True, return_tensors="pt",
                                        max_length=self.max_text).to(self.device)
                text = _features(self.model.get_text_features(**tokens))
                image = torch.nn.functional.normalize(image, dim=-1).reshape(len(clips), len(idx), -1)
                text = torch.nn.functional.normalize(text, dim=-1)
                cos = (image * text[:, None]).sum(-1).mean(1)
                scores.append((self.model.logit_scale.exp() * cos).cpu().numpy())
        return np.concatenate(scores).astype(np.float32)


def _features(out):
    """Projected embeddings: transformers 5 returns a model output whose pooler_output holds them (4.x: a tensor)."""
    return out.pooler_output if hasattr(out, "pooler_output") else out
