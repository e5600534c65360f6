"""The CUDA path (skipped without a GPU): sampling, a GPU actor's shards, a plan raced on the GPU.

Run on a machine with a GPU and this project installed: `pytest -m cuda tests/test_cuda.py`."""
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from tarflow import GSJacobi, Plan, SamplingSpec, sample, sample_ids, sample_noise, save_checkpoint
from tarflow.profile import profile_model
from tarflow.schedule import schedule
from workflows.storage import shards as sh

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")]


def test_cuda_sampling_matches_the_cpu_and_bf16_stays_close():
    model = make_tiny_model()
    noise = sample_noise(0, range(4), model.num_tokens, model.token_dim)
    y = torch.tensor([1, 3, 5, 7])
    plan = Plan.uniform(4, model.num_tokens, GSJacobi(segment_len=5, tol=0.0))
    cpu = sample(model, noise, y).images
    gpu = model.cuda()
    for p in (None, plan):
        out = sample(gpu, noise.cuda(), y.cuda(), p).images.cpu()
        assert (out - cpu).abs().max().item() <= 1e-3  # float32 on another device: reduction order only
    bf16 = sample(gpu, noise.cuda(), y.cuda(), spec=SamplingSpec(autocast="bf16")).images.cpu()
    assert 0 < (bf16 - cpu).abs().max().item() <= 0.05 * cpu.abs().max().item()


def test_a_plan_raced_on_cuda_holds_its_tolerance():
    model = make_tiny_model(out_std=0.035, num_blocks=2, img_size=16).cuda()
    prof = profile_model(model, SamplingSpec(batch_size=4), num_images=4, device="cuda", segment_lens=[63, 16],
                         windows=[16], tols=[1e-2, 1e-4], repeats=1)
    assert prof.device == torch.cuda.get_device_name(0)
    plan = schedule(prof, model, tol=1e-3, device="cuda")
    assert plan.evidence["verified_on"].startswith("cuda")
    spec = SamplingSpec(batch_size=4).for_model(10)
    ids = list(range(8, 16))
    exact = sample_ids(model, spec, ids).images
    assert (sample_ids(model, spec, ids, plan).images - exact).abs().max().item() <= 1e-3


def test_a_gpu_actor_writes_cuda_shards(tmp_path):
    ckpt = save_checkpoint(make_tiny_model(), tmp_path / "tiny.safetensors")
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, "RAY_AUTH_MODE": "disabled"}
    out = tmp_path / "set"
    subprocess.run([shutil.which("tarflow-gs"), "generate", "--checkpoint", str(ckpt), "--in-channels", "1",
                    "--num-samples", "16", "--batch-size", "8", "--shard-size", "8", "--num-gpus", "1",
                    "--out", str(out), "--no-progress"], env=env, check=True, timeout=300)
    manifest = sh.verify_shards(str(out))
    assert manifest.settings["numerics"]["device"] == "cuda"
    ids, _, images = sh.read_images(str(out))
    model = make_tiny_model()
    spec = SamplingSpec(batch_size=8).for_model(10)
    cpu = np.concatenate([sh.to_uint8(sample_ids(model, spec, list(range(s, s + 8))).images) for s in (0, 8)])
    assert np.abs(images.astype(int) - cpu).max() <= 1  # another device: at most one 8-bit level
