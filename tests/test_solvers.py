"""Solvers and plans: exactness, guidance, tolerances, caps, the fallback, bf16, the block-solve API and plan
JSON. Every sampling test runs on every engine for CPU tensors (the `engine` fixture: eager and static)."""
import json

import pytest
import torch

import reference_tarflow as ref
from conftest import make_tiny_model
from tarflow import GSJacobi, Guidance, Jacobi, NonFiniteSampleError, Plan, PlanError, SamplingSpec, Sequential, \
    jacobi_trace, sample, solve_block
from tarflow.schema import SchemaError

EXACT = 1e-4  # the stated tolerance of fast samplers vs sequential, float32


def noise_for(model, batch, seed=0):
    return torch.randn(batch, model.num_tokens, model.token_dim, generator=torch.Generator().manual_seed(seed))


def max_diff(a, b):
    return (a - b).abs().max().item()


def spec(**guidance) -> SamplingSpec:
    return SamplingSpec(guidance=Guidance(**guidance))


FULL_BUDGET_PLANS = {
    "jacobi": Jacobi(tol=0.0),
    "gs_jacobi_L4": GSJacobi(segment_len=4, tol=0.0),
    "gs_jacobi_L6_ragged": GSJacobi(segment_len=6, tol=0.0),  # 15 tokens: 6+6+3
    "gs_jacobi_zeros_init": GSJacobi(segment_len=5, tol=0.0, init="zeros"),
    "gs_jacobi_overbudget": GSJacobi(segment_len=5, tol=0.0, max_iters=50),
}


@pytest.mark.parametrize("name", FULL_BUDGET_PLANS)
@pytest.mark.parametrize("cfg", [
    dict(),
    dict(scale=1.5, annealed=True),
    dict(scale=2.0, attn_temp=0.6),
    dict(scale=1.0, what="a"),
    dict(scale=1.0, what="b", annealed=True, attn_temp=1.3),
], ids=["plain", "cfg_annealed", "cfg_attn_temp", "cfg_a", "cfg_b"])
def test_full_budget_equals_sequential(tiny8x8_model, name, cfg, engine):
    noise = noise_for(tiny8x8_model, 3)
    y = torch.tensor([0, 7, 3])
    seq = sample(tiny8x8_model, noise, y, spec=spec(**cfg), engine=engine)
    plan = Plan.uniform(len(tiny8x8_model.blocks), tiny8x8_model.num_tokens, FULL_BUDGET_PLANS[name])
    fast = sample(tiny8x8_model, noise, y, plan=plan, spec=spec(**cfg), engine=engine)
    assert max_diff(fast.images, seq.images) <= EXACT
    assert fast.stats.fallbacks == 0


@pytest.mark.parametrize("cfg", [dict(), dict(scale=2.0, attn_temp=0.7, annealed=True)])
def test_unconditional_model_with_guidance(cfg, engine):
    model = make_tiny_model(num_classes=0)
    noise = noise_for(model, 2)
    seq = sample(model, noise, spec=spec(**cfg), engine=engine)
    fast = sample(model, noise, plan=Plan.uniform(4, model.num_tokens, Jacobi(tol=0.0)), spec=spec(**cfg),
                  engine=engine)
    assert max_diff(fast.images, seq.images) <= EXACT


def test_batched_cfg_matches_separate_reference_passes(engine):
    model = make_tiny_model(num_blocks=2, head_dim=64)
    sd = model.state_dict()
    noise = noise_for(model, 2)
    y = torch.tensor([2, 5])
    for cfg in [dict(guidance=1.5, attn_temp=0.8, annealed=True, what="ab"), dict(guidance=0.7, what="b")]:
        expected = ref.sample(sd, noise, y, 2, 2, 64, **cfg)
        got = sample(model, noise, y, spec=spec(scale=cfg["guidance"], attn_temp=cfg.get("attn_temp", 1.0),
                                                annealed=cfg.get("annealed", False), what=cfg["what"]),
                     engine=engine).images
        torch.testing.assert_close(model.patchify(got), expected, atol=1e-5, rtol=1e-5)
    assert max_diff(sample(model, noise, y, spec=spec(scale=1.5), engine=engine).images,
                    sample(model, noise, y, engine=engine).images) > 1e-3


