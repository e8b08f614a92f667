"""dollar_jax.sample on Wan-shaped models: prompts -> umT5 -> 4-step student (and the 50-step teacher in the same
call) -> Wan VAE -> MP4s, with tiny random diffusers/transformers models built here."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

wan_reference = pytest.importorskip("wan_reference")
pytest.importorskip("transformers")
from dollar_jax.convert import convert  # noqa: E402
from dollar_jax.sample import generate_folder, read_prompts  # noqa: E402

torch = wan_reference.torch
pytestmark = pytest.mark.torch
ROOT = os.path.dirname(os.path.dirname(__file__))
WORDS = ["<pad>", "</s>", "<unk>", "a", "red", "blue", "circle", "square", "moving", "left", "right", "blurry"]
LATENTS_MEAN, LATENTS_STD = [0.1, -0.2, 0.3, 0.0], [1.5, 0.5, 2.0, 1.0]
TEXT_LEN, TEXT_DIM = 8, 16
LATENT_SHAPE = (3, 8, 8, 4)  # 5 frames of 16 x 16 pixels through the tiny VAE (2x in time and space)
PROMPTS = ["a red circle moving left", "a blue square"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("wan_sample")
    folders = wan_reference.save_tiny_wan_encoders(root, WORDS, LATENTS_MEAN, LATENTS_STD, text_dim=TEXT_DIM)
    wan_reference.save_diffusers(wan_reference.build_wan(seed=5, text_dim=TEXT_DIM), str(root / "torch"))
    convert(str(root / "torch"), str(root / "teacher"))
    folders["teacher"] = str(root / "teacher")
    folders["student"] = wan_reference.make_student_folder(
        folders["teacher"], str(root / "student"), [999.0, 749.0, 499.0, 249.0], LATENT_SHAPE, (TEXT_LEN, TEXT_DIM))
    return folders


@pytest.fixture(scope="module")
def sampled(models, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("videos"))
    report = generate_folder(models["student"], out, PROMPTS, steps=4, seed=0, text_encoder=models["text_encoder"],
                             tokenizer=models["tokenizer"], vae=models["vae"], negative_prompt="blurry",
                             mesh="data=2,fsdp=1", teacher=models["teacher"], save_frames=True)
    return out, report


def _diffusers_decode(vae_path, latents):
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(vae_path).eval()
    z = torch.from_numpy(latents).permute(0, 4, 1, 2, 3)
    z = z * torch.tensor(LATENTS_STD).view(1, -1, 1, 1, 1) + torch.tensor(LATENTS_MEAN).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        video = vae.decode(z).sample
    return ((video.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()


def test_mp4_per_prompt_matches_diffusers_decoding(sampled, models):
    import imageio.v2 as imageio

    out, report = sampled
    assert report["sampler"] == "student, 4 step(s)" and report["network_evaluations"] == 4
    mp4s = sorted(f for f in os.listdir(out) if f.endswith(".mp4") and f != "grid.mp4")
    assert mp4s == ["000_a_red_circle_moving_left.mp4", "001_a_blue_square.mp4"]
    assert os.path.exists(os.path.join(out, "grid.mp4"))
    latents = np.load(os.path.join(out, "latents.npy"))
    assert latents.shape == (2, *LATENT_SHAPE) and np.isfinite(latents).all()
    assert np.abs(latents[0] - latents[1]).mean() > 1e-3  # different prompts and noise, different videos
    want = _diffusers_decode(models["vae"], latents)
    frames = np.load(os.path.join(out, "videos.npy"))
    assert frames.shape == (2, 5, 16, 16, 3)
    assert np.abs(frames.astype(int) - want).max() <= 1  # same uint8 quantisation (float rounding aside)
    for i, name in enumerate(mp4s):
        back = np.stack(list(imageio.mimread(os.path.join(out, name))))
        assert back.shape == want[i].shape
        # H.264 at quality 8 on noise-like 16 x 16 frames: a loose bound, still far below unrelated videos (~85).
        assert np.abs(back.astype(float) - want[i]).mean() < 20


def test_teacher_in_the_same_call_is_guided_and_timed(sampled):
    out, report = sampled
    teacher = report["teacher"]
    assert teacher["sampler"] == "teacher, 50 steps, CFG 5.0 (uncond_anchor)"
    assert teacher["network_evaluations"] == 100
    assert len([f for f in os.listdir(os.path.join(out, "teacher")) if f.endswith(".mp4")]) == 3
    for r in (report, teacher):
        assert {"text", "compile", "diffusion", "decode"} <= set(r["seconds"])
        assert r["end_to_end_seconds"] >= r["diffusion_seconds"] > 0
    assert report["speedup"]["diffusion"] > 1.0
    assert json.load(open(os.path.join(out, "sample.json")))["speedup"] == report["speedup"]


def test_prompt_sources(tmp_path):
    (tmp_path / "p.txt").write_text("a red circle\n\n a blue square \n")
    (tmp_path / "p.csv").write_text("id,prompt\n1,a red circle\n2,\"a blue, square\"\n")
    assert read_prompts(str(tmp_path / "p.txt")) == ["a red circle", "a blue square"]
    assert read_prompts(str(tmp_path / "p.csv")) == ["a red circle", "a blue, square"]
    assert read_prompts("a red circle; a blue square") == ["a red circle", "a blue square"]
    with pytest.raises(ValueError, match="no such file"):
        read_prompts(str(tmp_path / "missing.txt"))


def test_unknown_vae_backend_is_named(models):
    # The flax backend itself is checked against the torch one in tests/test_wan_vae.py (same decoder code).
    from dollar_jax.rewards.decoders import wan_vae_decoder

    with pytest.raises(ValueError, match="--vae_backend must be one of"):
        wan_vae_decoder(models["vae"], backend="jax")


def test_cli_missing_weight_folder_is_one_error_line(models, tmp_path):
    """One subprocess: a misspelled --text_encoder ends in one line naming the flag, exit 1, no traceback."""
    out = subprocess.run([sys.executable, "-m", "dollar_jax.sample", f"--model={models['student']}",
                          "--prompts=a red circle", f"--text_encoder={tmp_path}/no_such_umt5",
                          f"--vae={models['vae']}", f"--out={tmp_path / 'out'}"],
                         cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 1
    assert "Traceback" not in out.stderr
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "--text_encoder" in errors[0] and "no_such_umt5" in errors[0], out.stderr
