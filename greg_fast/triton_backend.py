"""The Triton backend: one launch for all layers of a step (kernels/greg_step.py).

Runs on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (how CI tests it). Static
tables (shapes, work list, score offsets) are built once per layer set; address tables are cached
by address, so a step costs one launch and no host sync.
"""
from __future__ import annotations

import importlib.util
import os
from functools import lru_cache

import torch

from . import eager, native

name = "triton"
_FILTER, _CHANNEL, _WEIGHT = "filter", "channel", "weight"


def unavailable(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "triton is not installed"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"it needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), the weights are on {device}"


def _kernels():
    from .kernels import greg_step  # imported on first use: no triton import with `import greg_fast`
    return greg_step


def _blocks(granularity: str, max_b: int) -> tuple[int, int, int]:
    """(BLOCK_G, BLOCK_B, A_STEP): ~4K-element tiles shaped for each granularity's [A, G, B]."""
    if granularity == _FILTER:    # A = 1, B = fan-in: rows of the weight, looped in 256-wide chunks
        return 16, 256, 1
    if granularity == _CHANNEL:   # B = kernel area: whole groups in a tile, 16 rows of A per program
        block_b = min(256, triton_next_pow2(max_b))
        return max(1, 4096 // block_b), block_b, 16
    return 4096, 1, 1             # weight: one element per group


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


@lru_cache(maxsize=64)
def _static(views: tuple, granularity: str, device: torch.device):
    """Shape table, score offsets, work list and block sizes of one layer set (cached)."""
    block_g, block_b, a_step = _blocks(granularity, max(v[2] for v in views))
    work, offsets, off = [], [], 0
    for i, (a, g, _) in enumerate(views):
        offsets.append(off)
        off += g
        work += [(i, g0, a0) for g0 in range(0, g, block_g) for a0 in range(0, a, a_step)]
    as_tensor = lambda x: torch.tensor(x, dtype=torch.int64, device=device)  # noqa: E731
    return as_tensor(views), as_tensor(offsets), as_tensor(work), (block_g, block_b, a_step)


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


def _launch(layers, kept, lam_kept, lam_selected, *, mode, want_scores, mask, buffers=None, hyper=None):
    k = _kernels()
    device = layers[0].weight.device
    out = torch.empty(0, dtype=torch.float32, device=device)
    if want_scores:
        out = torch.zeros(sum(l.n_groups for l in layers), dtype=torch.float32, device=device)
    by_dtype: dict = {}
    for i, layer in enumerate(layers):
        by_dtype.setdefault(layer.weight.dtype, []).append(i)
    zero = torch.zeros(1, dtype=torch.int64, device=device)
    for dtype, idx in by_dtype.items():  # one launch per weight dtype (usually exactly one)
        sub = [layers[i] for i in idx]
        views = tuple(tuple(l.view) for l in sub)
        dims, offsets, work, (bg, bb, astep) = _static(views, sub[0].granularity, device)
        if len(idx) < len(layers):  # score offsets of this subset inside the full buffer
            starts = [sum(l.n_groups for l in layers[:i]) for i in idx]
            offsets = _table(tuple(starts), device)
        w_table = _table(tuple(l.weight.data_ptr() for l in sub), device)
        g_table = m_table = kept_table = hyper_table = zero
        lk = ls = torch.zeros(1, dtype=torch.float32, device=device)
        has_momentum = False
        if mode != k.MODE_SCORES:
            g_table = _table(tuple(l.weight.grad.data_ptr() for l in sub), device)
            kept_table = _table(tuple(kept[i].data_ptr() for i in idx), device)
            sel = idx if len(idx) < len(layers) else None
            lk = lam_kept if sel is None else lam_kept[torch.tensor(sel, device=device)]
            ls = lam_selected if sel is None else lam_selected[torch.tensor(sel, device=device)]
        if mode == k.MODE_SGD:
            bufs = [buffers[i] for i in idx]
            has_momentum = all(b is not None for b in bufs)
            if not has_momentum and any(b is not None for b in bufs):
                raise ValueError("fused SGD on the triton backend needs momentum on all or none of the layers")
            if has_momentum:
                m_table = _table(tuple(b.data_ptr() for b in bufs), device)
            hyper_table = _table(tuple(float(v) for i in idx for v in hyper[i]), device, torch.float32)
        packed = kept is not None and kept[idx[0]].dtype == torch.uint8
        k.launch(out, w_table, g_table, m_table, kept_table, dims, offsets, lk, ls, hyper_table, work,
                 elem=_elem(dtype), mode=mode, mask=mask, want_scores=want_scores, packed=packed,
                 has_momentum=has_momentum,
                 block_g=bg, block_b=bb, a_step=astep)
    if not want_scores:
        return None
    sums = native.split_scores(out, layers)
    return [s / (l.view[0] * l.view[2]) for s, l in zip(sums, layers)]


def scores(layers) -> list[torch.Tensor]:
    layers = list(layers)
    if not layers or not all(l.weight.is_contiguous() for l in layers):
        return eager.scores(layers)
    return _launch(layers, None, None, None, mode=_kernels().MODE_SCORES, want_scores=True, mask=False)


def _penalty(layers, kept, lam_kept, lam_selected, *, want_scores, mask):
    return _launch(layers, kept, lam_kept, lam_selected, mode=_kernels().MODE_PENALTY, want_scores=want_scores,
                   mask=mask)


def _fused_sgd(layers, kept, lam_kept, lam_selected, buffers, lr, momentum, weight_decay, *, want_scores, mask):
    return _launch(layers, kept, lam_kept, lam_selected, mode=_kernels().MODE_SGD, want_scores=want_scores,
                   mask=mask, buffers=buffers, hyper=list(zip(lr, momentum, weight_decay)))


def penalty(layers, kept, lam_kept, lam_selected, *, want_scores, mask):
    return native.run(_penalty, eager.penalty, layers, kept, lam_kept, lam_selected,
                      want_scores=want_scores, mask=mask)


def fused_sgd(layers, kept, lam_kept, lam_selected, buffers, lr, momentum, weight_decay, *, want_scores, mask):
    return native.run(_fused_sgd, eager.fused_sgd, layers, kept, lam_kept, lam_selected, buffers, lr, momentum,
                      weight_decay, want_scores=want_scores, mask=mask)
