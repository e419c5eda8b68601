"""The eager fallback of the compiled backends: all layers go to the compiled step first, and only
if it refuses one are they sorted by :func:`~greg_fast.backend.base.eligible`, the refused ones
running on the eager reference."""
from __future__ import annotations

from typing import Callable

import torch

from . import eager
from .base import StepBatch, eligible


def run_all_first(native: Callable, refused: type[Exception], batch: StepBatch, *, want_scores: bool, mask: bool):
    """``native`` over the whole batch in one call; only if it refuses a layer (``refused``,
    raised before anything is written) sort the layers with :func:`split_run`. Sorting every step
    would cost more host time than the step itself on small models."""
    try:
        return native(batch, want_scores=want_scores, mask=mask)
    except refused:
        return split_run(native, batch, want_scores=want_scores, mask=mask)


def split_run(native: Callable, batch: StepBatch, *, want_scores: bool, mask: bool):
    """``native`` on the eligible layers, eager on the others (decided up front by
    :func:`eligible`), results back in the batch's order."""
    buffers = batch.sgd.buffers if batch.sgd is not None else [None] * len(batch)
    ok = [eligible(l, b) for l, b in zip(batch.layers, buffers)]
    out: list[torch.Tensor | None] = [None] * len(batch)
    for fn, flag in ((native, True), (eager.step, False)):
        idx = [i for i, e in enumerate(ok) if e == flag]
        if not idx:
            continue
        scores = fn(batch.subset(idx), want_scores=want_scores, mask=mask)
        if want_scores:
            for i, s in zip(idx, scores):
                out[i] = s
    if want_scores and any(s is None for s in out):  # layers without a gradient
        missing = [i for i, s in enumerate(out) if s is None]
        for i, s in zip(missing, eager.scores([batch.layers[i] for i in missing])):
            out[i] = s
    return out if want_scores else None
