"""Scheduler and hand plans: tolerance on held-out noise, paper notation, clear errors."""
import json

import pytest
import torch
from click.testing import CliRunner
from conftest import make_tiny8x8_2blocks_model, make_tiny16x16_2blocks_model, make_tiny_model

from tarflow import ModelRef, Plan, PlanError, SamplingSpec, Sliding, sample, save_checkpoint
from tarflow.noise import sample_noise
from tarflow.profile import Costs, Profile, ProfileError, profile_model
from tarflow.solvers import GSJacobi, Jacobi, Sequential
from tarflow.schedule import Option, block_options, candidates, hand_plan, schedule, spend_budget
from workflows.cli import main

TOL = 1e-3


@pytest.fixture(scope="module")
def tiny16x16_profiled():
    # 64 tokens at batch 1, with the costs given rather than timed (a pass costs a few sequential steps,
    # as measured on CPUs here): which candidates exist does not depend on the machine's load
    model = make_tiny16x16_2blocks_model()
    prof = profile_model(model, SamplingSpec(batch_size=1), num_images=2, segment_lens=[63, 16], windows=[16],
                         tols=[1e-2, 1e-4, 1e-6], repeats=1, costs=Costs(1.0, {63: 4.0, 16: 2.0}))
    return model, prof


def test_auto_plan_meets_the_tolerance_on_held_out_noise(tiny16x16_profiled, monkeypatch):
    import tarflow.schedule as scheduler

    model, prof = tiny16x16_profiled
    monkeypatch.setattr(scheduler, "MIN_GAIN", -1e9)  # about errors, not clocks: the final race may not veto
    plan = schedule(prof, model, tol=TOL)
    assert plan.name == "auto" and plan.model_hash == prof.model_hash and plan.tol == TOL and plan.spec == prof.spec
    assert any(b.solver != "sequential" for b in plan.blocks) and plan.evidence["fallback"] is None
    ev = plan.evidence
    assert ev["predicted_seconds"]["plan"] <= ev["predicted_seconds"]["sequential"]
    assert max(ev["final_error"].values()) <= TOL / 2  # verified with a margin
    for r in ev["rounds"]:  # every check against half the tolerance
        assert r["limit"] <= TOL / 2 and r["passed"] == (max(r["final_error"].values()) <= r["limit"])
        if r["passed"]:
            assert set(r["final_error"]) == {"calibration", "held_out"}
        else:  # sampling stops at the batch that failed
            assert list(r["final_error"].values())[-1] > r["limit"]
    assert [b["block"] for b in ev["blocks"]] == [0, 1]
    # noise the scheduler never saw: other seed, other labels
    noise = sample_noise(1234, range(6), model.num_tokens, model.token_dim)
    labels = torch.tensor([0, 3, 5, 7, 9, 2])
    ref = sample(model, noise, labels).images
    out = sample(model, noise, labels, plan=plan)
    assert (out.images - ref).abs().max().item() <= TOL
    assert Plan.from_json(plan.to_json()).fingerprint() == plan.fingerprint()


def test_the_error_budget_goes_where_time_is_cheapest_to_buy():
    """Block a buys 9e-4 of error for 1 s, block b 5e-4 for 4 s: a budget of 1.1e-3 goes to a. Equal
    shares (5.5e-4 each) would have made b pay 4 s as well."""
    a = [Option(Jacobi(tol=1e-2), 2, 1e-3, 1.0), Option(Jacobi(tol=1e-3), 3, 1e-4, 2.0),
         Option(Sequential(), 15, 0, 10.0)]
    b = [Option(GSJacobi(segment_len=4, tol=1e-2), 2, 1e-3, 1.0),
         Option(GSJacobi(segment_len=4, tol=1e-3), 5, 5e-4, 5.0), Option(Sequential(), 15, 0, 10.0)]
    assert spend_budget([a, b], 1.1e-3) == [a[1], b[0]]
    assert spend_budget([a, b], 1e-2) == [a[0], b[0]]  # room for the fastest everywhere
    assert spend_budget([a, b], 0.0) == [a[2], b[2]]  # nothing parallel fits: sequential
    assert spend_budget([a, b], 6.5e-4) == [a[1], b[1]]


def test_candidates_are_faster_than_sequential_and_trade_time_for_error(tiny16x16_profiled):
    _, prof = tiny16x16_profiled
    for b in prof.blocks:
        seq = (prof.num_tokens - 1) * b.sequential_step_seconds
        cands = candidates(b, prof.num_tokens)
        assert cands, "the tiny16x16_profiled model's blocks converge in a few passes: something must beat sequential"
        times = [o.predicted_seconds for o in cands]
        errors = [o.error for o in cands]
        assert times == sorted(times) and max(times) < seq
        assert all(e1 > e2 for e1, e2 in zip(errors, errors[1:]))  # each slower option is more accurate
        # nothing the profile measured is both faster and more accurate than a kept candidate
        for o in block_options(b, prof.num_tokens)[1:]:
            assert not any(o.predicted_seconds < c.predicted_seconds and o.error < c.error for c in cands)


