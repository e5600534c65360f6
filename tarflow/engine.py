"""Engines: how one pass of a block solver (`solvers.py`) runs the network. The solvers' loops and pass rules
are the same on every engine; an engine gives them a run with the state they update and `pass_(rule, L)`.

- "eager" (`EagerRun`): the KV cache sliced to the solved prefix, the state held as host values (`start`
  an integer): a rule reads each tensor it decides with once (`decide` is `.item()`), chooses with Python's
  conditional (`where`) and assigns (`put`), and a span is written or not as the host decided; `live` is
  True (no pass ever runs after a stop). Cheapest on a CPU: the default.
- "static" (`StaticRun`): every pass has fixed shapes over preallocated buffers (a `Workspace` per batch
  shape: iterate, a zero-filled KV cache of the full length plus the widest window's padding, positions,
  state as 0-d tensors), reads `start` from a device tensor and updates the state on the device (`decide` is
  the identity, `where` is `torch.where`, `put` copies into the workspace in place: a captured pass reads
  nothing on the host and finds its state where it was captured); the host reads the state every
  `check_every` passes, and a pass after a stop is a no-op (`live` is the `active` flag: iterate,
  cache and counters keep their values), so checking less often costs passes, never changes samples.
  A pass attends over a bucket of keys that holds its queries' prefix where the host set `start`
  (segments, token steps), over every key a window can reach where a window moved it, and with the
  causal kernel where it starts at token 1 (a full-length Jacobi pass). Under autocast it runs a copy of
  the block whose Linear weights are already in the autocast dtype (bitwise autocast's own cast, once).
- "graph": static, each pass captured once as a CUDA graph per (block, pass rule, length, key bucket,
  dtype, guidance) and replayed for every later batch of that shape (gpt-fast's pattern); all graphs of
  a workspace share one memory pool. A capture that fails (out of memory, an op that cannot be captured)
  leaves the state as it was, runs the pass statically, turns capture off for the process (torch's capture
  bookkeeping can assert after a failed capture) and is named in every later block's stats.

"auto" is graph on CUDA and eager elsewhere. Captured graphs read the block's weights where they are:
a workspace keeps them per block only while the block lives and its parameters keep their addresses,
dtypes and versions (moving, casting or loading into a model drops them).
"""
from __future__ import annotations

import contextlib
import copy
import functools
import itertools
import weakref
from collections import OrderedDict
from typing import Protocol

import torch
import torch.nn as nn

from .model import CAUSAL, KVCache, MetaBlock
from .spec import Guidance

ENGINES = ("auto", "eager", "static", "graph")
KEPT = 2  # workspaces kept, least recently used dropped (with their graphs): a cache is batch x T x width
BUCKETS = 16  # key lengths a static pass attends over: about T / BUCKETS apart (multiples of 8)
_CAPTURE_FAILURE: str | None = None  # the first failed capture of this process; capture is off after it


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


# The state every run has, besides `start`: whether the run goes on (the static engine freezes passes after a stop
# by it) and the divergence bound a rule checks iterates against. Each entry: its host value, as eager holds it,
# and the dtype of the 0-d tensor that holds it on static (float64 `bound`: a 0-d value compares with it as exactly
# as a Python float does). A solver declares the rest of the state its rules use (`BlockSolver.state`).
CORE_STATE = {"active": (False, torch.bool), "bound": (0.0, torch.float64)}


