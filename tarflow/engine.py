"""The static-shape engine: block solves whose every pass has fixed shapes, eager or as CUDA graphs.

The eager solvers (`solvers.py`) slice the KV cache to the solved prefix and read convergence
on the host after every pass: cheap on a CPU, but on a GPU each pass is a few dozen small
kernels plus two host syncs, so a step is launch- and sync-bound. Here a block run holds
everything a pass touches in preallocated buffers (iterate, zero-filled KV cache of the full
length plus one window of padding, positions, flags) and a pass reads its segment start from
a device tensor, attends over the whole cache under a mask, and updates the convergence flags
on the device. So one pass of length L has the same shapes and addresses every time and can be
captured once per (block, batch, L) as a `torch.cuda.CUDAGraph` and replayed (gpt-fast's
pattern). The host reads the flags every `check_every` passes; a pass after its segment has
converged (or diverged) is a no-op (iterate and cache keep their values), so checking less
often costs passes, never changes samples.

Engines: "eager" (solvers.py), "static" (this module, run eagerly: the CPU tests of the
captured path's arithmetic) and "graph" (this module, captured; CUDA only). "auto" is graph
on CUDA and eager elsewhere; a capture that fails falls back to static and says so in
the block's stats (`BlockStats.engine`).
"""
from __future__ import annotations

import functools
from collections import OrderedDict

import torch

from .model import MetaBlock
from .plan import Sliding, segments
from .spec import Guidance

ENGINES = ("auto", "eager", "static", "graph")
KEPT = 2  # buffer sets kept (and runs per block), least recently used dropped: a cache is batch x T x width


def conditioning(block: MetaBlock, labels, guidance: Guidance, batch: int, device):
    """(class embedding rows, query scale or None) of one block's passes: under guidance the conditional
    and unconditional passes share one forward over a 2B batch, the unconditional half's attention
    logits divided by `attn_temp`."""
    cond = block.class_embedding(labels, batch)
    q_scale = None
    if guidance.active:
        if isinstance(cond, torch.Tensor):
            cond = torch.cat([cond, block.class_embedding(None, batch)])
        if guidance.attn_temp != 1.0:
            q_scale = torch.ones(2 * batch, 1, 1, 1, device=device)
            q_scale[batch:] = 1.0 / guidance.attn_temp
    return cond, q_scale


