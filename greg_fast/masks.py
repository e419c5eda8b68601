"""Masks: which groups of a planned layer are kept, and what removing the others touches.

A structured mask is bool ``[n_groups]`` (True = kept); an unstructured one is stored bit-packed
(one bit per weight, :func:`pack_bits`) and handed to users shaped like the weight. Every backend,
compaction, sparse export and the optimizer wrapper read masks through these functions.
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.nn as nn

from .result import Plan
from .units import LayerPlan


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """bool [n] -> uint8 [ceil(n / 8)]; bit k of byte b is element 8b + k (numpy's bitorder="little")."""
    flat = mask.reshape(-1)
    padded = torch.zeros(-(-flat.numel() // 8) * 8, dtype=torch.uint8, device=flat.device)
    padded[: flat.numel()] = flat.to(torch.uint8)
    return (padded.view(-1, 8) << torch.arange(8, dtype=torch.uint8, device=flat.device)).sum(1, dtype=torch.uint8)


def unpack_bits(bits: torch.Tensor, n: int) -> torch.Tensor:
    """The inverse of :func:`pack_bits`: the first ``n`` bits as a bool tensor."""
    shifts = torch.arange(8, dtype=torch.uint8, device=bits.device)
    return ((bits.view(-1, 1) >> shifts) & 1).reshape(-1)[:n].bool()


def keep_strongest(scores: torch.Tensor, n_remove: int) -> torch.Tensor:
    """The kept mask that removes the ``n_remove`` lowest-scored groups (ties: lowest index first),
    bool ``[n_groups]`` on the scores' device. Fixed shapes (a sort and an index fill), so that a
    capturable schedule selects with it on the device too."""
    order = torch.sort(scores, stable=True).indices
    return torch.ones(scores.shape[0], dtype=torch.bool, device=scores.device).index_fill(0, order[:n_remove], False)


def kept_bool(layer: LayerPlan, kept: torch.Tensor) -> torch.Tensor:
    """A layer's kept mask as bool ``[n_groups]``: unstructured layers keep theirs packed, one bit
    per weight (see :func:`pack_bits`)."""
    return unpack_bits(kept, layer.n_groups) if kept.dtype == torch.uint8 else kept


def expand_groups(layer: LayerPlan, values: torch.Tensor) -> torch.Tensor:
    """Shape per-group ``values`` ``[n_groups]`` so that they broadcast against the weight
    (whatever its strides, so that in-place ops on the weight or its gradient never copy)."""
    w = layer.weight
    if layer.granularity == "filter":
        return values.view(-1, *([1] * (w.dim() - 1)))
    if layer.granularity == "channel":
        outer, groups, inner = layer.view
        if w.dim() == 2:  # linear: a channel is `inner` consecutive input features
            return values.repeat_interleave(inner).view(1, -1)
        return values.view(1, groups, *([1] * (w.dim() - 2)))
    return values.view(w.shape)


def member_keep(tensor: torch.Tensor, axis: int, positions: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Bool over ``tensor``'s ``axis``: False at the positions of the removed groups (a position
    any removed group holds). Fixed shapes (a scatter, no boolean indexing), so that a capturable
    step can build it from masks that live on the device."""
    positions = positions.to(tensor.device).reshape(kept.shape[0], -1)
    held = kept.to(tensor.device, torch.uint8).view(-1, 1).expand_as(positions)
    keep = torch.ones(tensor.shape[axis], dtype=torch.uint8, device=tensor.device)
    return keep.scatter_reduce_(0, positions.reshape(-1), held.reshape(-1), "amin").bool()


def masked_tensors(plan: Plan, layer: LayerPlan, kept: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(tensor, kept mask broadcastable to it)`` for everything through which a removed group
    still reaches the output (the members marked ``masked``: filter rows, biases, BatchNorm weight,
    bias and running mean, added parameters; for channels the layer's columns), so that a removed
    channel is exactly zero downstream: an affine-free BatchNorm in eval mode would otherwise turn
    the zero into -mean/std. Unstructured layers: the weight, under its per-weight mask."""
    kept = kept_bool(layer, kept)
    if layer.granularity == "weight":
        return [(layer.weight, expand_groups(layer, kept))]
    pairs = []
    for key, positions in layer.members.items():
        tensor = getattr(plan.module(key.module), key.tensor) if key.masked and key.tensor else None
        if tensor is not None:
            shape = [1] * tensor.dim()
            shape[key.axis] = -1
            pairs.append((tensor, member_keep(tensor, key.axis, positions, kept).view(shape)))
    return pairs


def check_masks(plan: Plan, masks: Mapping[str, torch.Tensor]) -> None:
    known = {l.name: l for l in plan.layers}
    for key, mask in masks.items():
        if key not in known:
            raise KeyError(f"mask for {key!r}, which is not a layer of the plan")
        layer = known[key]
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask for {key!r} must be a bool tensor, got {type(mask).__name__}")
        if mask.device.type == "meta":
            raise ValueError(f"mask for {key!r} is on meta: it holds no values")
        if mask.dtype != torch.bool or mask.shape != (layer.n_groups,) and mask.shape != layer.weight.shape:
            raise ValueError(f"mask for {key!r} must be a bool tensor of shape [{layer.n_groups}]"
                             f"{' or the weight shape' if layer.granularity == 'weight' else ''}, "
                             f"got {mask.dtype} {tuple(mask.shape)}")


@torch.no_grad()
def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], plan: Plan) -> None:
    """Zero the removed groups of ``model`` in place (``masks``: layer name -> bool, True = kept)."""
    plan.check_model(model)
    check_masks(plan, masks)
    zero_removed([(tensor, ~keep) for layer in plan.layers if layer.name in masks
                  for tensor, keep in masked_tensors(plan, layer, masks[layer.name].to(layer.weight.device).reshape(-1))])


@torch.no_grad()
def zero_removed(removed: list[tuple[torch.Tensor, torch.Tensor]], *, state: Mapping | None = None,
                 grads: bool = False, when: torch.Tensor | None = None) -> None:
    """Zero every ``(tensor, removed entries)`` pair: the tensors themselves and every optimizer
    ``state`` tensor shaped like them, or with ``grads`` their gradients; with ``when`` (a 0-d bool
    a capturable step computes on the device) only where it is set. The one loop that zeroes
    removed groups: :func:`apply_masks`, and GrowingReg at pruning and every step after."""
    for tensor, gone in removed:
        gone = gone if when is None else gone & when
        if grads:
            if tensor.grad is not None:
                tensor.grad.masked_fill_(gone, 0)
            continue
        tensor.masked_fill_(gone, 0)
        for value in (state or {}).get(tensor, {}).values():
            if isinstance(value, torch.Tensor) and value.shape == tensor.shape:
                value.masked_fill_(gone, 0)

