"""The eager reference: per-layer, vectorized over groups, plain PyTorch.

Every fast backend is tested against these functions. A layer's groups live on the middle axis of
its weight viewed as ``[outer, n_groups, inner]`` (see :class:`greg_fast.plan.LayerPlan`).
"""
from __future__ import annotations

from typing import Sequence

import torch

from .masks import expand_groups, kept_bool
from .plan import LayerPlan

name = "eager"


def group_scores(layer: LayerPlan) -> torch.Tensor:
    """Mean |w| of every group, accumulated in fp32: ``[n_groups]``."""
    w = layer.weight.detach().reshape(layer.view)
    return w.abs().sum(dim=(0, 2), dtype=torch.float32) / (layer.view[0] * layer.view[2])


def scores(layers: Sequence[LayerPlan]) -> list[torch.Tensor]:
    return [group_scores(layer) for layer in layers]


def _group_lambda(kept: torch.Tensor, lam_kept: torch.Tensor, lam_selected: torch.Tensor) -> torch.Tensor:
    return torch.where(kept, lam_kept, lam_selected)


@torch.no_grad()
def penalty(layers: Sequence[LayerPlan], kept: Sequence[torch.Tensor], lam_kept: torch.Tensor,
            lam_selected: torch.Tensor, *, want_scores: bool, mask: bool) -> list[torch.Tensor] | None:
    """The regularization step on gradients, layer by layer.

    ``kept[i]``: layer i's bool mask ``[n_groups]``; ``lam_kept`` / ``lam_selected``: fp32 ``[n_layers]``.
    ``grad += λ_g * w`` with λ_g = ``lam_kept[i]`` on kept groups and ``lam_selected[i]`` on the
    others; with ``mask`` (after pruning) the removed groups' weights and gradients are then
    zeroed. ``want_scores``: also return every layer's group scores (of the weights as read).
    """
    out = scores(layers) if want_scores else None
    for i, layer in enumerate(layers):
        w, g, keep = layer.weight, layer.weight.grad, kept_bool(layer, kept[i])
        if g is not None:
            g.addcmul_(w, expand_groups(layer, _group_lambda(keep, lam_kept[i], lam_selected[i])))
        if mask:
            removed = ~expand_groups(layer, keep)
            w.masked_fill_(removed, 0)
            if g is not None:
                g.masked_fill_(removed, 0)
    return out


@torch.no_grad()
def fused_sgd(layers: Sequence[LayerPlan], kept: Sequence[torch.Tensor], lam_kept: torch.Tensor,
              lam_selected: torch.Tensor, momentum_buffers: Sequence[torch.Tensor | None],
              lr: Sequence[float], momentum: Sequence[float], weight_decay: Sequence[float], *,
              want_scores: bool, mask: bool) -> list[torch.Tensor] | None:
    """Penalty, weight decay, momentum and the SGD update (dampening 0, no nesterov), in the order
    ``torch.optim.SGD`` applies them after :func:`penalty`; the gradient itself is not written.
    With ``mask``, the removed groups' weights and momentum are zeroed instead of updated."""
    out = scores(layers) if want_scores else None
    for i, layer in enumerate(layers):
        w, g, buf = layer.weight, layer.weight.grad, momentum_buffers[i]
        if g is None:
            continue
        k = kept_bool(layer, kept[i])
        keep = expand_groups(layer, k)
        d = g.addcmul(w, expand_groups(layer, _group_lambda(k, lam_kept[i], lam_selected[i])))
        if mask:
            d.masked_fill_(~keep, 0)
        if weight_decay[i] != 0:
            d.add_(w, alpha=weight_decay[i])
        if buf is not None:
            buf.mul_(momentum[i]).add_(d)
            d = buf
        w.add_(d, alpha=-lr[i])
        if mask:
            w.masked_fill_(~keep, 0)
            if buf is not None:
                buf.masked_fill_(~keep, 0)
    return out