def test_a_tolerance_nothing_parallel_meets_gives_sequential(tiny16x16_profiled):
    model, prof = tiny16x16_profiled
    loose = Profile.from_json(prof.to_json())
    for b in loose.blocks:  # keep only settings that stop far from exact
        b.convergence = [r for r in b.convergence
                         if (getattr(r.plan, "max_iters", None) or 99) <= 2 or r.plan.tol >= 1e-2]
    plan = schedule(loose, model, tol=1e-6)
    assert [b.solver for b in plan.blocks] == ["sequential", "sequential"]
    assert all(b["candidates"] for b in plan.evidence["blocks"])  # parallel options existed: all were rejected
    assert not any(r["passed"] for r in plan.evidence["rounds"])  # by sampling, or by their errors alone
    assert plan.evidence["final_error"] == {"calibration": 0.0, "held_out": 0.0}


def test_hardware_aware_sequential_where_passes_cost_too_much(tiny16x16_profiled):
    """With parallel passes made expensive, every block stays sequential."""
    model, prof = tiny16x16_profiled
    slow = Profile.from_json(prof.to_json())
    for b in slow.blocks:
        b.pass_seconds = {k: 1e3 for k in b.pass_seconds}
    plan = schedule(slow, model, tol=TOL)
    assert [b.solver for b in plan.blocks] == ["sequential", "sequential"]


def test_a_plan_that_does_not_time_faster_falls_back_to_sequential(tiny16x16_profiled, monkeypatch):
    import tarflow.schedule as scheduler

    model, prof = tiny16x16_profiled
    monkeypatch.setattr(scheduler, "MIN_GAIN", 0.999)  # demand a 1000x speedup: no plan times that fast
    plan = schedule(prof, model, tol=TOL)
    assert [b.solver for b in plan.blocks] == ["sequential", "sequential"]
    assert "below the 1000.00x a parallel plan must reach" in plan.evidence["fallback"]
    assert plan.evidence["final_error"] == {"calibration": 0.0, "held_out": 0.0}


def test_schedule_rejects_another_model(tiny16x16_profiled):
    _, prof = tiny16x16_profiled
    with pytest.raises(ProfileError, match="profile was made for model"):
        schedule(prof, make_tiny_model(seed=5, num_blocks=2), tol=TOL)
    with pytest.raises(ValueError, match="tol=0"):
        schedule(prof, tiny16x16_profiled[0], tol=0)


@pytest.mark.parametrize("spec, lists", [
    # README of the authors' code: AFHQ [7-8-32-10] and Img64cond [0/7-256/8-1/13-6]
    ("7-8-32-10", ([8, 1, 1, 1, 1, 1, 1, 1], [32, 10, 10, 10, 10, 10, 10, 10], [0, 0, 0, 0, 0, 1, 1, 0])),
    ("0/6-8-32-20", ([1, 8, 1, 1, 1, 1, 1, 8], [20, 32, 20, 20, 20, 20, 20, 32], [0, 1, 0, 0, 1, 0, 1, 1])),
    ("[0/7-256/8-1/13-6]", ([8, 1, 1, 1, 1, 1, 1, 0], [13, 6, 6, 6, 6, 6, 6, 1], [1, 0, 0, 0, 0, 1, 1, 1])),
])
def test_paper_notation_equals_its_list_form(spec, lists):
    num_gs, max_jacobi, guess = lists
    T = 256
    a = Plan.from_paper_notation(spec, 8, T, guess=guess)
    b = Plan.from_paper_lists(num_gs, max_jacobi, guess, T)
    assert a.fingerprint() == b.fingerprint()


def test_paper_notation_meaning():
    plan = Plan.from_paper_notation("7-8-32-10", 8, 256)
    assert plan.blocks[7].solver == "gs_jacobi" and plan.blocks[7].segment_len == 32  # 256 // 8
    assert plan.blocks[7].max_iters == 32
    assert all(b.solver == "jacobi" and b.max_iters == 10 and b.init == "z" for b in plan.blocks[:7])
    seq = Plan.from_paper_notation("0-256-1-6", 8, 256)
    assert seq.blocks[0].solver == "sequential"
    # T not divisible by GS: still GS segments, tiling tokens 1..T-1
    odd = Plan.from_paper_notation("3-8-32-10", 4, 196)
    assert len(odd.blocks[3].segments(196)) == 8


@pytest.mark.parametrize("spec, message", [
    ("7-8-32", "four '-'-separated fields"),
    ("7-x-32-10", "fields must be integers"),
    ("9-8-32-10", r"Stack names blocks \[9\]"),
    ("1/1-8-32-10", "distinct"),
    ("0/1-8/4/2-32-10", "GS has 3 values for 2 stacked blocks"),
    ("7-300-32-10", "num_GS_list entry 0 .block 7. = 300"),
    ("7-8-0-10", "max_jacobi_list entry 0 .block 7. = 0"),
])
def test_invalid_hand_plans_are_rejected(spec, message):
    with pytest.raises(PlanError, match=message):
        Plan.from_paper_notation(spec, 8, 256)


