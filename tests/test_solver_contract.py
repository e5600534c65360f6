"""The solver contract (`tarflow.solvers.BlockSolver`): a solver written in this file alone, registered with one
call, samples on the eager and static engines, is profiled, is chosen by the scheduler and round-trips through
profile and plan files, with no edit to any project file.

The example is damped Jacobi over the whole block (x <- x + w (F(x) - x)): a loop, a pass rule and engine state
of its own (the damping weight and the last move), none of which the project knows."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest
import torch
from conftest import make_tiny8x8_2blocks_model

import tarflow.schedule as scheduler
from tarflow import Plan, PlanError, SamplingSpec, register, sample, sample_noise
from tarflow.profile import Costs, Profile, profile_model
from tarflow.schema import STRICT_FIELDS
from tarflow.solvers import SOLVERS, BlockSolver, BlockStats, Candidate, checked, pass_rule, solve_block, steps, \
    unregister


@dataclass(frozen=True, kw_only=True)
class DampedJacobi(BlockSolver):
    """Jacobi over tokens 1..T-1 with each update damped by `damping`, until no token's undamped update moves it
    more than `tol`; a diverging iterate, or no convergence in 4(T-1) passes, falls back to token steps."""

    solver: Literal["damped_jacobi"] = "damped_jacobi"
    damping: float = 0.8
    tol: float = 1e-5
    init: Literal["z", "zeros"] = "z"

    __pydantic_config__ = STRICT_FIELDS
    state = {"weight": (1.0, torch.float32), "moved": (0.0, torch.float32), "bad": (False, torch.bool),
             "tol": (0.0, torch.float64)}

    def __post_init__(self):
        if not 0 < self.damping <= 1:
            raise PlanError("must be in (0, 1]", "damping", self.damping)

    def segment_length(self, num_tokens: int) -> int:
        return num_tokens - 1

    @classmethod
    def candidates(cls, num_tokens: int, segment_lens, windows) -> list[Candidate]:
        return [Candidate(num_tokens - 1, lambda init, tol: cls(tol=tol, init=init))]

    def solve(self, run, stats: BlockStats) -> None:
        T = run.num_tokens
        run.set(start=1, weight=self.damping, tol=self.tol, moved=0.0, bad=False, active=True)
        for it in range(1, 4 * (T - 1) + 1):
            run.pass_(DampedJacobi.damped_pass, T - 1)
            if not run.read("active")[0]:
                break
        stats.passes += it
        stats.iterations.append(it)
        bad, moved, going = run.read("bad", "moved", "active")
        if bad or going:
            steps(run, 1, T - 1, stats)
            stats.fallbacks += 1
        else:
            stats.residual = max(stats.residual, moved)

    @staticmethod
    @pass_rule(moves_start=False, stops=True)
    def damped_pass(run, new, span) -> None:
        old, ok, moved = checked(run, new, span)
        go = run.live & ok
        delta = run.decide(moved.max())
        span.write(run.x, old + run.weight * (new - old), go, old)
        run.put(bad=run.bad | (run.live & (ok ^ True)), moved=run.where(go, delta, run.moved),
                active=go & (delta > run.tol))


@pytest.fixture
def damped():
    register(DampedJacobi)
    yield DampedJacobi
    unregister(DampedJacobi.solver)


@pytest.fixture(scope="module")
def tiny():
    model = make_tiny8x8_2blocks_model()
    spec = SamplingSpec(batch_size=2).for_model(10)
    noise = sample_noise(0, range(2), model.num_tokens, model.token_dim)
    y = torch.tensor([1, 2])
    return model, spec, noise, y, sample(model, noise, y, spec=spec).images


def test_it_samples_on_every_engine_within_its_tolerance(damped, tiny):
    model, spec, noise, y, exact = tiny
    plan = Plan.uniform(2, model.num_tokens, damped(tol=1e-6))
    out = {e: sample(model, noise, y, plan, spec, engine=e) for e in ("eager", "static")}
    for o in out.values():
        assert (o.images - exact).abs().max().item() <= 1e-4
        assert [b.solver for b in o.stats.blocks] == ["damped_jacobi"] * 2 and o.stats.fallbacks == 0
    assert (out["eager"].images - out["static"].images).abs().max().item() <= 1e-5
    assert [b.passes for b in out["eager"].stats.blocks] == [b.passes for b in out["static"].stats.blocks]


def test_it_is_profiled_chosen_and_written_to_files(damped, tiny, tmp_path, monkeypatch):
    model, spec, noise, y, exact = tiny
    prof = profile_model(model, spec, num_images=2, segment_lens=[model.num_tokens - 1], windows=[],
                         tols=[1e-3, 1e-5], repeats=1, costs=Costs(1.0, {model.num_tokens - 1: 0.1}))
    runs = [r for b in prof.blocks for r in b.convergence if isinstance(r.plan, damped)]
    assert len(runs) == 2 * 2 * 2  # blocks x starts x tolerances
    prof.save(tmp_path / "profile.json")
    assert Profile.load(tmp_path / "profile.json") == prof

    for b in prof.blocks:  # the scheduler picks among what the profile measured: the damped runs alone
        b.convergence = [r for r in b.convergence if isinstance(r.plan, damped)]
    monkeypatch.setattr(scheduler, "MIN_GAIN", -1e9)  # about the choice, not the clock
    plan = scheduler.schedule(prof, model, tol=1e-3, holdout_images=2)
    assert all(isinstance(b, damped) for b in plan.blocks), plan.summary()
    assert (sample(model, noise, y, plan, spec).images - exact).abs().max().item() <= 1e-3

    plan.save(tmp_path / "plan.json")
    again = Plan.load(tmp_path / "plan.json")
    assert again.blocks == plan.blocks and again.fingerprint() == plan.fingerprint()


def test_its_settings_are_checked_and_it_leaves_with_its_registration(damped, tiny, tmp_path):
    model = tiny[0]
    data = Plan.uniform(2, model.num_tokens, damped()).to_dict()
    data["blocks"][0]["damping"] = 2.0
    with pytest.raises(PlanError, match=r"plan.blocks\[0\].damping=2.0: must be in \(0, 1\]"):
        Plan.from_dict(data)
    unregister(damped.solver)
    data["blocks"][0]["damping"] = 0.5
    with pytest.raises(PlanError, match="does not match any of the expected tags: 'sequential', 'jacobi'"):
        Plan.from_dict(data)
    with pytest.raises(PlanError, match=r"blocks\[0\]=DampedJacobi.*: not a block plan"):
        Plan.uniform(2, model.num_tokens, damped())
    with pytest.raises(TypeError, match="not a registered block plan"):
        solve_block(model.blocks[0], tiny[2], tiny[3], damped())
    assert "damped_jacobi" not in SOLVERS


def test_a_class_that_breaks_the_contract_is_not_registered():
    class NotADataclass(BlockSolver):
        solver = "loose"

    with pytest.raises(TypeError, match="frozen dataclass deriving from BlockSolver"):
        register(NotADataclass)
    from tarflow.solvers import Jacobi

    @dataclass(frozen=True)
    class Impostor(BlockSolver):
        solver: Literal["jacobi"] = "jacobi"

    with pytest.raises(ValueError, match="'jacobi' is registered already"):
        register(Impostor)
    assert SOLVERS["jacobi"] is Jacobi


def test_a_solver_state_that_clashes_is_named(damped, tiny):
    """A solver's state may not redeclare the engine's, and a name the static workspace holds keeps one dtype:
    a captured graph reads the tensor it found there."""
    model, spec, noise, y, _ = tiny

    @dataclass(frozen=True, kw_only=True)
    class Overreach(DampedJacobi):
        solver: Literal["overreach"] = "overreach"
        state = {**DampedJacobi.state, "active": (True, torch.bool)}

    @dataclass(frozen=True, kw_only=True)
    class Coarser(DampedJacobi):
        solver: Literal["coarser"] = "coarser"
        state = {**DampedJacobi.state, "tol": (0.0, torch.float32)}  # float64 for every registered solver

    for cls, engine, message in ((Overreach, "eager", r"redeclares \['active'\]: the engine holds those"),
                                 (Coarser, "static", "'tol' as torch.float64 and as torch.float32")):
        register(cls)
        try:
            sample(model, noise, y, Plan.uniform(2, model.num_tokens, DampedJacobi(tol=1e-6)), spec, engine="static")
            with pytest.raises(TypeError, match=message):
                sample(model, noise, y, Plan.uniform(2, model.num_tokens, cls()), spec, engine=engine)
        finally:
            unregister(cls.solver)
