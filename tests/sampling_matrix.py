"""The sampling matrix: cases over every plan kind, guidance form, label mode, an unconditional model, batch 1
and > 1, bf16 autocast and the bf16 start, denoising and the divergence fallback, built with the public API.

`tests/test_engine_matrix.py` runs it on every engine the machine has; `bench/golden.py` hashes it on the
eager engine to show that a change keeps samples bitwise (so it uses only what every version of `tarflow`
has: keep it that way)."""
from __future__ import annotations

from typing import NamedTuple

import torch
from conftest import make_tiny_model

from tarflow import Denoise, GSJacobi, Guidance, Jacobi, Plan, SamplingSpec, Sequential, Sliding, load_checkpoint, \
    sample, sample_noise


class Case(NamedTuple):
    name: str
    model: str  # a key of models()
    batch: int
    labels: list | None
    plan: object  # a block plan for every block, None (sequential), "mixed" or "paper"
    spec: SamplingSpec
    fallback: bool = False  # a divergence bound that every parallel segment trips


CFG = Guidance(scale=1.5, annealed=True, attn_temp=0.7)
GUIDANCE = {"plain": Guidance(), "cfg": Guidance(scale=1.5), "annealed_temp": CFG,
            "what_a": Guidance(scale=1.0, what="a"), "what_b": Guidance(scale=1.0, what="b", annealed=True, attn_temp=1.3)}
BLOCK_PLANS = {
    "jacobi": Jacobi(tol=1e-5),
    "jacobi_zeros": Jacobi(tol=1e-4, init="zeros"),
    "jacobi_every4": Jacobi(tol=1e-5, check_every=4),
    "gs6_short_last": GSJacobi(segment_len=6, tol=1e-5),  # 15 tokens: 6 + 6 + 3
    "gs7_one_token_last": GSJacobi(segment_len=7, tol=1e-5),  # 7 + 7 + 1
    "gs4_cap2": GSJacobi(segment_len=4, tol=1e-4, max_iters=2),
    "gs5_tol0": GSJacobi(segment_len=5, tol=0.0),
    "sliding6": Sliding(window=6, tol=1e-5),
    "sliding4_tol0": Sliding(window=4, tol=0.0),
    "jacobi_bf16_start": Jacobi(tol=1e-6, coarse="bf16", coarse_tol=1e-2),
    "gs5_bf16_start": GSJacobi(segment_len=5, tol=1e-5, coarse="bf16", coarse_tol=1e-2),
}


