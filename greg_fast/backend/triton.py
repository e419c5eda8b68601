"""The Triton backend: one launch for all layers of a step (kernels/greg_step.py).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it). Static
tables (shapes, work list, score offsets) are built once per layer set; address tables are cached
by address, and a GrowingReg's launches are reused while its tensors stay where they were, so a
step costs a check of its tensors, one launch and no host sync.
"""
from __future__ import annotations

import dataclasses
import functools
import importlib.util
import itertools
import math
import operator
import os
import warnings
import weakref

import torch

from .. import ops
from . import base, eager, fallback

name = "triton"
_FILTER, _CHANNEL, _WEIGHT = "filter", "channel", "weight"
_MERGED = "rows and columns"  # a launch over a parameter's row slices and its column slices (CROSS)


def unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), the weights are on {device}"
    return _kernels_error()


@functools.cache
def _kernels_error() -> str | None:
    """Why the kernels (greg_fast.kernels, from the top-level kernels/ folder) do not import, if
    they do not: checked before a backend is chosen, not at its first step."""
    try:
        _kernels()
    except Exception as err:  # missing from the install, broken triton, syntax error
        return f"its kernels do not import ({type(err).__name__}: {err})"
    return None


def _kernels():
    global _KERNELS
    if _KERNELS is None:  # imported on first use: no triton import with `import greg_fast`
        from ..kernels import greg_step
        _KERNELS = greg_step
    return _KERNELS


_KERNELS = None


TILE = 1024           # elements per program and iteration: 8 per thread at 4 warps, no register spills
ROW_CHUNK = 16 * 128  # filter groups: B elements per program, so that long filters are split


