"""What the compiled backends (cpp, triton) share: one call for all eligible layers, eager for
the rest (a non-contiguous weight or gradient, say), results back in the caller's order."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from . import eager
from .plan import LayerPlan


def flat_views(layers: Sequence[LayerPlan]) -> list[int]:
    return [v for layer in layers for v in layer.view]


def score_buffer(layers: Sequence[LayerPlan], want_scores: bool, device) -> torch.Tensor:
    """One fp32 buffer for every group of every layer (empty when no scores are wanted)."""
    n = sum(l.n_groups for l in layers) if want_scores else 0
    return torch.empty(n, dtype=torch.float32, device=device)


def split_scores(scores: torch.Tensor, layers: Sequence[LayerPlan]) -> list[torch.Tensor]:
    return list(scores.split([l.n_groups for l in layers]))


DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the compiled kernels take


def walkable(t: torch.Tensor | None, w: torch.Tensor, view) -> bool:
    """Can a kernel walk ``t`` (the weight, its gradient or a buffer of it) as the layer's
    ``[A, G, B]`` view in memory order? Row-major always can; for filter groups (A == 1), so can
    channels_last, which keeps each filter one block of B elements (the work inside a filter is
    elementwise or a sum, blind to the order), provided ``t`` has the weight's strides. Gradient
    and buffer dtypes and devices match the weight's: autograd and torch's optimizers see to it."""
    if t is None:
        return False
    if t.is_contiguous() and w.is_contiguous():
        return True
    return (view[0] == 1 and w.dim() == 4 and w.stride(0) == view[2] and t.stride() == w.stride()
            and w.is_contiguous(memory_format=torch.channels_last))


def eligible(layer: LayerPlan, buffer: torch.Tensor | None = None) -> bool:
    w = layer.weight
    return (w.dtype in DTYPES and walkable(w, w, layer.view)
            and walkable(w.grad, w, layer.view)
            and (buffer is None or (buffer.dtype == w.dtype and walkable(buffer, w, layer.view))))


def run_all_first(native: Callable, eager_fn: Callable, refused: tuple[type[Exception], ...], layers, kept,
                  lam_kept, lam_selected, *extras, want_scores: bool, mask: bool):
    """``native`` over every layer in one call; only if it raises ``refused`` (which it does before
    writing anything) sort the layers with :func:`run`. Sorting first would cost more host time
    per step than a GPU spends on the whole step."""
    try:
        return native(layers, kept, lam_kept, lam_selected, *extras, want_scores=want_scores, mask=mask)
    except refused:
        return run(native, eager_fn, layers, kept, lam_kept, lam_selected, *extras, want_scores=want_scores,
                   mask=mask)


def run(native: Callable, eager_fn: Callable, layers, kept, lam_kept, lam_selected, *extras,
        want_scores: bool, mask: bool):
    """Call ``native`` on the eligible layers and ``eager_fn`` on the others, with the same
    arguments restricted to each subset; ``extras`` are further per-layer sequences."""
    buffers = extras[0] if extras else [None] * len(layers)
    ok = [eligible(l, b) for l, b in zip(layers, buffers)]
    out: list[torch.Tensor | None] = [None] * len(layers)
    for fn, flag in ((native, True), (eager_fn, False)):
        idx = [i for i, e in enumerate(ok) if e == flag]
        if not idx:
            continue
        if len(idx) == len(layers):
            args = (layers, kept, lam_kept, lam_selected, *extras)
        else:
            sel = torch.tensor(idx, device=lam_kept.device)
            args = ([layers[i] for i in idx], [kept[i] for i in idx], lam_kept[sel], lam_selected[sel],
                    *([e[i] for i in idx] for e in extras))
        scores = fn(*args, want_scores=want_scores, mask=mask)
        if want_scores:
            for i, s in zip(idx, scores):
                out[i] = s
    if want_scores and any(s is None for s in out):  # layers without a gradient
        missing = [i for i, s in enumerate(out) if s is None]
        for i, s in zip(missing, eager.scores([layers[i] for i in missing])):
            out[i] = s
    return out if want_scores else None
