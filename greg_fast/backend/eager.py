"""The eager reference: per-layer, vectorized over groups, plain PyTorch.

Every fast backend is tested against these functions. A layer's groups live on the middle axis of
its weight viewed as ``[outer, n_groups, inner]`` (see :class:`greg_fast.units.LayerPlan`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..masks import expand_groups, kept_bool
from ..units import LayerPlan
from .base import StepBatch

name = "eager"


def group_scores(layer: LayerPlan) -> torch.Tensor:
    """Mean |w| of every group, accumulated in fp32: ``[n_groups]``."""
    w = layer.weight.detach().reshape(layer.view)
    return w.abs().sum(dim=(0, 2), dtype=torch.float32) / (layer.view[0] * layer.view[2])


def scores(layers: Sequence[LayerPlan]) -> list[torch.Tensor]:
    return [group_scores(layer) for layer in layers]


def unavailable(device: torch.device) -> str | None:
    return None  # plain PyTorch runs wherever the weights are


@torch.no_grad()
def step(batch: StepBatch, *, want_scores: bool, mask) -> list[torch.Tensor] | None:
    """One step of ``batch``, layer by layer: the penalty on the gradients, or with ``batch.sgd``
    the fused SGD update. ``want_scores``: also return every layer's group scores (of the weights
    as read). ``mask`` and ``batch.sgd.skip`` are bools, or 0-d bool tensors that a capturable
    schedule computes on the device: then the same values come out of masked writes and selects."""
    out = scores(batch.layers) if want_scores else None
    for i, layer in enumerate(batch.layers):
        keep = kept_bool(layer, batch.kept[i])
        lam = expand_groups(layer, torch.where(keep, batch.lam_kept[i], batch.lam_selected[i]))
        if batch.sgd is None:
            _penalty(layer, keep, lam, mask)
        else:
            _sgd(layer, keep, lam, mask, *(getattr(batch.sgd, f)[i] for f in ("buffers", "lr", "momentum",
                                                                              "weight_decay")), batch.sgd.skip)
    return out


def _removed(layer: LayerPlan, keep: torch.Tensor, mask) -> torch.Tensor | None:
    """Where a masked step zeroes: the removed groups (broadcastable to the weight), None when not masked."""
    if isinstance(mask, torch.Tensor):
        return ~expand_groups(layer, keep) & mask
    return ~expand_groups(layer, keep) if mask else None


def _penalty(layer: LayerPlan, keep: torch.Tensor, lam: torch.Tensor, mask) -> None:
    """``grad += λ_g * w``; with ``mask`` (after pruning) the removed groups' weights and gradients
    are then zeroed."""
    w, g = layer.weight, layer.grad
    if g is not None:
        g.addcmul_(w, lam)
    removed = _removed(layer, keep, mask)
    if removed is not None:
        w.masked_fill_(removed, 0)
        if g is not None:
            g.masked_fill_(removed, 0)


def _sgd(layer: LayerPlan, keep: torch.Tensor, lam: torch.Tensor, mask, buf: torch.Tensor | None,
         lr, momentum, weight_decay, skip=False) -> None:
    """Penalty, weight decay, momentum and the SGD update (dampening 0, no nesterov), in the order
    ``torch.optim.SGD`` applies them after :func:`_penalty`; the gradient itself is not written.
    With ``mask`` (after pruning), the removed groups' weights and momentum are zeroed instead of
    updated; with ``skip`` nothing is written."""
    w, g = layer.weight, layer.grad
    if g is None or skip is True:
        return
    if isinstance(skip, torch.Tensor) and mask is not False:  # a skipped step zeroes nothing either
        mask = ~skip if mask is True else mask & ~skip
    removed = _removed(layer, keep, mask)
    d = g.addcmul(w, lam)
    if removed is not None:
        d.masked_fill_(removed, 0)
    if isinstance(weight_decay, torch.Tensor) or weight_decay != 0:
        d = d.add(w * weight_decay) if isinstance(weight_decay, torch.Tensor) else d.add_(w, alpha=weight_decay)
    if buf is not None:
        d = buf.mul(momentum).add_(d)
        _write(buf, d, skip)
    _write(w, w - d * lr if isinstance(lr, torch.Tensor) else w.add(d, alpha=-lr), skip)
    if removed is not None:
        w.masked_fill_(removed, 0)
        if buf is not None:
            buf.masked_fill_(removed, 0)


def _write(t: torch.Tensor, value: torch.Tensor, skip) -> None:
    """``t = value``, unless ``skip`` (a 0-d bool tensor) is set."""
    t.copy_(torch.where(skip, t, value) if isinstance(skip, torch.Tensor) else value)
