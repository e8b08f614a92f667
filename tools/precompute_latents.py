#!/usr/bin/env python
"""Videos + captions -> the latents dataset the teacher and distillation jobs read (Wan VAE + umT5).

    python tools/precompute_latents.py --videos /data/clips \
        --vae /weights/Wan2.1-T2V-1.3B-Diffusers/vae \
        --text_encoder /weights/Wan2.1-T2V-1.3B-Diffusers/text_encoder \
        --tokenizer /weights/Wan2.1-T2V-1.3B-Diffusers/tokenizer \
        --out /data/wan_latents --frames 81 --height 480 --width 832

Inputs: --videos DIR (every name.mp4|.gif|.npy with its caption in name.txt beside it) or --csv FILE
(columns video,caption; paths relative to the CSV). Each video's first --frames frames (1 + 4k) are
center-cropped and resized to --height x --width and encoded: latents are the VAE posterior's mean,
normalised (z - latents_mean) / latents_std, channels-last; captions become umT5 embeddings zeroed past their
tokens. Stage 1 caches one .npz per video in --cache (resumable: rerun the same command after an
interruption); stage 2 writes <out>/<name>/1.0.0 (ArrayRecord, splits train/validation) and the embedding
of --negative_prompt as the null text. Weights are read from local folders only. Use the result with
--config.data.dir=<out> --config.data.latents=<name>.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from dollar_jax.cli_errors import run_reporting
from dollar_jax.data.real_videos import DTYPES, precompute


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--videos", help="folder of name.mp4|.gif|.npy videos with captions in name.txt")
    source.add_argument("--csv", help="CSV with columns video,caption (paths relative to the CSV)")
    parser.add_argument("--vae", required=True, help="local diffusers AutoencoderKLWan folder")
    parser.add_argument("--text_encoder", required=True, help="local transformers UMT5EncoderModel folder")
    parser.add_argument("--tokenizer", help="local tokenizer folder (default: --text_encoder)")
    parser.add_argument("--out", required=True, help="data dir: the dataset goes to <out>/<name>/1.0.0")
    parser.add_argument("--name", default="latents", help="dataset name (config.data.latents)")
    parser.add_argument("--frames", type=int, required=True, help="first N frames of each video, N = 1 + 4k")
    parser.add_argument("--height", type=int, required=True, help="pixel height after center crop + resize")
    parser.add_argument("--width", type=int, required=True, help="pixel width after center crop + resize")
    parser.add_argument("--max_text_length", type=int, default=512, help="tokens per caption (Wan: 512)")
    parser.add_argument("--negative_prompt", default="", help="its embedding is the dataset's null text")
    parser.add_argument("--validation_fraction", type=float, default=0.05,
                        help="share of videos (by a hash of their path) in the validation split")
    parser.add_argument("--batch_size", type=int, default=1, help="videos encoded together")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="torch compute dtype")
    parser.add_argument("--device", default="auto", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--cache", help="per-video cache folder (default: <out>/<name>.cache)")
    parser.add_argument("--no_progress", action="store_true", help="no progress bar")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of an error")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    kwargs = vars(args)
    kwargs["progress"] = not kwargs.pop("no_progress")
    verbose = kwargs.pop("verbose")

    def run():
        print(json.dumps(precompute(**kwargs)))

    return run_reporting(run, verbose)


if __name__ == "__main__":
    sys.exit(main())