@pytest.mark.parametrize("segmented", [0, 3])
def test_segmented_single_block(tiny8x8_model, segmented, engine):
    """Block 0 is sampled last (identity order), block 3 first (flipped): each segmented alone."""
    noise = noise_for(tiny8x8_model, 2, seed=4)
    y = torch.tensor([1, 9])
    blocks = [Sequential() for _ in range(4)]
    blocks[segmented] = GSJacobi(segment_len=3, tol=0.0)
    plan = Plan(4, tiny8x8_model.num_tokens, blocks)
    out = sample(tiny8x8_model, noise, y, plan=plan, spec=spec(scale=1.0, annealed=True), engine=engine)
    seq = sample(tiny8x8_model, noise, y, spec=spec(scale=1.0, annealed=True), engine=engine)
    assert max_diff(out.images, seq.images) <= EXACT
    by_block = {b.block: b for b in out.stats.blocks}
    assert by_block[segmented].iterations == [3] * 5  # 15 tokens in segments of 3, tol=0: full budget
    assert by_block[segmented].residual == 0.0


def test_tolerance_is_per_sample_not_batch_average(tiny8x8_model, engine):
    """The batch stops only when its slowest sample has converged."""
    noise = noise_for(tiny8x8_model, 4, seed=3)
    y = torch.tensor([0, 1, 2, 3])
    plan = Plan.uniform(4, tiny8x8_model.num_tokens, Jacobi(tol=1e-3))
    batch = sample(tiny8x8_model, noise, y, plan=plan, engine=engine).stats
    for block_index in range(4):
        alone = [sample(tiny8x8_model, noise[i : i + 1], y[i : i + 1], plan=plan, engine=engine)
                 .stats.blocks[block_index].iterations[0] for i in range(4)]
        assert batch.blocks[block_index].iterations[0] == max(alone)
    assert all(b.residual <= 1e-3 for b in batch.blocks)


def test_iteration_cap_is_respected_and_reported(tiny8x8_model, engine):
    noise = noise_for(tiny8x8_model, 2)
    plan = Plan.uniform(4, tiny8x8_model.num_tokens, Jacobi(tol=0.0, max_iters=2))
    out = sample(tiny8x8_model, noise, [1, 2], plan=plan, engine=engine)
    assert all(b.iterations == [2] and b.passes == 2 for b in out.stats.blocks)
    exact = sample(tiny8x8_model, noise, [1, 2], engine=engine).images
    assert max_diff(out.images, exact) > EXACT  # 2 of 15 is not exact


def test_divergent_iterates_fall_back_to_sequential(tiny8x8_model, engine):
    noise = noise_for(tiny8x8_model, 2)
    y = torch.tensor([4, 4])
    seq = sample(tiny8x8_model, noise, y, engine=engine)
    bound = 0.5 * seq.images.abs().max().item()  # true values exceed it, so every Jacobi segment trips
    plan = Plan(4, tiny8x8_model.num_tokens, [GSJacobi(segment_len=5, tol=0.0)] * 4, divergence_bound=bound)
    out = sample(tiny8x8_model, noise, y, plan=plan, engine=engine)
    assert out.stats.fallbacks > 0
    assert max_diff(out.images, seq.images) <= EXACT


def test_overflowing_model_raises_a_clear_error(engine):
    model = make_tiny_model(out_std=0.5)  # a wildly scaled flow that overflows float32
    with pytest.raises(NonFiniteSampleError, match="produced NaN/inf"):
        sample(model, noise_for(model, 2) * 10, [0, 1], engine=engine)


