"""Conv and linear layers: their filters are the channels every group is made of; the channels they
read become their weight's input columns (grouped and depthwise convs tie them)."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe
from .registry import register
from .values import NONE, Val, along, meta_shape
from .walk import Walk


def param_val(a: Walk, name: str) -> Val:
    t = a.values[name]
    return Val(torch.full(t.shape, NONE), torch.zeros(t.shape, dtype=torch.int32), frozenset([name]),
                torch.arange(t.numel()).view(t.shape))


def whole(a: Walk, v: Val) -> bool:
    """``v`` is its parameter itself, entry for entry."""
    t = a.values[v.param]
    return tuple(v.pos.shape) == tuple(t.shape) and bool((v.pos.reshape(-1) == torch.arange(t.numel())).all())


def producer_output(a: Walk, node: fx.Node, weight: Val, bias, out_ids: torch.Tensor, axis: int) -> Val:
    """The value a conv/linear writes: its channels ``out_ids`` on ``axis``, recorded as its
    filter rows and bias."""
    shape = meta_shape(node.meta["val"])
    n = out_ids.numel()
    rows_of = [(weight, "filter")] + [(v, "bias") for v in (a.val(bias),) if isinstance(v, Val)]
    std = weight.param is None  # computed from parameters: weight standardization
    if std:
        rows_of = [(param_val(a, s), "filter" if a.values[s].shape == weight.ids.shape else "param")
                   for s in sorted(weight.sources) if a.values[s].dim() and a.values[s].shape[0] == n]
        rows_of += [(v, "bias") for v in (a.val(bias),) if isinstance(v, Val)]
    for v, role in rows_of:
        name = v.param
        t = a.values[name] if name else None
        if name is None or name in a.shared or t.shape[0] != n:
            a.freeze(out_ids, a.shared.get(name) or f"{describe(node)} reads a {role} tensor that "
                                                         "greg_fast cannot cut along its filters")
            continue
        module, _, tensor = name.rpartition(".")
        a.member(module, tensor, 0, role, True, out_ids)
    if std and not any(role == "filter" for _, role in rows_of):
        a.freeze(out_ids, f"{describe(node)} computes its weight from parameters in a way greg_fast "
                             "cannot cut along its filters")
    view = [1] * len(shape)
    view[axis] = n
    return Val(out_ids.view(view).expand(shape).clone(), torch.zeros(shape, dtype=torch.int32))


def layer(a: Walk, node: fx.Node, x: Val, weight, bias, axis: int, groups: int = 1) -> Val:
    """A conv (channels on ``axis``) or linear (the last axis) reading ``x`` with ``weight``."""
    w = a.val(weight)
    if not isinstance(w, Val) or not w.sources:
        a.unsupported(node, f"{describe(node)} takes its weight from the activations")
        return a.none(node)
    shape = w.ids.shape
    n_out, per_group = shape[0], shape[1]
    if w.param is not None and not whole(a, w):
        w = Val(w.ids, w.lost, w.sources)  # a view that reorders a parameter: treated as computed
    in_ids = along(x.ids, axis) if x.ids.dim() > axis else None
    a.layers.update(dict.fromkeys(s.rpartition(".")[0] for s in sorted(w.sources)[:1]))
    if in_ids is None:
        a.freeze(x.ids, f"{describe(node)} does not read the channels as its input channels")
        return producer_output(a, node, w, bias, a.fresh(n_out), axis)
    mult = n_out // groups
    if groups > 1 and per_group == 1:
        # depthwise: each input channel has its own `mult` filters, which go with it (zeroed with
        # it, they make its output exactly zero whatever the input holds); `groups` follows the
        # input's width, so an input channel that cannot be cut freezes its filters
        out_ids = a.fresh(n_out)
        a.join(out_ids, in_ids.repeat_interleave(mult),
                  strict=f"{describe(node)} is depthwise over channels that cannot be cut",
                  via=f"{describe(node)} (a depthwise conv: its filters go with their input channel)")
        return producer_output(a, node, w, bias, out_ids, axis)
    a.consume(x)
    sources = [w] if w.param is not None else [param_val(a, s) for s in sorted(w.sources)
                                   if a.values[s].shape == w.ids.shape]
    if not sources:
        a.freeze(in_ids, f"{describe(node)} computes its weight in a way greg_fast cannot cut along "
                            "its input channels")
    for src in sources:
        name = src.param
        if name in a.shared:
            a.freeze(in_ids, a.shared[name])
        module, _, tensor = name.rpartition(".")
        if groups == 1:
            a.member(module, tensor, 1, "input", False, in_ids)
        else:
            # grouped: the same input position in every conv group goes together
            by_group = in_ids.view(groups, per_group)
            a.join(by_group, by_group[:1].expand_as(by_group),
                      strict=f"{describe(node)} (groups={groups}) reads it beside channels that cannot be cut",
                      via=f"{describe(node)} (a grouped conv, groups={groups}: the same position in every "
                          "conv group goes together)")
            a.member(module, tensor, 1, "input", False, by_group[0])
    if w.param is None:  # weight standardization spans the input channels
        a.mark_approximate(in_ids, f"{describe(node)} standardizes its weight over its input channels: "
                                      "the compacted conv standardizes over the kept ones only")
    out_ids = a.fresh(n_out) if groups == 1 else a.fresh(mult).repeat(groups)
    return producer_output(a, node, w, bias, out_ids, axis)


@register("conv1d", "conv2d", "conv3d", "convolution", "_convolution", x="input", activation=True)
def conv(a: Walk, node: fx.Node, args: dict, x: Val):
    if args.get("transposed"):
        return a.unsupported(node, f"{describe(node)} is a transposed conv, which greg_fast does not cut")
    w = a.val(args["weight"])
    k = w.ids.dim() - 2 if isinstance(w, Val) else 0
    return layer(a, node, x, args["weight"], args["bias"], x.ids.dim() - k - 1, args["groups"])

@register("linear", x="input", activation=True)
def linear(a: Walk, node: fx.Node, args: dict, x: Val):
    return layer(a, node, x, args["weight"], args["bias"], x.ids.dim() - 1)