class Run(Protocol):
    """What a solver's loop and pass rules (solvers.py) see of one block's inversion, on any engine.

    State entries (`start`, CORE_STATE and the solver's `state`) are attributes: host values on eager, 0-d device
    tensors on static."""

    x: torch.Tensor  # the iterate (batch, tokens, dim), the block's permuted order
    prev: torch.Tensor  # each token's move in its last pass (tokens)
    num_tokens: int
    autocast: bool  # the spec runs the network under autocast (a bf16 start is then a no-op)
    live: object  # whether a pass counts: True on eager, the `active` flag on static

    def pass_(self, rule, L: int) -> None:
        """One network pass over tokens start..start+L-1, then `rule(run, new values, span)`."""

    def decide(self, t: torch.Tensor):
        """A value a rule decides with: read once on eager, left on the device on static."""

    def where(self, cond, a, b):
        """A choice between values a rule computed."""

    def put(self, **values) -> None:
        """A rule's new state."""

    def set(self, **values) -> None:
        """The loop's host values."""

    def read(self, *names) -> list:
        """Host values of state entries (one device sync on static)."""

    def reads_every(self, check_every: int) -> int:
        """How many passes a loop runs between reads of the state (1 where reading costs nothing)."""

    def coarse(self) -> contextlib.AbstractContextManager:
        """Passes inside run under bf16."""

    def result(self) -> torch.Tensor:
        """The solved block input (batch, tokens, dim), permuted order."""


def _state(declared: dict) -> dict:
    """Every state entry of a run: the engine's and those a solver declares."""
    clash = sorted(set(declared) & {"start", "x", "prev", *CORE_STATE})
    if clash:
        raise TypeError(f"a solver's state redeclares {clash}: the engine holds those")
    return {**CORE_STATE, **declared}


def _moves(length: int, device) -> torch.Tensor:
    """Each token's move in its last pass (none yet)."""
    return torch.full((length,), float("inf"), device=device)


# ---- eager ---------------------------------------------------------------------------------------------------------

