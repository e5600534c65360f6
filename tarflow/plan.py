"""Sampling plans: which solver inverts each block, and how.

A plan is indexed by *forward* block index: `plan.blocks[i]` drives `model.blocks[i]`.
Sampling runs the blocks in reverse, so `plan.blocks[-1]` is the block sampled first.
Each block plan is an instance of a solver registered in `solvers.SOLVERS` (its class is its plan
type, `BlockPlan` any of them), keyed by its `solver` field, and carries only that solver's settings. Tokens are numbered
in the block's own (permuted) order; token 0 never changes, so segments tile tokens 1..T-1.

JSON (version 2)::

    {"version": 2, "num_blocks": 4, "num_tokens": 196, "divergence_bound": 10000.0,
     "model_hash": "ab12..." | null, "name": "auto", "tol": 0.001 | null, "spec": {...} | null,
     "blocks": [{"solver": "gs_jacobi", "segment_len": 32, "max_iters": null, "tol": 1e-4, "init": "z",
                 "coarse": null, "coarse_tol": 0.01, "check_every": 1},
                {"solver": "sequential"}, ...],
     "evidence": {...written by the scheduler...}}

`tol` and `spec` say what an auto plan was certified for: final images within `tol` of
sequential sampling under that sampling spec (null for hand plans, which are not checked).
A solver registered later (`solvers.register`) is read and written like the others.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace

from .schema import JSONForm, check_finite, check_int
from .solvers import EXACT, INIT_NAMES, SOLVERS, BlockSolver, PlanError, is_registered, paper_block
from .spec import SamplingSpec

PLAN_VERSION = 2
BlockPlan = BlockSolver  # a block plan is an instance of a registered solver; pydantic reads the registry's union


def check_tolerance(tol, loc="tol", optional: bool = False):
    """The one rule for a tolerance a plan is certified for (`Plan.tol`, the scheduler's `tol`, a run's
    `plan.tol`): a finite max abs deviation > 0 (None: no certificate, where `optional`). Not a solver's own
    stopping `tol`, which may be 0."""
    return check_finite(tol, loc, strict=True, optional=optional, error=PlanError)


@dataclass
class Plan(JSONForm):
    num_blocks: int
    num_tokens: int
    blocks: list[BlockPlan]
    divergence_bound: float = 1e4
    model_hash: str | None = None
    name: str = ""
    tol: float | None = None
    spec: SamplingSpec | None = None
    evidence: dict = field(default_factory=dict)
    version: int = PLAN_VERSION

    __pydantic_config__ = {"extra": "forbid"}  # evidence may hold inf (an unmeasured speedup)
    json_name, json_error = "plan", PlanError

    def __post_init__(self):
        if self.version != PLAN_VERSION:
            raise PlanError(f"this build reads version {PLAN_VERSION} (re-run `tarflow-gs plan` to make one)", "version",
                            self.version)
        check_int(self.num_blocks, "num_blocks", error=PlanError)
        check_int(self.num_tokens, "num_tokens", low=2, error=PlanError)
        if len(self.blocks) != self.num_blocks:
            raise PlanError(f"has {len(self.blocks)} entries but num_blocks={self.num_blocks}", "blocks")
        check_finite(self.divergence_bound, "divergence_bound", strict=True, error=PlanError)
        check_tolerance(self.tol, optional=True)  # here: the plan's pydantic config lets inf through for the evidence
        T = self.num_tokens
        for i, b in enumerate(self.blocks):
            if not is_registered(b):
                raise PlanError(f"not a block plan ({', '.join(SOLVERS)})", ("blocks", i), b)
            name = b.length_field
            if name is not None and not 1 <= getattr(b, name) <= T - 1:
                raise PlanError(f"{b.solver} needs an integer in [1, {T - 1}] (T-1 for T={T} tokens)",
                                ("blocks", i, name), getattr(b, name))

    # ---- constructors ---------------------------------------------------------------------------------------

    @classmethod
    def uniform(cls, num_blocks: int, num_tokens: int, block) -> "Plan":
        return cls(num_blocks, num_tokens, [block] * num_blocks)

    @classmethod
    def sequential(cls, num_blocks: int, num_tokens: int) -> "Plan":
        return cls.uniform(num_blocks, num_tokens, EXACT)

    @classmethod
    def from_paper_lists(cls, num_gs: list[int], max_jacobi: list[int], guess: list[int] | None,
                         num_tokens: int, tol: float = 0.0, name: str = "") -> "Plan":
        """The public GS-Jacobi code's three lists, each in *sampling* order (entry 0 drives the
        last forward block): `num_GS_list` (segments per block; 1 = plain Jacobi, 0 or T =
        sequential), `max_jacobi_list` (iteration cap per segment), `guess_list` (0 = start
        from z, 1 = from zeros; None = all z). Segments tile tokens 1..T-1 in `num_gs` pieces,
        as the authors' T // num_gs where that divides T. `tol=0` keeps the paper's fixed
        iteration budgets (stop early only at an exact fixed point)."""
        guess = [0] * len(num_gs) if guess is None else guess
        for field_name, values in (("num_GS_list", num_gs), ("max_jacobi_list", max_jacobi), ("guess_list", guess)):
            if not isinstance(values, (list, tuple)) or not all(isinstance(v, int) for v in values):
                raise PlanError("must be a list of integers", field_name, values)
            if len(values) != len(num_gs):
                raise PlanError(f"has {len(values)} entries but num_GS_list has {len(num_gs)}: give one per block",
                                field_name)
        blocks = []
        for k, (gs, cap, g) in enumerate(zip(num_gs, max_jacobi, guess)):
            where = f"entry {k} (block {len(num_gs) - 1 - k})"
            if not 0 <= gs <= num_tokens:
                raise PlanError(f"num_GS_list {where} = {gs}: allowed 0 (sequential), 1 (Jacobi) .. {num_tokens} (T)")
            if cap < 1:
                raise PlanError(f"max_jacobi_list {where} = {cap}: must be >= 1")
            if g not in (0, 1):
                raise PlanError(f"guess_list {where} = {g}: allowed values are 0 (z) and 1 (zeros)")
            blocks.append(paper_block(gs, cap, tol, INIT_NAMES[g], num_tokens))
        return cls(len(blocks), num_tokens, blocks[::-1], name=name)

    @classmethod
    def from_paper_notation(cls, notation: str, num_blocks: int, num_tokens: int, guess: list[int] | None = None,
                            tol: float = 0.0) -> "Plan":
        """A plan in the paper's [Stack-GS-J-Else] notation, e.g. `7-8-32-10`: forward block 7
        is cut into 8 segments with at most 32 Jacobi iterations each, every other block runs
        plain Jacobi capped at 10. Several tough blocks are joined by '/', with one GS and J
        value for all of them or one each: `0/7-256/8-1/13-6`. `guess` is the public code's
        guess_list (sampling order, 0 = z, 1 = zeros)."""
        text = notation.strip().strip("[]")
        parts = text.split("-")
        if len(parts) != 4:
            raise PlanError(f"hand plan {notation!r}: expected Stack-GS-J-Else, four '-'-separated fields such as "
                            "'7-8-32-10' or '0/6-8-32-20'")
        try:
            stacks, gs, caps = ([int(v) for v in p.split("/")] for p in parts[:3])
            other = int(parts[3])
        except ValueError:
            raise PlanError(f"hand plan {notation!r}: fields must be integers (several blocks joined by '/')") from None
        for field_name, values in (("GS", gs), ("J", caps)):
            if len(values) not in (1, len(stacks)):
                raise PlanError(f"hand plan {notation!r}: {field_name} has {len(values)} values for {len(stacks)} "
                                "stacked blocks; give one, or one per block")
        bad = [b for b in stacks if not 0 <= b < num_blocks]
        if bad or len(set(stacks)) != len(stacks):
            raise PlanError(f"hand plan {notation!r}: Stack names blocks {stacks}; each must be a distinct forward "
                            f"block index in 0..{num_blocks - 1}")
        num_gs, max_jacobi = [1] * num_blocks, [other] * num_blocks
        for j, b in enumerate(stacks):
            k = num_blocks - 1 - b  # the lists run in sampling order
            num_gs[k] = gs[j if len(gs) > 1 else 0]
            max_jacobi[k] = caps[j if len(caps) > 1 else 0]
        return cls.from_paper_lists(num_gs, max_jacobi, guess, num_tokens, tol, name=f"paper[{text}]")

    # ---- checks -----------------------------------------------------------------------------------------------

    def check_model(self, num_blocks: int, num_tokens: int, model_hash: str | None = None) -> None:
        """Raise PlanError where the plan was made for another model."""
        if (self.num_blocks, self.num_tokens) != (num_blocks, num_tokens):
            raise PlanError(f"plan is for {self.num_blocks} blocks x {self.num_tokens} tokens, "
                            f"the model has {num_blocks} blocks x {num_tokens} tokens")
        if model_hash and self.model_hash and model_hash != self.model_hash:
            raise PlanError(f"plan.model_hash={self.model_hash} but the model's hash is {model_hash}")

    def check_spec(self, spec: SamplingSpec) -> None:
        """Raise PlanError where an auto plan was certified under another sampling map than `spec`'s."""
        if self.spec is None:
            return
        mine, theirs = self.spec.sampling_map(), spec.sampling_map()
        if mine != theirs:
            diff = [f"{k}: {mine[k]} there, {theirs[k]} here" for k in mine if mine[k] != theirs[k]]
            raise PlanError(f"plan {self.name or ''} was certified for another sampling map ({'; '.join(diff)}): "
                            "its tolerance does not hold here; re-plan with this spec, or use it as a hand plan")

    # ---- JSON (JSONForm) and names --------------------------------------------------------------------------

    def summary(self) -> str:
        """Each block's solver on one line, by forward index: `0:jacobi/z/tol0.001, 1:sequential`."""
        return ", ".join(f"{i}:{b.short()}" for i, b in enumerate(self.blocks))

    def fingerprint(self) -> str:
        """Hash of what changes samples (solvers and their settings), not of names, certificate or evidence."""
        core = {k: v for k, v in self.to_dict().items() if k not in ("name", "evidence", "tol", "spec")}
        core["blocks"] = [b.sample_settings(d) for b, d in zip(self.blocks, core["blocks"])]
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()[:16]

    def bound_to(self, model_hash: str) -> "Plan":
        return replace(self, model_hash=model_hash)