def test_invalid_lists_are_rejected():
    with pytest.raises(PlanError, match="guess_list has 2 entries but num_GS_list has 4"):
        Plan.from_paper_lists([1, 1, 1, 1], [5, 5, 5, 5], [0, 1], 16)
    with pytest.raises(PlanError, match="guess_list entry 1 .block 2. = 2: allowed values are 0 .z. and 1 .zeros."):
        Plan.from_paper_lists([1, 1, 1, 1], [5, 5, 5, 5], [0, 2, 0, 0], 16)


def test_sliding_plans_are_validated():
    with pytest.raises(PlanError, match="sliding needs an integer in"):
        Plan.uniform(2, 16, Sliding(window=16))
    base = Plan.uniform(2, 16, Sliding(window=4)).to_dict()
    with pytest.raises(PlanError, match=r"plan.blocks\[0\].window: Field required"):
        Plan.from_dict({**base, "blocks": [{"solver": "sliding"}, base["blocks"][1]]})
    with pytest.raises(PlanError, match=r"plan.blocks\[1\].max_iters: unknown field"):
        Plan.from_dict({**base, "blocks": [base["blocks"][0], {**base["blocks"][1], "max_iters": 3}]})


@pytest.mark.parametrize("window, tol", [(1, 0.0), (15, 0.0), (4, 1e-3)])
def test_sliding_window_matches_sequential(window, tol):
    model = make_tiny8x8_2blocks_model()
    noise = sample_noise(7, range(3), model.num_tokens, model.token_dim)
    ref = sample(model, noise, [1, 2, 3]).images
    plan = Plan.uniform(2, model.num_tokens, Sliding(window=window, tol=tol))
    out = sample(model, noise, [1, 2, 3], plan=plan)
    assert (out.images - ref).abs().max().item() <= (1e-5 if tol == 0 else 1e-2)
    if tol > 0:
        assert out.stats.passes < 2 * (model.num_tokens - 1)  # it skips converged tokens


def test_cli_profile_and_plan(tiny16x16_profiled, tmp_path, ray_local):
    model, prof = tiny16x16_profiled
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors")
    prof.model = ModelRef(str(ckpt), in_channels=1)  # the profile says how to reload its model
    prof.save(tmp_path / "profile.json")
    runner = CliRunner()
    r = runner.invoke(main, ["plan", "--profile", str(tmp_path / "profile.json"), "--num-cpus", "1",
                             "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert "verified on cpu" in r.output
    auto = Plan.load(tmp_path / "p.json")
    assert auto.name == "auto" and auto.evidence["placement"]["node_id"]
    r = runner.invoke(main, ["plan", "--hand", "1-2-8-4", "--checkpoint", str(ckpt), "--out", str(tmp_path / "h.json")])
    assert r.exit_code == 0, r.output
    hand = Plan.load(tmp_path / "h.json")
    assert hand.fingerprint() == hand_plan("1-2-8-4", model).fingerprint()
    assert hand.blocks[1].solver == "gs_jacobi" and hand.blocks[0].max_iters == 4
    r = runner.invoke(main, ["plan", "--paper-lists", "[2,1]", "[8,4]", "[0,0]", "--checkpoint", str(ckpt),
                             "--out", str(tmp_path / "l.json")])
    assert r.exit_code == 0, r.output
    assert Plan.load(tmp_path / "l.json").fingerprint() == hand.fingerprint()
    r = runner.invoke(main, ["plan", "--hand", "5-2-8-4", "--checkpoint", str(ckpt), "--out", str(tmp_path / "x.json")])
    assert r.exit_code != 0 and "Stack names blocks [5]" in r.output
    r = runner.invoke(main, ["plan", "--out", str(tmp_path / "x.json")])
    assert r.exit_code != 0 and "exactly one of --profile, --hand, --paper-lists" in r.output
    assert json.loads((tmp_path / "p.json").read_text())["tol"] == 1e-3


def test_plan_from_a_profile_of_a_raw_checkpoint_needs_nothing_else(tmp_path, ray_local):
    """The profile records how to reload its model (the raw file's image channels too)."""
    raw = tmp_path / "raw.pth"
    torch.save(make_tiny8x8_2blocks_model().state_dict(), raw)
    runner = CliRunner()
    r = runner.invoke(main, ["profile", "--checkpoint", str(raw), "--in-channels", "1", "--num-images", "1",
                             "--num-cpus", "1", "--out", str(tmp_path / "p.json")])
    assert r.exit_code == 0, r.output
    assert Profile.load(tmp_path / "p.json").model == ModelRef(str(raw), in_channels=1)
    r = runner.invoke(main, ["plan", "--profile", str(tmp_path / "p.json"), "--num-cpus", "1",
                             "--out", str(tmp_path / "plan.json")])
    assert r.exit_code == 0, r.output
    assert Plan.load(tmp_path / "plan.json").model_hash == Profile.load(tmp_path / "p.json").model_hash
