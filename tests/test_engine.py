"""The engines on the CPU: the static engine (the arithmetic CUDA graphs capture) against the eager one; the
captured path's bookkeeping with an injected capture function (keys, frozen warm-ups, replays, a failed
capture); what a graph must never outlive (a workspace the LRU dropped, a model moved, cast or loaded into);
Linear weights kept in the autocast dtype; attention over the solved prefix; the solver registry."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_model

from tarflow import GSJacobi, Guidance, Jacobi, Plan, SamplingSpec, Sequential, Sliding, demo_checkpoint, \
    load_checkpoint, sample, sample_noise, solve_block
from tarflow import engine as engines
from tarflow.profile import model_on

PLANS = [Sequential(), Jacobi(tol=1e-5), GSJacobi(segment_len=5, tol=1e-5),  # 15 tokens: a short last segment
         GSJacobi(segment_len=7, tol=1e-4, max_iters=3), Sliding(window=6, tol=1e-5), Sliding(window=4, tol=0.0)]
GUIDANCE = [Guidance(), Guidance(scale=1.5, annealed=True, attn_temp=0.7)]
STATIC_TOL = 1e-5  # static vs eager, float32, tiny models: attention over a bucket of keys, reduction order only


@pytest.fixture(scope="module")
def tiny8x8_batch():
    """The tiny8x8 model, the starting noise of 3 samples and their labels."""
    model = make_tiny_model()
    z = sample_noise(0, range(3), model.num_tokens, model.token_dim) * model.var.sqrt()
    return model, z, torch.tensor([1, 2, 3])


@pytest.fixture
def capture_on(monkeypatch):
    """A failed capture turns capture off for the process: each test starts with it on, and leaves it so."""
    monkeypatch.setattr(engines, "_CAPTURE_FAILURE", None)


class Recorder:
    """A capture function for the CPU: the warm-up runs the pass (frozen, as on CUDA), the "graph" is the pass
    itself, its Python values fixed at capture as a graph's are. `fail` raises after the warm-up."""

    def __init__(self, fail: str | None = None):
        self.fail, self.captured, self.replays = fail, 0, 0

    def __call__(self, fn, workspace):
        fn()
        if self.fail:
            raise RuntimeError(self.fail)
        self.captured += 1

        def replay():
            self.replays += 1
            fn()
        return replay


@pytest.mark.parametrize("guidance", GUIDANCE, ids=["plain", "cfg"])
@pytest.mark.parametrize("bp", PLANS, ids=lambda bp: bp.short())
def test_static_engine_matches_eager(tiny8x8_batch, bp, guidance):
    model, z, y = tiny8x8_batch
    eager = solve_block(model.blocks[1], z, y, bp, guidance, engine="eager")
    static = solve_block(model.blocks[1], z, y, bp, guidance, engine="static")
    assert static.stats.engine == "static" and eager.stats.engine == "eager"
    assert (static.x - eager.x).abs().max().item() <= STATIC_TOL
    assert static.stats.iterations == eager.stats.iterations
    assert static.stats.passes == eager.stats.passes


@pytest.mark.parametrize("guidance", GUIDANCE, ids=["plain", "cfg"])
@pytest.mark.parametrize("bp", [p for p in PLANS if hasattr(p, "check_every")], ids=lambda bp: bp.short())
def test_device_side_checks_stop_where_host_side_checks_do(tiny8x8_batch, bp, guidance):
    """Read every 4 passes, a converged segment's extra passes are no-ops: same iterations, same bits."""
    model, z, y = tiny8x8_batch
    every = solve_block(model.blocks[1], z, y, bp, guidance, engine="static")
    sparse = solve_block(model.blocks[1], z, y, dataclasses.replace(bp, check_every=4), guidance, engine="static")
    assert torch.equal(sparse.x, every.x)
    assert sparse.stats.iterations == every.stats.iterations
    assert sparse.stats.syncs < every.stats.syncs and sparse.stats.passes >= every.stats.passes


@pytest.mark.parametrize("guidance", GUIDANCE, ids=["plain", "cfg"])
def test_captured_passes_replay_as_static_ones(tiny8x8_batch, guidance, capture_on):
    """With a capture function the passes of a block are captured once per key and replayed: the same bits
    as the static engine, and a later batch of the same shape captures nothing new."""
    model, z, y = tiny8x8_batch
    recorder = Recorder()
    graph = engines.Static(recorder)
    for bp in PLANS + [Jacobi(tol=1e-6, coarse="bf16"), dataclasses.replace(PLANS[4], check_every=3)]:
        static = solve_block(model.blocks[1], z, y, bp, guidance, engine="static")
        captured = solve_block(model.blocks[1], z, y, bp, guidance, engine=graph)
        assert captured.stats.engine == "graph"
        assert torch.equal(captured.x, static.x), bp.short()
        assert captured.stats.iterations == static.stats.iterations and captured.stats.passes == static.stats.passes
    made = recorder.captured
    other = sample_noise(5, range(3), model.num_tokens, model.token_dim) * model.var.sqrt()
    for bp in PLANS:
        again = solve_block(model.blocks[1], other, y, bp, guidance, engine=graph)
        assert torch.equal(again.x, solve_block(model.blocks[1], other, y, bp, guidance, engine="static").x)
    assert recorder.captured == made and recorder.replays > 0


