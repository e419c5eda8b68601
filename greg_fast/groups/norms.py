"""Norms: per-channel ones (BatchNorm, InstanceNorm) cut their weight, bias and statistics with each
channel; those whose statistics span the channels (LayerNorm, GroupNorm) keep the original count."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe, module_path
from .registry import register
from .values import Val, along
from .walk import Walk


def channelwise_norm(a: Walk, node: fx.Node, x: Val, tensors: list, what: str) -> Val:
    """A norm with per-channel statistics on axis 1 (BatchNorm, InstanceNorm): weight, bias and
    statistics go with each channel."""
    ids = along(x.ids, 1) if x.ids.dim() > 1 else None
    if ids is None:
        return a.unsupported(node, f"{describe(node)} does not normalize over the channels' axis")
    present = [(a.val(t), masked) for t, masked in tensors if isinstance(a.val(t), Val)]
    for v, masked in present:
        if v.param in a.shared:
            return a.unsupported(node, a.shared[v.param])
        if not a.param_member(v, ids, "norm", masked):
            return a.unsupported(node, f"{describe(node)} reads '{sorted(v.sources)}' in a way greg_fast "
                                          "cannot cut along the channels")
    if not present and bool((ids >= 0).any()):  # no tensor: only its width follows
        a.member(module_path(node), "", 0, "norm", False, ids)
    return Val(x.ids, x.lost)  # a removed channel: its weight and bias are zeroed, so 0 again



@register("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training", "native_batch_norm", x="input")
def batch_norm(a: Walk, node: fx.Node, args: dict, x: Val):
    out = channelwise_norm(a, node, x, [(args["weight"], True), (args["bias"], True),
                                       (args.get("running_mean"), True), (args.get("running_var"), False)],
                             "normalizes")
    meta = node.meta["val"]
    return (out,) + a.none_like(meta)[1:] if isinstance(meta, (tuple, list)) else out


def normalized_together(a: Walk, node: fx.Node, args: dict, x: Val, axis: int, op: str):
    """A norm whose statistics span the channels along ``axis`` (LayerNorm, GroupNorm): exact with
    the original count (:mod:`greg_fast.exact`), since a removed channel is a zero in the masked
    model's statistics; its weight and bias go with the channels and zero a removed one's output."""
    ids = along(x.ids, axis)
    a.consume(x)  # its statistics read every entry: a removed channel must be exactly zero there
    a.count(node, op, axis, ids)
    tensors = [a.val(args[t]) for t in ("weight", "bias") if isinstance(a.val(args[t]), Val)]
    for v in tensors:
        if not a.param_member(v, ids, "norm", True):
            return a.unsupported(node)
    if not tensors:
        return a.unsupported(node, f"{describe(node)} has no weight or bias to zero a removed channel with")
    return Val(x.ids, torch.zeros_like(x.lost))


@register("layer_norm", x="input")
def layer_norm(a: Walk, node: fx.Node, args: dict, x: Val):
    """LayerNorm over the last axis: over the channels, exact with the original count."""
    if len(args["normalized_shape"]) != 1:
        return a.unsupported(node, f"{describe(node)} normalizes channels together over several axes")
    ids = along(x.ids, x.ids.dim() - 1)
    if ids is None:
        return a.unsupported(node, f"{describe(node)} normalizes channels that differ along other axes")
    if not bool((ids >= 0).any()):
        return a.none(node)  # no prunable channel in what it normalizes
    return normalized_together(a, node, args, x, x.ids.dim() - 1, "layer_norm")


@register("group_norm", x="input")
def group_norm(a: Walk, node: fx.Node, args: dict, x: Val):
    """GroupNorm over the channels (axis 1): exact with the original count per group; each group
    must keep as many channels as the others, so the same position in every group goes together
    (as in a grouped conv)."""
    groups = args["num_groups"]
    ids = along(x.ids, 1) if x.ids.dim() > 1 else None
    if ids is None or isinstance(groups, fx.Node) or ids.numel() % groups:
        return a.unsupported(node, f"{describe(node)} does not normalize over the channels' axis")
    if not bool((ids >= 0).any()):
        return a.none(node)
    by_group = ids.view(groups, -1)
    a.join(by_group, by_group[:1].expand_as(by_group),
           strict=f"{describe(node)} normalizes channels in groups beside entries that cannot be cut",
           via=f"{describe(node)} (GroupNorm, {groups} groups: the same position in every group goes together)")
    return normalized_together(a, node, args, x, 1, "group_norm")


@register("native_group_norm", "_weight_norm", "_weight_norm_interface")
def other_norms(a: Walk, node: fx.Node, args: dict):
    return a.unsupported(node, f"{describe(node)} normalizes channels together: removing one would change the others")
