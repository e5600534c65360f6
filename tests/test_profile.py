"""Profile stage: Ray tasks on a real local Ray, the JSON schema, and invalid profiles."""
import json

import pytest
import torch
from conftest import make_tiny_model

from workflows.profile import Profile, ProfileError, block_pairs, calibration_batch, profile_model

OUT_STD = 0.035  # large enough that blocks need several Jacobi passes, small enough not to overflow


@pytest.fixture(scope="module")
def profiled(ray_local):
    model = make_tiny_model(out_std=OUT_STD, num_blocks=2)
    prof = profile_model(model, num_images=2, batch_size=2, segment_lens=[15, 8], windows=[4], tols=[1e-3, 1e-5],
                         repeats=1, num_cpus=1, checkpoint="tiny")
    return model, prof


def test_profile_records_every_block(profiled):
    model, prof = profiled
    T = model.num_tokens
    assert (prof.num_blocks, prof.num_tokens, prof.batch_size) == (2, T, 2)
    assert prof.calibration == {"source": "samples", "num_images": 2, "seed": 0}
    (case,) = prof.cases
    assert [b.block for b in case.blocks] == [0, 1]
    assert sum(b.crm_share for b in case.blocks) == pytest.approx(1.0)
    for b in case.blocks:
        assert set(b.igm) == {"z", "zeros"} and b.crm > 0
        assert set(b.pass_seconds) == {"15", "8", "4"} and b.sequential_step_seconds > 0
        assert b.sequential_error < 1e-5  # sequential re-solves the true pairs
        sequential = (T - 1) * b.sequential_step_seconds
        for solver, L in [("jacobi", 15), ("gs_jacobi", 8), ("sliding", 4)]:
            for init in ("z", "zeros"):
                mine = [r for r in b.convergence if (r.solver, r.segment_len, r.init) == (solver, L, init)]
                runs = [r for r in mine if r.cap is None]
                # settings are skipped only where they are slower than sequential on this machine
                if not runs:
                    assert -(-(T - 1) // L) * b.pass_seconds[str(L)] >= sequential
                elif len(runs) < 2:
                    assert runs[0].tol == 1e-3 and runs[0].passes * b.pass_seconds[str(L)] >= sequential
                for r in runs:  # sliding counts all its passes as one segment's iterations
                    assert 1 <= r.max_iters <= (T - 1 if solver == "sliding" else L) and r.passes >= 1
                    assert r.error < (1e-2 if r.tol == 1e-3 else 1e-3)
                capped = [r for r in mine if r.cap is not None]
                if solver == "sliding" or not runs:
                    assert not capped
                    continue
                # caps ascend from 1 until a run is as slow as sequential or as accurate as the tightest tol
                assert [r.cap for r in capped] == [c for c in prof.caps if c < L][:len(capped)] and capped
                segments = -(-(T - 1) // L)
                for r in capped:
                    assert r.tol == 0 and r.max_iters == r.cap and r.passes == r.cap * segments
                last = capped[-1]
                assert (last.passes * b.pass_seconds[str(L)] >= sequential or last.error <= min(prof.tols)
                        or last.cap == max(c for c in prof.caps if c < L))
                assert capped[0].error > last.error  # more iterations, closer to the true solution


def test_profile_json_round_trip(profiled, tmp_path):
    _, prof = profiled
    path = prof.save(tmp_path / "profile.json")
    again = Profile.load(path)
    assert again == prof
    assert json.loads(path.read_text())["cases"][0]["blocks"][0]["igm"].keys() == {"z", "zeros"}


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.update(version=9), "profile.version=9"),
    (lambda d: d.pop("model_hash"), r"lacks required field\(s\) \['model_hash'\]"),
    (lambda d: d.update(colour="red"), r"unknown field\(s\) \['colour'\]"),
    (lambda d: d.update(batch_size=0), "profile.batch_size=0"),
    (lambda d: d["cases"][0]["blocks"].pop(), "has 1 blocks, profile.num_blocks=2"),
    (lambda d: d["cases"][0]["blocks"][1].update(block=0), r"blocks\[1\].block=0"),
    (lambda d: d["cases"][0]["blocks"][0]["igm"].pop("zeros"), r"igm has keys \['z'\]"),
    (lambda d: d["cases"][0]["blocks"][0]["convergence"][0].update(solver="newton"), "solver='newton': allowed"),
    (lambda d: d["cases"][0]["blocks"][0]["convergence"][0].update(error=float("nan")), "error=nan"),
    (lambda d: d["cases"][0]["blocks"][0]["pass_seconds"].update({"99": 1.0}), "key '99'"),
    (lambda d: d.update(caps=[2, 0]), r"profile.caps=\[2, 0\]"),
    (lambda d: d["cases"][0]["blocks"][0]["convergence"][0].update(cap=2.5), "cap=2.5: must be a positive integer"),
    (lambda d: next(r for r in d["cases"][0]["blocks"][0]["convergence"] if r["solver"] == "sliding").update(cap=3),
     "sliding solver takes no iteration cap"),
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


def test_data_calibration_uses_encode_pairs():
    """With images, block pairs come from encode and re-solve exactly to the images' tokens."""
    from tarflow import Model

    torch.manual_seed(0)
    model = Model(1, 8, 2, 32, 2, 1, num_classes=10, head_dim=32).eval()
    for block in model.blocks:
        torch.nn.init.normal_(block.proj_out.weight, std=0.02)
    calib = calibration_batch(model, "digits", 3, seed=1)
    assert calib.images.shape == (3, 1, 8, 8) and calib.labels.shape == (3,)
    pairs = block_pairs(model, calib, 0.0)
    assert torch.equal(pairs[0][1], model.patchify(calib.images))
    assert torch.allclose(pairs[1][0] / model.var.sqrt(), calib.noise)
    from workflows.profile import exact_solve
    from tarflow.solvers import Guidance
    assert torch.allclose(exact_solve(model.blocks[0], pairs[0][0], calib.labels, Guidance()), pairs[0][1], atol=1e-5)
