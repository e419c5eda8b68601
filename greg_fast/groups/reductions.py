"""Reductions, pooling, interpolation and softmax: fine over axes the channels do not vary along;
over the channels a sum is exact, a mean exact with the original count (over the channels alone; else
approximate), the rest unsupported."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe
from .registry import register
from .values import Val, along, meta_shape, op_name
from .walk import Walk

_ZERO_OF_ZEROS = {"mean", "sum", "amax", "amin", "max", "min", "linalg_vector_norm", "norm", "std", "var"}


def per_channel(a: Walk, node: fx.Node, x: Val, dims: list[int], what: str, shape: tuple | None = None):
    """An op over ``dims`` that keeps the channels (pooling, interpolation, a reduction) and gives
    ``shape`` (the node's): fine unless channels vary along them."""
    if any(a.varies(x.ids, d) for d in dims):
        return a.unsupported(node, f"{describe(node)} {what} over the channel axis")
    shape = shape or meta_shape(node.meta["val"])
    ids, lost = x.ids, x.lost
    for d in dims:
        ids, lost = ids.narrow(d, 0, 1), lost.amax(d, keepdim=True)
    if len(shape) < ids.dim():  # reduced without keepdim
        ids, lost = ids.reshape(shape), lost.reshape(shape)
    return Val(ids.expand(shape).contiguous(), lost.expand(shape).contiguous())



@register("mean", "sum", "amax", "amin", "linalg_vector_norm", "norm", "std", "var", "var_mean", "std_mean",
          "max", "min", "logsumexp", x=0)
def reduce(a: Walk, node: fx.Node, args: dict, x: Val):
    dims = args.get("dim")
    if isinstance(dims, fx.Node):
        return a.unsupported(node)
    if isinstance(dims, int):
        dims = [dims]
    dims = list(range(x.ids.dim())) if not dims else sorted({d % x.ids.dim() for d in dims})
    name = op_name(node)
    meta = node.meta["val"]
    if name in ("max", "min", "var_mean", "std_mean") and not isinstance(meta, (tuple, list)):
        return a.unsupported(node)
    channels = [d for d in dims if a.varies(x.ids, d)]
    if channels and name in _ZERO_OF_ZEROS and any(a.varies(x.ids, d) for d in range(x.ids.dim()) if d not in dims):
        # the channels are on a kept axis too: a sum of tensors of channels (SK-Net's branches), whose
        # slices go together as an add's operands do
        for d in channels:
            a.join(x.ids, x.ids.narrow(d, 0, 1).expand_as(x.ids),
                   strict=f"{describe(node)} sums channels together with entries that cannot be cut",
                   via=f"{describe(node)} (a sum of branches)")
        channels = []
    if channels:
        exact = name in ("sum", "linalg_vector_norm", "norm")  # a zero adds nothing
        if exact:
            a.consume(x)
            return a.none(node)
        line = along(x.ids, channels[0]) if name == "mean" and dims == channels == [channels[0]] else None
        if line is not None:  # a mean over the channels alone (ConvNeXt-V2's GRN): exact with the original count
            a.consume(x)
            a.count(node, "mean", channels[0], line)
            return a.none(node)
        if name in ("mean", "var", "std"):
            a.mark_approximate(x.ids, f"{describe(node)} averages over the channels: the compacted model "
                                      "averages over the kept ones only")
            a.consume(x)
            return a.none(node)
        return a.unsupported(node, f"{describe(node)} reduces over the channel axis")
    if not isinstance(meta, (tuple, list)):
        return per_channel(a, node, x, dims, "reduces")
    first = per_channel(a, node, x, dims, "reduces", meta_shape(meta[0]))
    if name in ("max", "min"):  # values and indices
        return first, a.none(node)[1]
    return first, per_channel(a, node, x, dims, "reduces", meta_shape(meta[1]))  # var (std) and mean


@register("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
      "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
      "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "upsample_nearest1d",
      "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
      "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
      "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", x=0)
def spatial(a: Walk, node: fx.Node, args: dict, x: Val):
    """Pooling and interpolation over the trailing 1-3 axes (by the op's name)."""
    name = op_name(node)
    n = int(next(c for c in reversed(name) if c.isdigit()))
    dims = list(range(x.ids.dim() - n, x.ids.dim()))
    meta = node.meta["val"]
    if isinstance(meta, (tuple, list)):  # values and indices
        return per_channel(a, node, x, dims, "pools", meta_shape(meta[0])), a.none(node)[1]
    return per_channel(a, node, x, dims, "pools")


@register("softmax", "_softmax", "log_softmax", "_log_softmax", x=0)
def softmax(a: Walk, node: fx.Node, args: dict, x: Val):
    dim = args["dim"] % x.ids.dim()
    if a.varies(x.ids, dim):
        return a.unsupported(node, f"{describe(node)} normalizes over the channels")
    return a.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                  f"{describe(node)} maps a removed channel's zeros to 1/n, so it would still reach the consumer")
