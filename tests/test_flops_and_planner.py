"""FLOPs accounting against XLA's own count, MFU arithmetic, and the memory planner on 8 virtual devices."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dollar_jax.config import config_from_file
from dollar_jax.models import WanDiT, preset
from dollar_jax.train.flops import (CHIPS, PEAK_BF16_FLOPS, chip_spec, dit_forward_flops, distill_step_flops,
                                   recompute_flops, utilisation)

ROOT = os.path.join(os.path.dirname(__file__), "..")


def _config(variant: str):
    return config_from_file(f"configs/wan21_distill.py:{variant}")


@pytest.mark.parametrize("latent,text_len", [((4, 16, 16, 16), 16), ((2, 8, 24, 16), 40)])
def test_dit_forward_flops_match_xla(latent, text_len):
    # Wide enough that matmuls dominate, as in real models; XLA also counts elementwise work, so it is higher.
    # One layer: XLA's cost analysis counts the body of the layer scan once, whatever its trip count.
    cfg = preset("tiny", num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=1, in_channels=16,
                 out_channels=16, text_dim=256, freq_dim=256)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0))))
    args = (jax.ShapeDtypeStruct((2, *latent), jnp.float32), jax.ShapeDtypeStruct((2,), jnp.float32),
            jax.ShapeDtypeStruct((2, text_len, cfg.text_dim), jnp.float32))
    xla = jax.jit(lambda p, x, t, c: nnx.merge(graphdef, p)(x, t, c)).lower(params, *args).cost_analysis()["flops"]
    analytic = dit_forward_flops(cfg, latent, text_len, batch=2)
    assert 0.85 * xla <= analytic <= 1.01 * xla, (analytic, xla)


def test_step_flops_follow_the_recipe():
    config = _config("local")
    config.distill.batch_size = 8  # the shipped -1 is resolved from the mesh by the job and the planner
    cfg = preset("tiny", in_channels=16, out_channels=16, text_dim=4096)
    shape = tuple(config.data.latent_shape)
    forward = dit_forward_flops(cfg, shape, 16, config.distill.batch_size)
    roles = distill_step_flops(config, cfg, shape, 16)
    dc = config.distill
    # teacher: guided real score (2 forwards) + 5 guided DDIM steps of CD (2 each)
    assert roles["teacher"] == pytest.approx((2 + 2 * dc.cd_steps) * forward)
    # fake: one forward in VSD + fake_updates training steps of 3 forwards each
    assert roles["fake"] == pytest.approx((1 + 3 * dc.fake_updates) * forward)
    # Model FLOPs (MFU) never count rematerialised recompute; hardware FLOPs (HFU) add one forward per
    # training pass: fake_updates of the fake score, the VSD and the CD passes of the student.
    remat = distill_step_flops(config, cfg.replace(remat_policy="full"), shape, 16)
    assert remat == pytest.approx(roles)
    assert recompute_flops(config, cfg, shape, 16) == 0.0
    assert recompute_flops(config, cfg.replace(remat_policy="full"), shape, 16) == pytest.approx(
        (dc.fake_updates + 2) * forward)


def test_utilisation_and_peaks():
    out = utilisation({"student": 3e12, "fake": 1e12}, steps=10, seconds=2.0, num_devices=4, peak=10e12,
                      recompute_per_step=1e12)
    assert out["tflops_per_device"] == pytest.approx(5.0)
    assert out["mfu"] == pytest.approx(0.5) and out["mfu_student"] == pytest.approx(0.375)
    assert out["hfu"] == pytest.approx(0.625)
    assert "mfu" not in utilisation({"student": 1.0}, 1, 1.0, 1, None)
    assert dict(PEAK_BF16_FLOPS)["H100"] == 989e12

    class Device:  # jax.Device's fields the chip table reads
        def __init__(self, kind, cores=0):
            self.device_kind, self.num_cores = kind, cores

    # PCIe is matched before SXM, v5 lite (v5e) before v5 (v5p); unknown devices (CPUs) have no peak.
    assert chip_spec(Device("NVIDIA H100 PCIe")).peak_bf16 == 756e12
    assert chip_spec(Device("NVIDIA H100 80GB HBM3")).peak_bf16 == 989e12
    assert chip_spec(Device("TPU v5 lite")).hbm_gib == 16 and chip_spec(Device("TPU v5")).hbm_gib == 95
    assert chip_spec(Device("cpu")) is None
    # HBM per device: a v5p megacore device (2 cores) owns its chip's 95 GiB; a v4 single-core device half.
    assert chip_spec(Device("TPU v5", 2)).hbm_gib_per_device(Device("TPU v5", 2)) == 95
    assert chip_spec(Device("TPU v4", 1)).hbm_gib_per_device(Device("TPU v4", 1)) == 16
    assert len({c.name for c in CHIPS}) == len(CHIPS)


@pytest.mark.slow
@pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 (virtual) devices")
def test_planner_compiles_the_real_step_and_sharding_divides_the_state():
    from dollar_jax.train.planner import format_plan, plan_distill_step

    config = _config("local")
    config.distill.update(dict(fake_updates=1, cd_steps=1))  # the same state, a shorter program to compile
    plan = plan_distill_step(config, {"fsdp": 8})
    assert plan["devices"] == 8 and sum(plan["parameters"].values()) > 1e5
    # Parameters, EMA, Adam moments and the teacher are split over fsdp: each device holds about an eighth of
    # the state (more in this tiny model: vectors too small to split stay replicated), never all of it.
    per_device, total = plan["per_device_gib"]["arguments"], plan["state_gib_total"]
    assert total / 8 <= per_device < total / 2, (per_device, total)  # unsharded would be the total
    assert plan["per_device_gib"]["peak"] > per_device > 0
    assert plan["compiler"] == "XLA:CPU (upper bound)" and plan["fits"] is None
    assert "per device" in format_plan(plan) and "upper bound" in format_plan(plan)


TPU_PLAN = r"""
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("w", sys.argv[1]); m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
from dollar_jax.train.planner import format_plan, plan_distill_step
c = m.get_config("local")
c.model.update(dict(num_attention_heads=2, attention_head_dim=64, ffn_dim=128, num_layers=1, text_dim=64,
                    attention="splash", remat_policy="full", dtype="bfloat16"))