def test_batch_split_changes_samples_only_within_tolerance(tiny8x8_model, engine):
    noise = noise_for(tiny8x8_model, 4)
    y = torch.tensor([0, 1, 2, 3])
    plan = Plan.uniform(4, tiny8x8_model.num_tokens, GSJacobi(segment_len=4, tol=1e-6))
    whole = sample(tiny8x8_model, noise, y, plan=plan, engine=engine).images
    halves = torch.cat([sample(tiny8x8_model, noise[:2], y[:2], plan=plan, engine=engine).images,
                        sample(tiny8x8_model, noise[2:], y[2:], plan=plan, engine=engine).images])
    assert max_diff(whole, halves) <= EXACT
    assert torch.equal(whole, sample(tiny8x8_model, noise, y, plan=plan, engine=engine).images)  # deterministic


def test_bf16_autocast_on_cpu(tiny8x8_model, engine):
    """Under bf16 the fast plan matches bf16 sequential to bf16 rounding, as documented."""
    noise = noise_for(tiny8x8_model, 2)
    y = torch.tensor([3, 8])
    ref32 = sample(tiny8x8_model, noise, y, engine=engine).images
    bf16 = SamplingSpec(autocast="bf16")
    seq16 = sample(tiny8x8_model, noise, y, spec=bf16, engine=engine)
    plan = Plan.uniform(4, tiny8x8_model.num_tokens, GSJacobi(segment_len=5, tol=0.0))
    fast16 = sample(tiny8x8_model, noise, y, plan=plan, spec=bf16, engine=engine)
    scale = ref32.abs().max().item()
    assert seq16.images.dtype == torch.float32
    assert 0 < max_diff(seq16.images, ref32) <= 0.05 * scale  # bf16 really ran, and stays close
    assert max_diff(fast16.images, ref32) <= 0.05 * scale
    assert max_diff(fast16.images, seq16.images) <= 0.05 * scale


def test_sample_input_validation(tiny8x8_model):
    with pytest.raises(ValueError, match=r"noise must be \(B, 16, 4\)"):
        sample(tiny8x8_model, torch.randn(2, 10, 4))
    with pytest.raises(ValueError, match="label 12 out of range"):
        sample(tiny8x8_model, noise_for(tiny8x8_model, 2), [1, 12])
    with pytest.raises(ValueError, match="3 labels for a batch of 2"):
        sample(tiny8x8_model, noise_for(tiny8x8_model, 2), [1, 2, 3])
    with pytest.raises(ValueError, match="what='c': allowed values are a, b, ab"):
        Guidance(1.0, what="c")
    with pytest.raises(PlanError, match="plan is for 3 blocks x 16 tokens, the model has 4 blocks x 16 tokens"):
        sample(tiny8x8_model, noise_for(tiny8x8_model, 1), plan=Plan.sequential(3, 16))


def test_image_noise_and_label_minus_one(tiny8x8_model, engine):
    images = noise_for(tiny8x8_model, 2)
    as_images = tiny8x8_model.unpatchify(images)
    a = sample(tiny8x8_model, as_images, [-1, 2], engine=engine).images
    b = sample(tiny8x8_model, images, [-1, 2], engine=engine).images
    assert torch.equal(a, b)
    mean_class = sample(tiny8x8_model, images, None, engine=engine).images
    assert torch.equal(a[0], mean_class[0])


# ---- the block-solve API ----------------------------------------------------

def test_solve_block_inverts_encode_and_jacobi_trace_reaches_the_solution(tiny8x8_model, engine):
    """One block on its own: solve_block and jacobi_trace against the encoder's true pair."""
    x = noise_for(tiny8x8_model, 2, seed=9)
    y = torch.tensor([1, 6])
    block = tiny8x8_model.blocks[1]  # flipped order: the API takes and returns model token order
    z, _ = block(x, y)
    solved = solve_block(block, z, y, GSJacobi(segment_len=4, tol=0.0), engine=engine)
    assert max_diff(solved.x, x) <= EXACT and solved.stats.iterations == [4, 4, 4, 3]
    trace = jacobi_trace(block, z, y, solution=x)
    # at most T-1 iterations (exact there); it stops earlier at an exact fixed point (residual 0)
    assert len(trace.residuals) == len(trace.errors) <= tiny8x8_model.num_tokens - 1
    assert trace.residuals[-1] == 0.0 or len(trace.residuals) == tiny8x8_model.num_tokens - 1
    assert trace.errors[-1] <= EXACT and trace.errors[0] > 10 * EXACT
    assert all(b <= a + 1e-6 for a, b in zip(trace.errors, trace.errors[1:]))  # token k is exact after k passes
    early = jacobi_trace(block, z, y, init="zeros", floor=1e-3, keep_iterates=True)
    assert early.residuals[-1] <= 1e-3 < min(early.residuals[:-1]) and len(early.iterates) == len(early.residuals)