def cases() -> list[Case]:
    out = []
    for name, bp in BLOCK_PLANS.items():
        for g in ("plain", "annealed_temp"):
            out.append(Case(f"{name}/{g}/b3", "tiny8x8", 3, [1, 2, 3], bp, SamplingSpec(guidance=GUIDANCE[g])))
    for g in GUIDANCE:
        out.append(Case(f"sequential/{g}/b3", "tiny8x8", 3, [0, 7, 3], None, SamplingSpec(guidance=GUIDANCE[g])))
        out.append(Case(f"gs6/{g}/b3", "tiny8x8", 3, [0, 7, 3], GSJacobi(segment_len=6, tol=1e-5),
                        SamplingSpec(guidance=GUIDANCE[g])))
    for labels, tag in (([5], "b1"), (None, "b3_none"), ([-1, 4, -1], "b3_minus1")):
        batch = 1 if labels == [5] else 3
        for pname, bp in (("sequential", None), ("jacobi", Jacobi(tol=1e-5)), ("sliding6", Sliding(window=6, tol=1e-5))):
            for g in ("plain", "annealed_temp"):
                out.append(Case(f"{pname}/{g}/{tag}", "tiny8x8", batch, labels, bp, SamplingSpec(guidance=GUIDANCE[g])))
    for pname, bp in (("sequential", None), ("jacobi", Jacobi(tol=1e-5)), ("gs5", GSJacobi(segment_len=5, tol=1e-5)),
                      ("sliding6", Sliding(window=6, tol=1e-5))):
        for g, guid in (("plain", Guidance()), ("temp_only", Guidance(scale=2.0, attn_temp=0.7, annealed=True))):
            out.append(Case(f"uncond/{pname}/{g}/b2", "tiny8x8_uncond", 2, None, bp, SamplingSpec(guidance=guid)))
    bf16 = SamplingSpec(autocast="bf16")
    for pname, bp in (("sequential", None), ("gs5_tol0", GSJacobi(segment_len=5, tol=0.0)), ("jacobi", Jacobi(tol=1e-4)),
                      ("sliding6", Sliding(window=6, tol=1e-4)), ("jacobi_bf16_start", BLOCK_PLANS["jacobi_bf16_start"])):
        out.append(Case(f"autocast_bf16/{pname}/b2", "tiny8x8", 2, [3, 8], bp, bf16))
    out.append(Case("autocast_bf16/gs6/cfg/b2", "tiny8x8", 2, [3, 8], GSJacobi(segment_len=6, tol=1e-4),
                    SamplingSpec(autocast="bf16", guidance=CFG)))
    denoised = SamplingSpec(denoise=Denoise(multiplier=1.0, noise_std=0.05))
    out.append(Case("denoise/sequential/b2", "tiny8x8", 2, [1, 2], None, denoised))
    out.append(Case("denoise/jacobi/cfg/b2", "tiny8x8", 2, [1, 2], Jacobi(tol=1e-5),
                    SamplingSpec(guidance=CFG, denoise=Denoise(multiplier=0.8, noise_std=0.05))))
    for pname, bp in (("gs5_tol0", GSJacobi(segment_len=5, tol=0.0)), ("jacobi", Jacobi(tol=1e-5)),
                      ("sliding6", Sliding(window=6, tol=1e-5)), ("jacobi_bf16_start", BLOCK_PLANS["jacobi_bf16_start"])):
        out.append(Case(f"fallback/{pname}/b2", "tiny8x8", 2, [4, 4], bp, SamplingSpec(), fallback=True))
    out.append(Case("mixed/plain/b3", "tiny8x8", 3, [1, 2, 3], "mixed", SamplingSpec()))
    out.append(Case("mixed/annealed_temp/b3", "tiny8x8", 3, [1, 2, 3], "mixed", SamplingSpec(guidance=CFG)))
    out.append(Case("paper_3-4-2-3/plain/b3", "tiny8x8", 3, [1, 2, 3], "paper", SamplingSpec()))
    out.append(Case("demo/sequential/none/b2", "demo", 2, None, None, SamplingSpec()))
    out.append(Case("demo/gs49/none/b2", "demo", 2, None, GSJacobi(segment_len=49, tol=1e-4), SamplingSpec()))
    out.append(Case("demo/jacobi/cfg/b1", "demo", 1, [7], Jacobi(tol=1e-3), SamplingSpec(guidance=Guidance(scale=2.0))))
    return out


def plan_for(model, bp) -> Plan | None:
    n, T = len(model.blocks), model.num_tokens
    if bp is None:
        return None
    if bp == "mixed":
        return Plan(n, T, [Jacobi(tol=1e-6), GSJacobi(segment_len=4, tol=1e-6), Sliding(window=5, tol=1e-6), Sequential()])
    if bp == "paper":
        return Plan.from_paper_notation("3-4-2-3", n, T, tol=0.0)
    return Plan.uniform(n, T, bp)


def models() -> dict:
    return {"tiny8x8": make_tiny_model(), "tiny8x8_uncond": make_tiny_model(num_classes=0),
            "demo": load_checkpoint("demo").eval()}


def run(case: Case, model, engine="eager"):
    """The case's `SampleOutput` on `engine`."""
    noise = sample_noise(11, range(case.batch), model.num_tokens, model.token_dim)
    y = None if case.labels is None else torch.tensor(case.labels)
    plan = plan_for(model, case.plan)
    if case.fallback:  # half the largest true value: every parallel segment trips the divergence check
        exact = sample(model, noise, y, spec=case.spec, engine=engine).images
        plan = Plan(plan.num_blocks, plan.num_tokens, plan.blocks, divergence_bound=0.5 * exact.abs().max().item())
    return sample(model, noise, y, plan, case.spec, engine=engine)
