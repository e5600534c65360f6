"""Profiling: in process with torch alone and as the Ray stage (real local Ray), the JSON schema, invalid
profiles, and a profile that certifies the whole sampling map (guidance with annealing and attn_temp)."""
import json

import pytest
import torch
from conftest import make_tiny_model

from tarflow import Guidance, ModelRef, SamplingSpec, save_checkpoint, solve_block
from tarflow.calibration import block_pairs, calibration_batch
from tarflow.profile import Costs, Profile, ProfileError, profile_model
from workflows.config import Resources
from workflows.stages.profile import profile as profile_stage

OUT_STD = 0.035  # large enough that blocks need several Jacobi passes, small enough not to overflow
SETTINGS = dict(segment_lens=[15, 8], windows=[4], tols=[1e-3, 1e-5], repeats=1)


# one sequential step costs 1; a 15-token pass 2.5, an 8-token pass 1.5, a 4-token window 100: the
# sequential block (15 steps) is 15, so sliding W=4 (4 windows x 100) is never worth running
COSTS = Costs(1.0, {15: 2.5, 8: 1.5, 4: 100.0})


@pytest.fixture(scope="module")
def profiled():
    model = make_tiny_model(out_std=OUT_STD, num_blocks=2)
    prof = profile_model(model, SamplingSpec(batch_size=2), num_images=2, model_ref=ModelRef("tiny"), costs=COSTS,
                         **SETTINGS)
    return model, prof


def _key(r):
    """(solver, segment length or window, init) of a convergence run's block plan."""
    p = r.plan
    return p.solver, getattr(p, "segment_len", None) or getattr(p, "window", None) or 15, p.init


