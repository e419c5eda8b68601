"""Shape ops: views, reshapes, slices, splits, concatenations and padding move the channel ids as
they move the values; a written split of the channel axis joins the channels it lines up."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe
from .registry import MOVEMENT, register
from .values import Val, move, op_name
from .walk import Walk


@register(*MOVEMENT, x=0)
def movement(a: Walk, node: fx.Node, args: dict, x: Val):
    name = op_name(node)
    ids, lost = move(node, name, x.ids), move(node, name, x.lost)
    if name in ("slice", "select", "narrow"):
        dim = args["dim"] % x.ids.dim()
        whole = name == "slice" and args["start"] in (None, 0) and args["step"] == 1 and (
            args["end"] is None or args["end"] >= x.ids.shape[dim])
        if a.varies(x.ids, dim) and not whole:
            return a.unsupported(node, f"{describe(node)} slices the channel axis at written positions, which "
                                       "cannot follow the pruned width")
    if name in ("view", "_unsafe_view", "reshape", "unflatten"):
        written = list(args["size"] if "size" in args else args.get("shape") or args.get("sizes") or ())
        if name == "unflatten":
            d = args["dim"] % x.ids.dim()
            written = list(x.ids.shape[:d]) + [-1 if s == -1 else s for s in written] + list(x.ids.shape[d + 1:])
        varying = [d for d in range(ids.dim()) if a.varies(ids, d)]
        literal = [d for d in varying if d < len(written) and isinstance(written[d], int) and written[d] != -1]
        if varying and len(literal) == len(varying):
            # export writes a size computed from the input's shape (``C // paths``) as a number: assume
            # the innermost channel axis follows the pruned width, and let plan() confirm it by trial
            sizes = [written[d] for d in literal]
            a.mark_speculative(ids, f"{describe(node)} reshapes the channel axis to the size "
                                    f"{sizes if len(sizes) > 1 else sizes[0]}, which the compacted model does not "
                                    "follow (a written size: write -1 there, or compute it from the shape)")
            literal = literal[:-1]
        if literal:
            for d in literal:  # a written split of the channel axis: keep it true after the cut
                a.join(ids, ids.narrow(d, 0, 1).expand_as(ids),
                       strict=f"{describe(node)} splits it with a written size beside channels that cannot be cut",
                       via=f"{describe(node)} (a written split of the channel axis)")
    return Val(ids.contiguous(), lost.contiguous(), x.sources, None)


@register("split", "split_with_sizes", "unbind", "chunk", x=0)
def split(a: Walk, node: fx.Node, args: dict, x: Val):
    pieces_ids = node.target(x.ids, *node.args[1:], **node.kwargs)
    pieces_lost = node.target(x.lost, *node.args[1:], **node.kwargs)
    dim = args.get("dim", 0) % x.ids.dim()
    if a.varies(x.ids, dim) and len(pieces_ids) > 1:
        if len({p.shape[dim] for p in pieces_ids}) != 1:
            return a.unsupported(node, f"{describe(node)} splits the channels at written sizes, which cannot "
                                       "follow the pruned width")
        if op_name(node) not in ("chunk", "unbind"):  # equal sizes, written or computed from the shape: confirmed by trial
            a.mark_speculative(x.ids, f"{describe(node)} splits the channels into pieces of the written size "
                                      f"{pieces_ids[0].shape[dim]}, which the compacted model does not follow")
        for p in pieces_ids[1:]:  # equal pieces must lose the same positions
            a.join(pieces_ids[0], p, strict=f"{describe(node)} splits it beside channels that cannot be cut",
                   via=f"{describe(node)} (equal pieces of a split)")
    return tuple(Val(i.contiguous(), lo.contiguous()) for i, lo in zip(pieces_ids, pieces_lost))


@register("cat", "concat", "stack")
def cat(a: Walk, node: fx.Node, args: dict):
    vals = []
    for item in args["tensors"]:
        v = a.val(item)
        vals.append(v if isinstance(v, Val) else a.none(item))
    if any(not isinstance(v, Val) for v in vals):
        return a.unsupported(node)
    fn = torch.stack if op_name(node) == "stack" else torch.cat
    return Val(fn([v.ids for v in vals], args["dim"]), fn([v.lost for v in vals], args["dim"]))


@register("pad", "constant_pad_nd", x=0)
def pad(a: Walk, node: fx.Node, args: dict, x: Val):
    pad, mode = args["pad"], args.get("mode", "constant")
    value = args.get("value")
    if not all(isinstance(p, int) for p in pad):
        return a.unsupported(node)
    ids, lost = x.ids, x.lost
    for k in range(len(pad) // 2):
        d, before, after = ids.dim() - 1 - k, pad[2 * k], pad[2 * k + 1]
        if before == after == 0:
            continue
        if a.varies(ids, d):
            if mode != "constant" or value not in (None, 0, 0.0) or before < 0 or after < 0:
                return a.unsupported(node)
            fixed = a.fresh(1)  # their number is written: what they line up with cannot shrink
            a.freeze(fixed, f"it lines up with the {before + after} zero channels that {describe(node)} adds, "
                            "whose number is fixed")
            parts = [ids.new_full(ids.shape[:d] + (n,) + ids.shape[d + 1:], int(fixed)) for n in (before, after)]
            ids = torch.cat([parts[0], ids, parts[1]], d)
            zeros = [lost.new_zeros(lost.shape[:d] + (n,) + lost.shape[d + 1:]) for n in (before, after)]
            lost = torch.cat([zeros[0], lost, zeros[1]], d)
        else:
            size = ids.shape[d] + before + after
            grow = ids.shape[:d] + (size,) + ids.shape[d + 1:]
            ids, lost = ids.narrow(d, 0, 1).expand(grow), lost.amax(d, keepdim=True).expand(grow)
            if mode != "constant" or value not in (None, 0, 0.0):
                pass  # reflect/replicate pad repeat the channel's own entries: zero stays zero
    return Val(ids.contiguous(), lost.contiguous())
