"""Profile, plan and generate certify and sample one map: the whole sampling spec, annealed guidance and an
attention temperature included, travels from the profile to every generate actor."""
import dataclasses

import numpy as np
import pytest
import torch
from conftest import make_tiny16x16_2blocks_model

from tarflow import Guidance, ModelRef, PlanError, SamplingSpec, sample_ids, save_checkpoint
from tarflow.schedule import schedule
from workflows.config import GenerateConfig, Resources, SampleSet
from workflows.stages.generate import generate
from workflows.stages.profile import profile
from workflows.storage import shards as sh

TOL = 1e-3


def test_plan_certified_under_annealed_guidance_holds_on_generated_images(ray_local, tmp_path, monkeypatch):
    import tarflow.schedule as scheduler

    # 64 tokens at batch 1: parallel passes clearly beat sequential steps, so the plan is not sequential
    model = make_tiny16x16_2blocks_model()
    ref = ModelRef(str(save_checkpoint(model, tmp_path / "m.safetensors")), in_channels=1)
    spec = SamplingSpec(seed=5, batch_size=1, guidance=Guidance(1.5, annealed=True, attn_temp=0.5)).for_model(10)
    prof, _ = profile(model, ref, spec, None, 2, Resources(num_cpus=1), segment_lens=[63, 16], windows=[16],
                      tols=[1e-2, 1e-4, 1e-6], repeats=1)
    assert prof.spec == spec and prof.model == ref
    monkeypatch.setattr(scheduler, "MIN_GAIN", -1e9)  # about errors, not clocks: the final race may not veto
    plan = schedule(prof, model, tol=TOL)
    assert plan.spec == spec and plan.tol == TOL and any(b.solver != "sequential" for b in plan.blocks)

    out = tmp_path / "set"
    cfg = GenerateConfig(model=ref, out=str(out), samples=SampleSet(num_samples=12, shard_size=4), spec=spec,
                         plan=plan, resources=Resources(num_cpus=0.5))
    generate(cfg, progress=False)
    ids, labels, images = sh.read_images(str(out))
    assert ids.tolist() == list(range(12)) and labels.tolist() == [i % 10 for i in range(12)]
    planned = torch.cat([sample_ids(model, spec, [i], plan).images for i in ids.tolist()])
    sequential = torch.cat([sample_ids(model, spec, [i]).images for i in ids.tolist()])
    assert (planned - sequential).abs().max().item() <= TOL  # the certified error holds on generated ids
    assert np.array_equal(images, sh.to_uint8(planned))  # and those are the images the actors wrote

    # the spec really reached the actors: constant guidance is another map, and the plan refuses it
    constant = dataclasses.replace(spec, guidance=Guidance(1.5, attn_temp=0.5))
    other = torch.cat([sample_ids(model, constant, [i]).images for i in ids.tolist()])
    assert (other - sequential).abs().max().item() > 10 * TOL
    with pytest.raises(PlanError, match="certified for another sampling map"):
        generate(cfg.model_copy(update={"spec": constant, "out": str(tmp_path / "other")}))