def test_a_static_pass_reads_nothing_on_the_host(tiny8x8_batch, monkeypatch):
    """The pass rules are shared with eager, which reads its state on the host (`run.decide`): on static they must
    stay on the device, since a host read inside a CUDA graph capture fails. Every plan kind, CFG, the bf16 start
    and the divergence fallback, with every tensor-to-host conversion refused while a static pass runs."""
    model, z, y = tiny8x8_batch
    static_pass = engines._static_pass

    def refused(*args, **kwargs):
        raise AssertionError("a host read inside a static pass")

    def device_only(*args):
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "__int__", "__float__", "__index__"):
                m.setattr(torch.Tensor, name, refused)
            static_pass(*args)

    monkeypatch.setattr(engines, "_static_pass", device_only)
    for bp, guidance, bound in [*((bp, g, 1e4) for bp in PLANS for g in GUIDANCE),
                                (Jacobi(tol=1e-6, coarse="bf16"), GUIDANCE[0], 1e4),
                                (Jacobi(tol=1e-5), GUIDANCE[0], 0.5), (Sliding(window=6, tol=1e-5), GUIDANCE[0], 0.5)]:
        static = solve_block(model.blocks[1], z, y, bp, guidance, divergence_bound=bound, engine="static")
        eager = solve_block(model.blocks[1], z, y, bp, guidance, divergence_bound=bound, engine="eager")
        assert (static.x - eager.x).abs().max().item() <= STATIC_TOL, bp.short()
        assert static.stats.fallbacks == eager.stats.fallbacks


def test_a_failed_capture_restores_the_state_and_turns_capture_off(tiny8x8_batch, capture_on):
    """The warm-up ran frozen, then capture failed: the pass still runs (exact samples), the first error is
    kept and named in every later block's stats, and nothing is captured again in this process."""
    _, z, y = tiny8x8_batch
    model = make_tiny_model()  # no graphs from other tests
    bp = GSJacobi(segment_len=5, tol=1e-5)
    static = solve_block(model.blocks[1], z, y, bp, engine="static")
    failed = solve_block(model.blocks[1], z, y, bp,
                         engine=engines.Static(Recorder(fail="operation not permitted when stream is capturing")))
    assert failed.stats.engine == "static (capture failed: RuntimeError: operation not permitted when stream is " \
                                  "capturing)"
    assert torch.equal(failed.x, static.x) and failed.stats.iterations == static.stats.iterations
    later = Recorder()
    again = solve_block(model.blocks[2], z, y, Sliding(window=6, tol=1e-5), engine=engines.Static(later))
    assert later.captured == 0 and again.stats.engine == failed.stats.engine
    assert torch.equal(again.x, solve_block(model.blocks[2], z, y, Sliding(window=6, tol=1e-5), engine="static").x)


def test_a_class_conditional_model_without_labels_on_the_static_engine():
    """The demo model sampled with no labels (the mean class), batch 2: the mean class embedding is an
    expanded view; the static engine copies it into its own rows."""
    model = load_checkpoint(str(demo_checkpoint())).eval()
    noise = sample_noise(0, range(2), model.num_tokens, model.token_dim)
    plan = Plan(4, model.num_tokens, [Sequential(), GSJacobi(segment_len=49, tol=1e-4), Sequential(), Sequential()])
    for spec in (SamplingSpec(), SamplingSpec(guidance=Guidance(scale=1.0))):
        eager = sample(model, noise, None, plan, spec, engine="eager")
        static = sample(model, noise, None, plan, spec, engine="static")
        # 4 x 195 dependent steps of a trained model amplify reduction order (docs/benchmarks.md)
        assert (static.images - eager.images).abs().max().item() <= 1e-3