class StaticKVCache:
    """Keys/values of every layer over the padded length, zero-filled (masked keys must not be NaN:
    softmax gives them weight 0, and 0 * NaN is NaN). `write` takes device positions; it keeps the
    old entries where `keep` is False, so a frozen pass leaves the cache as it was."""

    def __init__(self, num_layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keep: torch.Tensor | None = None

    def write(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        K, V = self.k[layer], self.v[layer]
        k, v = k.to(K.dtype), v.to(V.dtype)
        if self.keep is not None:
            k = torch.where(self.keep, k, K.index_select(2, idx))
            v = torch.where(self.keep, v, V.index_select(2, idx))
        K.index_copy_(2, idx, k)
        V.index_copy_(2, idx, v)
        return K, V


class Buffers:
    """What every pass reads or writes, shared by all blocks of a model (they have the same shapes and
    run one after another): iterate, input, KV cache and the device-side solver state."""

    def __init__(self, batch: int, num_tokens: int, pad: int, token_dim: int, rows: int, layers: int, heads: int,
                 head_dim: int, cache_dtype: torch.dtype, bound: float, device):
        self.batch, self.num_tokens, self.length = batch, num_tokens, num_tokens + pad
        self.z = torch.zeros(batch, self.length, token_dim, device=device)
        self.x = torch.zeros_like(self.z)
        self.cache = StaticKVCache(layers, rows, heads, self.length, head_dim, cache_dtype, device)
        self.keys = torch.arange(self.length, device=device)
        # device-side state of the segment being solved; the host sets it per segment, reads it every k passes
        self.start = torch.ones((), dtype=torch.long, device=device)
        self.active = torch.zeros((), dtype=torch.bool, device=device)
        self.bad = torch.zeros((), dtype=torch.bool, device=device)
        self.iters = torch.zeros((), dtype=torch.long, device=device)
        self.cap = torch.zeros((), dtype=torch.long, device=device)
        self.residual = torch.zeros((), device=device)
        self.tol = torch.zeros((), device=device)
        self.bound = torch.tensor(float(bound), device=device)
        self.prev = torch.full((self.length,), float("inf"), device=device)  # sliding: each token's last move
        self.cache.keep = self.active


class StaticRun:
    """One block's inversion over shared `Buffers`, padded by a window past T where a sliding window
    needs it. Padding tokens are computed like any other but never read by a real token
    (causality), and are left out of every convergence check."""

    def __init__(self, block: MetaBlock, labels, guidance: Guidance, buffers: Buffers):
        self.block, self.guidance = block, guidance
        B, T, dev = buffers.batch, buffers.num_tokens, buffers.z.device
        self.batch, self.num_tokens, self.length = B, T, buffers.length
        for name in ("z", "x", "cache", "keys", "start", "active", "bad", "iters", "cap", "residual", "tol", "bound",
                     "prev"):
            setattr(self, name, getattr(buffers, name))
        C = block.pos_embed.shape[1]
        self.pos = torch.zeros(self.length, C, device=dev, dtype=block.pos_embed.dtype)
        self.pos[:T] = block.permute(block.pos_embed, 0)
        self.cond, self.q_scale = conditioning(block, labels, guidance, B, dev)
        if guidance.active:
            self.g = torch.zeros(self.length, 1, device=dev)
            self.g[:T] = guidance.weights(T, dev)

    def reset(self, z: torch.Tensor, labels, init: str) -> None:
        """A new batch, written into the same buffers (captured graphs read them)."""
        T = self.num_tokens
        zp = self.block.permute(z).float()
        self.z[:, :T] = zp
        self.x.zero_()
        self.x[:, :T] = zp if init == "z" else 0.0
        self.x[:, 0] = zp[:, 0]
        if isinstance(self.cond, torch.Tensor):
            self.cond.copy_(conditioning(self.block, labels, self.guidance, self.batch, self.x.device)[0])
        for t in (*self.cache.k, *self.cache.v):
            t.zero_()  # a stale entry is masked, but a non-finite one would still poison the softmax
        self.prev.fill_(float("inf"))

    def update(self, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(new values of tokens start..start+L-1 from x, their positions): `BlockRun.update` with the
        segment start on the device and attention over the whole (masked) cache."""
        idx = self.start - 1 + torch.arange(L, device=self.keys.device)  # input positions
        inp = self.x.index_select(1, idx)
        if self.guidance.active:
            inp = torch.cat([inp, inp])
        mask = self.keys.unsqueeze(0) <= idx.unsqueeze(1)  # query at position p sees keys 0..p
        a, b = self.block.params(inp, self.pos.index_select(0, idx), self.cond, mask, self.cache, idx, self.q_scale)
        out = idx + 1
        if self.guidance.active:
            a, b = self.guidance.combine(a, b, self.g.index_select(0, out))
        return self.z.index_select(1, out) * a.float().exp() + b.float(), out

    # ---- the passes (each is what one graph holds) ----------------------------------------------------

    def step(self) -> None:
        """One sequential token at `start`, then start += 1 (while active)."""
        new, out = self.update(1)
        self.x.index_copy_(1, out, torch.where(self.active, new, self.x.index_select(1, out)))
        self.start.add_(self.active.long())

    def _checked(self, new, out):
        """(current segment values, real-token mask, iterate finite and bounded, per-token move)."""
        valid = out < self.num_tokens
        seg = self.x.index_select(1, out)
        ok = ((new.abs() <= self.bound) | ~valid.view(1, -1, 1)).all()  # also catches NaN/inf
        moved = torch.where(valid, (new - seg).abs().amax(dim=(0, 2)), 0.0)
        return seg, valid, ok, moved

    def jacobi_pass(self, L: int) -> None:
        """One Jacobi iteration of segment start..start+L-1, stopping it (active = False) at `tol`,
        at `cap` iterations, or on a diverging iterate (bad = True)."""
        new, out = self.update(L)
        seg, _, ok, moved = self._checked(new, out)
        go = self.active & ok
        delta = moved.max()
        self.x.index_copy_(1, out, torch.where(go, new, seg))
        self.bad.logical_or_(self.active & ~ok)
        self.iters.add_(self.active.long())
        self.residual.copy_(torch.where(go, delta, self.residual))
        self.active.copy_(go & (delta > self.tol) & (self.iters < self.cap))

    def sliding_pass(self, W: int) -> None:
        """One pass of the window start..start+W-1; advances `start` past the final tokens (the rule
        of `solvers.sliding_window`) and stops at the end of the block or on divergence."""
        new, out = self.update(W)
        seg, valid, ok, moved = self._checked(new, out)
        go = self.active & ok
        prev = self.prev.index_select(0, out)
        stable = ((moved <= self.tol) & (prev <= self.tol)) | ~valid
        ar = torch.arange(W, device=out.device)
        advance = torch.where(stable, W, ar).min().clamp(max=W - 1) + 1  # first unstable token is final too
        accepted = torch.where(ar < advance - 1, moved, 0.0).max()
        self.x.index_copy_(1, out, torch.where(go, new, seg))
        self.prev.index_copy_(0, out, torch.where(go, moved, prev))
        self.residual.copy_(torch.where(go, torch.maximum(self.residual, accepted), self.residual))
        self.iters.add_(self.active.long())
        self.start.copy_(torch.where(go, torch.clamp(self.start + advance, max=self.num_tokens), self.start))
        self.bad.logical_or_(self.active & ~ok)
        self.active.copy_(go & (self.start < self.num_tokens))

    def result(self) -> torch.Tensor:
        return self.x[:, : self.num_tokens]


class Passes:
    """The passes of one StaticRun, run eagerly or replayed from CUDA graphs captured on first use."""

    def __init__(self, run: StaticRun, capture: bool, autocast_dtype: torch.dtype | None):
        self.run, self.capture = run, capture
        self.autocast_dtype = autocast_dtype  # the spec's autocast, re-entered without its weight cache
        self.graphs: dict[tuple, torch.cuda.CUDAGraph] = {}
        self.pool = None
        self.capture_error: str | None = None

    def __call__(self, kind: str, L: int, coarse: bool = False) -> None:
        """One pass of `kind` ("step", "jacobi", "sliding") over L tokens (bf16 if `coarse`)."""
        dtype = torch.bfloat16 if coarse else self.autocast_dtype
        key = (kind, L, dtype)
        graph = self.graphs.get(key) if self.capture else None
        if graph is not None:  # the hot path on CUDA: nothing but the replay
            graph.replay()
            return
        fn = self.run.step if kind == "step" else functools.partial(getattr(self.run, f"{kind}_pass"), L)
        if self.capture:
            try:
                self.graphs[key] = self._capture(fn, dtype)
            except RuntimeError as e:  # an op that cannot be captured on this build: run the same passes eagerly
                self.capture, self.capture_error = False, f"{type(e).__name__}: {e}"[:300]
            else:
                self.graphs[key].replay()
                return
        self._under(dtype, fn)

    def _under(self, dtype, fn) -> None:
        device_type = self.run.x.device.type
        if dtype is None:
            with torch.autocast(device_type, enabled=False):
                fn()
        else:
            # the autocast weight cache must stay off under capture: a graph would keep pointers to cast
            # weights that the cache frees when its context exits
            with torch.autocast(device_type, dtype=dtype, cache_enabled=False):
                fn()

    def _capture(self, fn, dtype) -> torch.cuda.CUDAGraph:
        run = self.run
        was = run.active.clone()
        run.active.fill_(False)  # a frozen pass: the warm-up leaves iterate, cache and counters as they are
        side = torch.cuda.Stream(run.x.device)
        side.wait_stream(torch.cuda.current_stream(run.x.device))
        with torch.cuda.stream(side):
            self._under(dtype, fn)
        torch.cuda.current_stream(run.x.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        with torch.cuda.graph(graph, pool=self.pool):
            self._under(dtype, fn)
        run.active.copy_(was)
        return graph


def _solve_steps(P: Passes, start: int, count: int) -> None:
    run = P.run
    run.start.fill_(start)
    run.active.fill_(True)
    for _ in range(count):
        P("step", 1)


def gauss_seidel_jacobi(P: Passes, bp, stats) -> None:
    """`solvers.gauss_seidel_jacobi` over static passes: the same segments, stops and fallback."""
    T = P.run.num_tokens
    if bp.segment_length(T) == 1:
        _solve_steps(P, 1, T - 1)
        stats.passes += T - 1
        stats.iterations.extend([1] * (T - 1))
        return
    k = bp.check_every
    for s, e in segments(bp, T):
        n = e - s  # the last segment may be shorter: a pass (graph) of its own length
        if getattr(bp, "coarse", None) and P.autocast_dtype is None:
            _iterate(P, s, n, bp.coarse_tol, n, k, stats, coarse=True)
        iters, bad, residual = _iterate(P, s, n, bp.tol, n if bp.max_iters is None else min(bp.max_iters, n), k, stats)
        if bad:  # a diverging iterate: re-solve this segment token by token, which is exact
            _solve_steps(P, s, n)
            stats.passes += n
            stats.fallbacks += 1
            residual = 0.0
        stats.iterations.append(iters)
        stats.residual = max(stats.residual, 0.0 if iters == n else residual)  # n iterations are exact


def _iterate(P: Passes, s: int, n: int, tol: float, cap: int, k: int, stats, coarse: bool = False):
    """Jacobi passes on segment s..s+n-1 until the device says stop, read every k passes and at the cap:
    (iterations that counted, diverged, last move)."""
    run = P.run
    run.start.fill_(s)
    run.tol.fill_(tol)
    run.cap.fill_(cap)
    run.iters.zero_()
    run.bad.fill_(False)
    run.active.fill_(True)
    for it in range(1, cap + 1):
        P("jacobi", n, coarse)
        if it % k == 0 or it == cap:
            stats.syncs += 1
            if not bool(run.active):
                break
    stats.passes += it
    if coarse:
        stats.coarse_passes += it
    iters, bad, residual = torch.stack([run.iters.float(), run.bad.float(), run.residual]).tolist()
    stats.syncs += 1
    return int(iters), bool(bad), residual


def sliding_window(P: Passes, bp: Sliding, stats) -> None:
    """`solvers.sliding_window` over static passes: the same acceptance rule, the same fallback."""
    run, T, W, k = P.run, P.run.num_tokens, bp.window, bp.check_every
    run.tol.fill_(bp.tol)
    run.start.fill_(1)
    run.iters.zero_()
    run.bad.fill_(False)
    run.active.fill_(True)
    done = 0
    while True:
        P("sliding", W)
        stats.passes += 1
        done += 1
        if done % k and done < T - 1:
            continue
        stats.syncs += 1
        active, bad, s = torch.stack([run.active.long(), run.bad.long(), run.start]).tolist()
        if bad:
            e = min(s + W, T)
            _solve_steps(P, s, e - s)  # leaves start at e
            stats.passes += e - s
            stats.fallbacks += 1
            run.iters.add_(e - s)
            run.bad.fill_(False)
            run.active.fill_(e < T)
            active = e < T
        if not active:
            break
    stats.iterations.append(int(run.iters))
    stats.residual = max(stats.residual, float(run.residual))


_BUFFERS: OrderedDict = OrderedDict()


def _lru(store: OrderedDict, key, make):
    value = store.pop(key, None)
    store[key] = make() if value is None else value
    while len(store) > KEPT:
        store.popitem(last=False)
    return store[key]


def solve(block: MetaBlock, z: torch.Tensor, labels, plan, guidance: Guidance, bound: float, stats) -> torch.Tensor:
    """The block's input (permuted order) under `plan` on the static engine `stats.engine`, reusing
    the buffers and graphs of an earlier batch of the same shape; `stats.engine` ends as what ran."""
    device = z.device
    autocast = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    B, T, D = z.shape
    pad = plan.window if isinstance(plan, Sliding) else 0  # a window runs past the last token
    attn = block.attn_blocks[0].attention
    rows = 2 * B if guidance.active else B
    shape = (B, T, pad, D, rows, len(block.attn_blocks), attn.num_heads, block.pos_embed.shape[1] // attn.num_heads,
             autocast or torch.float32, float(bound), str(device))
    buffers = _lru(_BUFFERS, shape, lambda: Buffers(*shape[:-1], device))
    runs = block.__dict__.setdefault("_static_runs", OrderedDict())  # a plain attribute, not module state
    capture = stats.engine == "graph"
    entry = _lru(runs, (id(buffers), guidance, labels is None, capture),
                 lambda: Passes(StaticRun(block, labels, guidance, buffers), capture, autocast))
    entry.run.reset(z, labels, plan.init)
    (sliding_window if isinstance(plan, Sliding) else gauss_seidel_jacobi)(entry, plan, stats)
    if capture and not entry.capture:
        stats.engine = f"static (capture failed: {entry.capture_error})"
    return entry.run.result().clone()