def test_profile_records_every_block(profiled):
    """With the costs given, what is run follows from them: every setting whose predicted time can beat
    sequential, tighter tolerances until one cannot, caps from 1 until too slow or as accurate as the
    tightest tolerance; settings that can never win are not run."""
    model, prof = profiled
    T = model.num_tokens
    assert (prof.num_blocks, prof.num_tokens, prof.spec.batch_size) == (2, T, 2)
    assert (prof.calibration.source, prof.calibration.num_images, prof.calibration.seed) == ("samples", 2, 0)
    assert [b.block for b in prof.blocks] == [0, 1]
    assert sum(b.crm_share for b in prof.blocks) == pytest.approx(1.0)
    sequential = (T - 1) * COSTS.sequential_step_seconds
    for b in prof.blocks:
        assert set(b.igm) == {"z", "zeros"} and b.crm > 0
        assert b.pass_seconds == COSTS.pass_seconds and b.sequential_step_seconds == COSTS.sequential_step_seconds
        assert b.sequential_error < 1e-5  # sequential re-solves the true pairs
        assert not [r for r in b.convergence if r.plan.solver == "sliding"], "4 windows x 100 > 15: never run"
        for solver, L in [("jacobi", 15), ("gs_jacobi", 8)]:
            cost = COSTS.pass_seconds[L]
            for init in ("z", "zeros"):
                mine = [r for r in b.convergence if _key(r) == (solver, L, init)]
                runs = [r for r in mine if r.plan.max_iters is None]
                assert [r.plan.tol for r in runs] == [1e-3, 1e-5][:len(runs)] and runs
                # the next tolerance is run exactly when this one was still predicted faster than sequential
                assert (len(runs) == 2) == (runs[0].passes * cost < sequential)
                for r in runs:
                    assert 1 <= r.max_iters <= L and r.passes >= 1
                    assert r.error < (1e-2 if r.plan.tol == 1e-3 else 1e-3)
                capped = [r for r in mine if r.plan.max_iters is not None]
                assert [r.plan.max_iters for r in capped] == [c for c in prof.caps if c < L][:len(capped)] and capped
                segments = -(-(T - 1) // L)
                for r in capped:
                    assert r.plan.tol == 0 and r.max_iters == r.plan.max_iters
                    assert r.passes == r.plan.max_iters * segments
                last = capped[-1]
                stop = last.passes * cost >= sequential or last.error <= min(prof.tols)
                assert stop or last.plan.max_iters == max(c for c in prof.caps if c < L)
                assert all(r.passes * cost < sequential and r.error > min(prof.tols) for r in capped[:-1])
                assert capped[0].error > last.error  # more iterations, closer to the true solution


def test_measured_costs_are_positive_and_decide_the_same_way(tmp_path):
    """Without injected costs the profile times steps and passes on this device; whatever they are,
    a setting is skipped only where its one pass per segment is predicted as slow as sequential."""
    model = make_tiny_model(out_std=OUT_STD, num_blocks=1)
    prof = profile_model(model, SamplingSpec(batch_size=2), num_images=2, **SETTINGS)
    (b,) = prof.blocks
    assert b.sequential_step_seconds > 0 and set(b.pass_seconds) == {15, 8, 4} and min(b.pass_seconds.values()) > 0
    sequential = 15 * b.sequential_step_seconds
    for L in (15, 8, 4):
        ran = any(_key(r)[1] == L for r in b.convergence)
        assert ran == (-(-15 // L) * b.pass_seconds[L] < sequential)


def test_ray_stage_profiles_the_same_blocks_in_tasks(ray_local, tmp_path):
    """The stage runs the same torch code in Ray tasks: same calibration, pairs, CRM and IGM; it says where."""
    model = make_tiny_model(out_std=OUT_STD, num_blocks=2)
    ref = ModelRef(str(save_checkpoint(model, tmp_path / "m.safetensors")))
    spec = SamplingSpec(batch_size=2, guidance=Guidance(1.5, annealed=True, attn_temp=0.5))
    local = profile_model(model, spec, num_images=2, model_ref=ref, **SETTINGS)
    staged, workers = profile_stage(model, ref, spec, None, 2, Resources(num_cpus=1), **SETTINGS)
    assert staged.model == ref and staged.spec == spec and staged.calibration == local.calibration
    for a, b in zip(local.blocks, staged.blocks):
        assert a.crm == pytest.approx(b.crm, rel=1e-6) and a.igm == pytest.approx(b.igm, rel=1e-5)
        assert a.sequential_error == pytest.approx(b.sequential_error, abs=1e-6)
    assert len(workers) == 3 and all(w["node_id"] and w["device"] == "cpu" for w in workers)  # calibration + 2 blocks


def test_profile_json_round_trip(profiled, tmp_path):
    _, prof = profiled
    path = prof.save(tmp_path / "profile.json")
    again = Profile.load(path)
    assert again == prof
    assert json.loads(path.read_text())["blocks"][0]["igm"].keys() == {"z", "zeros"}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=9), "profile.version=9: this build reads version 2"),
    (lambda d: d.pop("model_hash"), r"profile.model_hash: Field required"),
    (lambda d: d.update(colour="red"), r"profile.colour: unknown field; allowed here: model_hash, model"),
    (lambda d: d["spec"].update(batch_size=0), "profile.spec.batch_size=0: must be an integer in .1, 65536."),
    (lambda d: d["blocks"].pop(), "profile.blocks has 1 entries, num_blocks=2"),
    (lambda d: d["blocks"][1].update(block=0), r"profile.blocks\[1\].block=0"),
    (lambda d: d["blocks"][0]["igm"].pop("zeros"), r"profile.blocks\[0\].igm has keys \['z'\]"),
    (lambda d: d["blocks"][0]["convergence"][0]["plan"].update(solver="newton"),
     r"profile.blocks\[0\].convergence\[0\].plan.solver: Input tag 'newton'"),
    (lambda d: d["blocks"][0]["convergence"][0].update(error="nan"),
     r"profile.blocks\[0\].convergence\[0\].error: Input should be a finite number"),
    (lambda d: d["blocks"][0]["pass_seconds"].update({"99": 1.0}), "pass_seconds has segment length 99"),
    (lambda d: d.update(caps=[2, "x"]), r"profile.caps\[1\]: Input should be a valid integer"),
    (lambda d: d["blocks"][0]["convergence"][0]["plan"].update(solver="sliding", window=4),
     r"convergence\[0\].plan.max_iters: unknown field; allowed here: solver, window, tol, init"),
])
def test_invalid_profiles_are_rejected(profiled, edit, message):
    _, prof = profiled
    d = json.loads(prof.to_json())
    edit(d)
    with pytest.raises(ProfileError, match=message):
        Profile.from_dict(d)