class _Span:
    """The tokens start..start+L-1 of an eager pass: slices of the state (views: a read is valid until the
    span is written); `when` is a host bool."""

    __slots__ = ("start", "length")
    valid = None  # every token of an eager pass is a real one

    def __init__(self, start: int, length: int):
        self.start, self.length = start, length

    def read(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return t.narrow(dim, self.start, self.length)

    def write(self, t: torch.Tensor, values: torch.Tensor, when, old=None, dim: int = 1) -> None:
        if when:
            t.narrow(dim, self.start, self.length).copy_(values)


class EagerRun:
    """One block's inversion on the eager engine: its input z (permuted), the iterate, a KV cache grown
    over the solved prefix, conditioning, and the state as host values (a rule's `decide` reads a tensor once,
    `where` is Python's conditional, `put` assigns). `update` is one network pass; `jacobi_trace` and the
    bounds use it directly."""

    engine_name = "eager"
    live = True

    def __init__(self, block: MetaBlock, z: torch.Tensor, labels, guidance: Guidance,
                 bound: float = float("inf"), init: str = "z", state: dict | None = None):
        self.block = block
        self.z = block.permute(z)
        B, T, _ = self.z.shape
        self.batch, self.num_tokens = B, T
        self.pos = block.permute(block.pos_embed, 0)
        self.guidance = guidance
        self.cond, self.q_scale = conditioning(block, labels, guidance, B, z.device)
        if guidance.active:
            self.g = guidance.weights(T, z.device)
        self.autocast = torch.is_autocast_enabled(z.device.type)
        # keys/values in float32 unless the spec is bf16: a bf16 start is polished in float32
        self.cache = KVCache(len(block.attn_blocks), T, None if self.autocast else torch.float32)
        self.x = self.initial(init)
        self.prev = _moves(T, z.device)
        self.__dict__.update({name: value for name, (value, _) in _state(state or {}).items()}, bound=bound, start=1)

    def update(self, x: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """New values of tokens s..e-1 from the current x (inputs: tokens s-1..e-2)."""
        inp = x[:, s - 1 : e - 1]
        L = e - s
        if self.guidance.active:
            inp = torch.cat([inp, inp])
        # query i (position s-1+i) sees cached keys 0..s-1+i
        if L == 1:
            mask = None
        elif s == 1:
            mask = CAUSAL
        else:
            mask = torch.ones(L, s - 1 + L, dtype=torch.bool, device=x.device).tril(s - 1)
        a, b = self.block.params(inp, self.pos[s - 1 : e - 1], self.cond, mask, self.cache, s - 1, self.q_scale)
        if self.guidance.active:
            a, b = self.guidance.combine(a, b, self.g[s:e])
        return self.z[:, s:e] * a.float().exp() + b.float()

    def initial(self, init: str) -> torch.Tensor:
        x = self.z.clone() if init == "z" else torch.zeros_like(self.z)
        x[:, 0] = self.z[:, 0]
        return x

    def pass_(self, rule, L: int) -> None:
        s = self.start
        L = min(L, self.num_tokens - s)  # a window at the end of the block is shorter
        rule(self, self.update(self.x, s, s + L), _Span(s, L))

    @staticmethod
    def decide(t: torch.Tensor):
        return t.item()

    @staticmethod
    def where(cond: bool, a, b):
        return a if cond else b

    def set(self, **values) -> None:
        self.__dict__.update(values)

    put = set  # a rule's values are host values too

    def read(self, *names) -> list:
        return [getattr(self, n) for n in names]

    def reads_every(self, check_every: int) -> int:
        return 1

    def coarse(self):
        return torch.autocast(self.x.device.type, dtype=torch.bfloat16)

    def result(self) -> torch.Tensor:
        return self.x


class Eager:
    name = "eager"

    def start(self, block, z, labels, guidance, bound, plan) -> EagerRun:
        return EagerRun(block, z, labels, guidance, bound, plan.init, plan.state)


# ---- static and graph ----------------------------------------------------------------------------------------------

class StaticKVCache:
    """Keys/values of every layer over the padded length, zero-filled (masked keys must not be NaN:
    softmax gives them weight 0, and 0 * NaN is NaN). `write` takes device positions and returns the
    first `bucket` keys; with `keep` set (a pass that may run frozen) it keeps the old entries where
    `keep` is False."""

    def __init__(self, num_layers: int, batch: int, heads: int, length: int, head_dim: int, dtype, device):
        shape = (batch, heads, length, head_dim)
        self.k = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.keep: torch.Tensor | None = None
        self.bucket = length

    def write(self, layer: int, idx: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        K, V = self.k[layer], self.v[layer]
        k, v = k.to(K.dtype), v.to(V.dtype)
        if self.keep is not None:
            k = torch.where(self.keep, k, K.index_select(2, idx))
            v = torch.where(self.keep, v, V.index_select(2, idx))
        K.index_copy_(2, idx, k)
        V.index_copy_(2, idx, v)
        return K[:, :, : self.bucket], V[:, :, : self.bucket]

    def zero_(self) -> None:
        for t in (*self.k, *self.v):
            t.zero_()


def _weight_identity(block: MetaBlock) -> tuple:
    """Where and what a block's parameters are: a graph read them there."""
    return tuple((p.data_ptr(), p.dtype, p.device, p._version) for p in block.parameters())


_CASTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # block -> (its weights, {dtype: copy})


def cast_linears(block: MetaBlock, dtype, weights: tuple | None = None) -> MetaBlock:
    """The block, or under autocast a copy sharing its parameters except the Linear weights and biases, held
    in `dtype`: autocast casts exactly those on every call (a captured pass cannot keep its cast cache), and
    `.to(dtype)` is the same rounding. LayerNorm, positions and classes stay float32. One copy per block and
    dtype while the block's weights (`_weight_identity`, given or read) stay where and what they were."""
    if dtype is None:
        return block
    weights = weights or _weight_identity(block)
    made, casts = _CASTS.get(block, (None, {}))
    if made != weights:
        casts = {}
        _CASTS[block] = (weights, casts)
    if dtype not in casts:
        with torch.inference_mode(False):
            memo = {id(t): t for t in itertools.chain(block.parameters(), block.buffers())}
            for layer in block.modules():
                if isinstance(layer, nn.Linear):
                    for p in layer.parameters(recurse=False):
                        memo[id(p)] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
            casts[dtype] = copy.deepcopy(block, memo)
    return casts[dtype]


class _BlockGraphs:
    """What a workspace keeps for one block: its graphs, valid for the parameters (and their casts) they were
    captured over (`weights`)."""

    def __init__(self, weights: tuple):
        self.weights = weights
        self.graphs: dict = {}


class Workspace:
    """Everything a static pass reads or writes, for one shape: shared by the blocks of a model (same shapes,
    run one after another) and by every later batch of that shape, so captured graphs find their inputs at
    the same addresses. Per-solve inputs (z, positions, class rows, guidance weights) are copied in. It owns
    the graphs captured over it, per block (as long as the block lives), and their one memory pool."""

    def __init__(self, batch, num_tokens, token_dim, rows, layers, heads, head_dim, channels, cache_dtype, device, pad):
        self.pad, self.length = pad, num_tokens + pad
        self.quantum = 8 * -(-num_tokens // (8 * BUCKETS))
        self.z = torch.zeros(batch, self.length, token_dim, device=device)
        self.x = torch.zeros_like(self.z)
        self.cache = StaticKVCache(layers, rows, heads, self.length, head_dim, cache_dtype, device)
        self.keys = torch.arange(self.length, device=device)
        self.pos = torch.zeros(self.length, channels, device=device)
        self.cond = torch.zeros(rows, 1, channels, device=device)
        self.g = torch.zeros(self.length, 1, device=device)
        self.q_scale = torch.ones(rows, 1, 1, 1, device=device)
        self.start = torch.ones((), dtype=torch.long, device=device)
        self.state: dict[str, torch.Tensor] = {}  # 0-d tensors by name, made as the solvers that run declare them
        self.prev = _moves(self.length, device)
        self.blocks: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.pool = None  # the graphs' memory pool, made at the first capture

    def holding(self, state: dict) -> dict[str, torch.Tensor]:
        """The 0-d tensors of these state entries (name -> (host value, dtype)), made where new: they stay
        where captured graphs found them."""
        for name, (value, dtype) in state.items():
            held = self.state.setdefault(name, torch.full((), value, dtype=dtype, device=self.x.device))
            if held.dtype != dtype:
                raise TypeError(f"solvers declare state {name!r} as {held.dtype} and as {dtype}: one name, one dtype")
        return {name: self.state[name] for name in state}

    def graphs(self, block: MetaBlock, weights: tuple) -> _BlockGraphs:
        entry = self.blocks.get(block)
        if entry is None or entry.weights != weights:  # moved, cast or loaded into: its graphs read other memory
            entry = self.blocks[block] = _BlockGraphs(weights)
        return entry


class _DeviceSpan:
    """The tokens of a static pass by device positions; `valid` says which are real (a window runs past T)."""

    def __init__(self, idx: torch.Tensor, num_tokens: int):
        self.idx, self.valid = idx, idx < num_tokens

    def read(self, t: torch.Tensor, dim: int = 1) -> torch.Tensor:
        return t.index_select(dim, self.idx)

    def write(self, t: torch.Tensor, values: torch.Tensor, when, old=None, dim: int = 1) -> None:
        keep = (when & self.valid).view([-1 if d == dim else 1 for d in range(t.dim())])
        t.index_copy_(dim, self.idx, torch.where(keep, values, self.read(t, dim) if old is None else old))


def _autocast(device_type: str, dtype):
    # the autocast weight cache stays off: a captured graph would keep pointers to casts it frees
    if dtype is None:
        return torch.autocast(device_type, enabled=False)
    return torch.autocast(device_type, dtype=dtype, cache_enabled=False)


def _static_pass(run: "StaticRun", module: MetaBlock, rule, L: int, bucket: int, causal: bool, dtype) -> None:
    """One pass over tokens start..start+L-1 (start on the device), then `rule`: what a graph holds. Inputs
    positions start-1.., queries see keys 0..their position among the first `bucket`."""
    ws, g = run.ws, run.guidance
    with _autocast(ws.x.device.type, dtype):
        idx = ws.start - 1 + ws.keys[:L]
        inp = ws.x.index_select(1, idx)
        if g.active:
            inp = torch.cat([inp, inp])
        mask = CAUSAL if causal else ws.keys[:bucket] <= idx.unsqueeze(1)
        ws.cache.bucket, ws.cache.keep = bucket, run.live if rule.stops else None
        a, b = module.params(inp, ws.pos.index_select(0, idx), ws.cond if run.conditional else 0.0, mask, ws.cache,
                             idx, ws.q_scale if run.q_scaled else None)
        out = idx + 1
        if g.active:
            a, b = g.combine(a, b, ws.g.index_select(0, out))
        rule(run, ws.z.index_select(1, out) * a.float().exp() + b.float(), _DeviceSpan(out, run.num_tokens))


class StaticRun:
    """One block's inversion over a `Workspace`; passes run statically or replay captured graphs."""

    def __init__(self, engine: "Static", ws: Workspace, block: MetaBlock, z, labels, guidance: Guidance,
                 bound: float, plan, dtype):
        self.capture, self.ws, self.block, self.guidance, self.dtype = engine.capture, ws, block, guidance, dtype
        self.weights = _weight_identity(block)
        self.entry = ws.graphs(block, self.weights)
        self.x, self.prev = ws.x, ws.prev
        declared = _state(plan.state)
        self.kinds = {"start": int, **{name: type(value) for name, (value, _) in declared.items()}}  # what `read` gives
        self.state = {"start": ws.start, **ws.holding(declared)}
        self.__dict__.update(self.state)  # `run.start`, `run.tol`, ...: what the rules read
        self.live = ws.state["active"]
        self.num_tokens = T = z.shape[1]
        self.autocast = dtype is not None
        self.conditional = block.class_embed is not None
        self.q_scaled = guidance.active and guidance.attn_temp != 1.0
        self.known_start: int | None = 1  # `start` where the host knows it
        zp = block.permute(z).float()
        ws.z[:, :T] = zp
        ws.x.zero_()
        ws.x[:, :T] = zp if plan.init == "z" else 0.0
        ws.x[:, 0] = zp[:, 0]
        ws.pos[:T] = block.permute(block.pos_embed, 0)
        cond, q_scale = conditioning(block, labels, guidance, z.shape[0], z.device)
        if self.conditional:
            ws.cond.copy_(cond)  # the mean class for no labels is an expanded view: copied, broadcast
        if guidance.active:
            ws.g[:T] = guidance.weights(T, z.device)
        if q_scale is not None:
            ws.q_scale.copy_(q_scale)
        ws.cache.zero_()  # a stale entry is masked, but a non-finite one would still poison the softmax
        ws.prev.fill_(float("inf"))
        ws.state["bound"].fill_(bound)

    @property
    def engine_name(self) -> str:
        if self.capture is None:
            return "static"
        return "graph" if _CAPTURE_FAILURE is None else f"static (capture failed: {_CAPTURE_FAILURE})"

    def pass_(self, rule, L: int) -> None:
        bucket, causal = self._keys(L)
        key = (rule, L, bucket, causal, self.dtype, self.guidance)
        capturing = self.capture is not None and _CAPTURE_FAILURE is None
        replay = self.entry.graphs.get(key) if capturing else None
        if replay is None:
            fn = functools.partial(_static_pass, self, cast_linears(self.block, self.dtype, self.weights), rule, L,
                                   bucket, causal, self.dtype)
            if capturing:
                replay = self._captured(key, fn)
            if replay is None:
                fn()
        if replay is not None:
            replay()
        if rule.moves_start:  # a live step moves one token; a rule that stops can leave `start` anywhere
            self.known_start = None if rule.stops or self.known_start is None else self.known_start + L

    def _keys(self, L: int) -> tuple[int, bool]:
        """(keys the pass attends over, causal): the causal square where the pass starts at token 1, else the
        keys its queries can see (0..start+L-2, for an unknown start the furthest: T+L-2), in buckets of
        `quantum` up to T. Only what the host sets counts, never what it reads (reading every pass or every
        k passes must not change a bit), and never the workspace's padding (another plan's window)."""
        T = self.num_tokens
        if self.known_start == 1:
            return L, True
        need = T + L - 1 if self.known_start is None else self.known_start + L - 1
        if need > T:  # a window past the last token
            return need, False
        return min(-(-need // self.ws.quantum) * self.ws.quantum, T), False

    def _captured(self, key, fn):
        """The pass captured (None where capture fails: then off for the process, the first error kept)."""
        global _CAPTURE_FAILURE
        was = self.live.clone()
        self.live.fill_(False)  # frozen: a warm-up leaves iterate, cache (up to equal values) and counters
        try:
            replay = self.capture(fn, self.ws)
        except Exception as e:  # out of memory, an op that cannot be captured: the same pass, not captured
            _CAPTURE_FAILURE = f"{type(e).__name__}: {e}"[:300]
            return None
        finally:
            self.live.copy_(was)
        self.entry.graphs[key] = replay
        return replay

    @staticmethod
    def decide(t: torch.Tensor) -> torch.Tensor:
        return t  # no host read inside a pass: it stays capturable

    where = staticmethod(torch.where)

    def put(self, **values) -> None:
        """A rule's new state, copied into the workspace (where a captured pass finds it)."""
        for name, value in values.items():
            self.state[name].copy_(value)

    def set(self, **values) -> None:
        """The loop's host values; `start` is where the host knows it."""
        for name, value in values.items():
            self.state[name].fill_(value)
        if "start" in values:
            self.known_start = values["start"]

    def read(self, *names) -> list:
        """Host values of state entries, in one device sync."""
        values = [self.state[n] for n in names]
        host = [values[0].item()] if len(values) == 1 else torch.stack([v.double() for v in values]).tolist()
        return [self.kinds[n](v) for n, v in zip(names, host)]

    def reads_every(self, check_every: int) -> int:
        return check_every

    @contextlib.contextmanager
    def coarse(self):
        dtype, self.dtype = self.dtype, torch.bfloat16
        try:
            yield
        finally:
            self.dtype = dtype

    def result(self) -> torch.Tensor:
        return self.ws.x[:, : self.num_tokens].clone()


def capture_cuda_graph(fn, ws: Workspace):
    """`fn` captured as a CUDA graph in the workspace's pool, after a warm-up on a side stream: its replay."""
    device = ws.x.device
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream(device).wait_stream(side)
    if ws.pool is None:
        ws.pool = torch.cuda.graph_pool_handle()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=ws.pool):
        fn()
    return graph.replay


class Static:
    """The static engine; with `capture` (a function (pass, workspace) -> replay) the graph engine."""

    def __init__(self, capture=None):
        self.capture = capture
        self.name = "static" if capture is None else "graph"

    def start(self, block, z, labels, guidance, bound, plan) -> StaticRun:
        device = z.device
        dtype = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
        B, T, D = z.shape
        attn = block.attn_blocks[0].attention
        C = block.pos_embed.shape[1]
        shape = (B, T, D, 2 * B if guidance.active else B, len(block.attn_blocks), attn.num_heads,
                 C // attn.num_heads, C, dtype or torch.float32, device)
        ws = _WORKSPACES.pop(shape, None)
        pad = plan.padding
        if ws is None or ws.pad < pad:  # the widest window so far: one workspace serves every plan of a shape
            ws = Workspace(*shape, max(pad, ws.pad if ws else 0))
        _WORKSPACES[shape] = ws
        while len(_WORKSPACES) > KEPT:
            _WORKSPACES.popitem(last=False)
        return StaticRun(self, ws, block, z, labels, guidance, bound, plan, dtype)


_WORKSPACES: OrderedDict = OrderedDict()
_BY_NAME = {"eager": Eager(), "static": Static(), "graph": Static(capture_cuda_graph)}


def resolve(engine, device: torch.device):
    """The engine `engine` names on `device` ("auto": graph on CUDA, eager elsewhere), or `engine` itself."""
    if isinstance(engine, (Eager, Static)):
        return engine
    if engine not in ENGINES:
        raise ValueError(f"engine={engine!r}: allowed values are {', '.join(ENGINES)}")
    if engine == "auto":
        engine = "graph" if device.type == "cuda" else "eager"
    if engine == "graph" and device.type != "cuda":
        raise ValueError(f"engine='graph' captures CUDA graphs; the device here is {device.type}")
    return _BY_NAME[engine]