def _tiling(granularity: str, max_b: int, strided: bool) -> tuple[int, int, int, int]:
    """(BLOCK_G, BLOCK_B, A_STEP, B_STEP): TILE-element tiles shaped for each granularity's [A, G, B],
    and how much of A and B one program walks."""
    if granularity == _MERGED:  # the columns' tiles (max_b: theirs); rows walked ROW_CHUNK at a time
        block_g, block_b, a_step, _ = _tiling(_CHANNEL, max_b, strided)
        return block_g, block_b, a_step, ROW_CHUNK
    if granularity == _CHANNEL and strided:  # the row stride takes registers: half tiles, no spills
        block_g, block_b, a_step, b_step = _tiling(granularity, max_b, False)
        return max(1, block_g // 2), block_b, a_step, b_step
    if granularity == _FILTER:    # A = 1, B = fan-in: rows of the weight in 128-wide steps, ROW_CHUNK per program
        return TILE // 128, 128, 1, ROW_CHUNK
    if granularity == _CHANNEL:   # B = kernel area: whole groups in a tile, 16 rows of A per program
        block_b = min(128, _next_pow2(max_b))
        return TILE // block_b, block_b, 16, block_b * -(-max_b // block_b)
    return TILE, 1, 1, 1          # weight: one element per group


def _vec(runs_gcd: int, addresses: tuple, element_size: int) -> int:
    """Elements per 128-bit access when every contiguous run (B, or G for single weights) is a
    whole number of them and every address is 16-byte aligned; else 1."""
    vec = 16 // element_size
    aligned = functools.reduce(operator.or_, addresses, 0) % 16 == 0
    return vec if aligned and runs_gcd % vec == 0 else 1


def _next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@functools.lru_cache(maxsize=64)
def _static(dims: tuple, granularity: str, device: torch.device, whole: bool):
    """Shape table, score offsets, work list, tiling, the gcd of the contiguous runs and whether any
    row stride is not G·B, of one layer set (cached; ``dims``: A, G, B and the stride of A per
    layer). ``whole``: one program per group block over whole A and B (launches with scores: one
    atomic per group keeps the sums deterministic)."""
    strided = any(v[3] != v[1] * v[2] for v in dims)
    columns = [v[2] for v in dims if v[0] > 1] if granularity == _MERGED else []
    block_g, block_b, a_step, b_step = _tiling(granularity, max(columns or [v[2] for v in dims]), strided)
    if whole:
        a_step = b_step = 0
    work, offsets, off = [], [], 0
    for i, (a, g, b, _) in enumerate(dims):
        offsets.append(off)
        off += g
        work += [(i, g0, a0, b0) for g0 in range(0, g, block_g) for a0 in range(0, a, a_step or a)
                 for b0 in range(0, b, b_step or b)]
    # every row start and contiguous run (B, or G for single weights) decides the access width
    runs_gcd = math.gcd(*(v[1] if granularity == _WEIGHT else v[2] for v in dims),
                        *(v[3] for v in dims if v[0] > 1))
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(dims), as_tensor(offsets), as_tensor(work), (block_g, block_b, a_step, b_step), runs_gcd, strided


_ADDRESS_CACHE: dict = {}


def _table(values: tuple, device: torch.device, dtype=torch.int64) -> torch.Tensor:
    """A device tensor of per-layer values (addresses, hyper-parameters), cached by content so that
    steady-state steps copy nothing to the device (the caching allocator reuses addresses)."""
    key = (values, device, dtype)
    table = _ADDRESS_CACHE.get(key)
    if table is None:
        if len(_ADDRESS_CACHE) > 256:
            _ADDRESS_CACHE.clear()
        host = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            host = host.pin_memory()
        table = _ADDRESS_CACHE[key] = host.to(device, non_blocking=True)
    return table


_ELEM = {}


def _elem(dtype: torch.dtype):
    if not _ELEM:
        import triton.language as tl
        _ELEM.update({torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16})
    return _ELEM[dtype]


class _NeedsEager(Exception):
    """A layer the kernel cannot walk (see base.eligible): the caller sorts the layers out."""


@functools.lru_cache(maxsize=None)
def _placeholder(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A one-element tensor for pointer arguments that a specialization never reads."""
    return torch.zeros(1, dtype=dtype, device=device)


# The two helpers below run every step: base.eligible, read as the launch needs it (one pass per
# tensor; trying all layers first is cheaper than sorting them, which only a refusal pays for).
def _weight_addresses(weights, views) -> tuple[tuple, list]:
    """(data_ptrs, layouts) of the weights (see base.layout)."""
    layouts = [base.layout(w, view) for w, view in zip(weights, views)]
    if any(layout is False for layout in layouts):
        raise _NeedsEager
    return tuple(w.data_ptr() for w in weights), layouts


def _addresses_like(tensors, layouts, dtype: torch.dtype) -> tuple:
    """data_ptrs of gradients or buffers, each in its weight's dtype and layout."""
    if not all(base.follows(t, layout, dtype) for t, layout in zip(tensors, layouts)):
        raise _NeedsEager
    return tuple(t.data_ptr() for t in tensors)


def _launch(layers, kept, lam_kept, lam_selected, *, mode, want_scores, mask, buffers=None, hyper=None,
            skip=False, passes=(), cross=None, memo=None, anchor=None):
    """One kernel launch per pass and weight dtype over ``layers`` (usually exactly one; ``passes``:
    sizes of runs of layers that run one after the other; with ``cross`` they run as one launch where all
    layers have one dtype). ``mask`` and ``skip``: bools, or 0-d bool tensors the kernel reads (a
    capturable step's flags); ``hyper``: per layer (lr, momentum, weight decay), or an fp32
    ``[n_layers, 3]`` tensor the kernel reads; ``anchor``: what stands for the layer set in the memo
    (default ``layers``). Runs every step: what it can, it reads from the cached launches."""
    if not layers:
        return [] if want_scores else None
    k = _kernels()
    from_flag, skip_flag = isinstance(mask, torch.Tensor), isinstance(skip, torch.Tensor)
    how = (mode, want_scores, k.MASK_FROM_FLAG.value if from_flag else k.MASK_ON.value if mask else k.MASK_OFF.value,
           skip_flag, passes)
    launches = _prepared(layers, kept, buffers, cross, memo, anchor, how)
    first = launches[0]
    flags = (mask.reshape(1) if from_flag else first.no_flag, skip.reshape(1) if skip_flag else first.no_flag)
    out = first.no_scores
    if want_scores:
        out = torch.zeros(sum(l.n_groups for l in layers), dtype=torch.float32, device=first.device)
    if first.device.type == "cuda":  # triton launches on the current device: make it the weights'
        with torch.cuda.device(first.device):
            _run(launches, out, lam_kept, lam_selected, hyper, flags, mode == k.MODE_SGD.value)
    else:
        _run(launches, out, lam_kept, lam_selected, hyper, flags, mode == k.MODE_SGD.value)
    if not want_scores:
        return None
    sums = base.split_scores(out, layers)
    return [s / (l.view[0] * l.view[2]) for s, l in zip(sums, layers)]


def _run(launches, out, lam_kept, lam_selected, hyper, flags, sgd: bool) -> None:
    k = _kernels()
    for launch in launches:
        lk, ls, hyper_table = lam_kept, lam_selected, launch.hyper
        if launch.select is not None:
            lk, ls = lam_kept[launch.select], lam_selected[launch.select]
        if isinstance(hyper, torch.Tensor):
            hyper_table = hyper if launch.select is None else hyper[launch.select]
        elif sgd:  # learning rates may change every step
            hyper_table = _table(tuple(map(float, itertools.chain.from_iterable(hyper[i] for i in launch.idx))),
                                 out.device, torch.float32)
        tensors = (out, *launch.tables, lk, ls, hyper_table, launch.work, *flags)
        direct, spec = launch.direct
        if direct is not None and spec == _spec(out, lk, ls, hyper_table, *flags):
            try:
                direct(*tensors)
                continue
            except TypeError as err:  # the launcher refused the arguments (before launching anything)
                warnings.warn(f"greg_fast: calling the compiled Triton kernel directly failed ({err}); "
                              "using Triton's full launch from now on")
                k.DIRECT_OK = False
        # the first launch, or the per-step tensors changed what the kernel was compiled for
        direct = k.launch(*tensors, **launch.kwargs)
        launch.direct[:] = direct, None if direct is None else _spec(out, lk, ls, hyper_table, *flags)


def _spec(*tensors) -> tuple:
    """What Triton specializes a pointer on: dtype and 16-byte alignment (of the tensors a cached
    launch is given anew each step; its tables stay put)."""
    return tuple((t.dtype, t.data_ptr() % 16 == 0) for t in tensors)


@dataclasses.dataclass(frozen=True)
class _Launch:
    idx: list            # the layers it walks
    select: torch.Tensor | None  # their indices as a device tensor when a subset (λ is per layer), else None
    tables: tuple        # w, grad, momentum, kept, xlam, xkeep, own tables, dims, score offsets
    work: torch.Tensor   # the work list
    hyper: torch.Tensor  # a placeholder (fused SGD reads its hyper-parameters every step)
    kwargs: dict         # the specialization
    no_scores: torch.Tensor  # placeholders on the weights' device: the scores a launch without them
    no_flag: torch.Tensor    # is given, a flag it does not read
    device: torch.device
    # the compiled kernel to call directly (greg_step.Direct, on a GPU) and the _spec it was built for
    direct: list = dataclasses.field(default_factory=lambda: [None, None])


@dataclasses.dataclass(frozen=True)
class _Cached:
    anchor: object       # holding it keeps its id (the memo key) from being reused
    cross: list | None   # SliceMap.cross returns a new list whenever it rebuilds its vectors
    sources: tuple | None
    state: bytes | tuple
    launches: list


def _prepared(layers, kept, buffers, cross, memo, anchor, how: tuple) -> list[_Launch]:
    """The launches of a step, rebuilt only when what they were built from changed (see
    :func:`_state`; a new gradient lands where the last one was, so steady-state steps reuse
    them). On a GPU the host, not the GPU, bounded a step (H200, ResNet-50: 42 µs of kernel time,
    77 µs of host code around it).
    ``memo``: the caller's dict (one per GrowingReg, so nothing outlives it); None: no reuse.
    ``anchor``: what stands for the layer set (default ``layers``; an op's layers are new
    :class:`_Bound` objects every call, their weights and gradients its arguments).
    ``how``: mode, want_scores, mask mode, skip flag, passes."""
    if memo is None:
        return _prepare(layers, kept, buffers, cross, *how)
    anchor = layers if anchor is None else anchor
    key = (id(anchor), how, cross is None)
    cached = memo.get(key)
    if (cached is not None and cached.anchor is anchor and cached.cross is cross
            and _state(layers, kept, buffers, cached.sources) == cached.state):
        return cached.launches
    launches = _prepare(layers, kept, buffers, cross, *how)
    sources = None if anchor is not layers else _sources(layers)
    if len(memo) >= 8:
        memo.clear()
    memo[key] = _Cached(anchor, cross, sources, _state(layers, kept, buffers, sources), launches)
    return launches


def _sources(layers) -> tuple[list, list]:
    """Where each layer's parameter is looked up every step: its module's parameter dict and name."""
    return [l.module._parameters for l in layers], [l.tensor for l in layers]


def _state(layers, kept, buffers, sources) -> bytes | tuple:
    """What a launch bakes in of the step's tensors (:func:`greg_fast.ops.launch_state`, one call):
    parameters and their gradients as looked up in ``sources`` (a slice's rows or columns are a
    fixed part of its parameter, so the parameter stands for the slice), masks, momentum buffers.
    ``sources`` None: the layers are an op's :class:`_Bound` arguments, whose own weights and
    gradients are what the launch walks."""
    tensors = [] if kept is None else kept if type(kept) is list else list(kept)
    if buffers is not None:
        tensors = [*tensors, *buffers]
    if sources is None:
        return ops.launch_state([], [], [*tensors, *(l.weight for l in layers), *(l.grad for l in layers)])
    return ops.launch_state(*sources, tensors)


def _prepare(layers, kept, buffers, cross, mode, want_scores, mask, skip, passes) -> list[_Launch]:
    k = _kernels()
    weights = [l.weight for l in layers]
    device = weights[0].device
    dtypes = {w.dtype for w in weights}
    if not dtypes <= set(base.DTYPES):
        raise _NeedsEager
    launches = []  # (dtype, granularity, layer indices), passes in order
    if cross is not None and len(dtypes) == 1:  # the passes in one launch (kernels/greg_step.py CROSS)
        launches = [(weights[0].dtype, _MERGED, list(range(len(layers))))]
    for span in [] if launches else base.pass_ranges(passes, len(layers)):
        kinds = {(weights[i].dtype, layers[i].granularity) for i in span}
        for dtype, granularity in kinds:  # one, unless a coupled plan mixes rows and columns
            launches.append((dtype, granularity, list(span) if len(kinds) == 1 else [
                i for i in span if weights[i].dtype is dtype and layers[i].granularity == granularity]))
    prepared = []  # every layer is checked before any kernel writes: a refusal leaves nothing half done
    for dtype, granularity, idx in launches:
        sub = [layers[i] for i in idx]
        views = tuple(l.view for l in sub)
        ws = [weights[i] for i in idx]
        addresses, layouts = _weight_addresses(ws, views)
        shapes = tuple((*v, base.outer_stride(w, v)) for w, v in zip(ws, views))
        dims, offsets, work, tiling, runs_gcd, strided = _static(shapes, granularity, device, want_scores)
        if want_scores and len(idx) < len(layers):  # this subset's score offsets inside the full buffer
            starts = list(itertools.accumulate((l.n_groups for l in layers), initial=0))
            offsets = _table(tuple(starts[i] for i in idx), device)
        w_table = _table(addresses, device)
        g_table = m_table = kept_table = hyper_table = _placeholder(device, torch.int64)
        x_tables = (_placeholder(device, torch.int64),) * 3
        if granularity == _MERGED:
            x_tables = tuple(_table(tuple(0 if x[j] is None else x[j].data_ptr() for x in cross), device)
                             for j in range(3))
        select = None
        has_momentum = False
        if mode != k.MODE_SCORES.value:
            grads = _addresses_like([layers[i].grad for i in idx], layouts, dtype)
            addresses += grads
            g_table = _table(grads, device)
            kept_table = _table(tuple(kept[i].data_ptr() for i in idx), device)
            if len(idx) < len(layers):
                select = _table(tuple(idx), device)  # cached: no blocking copy per step
        if mode == k.MODE_SGD.value:
            bufs = [buffers[i] for i in idx]
            has_momentum = _all_or_no_momentum(bufs)
            if has_momentum:
                momenta = _addresses_like(bufs, layouts, dtype)
                addresses += momenta
                m_table = _table(momenta, device)
        prepared.append(_Launch(idx, select, (w_table, g_table, m_table, kept_table, *x_tables, dims, offsets), work,
                                hyper_table,
                                dict(elem=_elem(dtype), mode=mode, mask=mask, skip=skip, want_scores=want_scores,
                                     packed=kept is not None and kept[idx[0]].dtype == torch.uint8,
                                     has_momentum=has_momentum, tiling=tiling,
                                     vec=_vec(runs_gcd, addresses, dtype.itemsize),
                                     unit_b=granularity == _WEIGHT, strided=strided, cross=granularity == _MERGED),
                                _placeholder(device, torch.float32), _placeholder(device, torch.bool), device))
    return prepared


def _all_or_no_momentum(buffers) -> bool:
    """Whether the layers have momentum buffers (fused SGD here takes all of them or none)."""
    has = [b is not None for b in buffers]
    if any(has) and not all(has):
        raise ValueError("fused SGD on the triton backend needs momentum on all or none of the layers")
    return bool(has) and has[0]


def scores(layers) -> list[torch.Tensor]:
    layers = list(layers)
    try:
        return _launch(layers, None, None, None, mode=_kernels().MODE_SCORES.value, want_scores=True, mask=False)
    except _NeedsEager:
        return eager.scores(layers)


def _hyper(sgd: base.SGDArgs, device: torch.device):
    """Per layer (lr, momentum, weight decay) as floats, or as an fp32 ``[n_layers, 3]`` device
    tensor when any is a tensor (read by the kernel: no host sync)."""
    if sgd.table is not None:
        return sgd.table
    values = (sgd.lr, sgd.momentum, sgd.weight_decay)
    if any(isinstance(v, torch.Tensor) for col in values for v in col):
        return ops.sgd_hyper(*values, device=device)
    return list(zip(*values))


def _step(batch: base.StepBatch, *, want_scores: bool, mask, anchor=None):
    k, sgd = _kernels(), batch.sgd
    fused = {} if sgd is None else {"buffers": sgd.buffers, "hyper": _hyper(sgd, batch.lam_kept.device),
                                    "skip": sgd.skip}
    # one launch over rows and columns, except when scores are read while masking writes weights
    cross = batch.cross if sgd is None and not (want_scores and mask is not False) else None
    return _launch(batch.layers, batch.kept, batch.lam_kept, batch.lam_selected,
                   mode=(k.MODE_PENALTY if sgd is None else k.MODE_SGD).value, want_scores=want_scores, mask=mask,
                   passes=batch.passes, cross=cross, memo=batch.memo, anchor=anchor,
                   **fused)


def step(batch: base.StepBatch, *, want_scores: bool, mask):
    if isinstance(mask, torch.Tensor):  # a capturable schedule's step: through the registered op
        return _op_step(batch, want_scores=want_scores, mask=mask)
    return fallback.run_all_first(_step, _NeedsEager, batch, want_scores=want_scores, mask=mask)


# ---- the capturable step: one op that torch.compile sees (and a CUDA graph captures) ----
# torch.library.triton_op would let inductor see the kernel, but its pointer tables hide the
# tensors anyway, and the interpreter (CI) reads fake tensors' addresses under it; a custom op with
# a fake kernel traces with no graph break and runs the same launch.
_OP_KEY = "triton_op"
_OP_LAYERS: "weakref.WeakValueDictionary[int, _OpLayers]" = weakref.WeakValueDictionary()
_HANDLES = itertools.count()


class _OpLayers:
    """The static side of a capturable step (each layer's view, granularity and slice), found by the
    op from a handle: an op takes tensors and numbers, not objects. Kept alive by the memo of the
    GrowingReg that uses it; shared by its copies (nothing in it changes)."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.memo: dict = {}  # the op's launches, reused while its tensors stay where they were
        self.handle = next(_HANDLES)
        _OP_LAYERS[self.handle] = self

    def __deepcopy__(self, memo) -> "_OpLayers":
        return self


class _Bound:
    """A layer whose weight and gradient are the tensors the op was given (under torch.compile the
    op may be given copies of the parameters, written back after it)."""
    __slots__ = ("layer", "weight", "grad")

    def __init__(self, layer, weight: torch.Tensor, grad: torch.Tensor | None):
        self.layer, self.weight, self.grad = layer, weight, grad

    @property
    def param(self) -> torch.Tensor:
        return self.weight

    def __getattr__(self, name):
        return getattr(self.layer, name)


def capture(layers, memo: dict) -> None:
    """Register ``layers`` for capturable steps that keep ``memo`` (before any is compiled)."""
    memo[_OP_KEY] = _OpLayers(layers)


@torch.library.custom_op("greg_fast::triton_step_", mutates_args=("weights", "grads", "buffers", "scores"))
def _step_op(weights: list[torch.Tensor], grads: list[torch.Tensor], buffers: list[torch.Tensor],
             kept: list[torch.Tensor], lam_kept: torch.Tensor, lam_selected: torch.Tensor, hyper: torch.Tensor,
             mask: torch.Tensor, skip: torch.Tensor, scores: torch.Tensor, handle: int, fused: bool,
             passes: list[int]) -> None:
    """One step of the registered layers ``handle`` (see :func:`_op_step`); mean group scores into
    ``scores`` unless it is empty. A missing gradient is an empty tensor; ``buffers`` is empty
    without momentum."""
    static = _OP_LAYERS[handle]
    layers = [_Bound(l, w, g if g.numel() or not w.numel() else None)
              for l, w, g in zip(static.layers, weights, grads)]
    sgd = None
    if fused:
        sgd = base.SGDArgs(buffers or [None] * len(layers), *hyper.unbind(1), skip=skip, table=hyper.contiguous())
    batch = base.StepBatch(layers, kept, lam_kept, lam_selected, sgd, passes=tuple(passes), memo=static.memo)
    native = functools.partial(_step, anchor=static.layers)
    out = fallback.run_all_first(native, _NeedsEager, batch, want_scores=scores.numel() > 0, mask=mask)
    if out is not None:
        torch.cat(out, out=scores)


@_step_op.register_fake
def _(weights, grads, buffers, kept, lam_kept, lam_selected, hyper, mask, skip, scores, handle, fused, passes):
    return None


def _op_step(batch: base.StepBatch, *, want_scores: bool, mask: torch.Tensor):
    """``step`` through the op: every tensor it reads or writes is an argument, so the compiler
    orders it and functionalizes its writes."""
    static = batch.memo.get(_OP_KEY) if batch.memo is not None else None
    if static is None:  # not registered ahead (a direct call): fine eagerly, not under a compile
        static = _OpLayers(batch.layers)
    device = batch.lam_kept.device
    weights = [l.weight for l in batch.layers]
    grads = [torch.empty(0, dtype=w.dtype, device=device) if l.grad is None else l.grad
             for l, w in zip(batch.layers, weights)]
    sgd = batch.sgd
    buffers, hyper, skip = [], torch.empty((0, 3), device=device), ops.flag(False, device)
    if sgd is not None:
        if _all_or_no_momentum(sgd.buffers):
            buffers = list(sgd.buffers)
        hyper = ops.sgd_hyper(sgd.lr, sgd.momentum, sgd.weight_decay, device=device)
        skip = ops.flag(sgd.skip, device)
    n = sum(l.n_groups for l in batch.layers) if want_scores else 0
    scores = torch.empty(n, dtype=torch.float32, device=device)
    _step_op(weights, grads, buffers, list(batch.kept), batch.lam_kept, batch.lam_selected, hyper, mask, skip,
             scores, static.handle, sgd is not None, list(batch.passes))
    return base.split_scores(scores, batch.layers) if want_scores else None