def test_not_json_and_missing_file(tmp_path):
    with pytest.raises(ProfileError, match="not valid JSON"):
        Profile.from_json("{")
    with pytest.raises(FileNotFoundError, match="profile not found"):
        Profile.load(tmp_path / "none.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ProfileError, match="list.json: profile: Input should be a dictionary"):
        Profile.load(tmp_path / "list.json")


def test_data_calibration_uses_encode_pairs():
    """With images, block pairs come from encode and re-solve exactly to the images' tokens."""
    from tarflow import Model

    torch.manual_seed(0)
    model = Model(1, 8, 2, 32, 2, 1, num_classes=10, head_dim=32).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    calib = calibration_batch(model, "digits", 3, seed=1)
    assert calib.images.shape == (3, 1, 8, 8) and calib.labels.shape == (3,)
    pairs = block_pairs(model, calib, SamplingSpec())
    assert torch.equal(pairs[0][1], model.patchify(calib.images))
    assert torch.allclose(pairs[1][0] / model.var.sqrt(), calib.noise)
    assert torch.allclose(solve_block(model.blocks[0], pairs[0][0], calib.labels).x, pairs[0][1], atol=1e-5)


def test_guided_pairs_follow_the_whole_guidance_spec():
    """Under guidance the true pairs come from sequential sampling with all of the spec's guidance:
    annealing and attn_temp change them, so a profile certifies the map generation samples."""
    model = make_tiny_model(out_std=OUT_STD, num_blocks=2)
    calib = calibration_batch(model, None, 2, seed=0)
    plain, annealed, tempered = (block_pairs(model, calib, SamplingSpec(guidance=g)) for g in
                                 (Guidance(2.0), Guidance(2.0, annealed=True), Guidance(2.0, attn_temp=0.5)))
    for other in (annealed, tempered):
        assert (other[0][1] - plain[0][1]).abs().max() > 1e-3


def test_a_bf16_start_is_profiled_where_its_passes_are_cheaper():
    """The profile times bf16 passes; where one costs < 90% of a float32 pass it measures bf16-then-float32
    runs, and the scheduler prices their bf16 and float32 passes apart."""
    from tarflow.schedule import block_options

    model = make_tiny_model(out_std=OUT_STD, num_blocks=2)
    costs = Costs(1.0, {15: 2.5, 8: 1.5, 4: 100.0}, coarse_pass_seconds={15: 1.0, 8: 1.4})
    prof = profile_model(model, SamplingSpec(batch_size=2), num_images=2, costs=costs, **SETTINGS)
    for b in prof.blocks:
        assert b.engine == "eager" and b.coarse_pass_seconds == costs.coarse_pass_seconds
        coarse = [r for r in b.convergence if r.plan.coarse]
        assert coarse and {r.plan.segment_length(model.num_tokens) for r in coarse} == {15}  # 1.4 > 0.9 x 1.5
        assert all(0 < r.coarse_passes < r.passes and r.engine == "eager" for r in coarse)
        assert min(r.error for r in coarse if r.plan.tol == 1e-5) <= 1e-4  # the float32 polish decides accuracy
        options = {o.plan: o for o in block_options(b, model.num_tokens)}
        for r in coarse:
            assert options[r.plan].predicted_seconds == pytest.approx(r.coarse_passes * 1.0
                                                                      + (r.passes - r.coarse_passes) * 2.5)
    assert Profile.from_json(prof.to_json()).blocks[0].convergence == prof.blocks[0].convergence