def test_a_workspace_dropped_by_the_lru_never_serves_another_shape(tiny8x8_batch, capture_on):
    """More batch shapes than workspaces kept, over two blocks: each solve equals eager, and graphs live in
    their workspace (a dropped one takes its graphs along; a new one captures afresh)."""
    model, _, _ = tiny8x8_batch
    bp = GSJacobi(segment_len=5, tol=1e-5)
    recorder = Recorder()
    graph = engines.Static(recorder)
    for step, (i, batch) in enumerate([(0, 1), (0, 2), (1, 3), (1, 4), (0, 4), (1, 5), (0, 1), (0, 2), (1, 1)]):
        z = sample_noise(step, range(batch), model.num_tokens, model.token_dim) * model.var.sqrt()
        y = torch.arange(batch)
        eager = solve_block(model.blocks[i], z, y, bp, engine="eager").x
        for engine in ("static", graph):
            assert (solve_block(model.blocks[i], z, y, bp, engine=engine).x - eager).abs().max().item() <= STATIC_TOL
    assert len(engines._WORKSPACES) == engines.KEPT
    made = recorder.captured
    z = sample_noise(0, range(6), model.num_tokens, model.token_dim)
    solve_block(model.blocks[0], z, torch.arange(6), bp, engine=graph)  # a shape never seen: new captures
    assert recorder.captured > made


def test_a_model_moved_cast_or_loaded_into_samples_as_a_fresh_one(capture_on):
    """A workspace keeps a block's graphs and bf16 weights only while its parameters stay where and what they
    were: after loading other weights, or a round trip through bf16 (new storage), a solve equals a fresh
    model's, captured anew."""
    model, fresh = make_tiny_model(), make_tiny_model(seed=1)
    noise = sample_noise(0, range(2), model.num_tokens, model.token_dim)
    y = torch.tensor([1, 2])
    plan = Plan.uniform(4, model.num_tokens, GSJacobi(segment_len=5, tol=1e-5))
    recorder = Recorder()
    graph = engines.Static(recorder)
    for spec in (SamplingSpec(), SamplingSpec(autocast="bf16")):
        sample(model, noise, y, plan, spec, engine=graph)
    made = recorder.captured
    model.load_state_dict(fresh.state_dict())
    for spec in (SamplingSpec(), SamplingSpec(autocast="bf16")):
        for engine in ("static", graph):
            assert torch.equal(sample(model, noise, y, plan, spec, engine=engine).images,
                               sample(fresh, noise, y, plan, spec, engine="static").images)
    assert recorder.captured >= 2 * made
    model.to(torch.bfloat16).to(torch.float32)
    rounded = make_tiny_model(seed=1).to(torch.bfloat16).to(torch.float32)
    assert torch.equal(sample(model, noise, y, plan, engine=graph).images,
                       sample(rounded, noise, y, plan, engine="static").images)


def test_profiling_never_moves_the_callers_model():
    model = make_tiny_model()
    weights = [p.data_ptr() for p in model.parameters()]
    assert model_on(model, "cpu") is model
    elsewhere = model_on(model, "meta")  # a device the model is not on: a copy goes there
    assert elsewhere is not model and next(elsewhere.parameters()).device.type == "meta"
    assert [p.data_ptr() for p in model.parameters()] == weights and next(model.parameters()).device.type == "cpu"


def test_linear_weights_kept_in_the_autocast_dtype_are_autocasts_own_cast(tiny8x8_batch):
    """The static engine's copy of a block for bf16 passes holds its Linear weights and biases in bf16 (cast
    once, as autocast casts them on every call) and shares every other parameter, LayerNorm's in float32."""
    model, z, _ = tiny8x8_batch
    block = model.blocks[1]
    cast = engines.cast_linears(block, torch.bfloat16)
    linear = {n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)}
    for name, p in cast.named_parameters():
        if name.rsplit(".", 1)[0] in linear:
            assert p.dtype == torch.bfloat16 and torch.equal(p, dict(block.named_parameters())[name].to(torch.bfloat16))
        else:
            assert p is dict(block.named_parameters())[name] and p.dtype == torch.float32
    x, pos = z[:, :9], block.pos_embed[:9]
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        for mask in ("causal", None):
            a, b = block.params(x, pos, 0.0, mask)
            a_cast, b_cast = cast.params(x, pos, 0.0, mask)
            assert torch.equal(a, a_cast) and torch.equal(b, b_cast) and a.dtype == torch.bfloat16


def test_static_passes_attend_over_the_solved_prefix(tiny8x8_batch, monkeypatch):
    """Sequential steps attend over a bucket of keys that holds the solved prefix (not the whole cache), and a
    segment from token 1 (a full-length Jacobi pass) runs the causal kernel over exactly its own keys."""
    model, z, y = tiny8x8_batch
    seen = []
    sdpa = F.scaled_dot_product_attention

    def recording(q, k, v, attn_mask=None, is_causal=False, **kw):
        seen.append((q.shape[2], k.shape[2], is_causal))
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    solve_block(model.blocks[1], z, y, Sequential(), engine="static")
    layers = len(model.blocks[1].attn_blocks)
    keys = [k for _, k, _ in seen[::layers]]  # one entry per step
    T = model.num_tokens
    assert keys == sorted(keys) and min(keys) < T - 1 and all(k >= s for s, k in enumerate(keys, start=1))
    seen.clear()
    solve_block(model.blocks[1], z, y, Jacobi(tol=1e-5), engine="static")
    assert {s for s in seen} == {(T - 1, T - 1, True)}


