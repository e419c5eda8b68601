"""Attention, fused (``scaled_dot_product_attention``) or written out (``q @ k.T``, softmax, ``@ v``),
from whatever projections a module computes it with: found from the ops, not from module classes.

Queries and keys are contracted over the head size: a query dim and the key dim it meets are one
channel (the same dims leave both, so the scores do not change). Values' dims pass through to the
output, and from there to the output projection's columns. A removed channel is zero in the masked
model, so it adds nothing to a score; the fused op's softmax scale, which it derives from the head
size, is kept at the original one after compaction (:mod:`greg_fast.exact`).
"""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe
from .registry import register
from .values import Val, line, meta_shape
from .walk import Walk


def _per_token(v: Val, axis: int) -> torch.Tensor | None:
    """``v``'s ids with the token ``axis`` kept at size 1, when every token holds the same channels."""
    first = v.ids.narrow(axis, 0, 1)
    return first if bool((v.ids == first).all()) else None


def _contract(a: Walk, node: fx.Node, left: Val, right: Val, left_line: torch.Tensor, right_line: torch.Tensor) -> None:
    """The channels met in a contraction: each on the left goes with the one it meets on the right."""
    a.consume(left)
    a.consume(right)
    a.join(left_line, right_line, strict=f"{describe(node)} contracts channels with entries that cannot be cut",
           via=f"{describe(node)} (attention: a query dim goes with the key dim it meets)")


def _through(v: Val, ids: torch.Tensor, axis: int, shape: tuple) -> Val:
    """The output of a product over ``v``'s token ``axis``: ``v``'s channels, the same for every row."""
    return Val(ids.expand(shape).contiguous(), v.lost.amax(axis, keepdim=True).expand(shape).contiguous())


@register("scaled_dot_product_attention", x="query", activation=True)
def attention(a: Walk, node: fx.Node, args: dict, q: Val):
    k, v = a.val(args["key"]), a.val(args["value"])
    mask = a.val(args.get("attn_mask"))
    if not isinstance(k, Val) or not isinstance(v, Val) or k.sources or v.sources or args.get("enable_gqa"):
        return a.unsupported(node)
    if isinstance(mask, Val) and bool((mask.ids >= 0).any()):
        return a.unsupported(node, f"{describe(node)} takes its mask from the channels")
    lines = [_per_token(x, x.ids.dim() - 2) for x in (q, k, v)]
    if any(t is None for t in lines) or lines[0].shape != lines[1].shape:
        return a.unsupported(node, f"{describe(node)} reads channels that differ from token to token")
    _contract(a, node, q, k, lines[0], lines[1])
    if a.heads == "whole" and lines[0].dim() >= 3 and lines[0].shape[:-1] == lines[2].shape[:-1]:
        # a head's queries and keys weight that head's values: whole heads take all three (separate
        # projections whose head count nothing stores would otherwise lose different heads)
        first = lambda t: t.narrow(-1, 0, 1).narrow(-2, 0, 1)  # noqa: E731  (a head's first dim stands for it)
        a.join(first(lines[0]), first(lines[2]), strict=f"{describe(node)} pairs heads with values that cannot be cut",
               via=f"{describe(node)} (whole heads: a head's queries, keys and values go together)")
    if args.get("scale") is None and a.heads == "dims":  # derived from the head size: keep the original
        # after the cut (whole heads keep their size; head 0's dims stand for every head's)
        a.count(node, "scaled_dot_product_attention", q.ids.dim() - 1, line(lines[0], q.ids.dim() - 1))
    return _through(v, lines[2], v.ids.dim() - 2, meta_shape(node.meta["val"]))


@register("matmul", "bmm")
def matmul(a: Walk, node: fx.Node, args: dict):
    """A product of two activations (``q @ k.transpose(-2, -1)``, ``attn @ v``): channels on the
    contracted axis go with what they meet and leave no channel in the product; channels on the
    left's rows or the right's columns pass through when the other operand holds none."""
    left, right = a.val(args["self"]), a.val(args["other"] if "other" in args else args["mat2"])
    if not isinstance(left, Val) or not isinstance(right, Val) or left.sources or right.sources \
            or left.ids.dim() < 2 or right.ids.dim() < 2:
        return a.unsupported(node)  # a parameter's product is a layer, which greg_fast reads as linear/conv
    shape = meta_shape(node.meta["val"])
    has = [bool((x.ids >= 0).any()) for x in (left, right)]
    left_k, right_k = _per_token(left, left.ids.dim() - 2), _per_token(right, right.ids.dim() - 1)
    if all(has) and left_k is not None and right_k is not None:  # channels on the contracted axis
        _contract(a, node, left, right, left_k, right_k.transpose(-1, -2))
        return a.none(node)
    if has == [False, True] and (cols := _per_token(right, right.ids.dim() - 2)) is not None:
        return _through(right, cols, right.ids.dim() - 2, shape)
    if has == [True, False] and (rows := _per_token(left, left.ids.dim() - 1)) is not None:
        return _through(left, rows, left.ids.dim() - 1, shape)
    if not any(has):
        return a.none(node)
    return a.unsupported(node, f"{describe(node)} multiplies channels in a way greg_fast does not follow")
