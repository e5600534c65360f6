"""The CUDA path (skipped without a GPU): sampling, a GPU actor's shards, a plan raced on the GPU,
and the captured engine (CUDA graphs) against the eager one.

Run on a machine with a GPU and this project installed: `pytest -m cuda tests/test_cuda.py`."""
import dataclasses
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch
from conftest import make_tiny_model

from tarflow import GSJacobi, Guidance, Jacobi, Plan, SamplingSpec, Sequential, Sliding, sample, sample_ids, \
    sample_noise, save_checkpoint, solve_block
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


CAPTURE_PLANS = [Sequential(), Jacobi(tol=1e-5), GSJacobi(segment_len=5, tol=1e-5),
                 GSJacobi(segment_len=7, tol=1e-4, max_iters=3), Sliding(window=6, tol=1e-5),
                 Jacobi(tol=1e-6, coarse="bf16")]


@pytest.mark.parametrize("guidance", [Guidance(), Guidance(scale=1.5, annealed=True, attn_temp=0.7)],
                         ids=["plain", "cfg"])
def test_captured_passes_match_eager_and_check_every_changes_nothing(guidance):
    model = make_tiny_model().cuda()
    z = (sample_noise(0, range(3), model.num_tokens, model.token_dim) * model.var.sqrt()).cuda()
    y = torch.tensor([1, 2, 3]).cuda()
    for bp in CAPTURE_PLANS:
        eager = solve_block(model.blocks[1], z, y, bp, guidance, engine="eager")
        graph = solve_block(model.blocks[1], z, y, bp, guidance, engine="graph")
        assert graph.stats.engine == "graph", graph.stats.engine
        assert (graph.x - eager.x).abs().max().item() <= 1e-4, bp.short()
        again = solve_block(model.blocks[1], z, y, bp, guidance, engine="graph")  # replayed, not captured
        assert torch.equal(again.x, graph.x)
        if hasattr(bp, "check_every"):
            sparse = solve_block(model.blocks[1], z, y, dataclasses.replace(bp, check_every=4), guidance,
                                 engine="graph")
            assert torch.equal(sparse.x, graph.x) and sparse.stats.iterations == graph.stats.iterations
            assert sparse.stats.syncs < graph.stats.syncs


def test_auto_captures_on_cuda_and_a_whole_sample_matches_eager():
    model = make_tiny_model().cuda()
    noise = sample_noise(3, range(4), model.num_tokens, model.token_dim).cuda()
    plan = Plan(4, model.num_tokens, [Jacobi(tol=1e-6), GSJacobi(segment_len=4, tol=1e-6),
                                      Sliding(window=5, tol=1e-6), Sequential()])
    spec = SamplingSpec(guidance=Guidance(scale=1.0))
    eager = sample(model, noise, torch.tensor([1, 2, 3, 4]).cuda(), plan, spec, engine="eager")
    auto = sample(model, noise, torch.tensor([1, 2, 3, 4]).cuda(), plan, spec)
    assert {b.engine for b in auto.stats.blocks} == {"graph"}
    assert (auto.images - eager.images).abs().max().item() <= 1e-4