def test_an_unregistered_block_plan_runs_on_no_engine(tiny8x8_batch):
    """Dispatch goes through the registry: a plan type that is not registered (here a subclass) is refused
    on every engine, never run as another solver."""
    model, z, y = tiny8x8_batch

    @dataclasses.dataclass(frozen=True, kw_only=True)
    class Newton(Jacobi):
        pass

    for engine in ("eager", "static"):
        with pytest.raises(TypeError, match="is not a registered block plan .tarflow.solvers.SOLVERS: sequential, "
                                            "jacobi, gs_jacobi, sliding"):
            solve_block(model.blocks[0], z, y, Newton(), engine=engine)


def test_the_static_fallback_equals_the_eager_one(tiny8x8_batch):
    model, z, y = tiny8x8_batch
    for bp in (Jacobi(tol=1e-5), Sliding(window=6, tol=1e-5)):
        eager = solve_block(model.blocks[1], z, y, bp, divergence_bound=0.5, engine="eager")
        static = solve_block(model.blocks[1], z, y, bp, divergence_bound=0.5, engine="static")
        assert eager.stats.fallbacks > 0 and static.stats.fallbacks == eager.stats.fallbacks
        exact = solve_block(model.blocks[1], z, y, Sequential(), engine="eager")
        assert (static.x - exact.x).abs().max().item() <= STATIC_TOL


def test_buffers_reused_across_batches_carry_nothing_over(tiny8x8_batch):
    model, z, y = tiny8x8_batch
    bp = GSJacobi(segment_len=5, tol=1e-5)
    first = solve_block(model.blocks[0], z, y, bp, engine="static").x
    other = sample_noise(9, range(3), model.num_tokens, model.token_dim)
    solve_block(model.blocks[0], other, torch.tensor([4, 5, 6]), bp, engine="static")
    solve_block(model.blocks[1], other, y, bp, engine="static")  # another block on the same buffers
    assert torch.equal(solve_block(model.blocks[0], z, y, bp, engine="static").x, first)


def test_engine_names_are_checked(tiny8x8_batch):
    model, z, y = tiny8x8_batch
    with pytest.raises(ValueError, match="engine='graph' captures CUDA graphs"):
        solve_block(model.blocks[0], z, y, engine="graph")
    with pytest.raises(ValueError, match="engine='fast': allowed values are auto, eager, static, graph"):
        solve_block(model.blocks[0], z, y, engine="fast")
    assert solve_block(model.blocks[0], z, y).stats.engine == "eager"  # auto on a CPU


@pytest.mark.parametrize("engine", ["eager", "static"])
def test_a_bf16_start_polished_in_float32_meets_tol(tiny8x8_batch, engine):
    model, z, y = tiny8x8_batch
    exact = solve_block(model.blocks[1], z, y, Sequential(), engine="eager").x
    bp = Jacobi(tol=1e-6, coarse="bf16", coarse_tol=1e-2)
    out = solve_block(model.blocks[1], z, y, bp, engine=engine)
    assert out.stats.coarse_passes > 0 and out.stats.passes > out.stats.coarse_passes
    assert (out.x - exact).abs().max().item() <= 1e-5
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 throughout, for scale: what the polish removes
        rough = solve_block(model.blocks[1], z, y, Jacobi(tol=1e-6), engine=engine).x
    assert (rough - exact).abs().max().item() > 100 * (out.x - exact).abs().max().item()


def test_the_sliding_window_accepts_a_token_only_after_two_quiet_passes():
    """On the demo model's tough block (sampled first) one quiet pass put ~90x tol into the block's
    output (measured in docs/benchmarks.md); two quiet passes keep it near 10x."""
    model = load_checkpoint("demo").eval()
    z = sample_noise(7, range(1), model.num_tokens, model.token_dim) * model.var.sqrt()
    y = torch.tensor([0])
    exact = solve_block(model.blocks[3], z, y, Sequential()).x
    for tol in (1e-3, 1e-4):
        out = solve_block(model.blocks[3], z, y, Sliding(window=32, tol=tol))
        assert (out.x - exact).abs().max().item() <= 20 * tol
        assert out.stats.passes < model.num_tokens - 1  # still faster than one token per pass
