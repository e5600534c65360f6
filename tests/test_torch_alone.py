"""The README's promise that `tarflow` needs torch alone (the GPU machine has no Ray, pydantic, torch-fidelity
or PyYAML): sampling on every engine, profiling and planning run in a process where ray, pyarrow, click,
pydantic, yaml and torch_fidelity cannot be imported, and none of them is loaded."""
import os
import subprocess
import sys
from pathlib import Path

BLOCKED = ("ray", "pyarrow", "click", "pydantic", "yaml", "torch_fidelity")
SCRIPT = f"""
import sys

class Blocked:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)

sys.meta_path.insert(0, Blocked())

import torch
from conftest import make_tiny8x8_2blocks_model
from tarflow import GSJacobi, Guidance, Plan, SamplingSpec, Sliding, sample, sample_noise
from tarflow.profile import Costs, profile_model
from tarflow.schedule import schedule

model = make_tiny8x8_2blocks_model()
spec = SamplingSpec(batch_size=2, guidance=Guidance(1.5, annealed=True, attn_temp=0.7)).for_model(10)
noise = sample_noise(0, range(2), model.num_tokens, model.token_dim)
y = torch.tensor([1, 2])
hand = Plan(2, model.num_tokens, [GSJacobi(segment_len=5, tol=1e-5), Sliding(window=4, tol=1e-5)])
eager, static = (sample(model, noise, y, hand, spec, engine=e).images for e in ("eager", "static"))
assert (eager - static).abs().max().item() <= 1e-5
prof = profile_model(model, spec, num_images=2, segment_lens=[15, 8], windows=[4], tols=[1e-3, 1e-5], repeats=1,
                     costs=Costs(1.0, {{15: 2.5, 8: 1.5, 4: 1.0}}))
plan = schedule(prof, model, tol=1e-3, holdout_images=2)
assert (sample(model, noise, y, plan, spec).images - sample(model, noise, y, spec=spec).images).abs().max() <= 1e-3
loaded = sorted({{m.split(".")[0] for m in sys.modules}} & set({BLOCKED!r}))
assert not loaded, loaded
print("ok", plan.summary())
"""


def test_sampling_profiling_and_planning_need_torch_alone():
    tests = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tests), str(tests.parent), os.environ.get("PYTHONPATH", "")])}
    run = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0 and run.stdout.startswith("ok"), run.stdout + run.stderr