c.data.update(dict(latent_shape=(2, 8, 8, 16), text_shape=(8, 64)))
c.distill.update(dict(batch_size=4, fake_updates=1, cd_steps=1, ema_memory="host"))
plan = plan_distill_step(c, {"fsdp": 4}, topology="v5p:2x2x1")
print(format_plan(plan), file=sys.stderr)
print(json.dumps(plan))
"""


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                    reason="libtpu not installed (pip install -e '.[tpu-plan]'): the XLA:TPU planner is not tested")
def test_planner_compiles_for_a_tpu_topology_with_xla_tpu():
    import json
    import subprocess
    import sys

    # A fresh process: libtpu is loaded for the topology only, next to the CPU backend the tests run on
    # (JAX_PLATFORMS=cpu stays set: the topology API does not need a TPU backend).
    env = dict(os.environ, PYTHONPATH=ROOT)
    done = subprocess.run([sys.executable, "-c", TPU_PLAN, os.path.join(ROOT, "configs", "wan21_distill.py")],
                          capture_output=True, text=True, env=env, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    plan = json.loads(done.stdout.strip().splitlines()[-1])
    assert plan["compiler"] == "XLA:TPU (v5p:2x2x1)" and plan["device_kind"] == "TPU v5" and plan["devices"] == 4
    mem = plan["per_device_gib"]
    # The figures are read back from XLA:TPU: sharded arguments, temporaries, and a peak against 95 GiB HBM.
    assert 0 < mem["arguments"] < plan["state_gib_total"] and mem["temporaries"] > 0
    assert mem["peak"] >= mem["arguments"] and plan["hbm_gib_per_device"] == 95 and plan["fits"] is True
    # The EMA waits in host memory: XLA:TPU counts it apart from the device's arguments, split over fsdp=4
    # (more than a quarter each: vectors too small to split stay replicated).
    assert plan["ema_gib"]["student"] / 4 <= mem["host_arguments"] < plan["ema_gib"]["student"] / 2
    assert "in host memory" in done.stderr
    assert plan["estimated_step_seconds"] > 0 and 0 < plan["estimated_mfu"] < 1
    assert plan["hardware_tflops_per_device_step"] > plan["model_tflops_per_device_step"] > 0


def test_reward_memory_benchmark_compiles_both_generator_steps():
    # benchmarks/reward_memory.py's measurement at tiny sizes (8 frames at 32 x 32, a 2-level decoder, a 1-layer
    # ViT): both generator steps compile, and the pixel path's temporaries exceed the LRM path's.
    from dollar_jax.eval import reward_memory as bench

    rows = {path: bench.measure(path, 8, 32, 32, tiny=True, compiler_options=bench.FAST_COMPILE)
            for path in bench.PATHS}
    for row in rows.values():
        assert row["peak_bytes"] == row["argument_bytes"] + row["temp_bytes"] + row["output_bytes"] - row["alias_bytes"]
        assert row["output_bytes"] > 0 and "step_s" not in row  # compiled, not run (run_max_gib=0)
    assert rows["pixel"]["temp_bytes"] > rows["lrm"]["temp_bytes"] > 0
    assert rows["lrm"]["frozen_params"] == 189_441  # the paper's image LRM, whatever the latent size
    assert rows["lrm"]["latent_frames"] == 3 and rows["pixel"]["student_params"] == rows["lrm"]["student_params"]
    table = bench.markdown([{**r, "compiler": "XLA:CPU"} for r in rows.values()])
    assert table.count("\n") == 3 and "| pixel |" in table


def test_reward_memory_rows_in_child_processes_and_their_files(tmp_path, monkeypatch):
    # What the :paper demo's "reward memory" stage and the benchmark script run: each row in a process of its own
    # (`python -m dollar_jax.eval.reward_memory --single`) on JAX's CPU backend whatever the parent's platform
    # (here one that does not exist), then the table, the JSON and the plot; a row that fails is recorded with its
    # error and the command that would measure it, not dropped.
    from dollar_jax.eval import reward_memory as bench

    monkeypatch.setenv("JAX_PLATFORMS", "no_such_platform")
    rows = bench.measure_rows(("student", "nothing"), [8], height=32, width=32, tiny=True, run_max_gib=0.0)
    ok, failed = rows
    # The compiler column is the child's own backend, and the row says it measured the tiny networks.
    assert ok["path"] == "student" and ok["compiler"] == "XLA:CPU" and ok["tiny"] is True and ok["peak_bytes"] > 0
    assert "step_s" not in ok  # compiled, not run (run_max_gib=0)
    assert "invalid choice: 'nothing'" in failed["error"] and "--single nothing --frames 8" in failed["command"]
    table = bench.write(rows, str(tmp_path / "memory"), 32, 32)
    assert "not measured: " in table and "| student |" in table
    assert json.load(open(tmp_path / "memory.json"))["rows"] == rows
    assert (tmp_path / "memory.png").stat().st_size > 0 and open(tmp_path / "memory.md").read() == table + "\n"


def test_a_row_the_tpu_compiler_refuses_keeps_its_temporaries(tmp_path):
    # XLA:TPU refuses a program that cannot fit one chip instead of compiling it; its message (verbatim from the
    # pixel path at 32 frames on one v5p chip) still holds its own figure for the temporaries, which the table and
    # the plot show as a lower bound of the peak. Any other failure stays "not measured".
    from dollar_jax.eval import reward_memory as bench

    error = ("jax.errors.JaxRuntimeError: RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for "
             "HLO temporaries (283.27G) exceeds available HBM (95.74G).")
    refused = {"compiler": "XLA:TPU (v5p:2x2x1, 1 chip)", "path": "pixel", "frames": 32, "latent_frames": 9,
               "decoded_frames": 33, "error": error}
    other = refused | {"frames": 64, "latent_frames": 17, "decoded_frames": 65, "error": "over 600 s"}
    tera = refused | {"frames": 128, "latent_frames": 33, "decoded_frames": 129,
                      "error": error.replace("(283.27G)", "(1.06T)")}
    assert bench.refusal(refused) == (283.27 * 2**30, 95.74 * 2**30) and bench.refusal(other) is None
    assert bench.refusal(tera)[0] == 1.06 * 2**40
    table = bench.markdown([refused, other, tera])
    assert ("| pixel | 32 (9 -> 33) | refused: more than the chip's 95.74 GiB of HBM | | 283.27 GiB "
            "| **> 283.27 GiB** |") in table
    assert "| 64 (17 -> 65) | not measured: over 600 s |" in table
    assert "| 1.06 TiB | **> 1.06 TiB** |" in table  # the compiler's own precision, not 1085.44 GiB
    bench.plot([refused, other], str(tmp_path / "refused.png"))
    assert (tmp_path / "refused.png").stat().st_size > 0


def test_a_step_estimate_faster_than_the_chips_peak_is_rejected():
    from dollar_jax.train.planner import judge_step_estimate

    # The XLA:TPU figure for the 1.3B step on one v5p chip (BENCHMARKS.md): 3.06 s for 13,867 TFLOP at 459 TFLOP/s.
    rejected = judge_step_estimate(3.06, 13867.0, 15848.0, 459.0)
    assert set(rejected) == {"step_estimate_rejected"} and "30.2 s" in rejected["step_estimate_rejected"]
    kept = judge_step_estimate(40.0, 13867.0, 15848.0, 459.0)
    assert kept["estimated_step_seconds"] == 40.0
    assert kept["estimated_mfu"] == pytest.approx(13867.0 / 40.0 / 459.0) and kept["estimated_hfu"] > kept["estimated_mfu"]
