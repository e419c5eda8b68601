"""Arithmetic: residual adds and gating products join the channels they combine; ops that act on
each entry alone (tagged pointwise, or shown so) pass channels through when they keep 0 at 0."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe
from .registry import register, register_fallback
from .values import Val, broadcast, meta_shape, op_name, varies
from .walk import Walk


def binary(walk: Walk, node: fx.Node, a, b, kind: str):
    """``a (+ - * /) b`` (nodes, values or numbers): ``kind`` is "add" (add, sub), "mul" or "div"."""
    va, vb = (x if isinstance(x, Val) else walk.val(x) for x in (a, b))
    if not isinstance(va, Val) or not isinstance(vb, Val):  # a tensor with a number
        x, other, x_first = (va, b, True) if isinstance(va, Val) else (vb, a, False)
        if isinstance(other, fx.Node):
            return walk.unsupported(node)
        if kind == "mul" or (kind == "div" and x_first) or (kind == "add" and other == 0):
            return x
        if kind == "div":
            return walk.unsupported(node, f"{describe(node)} divides by the channels")
        return walk.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                         f"{describe(node)} combines the channels with the constant {other!r}, so a "
                         "removed channel would not be zero")
    shape = meta_shape(node.meta["val"])
    ai, bi = va.ids.expand(shape), vb.ids.expand(shape)
    if kind == "div" and bool((bi >= 0).any()):
        return walk.unsupported(node, f"{describe(node)} divides by channels")
    for v, other in ((va, bi), (vb, ai)):
        if not v.sources:
            continue
        # a parameter: a scalar or spatial one scales every channel alike (a product stays zero,
        # a sum does not); one along the channels (a bias, a layer scale) is cut with them
        if not any(not broadcast(v.ids, shape, d) and varies(other, d) for d in range(len(shape))):
            if kind == "add" and bool((other >= 0).any()):
                x = va if v is vb else vb
                return walk.lose(Val(other.contiguous(), x.lost.expand(shape).contiguous()),
                                 torch.ones(shape, dtype=torch.bool),
                                 f"{describe(node)} adds {sorted(v.sources)} alike to every channel, so a "
                                 "removed channel would not be zero")
        elif v.param in walk.shared:
            return walk.unsupported(node, walk.shared[v.param])
        elif not walk.param_member(v, other, "param", masked=kind == "add"):
            return walk.unsupported(node, f"{describe(node)} combines the channels with "
                                          f"{sorted(v.sources)} in a way greg_fast cannot cut along them")
    acts = [v for v in (va, vb) if not v.sources]
    if len(acts) == 1:
        x = acts[0]
        return Val(x.ids.expand(shape).contiguous(), x.lost.expand(shape).contiguous())
    # two activations: one broadcast over the other's channels must carry none of its own
    for v, o, oi in ((va, vb, bi), (vb, va, ai)):
        if any(broadcast(v.ids, shape, d) and varies(oi, d) for d in range(len(shape))):
            if bool((v.ids >= 0).any()):
                return walk.unsupported(node, f"{describe(node)} broadcasts channels over other channels")
            out = Val(oi.contiguous(), o.lost.expand(shape).contiguous())
            if kind != "add":  # a product or a quotient of a removed channel stays zero
                return out
            return walk.lose(out, torch.ones(shape, dtype=torch.bool),
                             f"{describe(node)} adds a tensor that is not a prunable channel, so a "
                             "removed channel would not be zero")
    walk.join(ai, bi, strict=f"{describe(node)} combines them with a tensor of the same width that "
                             "cannot be cut",
              via=f"{describe(node)} ({'a residual add' if kind == 'add' else 'a product: gating'})")
    al, bl = va.lost.expand(shape), vb.lost.expand(shape)
    ids = torch.where(ai >= 0, ai, bi)
    if kind == "add":
        lost = torch.where(al > 0, al, bl)
    else:  # a product is zero when either factor is
        zero = ((ai >= 0) & (al == 0)) | ((bi >= 0) & (bl == 0))
        lost = torch.where(zero, 0, torch.maximum(al, bl))
    return Val(ids.contiguous(), lost.to(torch.int32).contiguous())



@register("add", "add_", "sub", "sub_")
def add(a: Walk, node: fx.Node, args: dict):
    alpha = args.get("alpha")
    if isinstance(alpha, fx.Node):
        return a.unsupported(node)
    return binary(a, node, args["self"], args["other"], "add")


@register("rsub")
def rsub(a: Walk, node: fx.Node, args: dict):
    return binary(a, node, args["other"], args["self"], "add")


@register("mul", "mul_")
def mul(a: Walk, node: fx.Node, args: dict):
    return binary(a, node, args["self"], args["other"], "mul")


@register("div", "div_")
def div(a: Walk, node: fx.Node, args: dict):
    if args.get("rounding_mode") is not None:
        return a.unsupported(node)
    return binary(a, node, args["self"], args["other"], "div")


@register("addcmul", "addcmul_")
def addcmul(a: Walk, node: fx.Node, args: dict):
    """``self + value * t1 * t2`` (a layer scale and bias in one op, ConvNeXt-V2's GRN)."""
    if args.get("value", 1) != 1:
        return a.unsupported(node)
    product = binary(a, node, args["tensor1"], args["tensor2"], "mul")
    if not isinstance(product, Val):
        return product
    return binary(a, node, args["self"], product, "add")


@register("new_zeros", "new_ones", "new_empty", "new_full", "new_empty_strided")
def new_tensor(a: Walk, node: fx.Node, args: dict):
    """A tensor of written size that reads only its input's dtype and device: no channels."""
    return a.none(node)


@register("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", x=0)
def like(a: Walk, node: fx.Node, args: dict, x: Val):
    """A tensor of its input's shape: the same channels (its width follows the cut); zeros stay zero."""
    if op_name(node) == "zeros_like":
        return Val(x.ids, torch.zeros_like(x.lost))
    return a.lose(x, torch.ones_like(x.ids, dtype=torch.bool), f"{describe(node)} fills the channels with values "
                                                               "that are not zero")


_ELEMENTWISE_SEEN: dict = {}


def elementwise(node: fx.Node) -> bool:
    """Whether the op acts on each entry of its first argument alone. Tagged pointwise, or (an op the
    tags miss, such as ``hardswish``) of one tensor and numbers and shown so: it commutes with a
    random shuffle of the entries of a random input of the same rank."""
    if torch.Tag.pointwise in node.target.tags:
        return True
    first, others = (node.args[0] if node.args else None), []
    fx.node.map_arg((node.args[1:], node.kwargs), others.append)
    if others or not isinstance(first, fx.Node) or not isinstance(first.meta.get("val"), torch.Tensor) \
            or meta_shape(first.meta["val"]) != meta_shape(node.meta.get("val")):
        return False
    key = (node.target, repr((node.args[1:], node.kwargs)), first.meta["val"].dim(), first.meta["val"].dtype)
    if key not in _ELEMENTWISE_SEEN:
        g = torch.Generator().manual_seed(0)
        try:  # a dtype randn cannot draw (bool, integers) makes it raise too: not shown elementwise
            x = torch.randn((3,) * first.meta["val"].dim(), generator=g, dtype=first.meta["val"].dtype) * 4
            shuffle = torch.randperm(x.numel(), generator=g)
            with torch.no_grad():
                a = node.target(x.reshape(-1)[shuffle].reshape(x.shape).clone(), *node.args[1:], **node.kwargs)
                b = node.target(x.clone(), *node.args[1:], **node.kwargs)
            _ELEMENTWISE_SEEN[key] = isinstance(a, torch.Tensor) and a.shape == x.shape and bool(
                torch.equal(a, b.reshape(-1)[shuffle].reshape(x.shape)))
        except Exception:
            _ELEMENTWISE_SEEN[key] = False
    return _ELEMENTWISE_SEEN[key]


@register_fallback(elementwise)
def pointwise(a: Walk, node: fx.Node, args: dict):
    """An elementwise op of one activation (and numbers or per-channel parameters): judged at 0,
    with the parameters' real values."""
    x = a.val(node.args[0]) if node.args else None
    acts = [v for v in a.tensors_in((node.args, node.kwargs)) if not v.sources]
    if len(acts) != 1 or x is not acts[0]:
        return a.unsupported(node)
    call_args = []
    for arg in node.args[1:]:
        v = a.val(arg)
        if isinstance(v, Val):  # a parameter (PReLU's slopes): cut with the channels
            if v.param is None or not a.param_member(v, x.ids, "param", False):
                return a.unsupported(node)
            arg = a.values[v.param].detach().reshape(-1)[v.pos]
        elif isinstance(arg, fx.Node):
            return a.unsupported(node)
        call_args.append(arg)
    kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
    per_entry = any(isinstance(arg, torch.Tensor) for arg in call_args)
    zeros = torch.zeros(x.ids.shape if per_entry else (1,) * x.ids.dim(), dtype=node.args[0].meta["val"].dtype)
    try:
        with torch.no_grad():
            out = node.target(zeros, *call_args, **kwargs)
    except Exception:
        return a.unsupported(node)
    if isinstance(out, torch.Tensor) and bool((out == 0).all()):
        return x
    return a.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                     f"{describe(node)} maps 0 to a non-zero value, so a removed channel would still "
                     "reach the consumer")