# ---- plan JSON -------------------------------------------------------------

def test_plan_json_round_trip(tmp_path):
    plan = Plan(3, 16, [Sequential(), Jacobi(tol=1e-5, init="zeros"), GSJacobi(segment_len=4, max_iters=3)],
                name="mine", evidence={"why": "test"})
    path = plan.save(tmp_path / "p.json")
    loaded = Plan.load(path)
    assert loaded == plan
    data = json.loads(path.read_text())
    assert data["version"] == 2 and data["blocks"][0] == {"solver": "sequential"}
    assert loaded.fingerprint() == plan.fingerprint()
    renamed = Plan.from_dict({**plan.to_dict(), "name": "other", "evidence": {}})
    assert renamed.fingerprint() == plan.fingerprint()
    changed = Plan.from_dict({**plan.to_dict(), "divergence_bound": 5.0})
    assert changed.fingerprint() != plan.fingerprint()
    assert Plan.from_dict({**plan.to_dict(), "blocks": [{"solver": "sequential"}, {"solver": "jacobi", "tol": "1e-5",
                                                        "init": "zeros"}, plan.to_dict()["blocks"][2]]}) == plan


def _plan_dict(**block):
    return {"version": 2, "num_blocks": 1, "num_tokens": 16, "blocks": [{"solver": "gs_jacobi", "segment_len": 4, **block}]}


@pytest.mark.parametrize("data, message", [
    (_plan_dict(solver="newton"), r"plan.blocks\[0\].solver: Input tag 'newton' .* expected tags: 'sequential', "
                                  r"'jacobi', 'gs_jacobi', 'sliding'"),
    (_plan_dict(segment_len=16), r"plan.blocks\[0\].segment_len=16: gs_jacobi needs an integer in \[1, 15\]"),
    (_plan_dict(segment_len=None), r"plan.blocks\[0\].segment_len: Input should be a valid integer \(got None\)"),
    (_plan_dict(solver="jacobi"), r"plan.blocks\[0\].segment_len: unknown field; allowed here: solver, tol, "
                                  r"max_iters, init"),
    (_plan_dict(max_iters=0), r"plan.blocks\[0\].max_iters=0: must be a positive integer or null"),
    (_plan_dict(tol=-1), r"plan.blocks\[0\].tol=-1.0: must be a finite number >= 0"),
    (_plan_dict(tol="nan"), r"plan.blocks\[0\].tol: Input should be a finite number"),
    (_plan_dict(init="ones"), r"plan.blocks\[0\].init: Input should be 'z' or 'zeros' \(got 'ones'\)"),
    (_plan_dict(speed=3), r"plan.blocks\[0\].speed: unknown field; allowed here: solver, segment_len"),
    ({**_plan_dict(), "version": 1}, r"plan.version=1: this build reads version 2"),
    ({**_plan_dict(), "num_blocks": 2}, r"plan.blocks has 1 entries but num_blocks=2"),
    ({"version": 2, "num_tokens": 16, "blocks": []}, r"plan.num_blocks: Field required"),
    ({**_plan_dict(), "divergence_bound": 0}, r"plan.divergence_bound=0.0: must be a finite number > 0"),
])
def test_invalid_plans_are_rejected_with_the_field_named(data, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_dict(data)


def test_plan_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Plan.load(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(PlanError, match="bad.json: plan is not valid JSON"):
        Plan.load(tmp_path / "bad.json")
    (tmp_path / "binary.json").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(SchemaError, match="binary.json: cannot read the plan"):
        Plan.load(tmp_path / "binary.json")
