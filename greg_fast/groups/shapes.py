"""Shape ops: views, reshapes, slices, splits, concatenations and padding move the channel ids as
they move the values; a written split of the channel axis joins the channels it lines up."""
from __future__ import annotations

import torch
import torch.fx as fx

from ..capture import describe, module_path
from .registry import MOVEMENT, register
from .stored import bound_source
from .values import Val, line, move, op_name
from .walk import Walk


@register(*MOVEMENT, x=0)
def movement(a: Walk, node: fx.Node, args: dict, x: Val):
    name = op_name(node)
    ids, lost = move(node, name, x.ids), move(node, name, x.lost)
    if name in ("slice", "select", "narrow"):
        dim = args["dim"] % x.ids.dim()
        whole = name == "slice" and args["start"] in (None, 0) and args["step"] == 1 and (
            args["end"] is None or args["end"] >= x.ids.shape[dim])
        if a.varies(x.ids, dim) and not whole and not _stored_bound(a, node, args, x, dim):
            return a.unsupported(node, f"{describe(node)} slices the channel axis at written positions, which "
                                       "cannot follow the pruned width")
    if name in ("view", "_unsafe_view", "reshape", "unflatten"):
        written = list(args["size"] if "size" in args else args.get("shape") or args.get("sizes") or ())
        if name == "unflatten":
            d = args["dim"] % x.ids.dim()
            written = list(x.ids.shape[:d]) + [-1 if s == -1 else s for s in written] + list(x.ids.shape[d + 1:])
        varying = [d for d in range(ids.dim()) if a.varies(ids, d)]
        literal = [d for d in varying if d < len(written) and isinstance(written[d], int) and written[d] != -1]
        inferred = [d for d in varying if d < len(written) and written[d] == -1]
        if a.heads == "whole" and len(varying) > 1 and _whole_heads(a, node, ids, written, varying, literal, inferred):
            return Val(ids.contiguous(), lost.contiguous(), x.sources, None)
        if (len(inferred) == 1 and literal and literal[-1] == varying[-1] and len(literal) + 1 == len(varying)
                and a.stored_width(node, varying[-1], line(ids, varying[-1]), written, varying[-1], probe=True)):
            # ``view(B, N, -1, self.head_dim)``: the inferred axis (heads) keeps its count only if every
            # head loses the same dims, as where it is written; the stored inner size follows the cut
            literal = sorted(literal + inferred)
        if varying and len(literal) == len(varying):
            # export writes a size computed from the input's shape (``C // paths``) as a number: assume
            # the innermost channel axis follows the pruned width, and let plan() confirm it by trial
            inner = literal[-1]
            held = a.stored_width(node, inner, line(ids, inner), written, inner)
            a.mark_speculative(ids, f"{describe(node)} reshapes the channel axis to the size {written[inner]}, " + (
                f"which it reads from `{module_path(node)}.{held}`, updated by the cut" if held else
                f"which no attribute of `{module_path(node)}` holds, and which the compacted model may not follow "
                "(a written size: write -1 there, or compute it from the shape)"))
            literal = literal[:-1]
        if literal:
            for d in literal:  # a written split of the channel axis: keep it true after the cut
                a.join(ids, ids.narrow(d, 0, 1).expand_as(ids),
                       strict=f"{describe(node)} splits it with a written size beside channels that cannot be cut",
                       via=f"{describe(node)} (a written split of the channel axis)")
    return Val(ids.contiguous(), lost.contiguous(), x.sources, None)


def _stored_bound(a: Walk, node: fx.Node, args: dict, x: Val, dim: int) -> bool:
    """``x[:, :self.d]`` or ``x[:, self.d:]``: a slice of the channels at a point an attribute holds,
    which the cut moves to the number of kept channels before it."""
    start, end, size = args.get("start") or 0, args.get("end"), x.ids.shape[dim]
    end = size if end is None or end >= size else end
    if op_name(node) != "slice" or args.get("step", 1) != 1 or (start != 0) == (end != size):
        return False  # one bound at the edge, the other inside
    point = end if start == 0 else start
    spec = bound_source(a.model.get_submodule(module_path(node)), node, point)
    if spec is None:
        return False
    a.member(module_path(node), "", dim, "width", False, line(x.ids.narrow(dim, 0, point), dim), op=spec, width=point)
    a.mark_speculative(x.ids, f"{describe(node)} slices the channels at {point}, read from "
                              f"`{module_path(node)}.{spec}`, updated by the cut")
    return True


def _whole_heads(a: Walk, node: fx.Node, ids: torch.Tensor, written: list, varying: list, literal: list,
                 inferred: list) -> bool:
    """``heads="whole"``: a reshape that splits the channels into heads (``(B, N, 3, num_heads,
    head_dim)``) lets its outermost axis whose size an attribute gives follow the cut, or the one it
    infers (``(B, N, -1, head_dim)``), and joins the channels along every other axis (a head's q, k, v
    and dims go together). False where no axis's size comes from an attribute or is inferred."""
    if len(inferred) == 1 and inferred[0] != varying[-1]:
        heads = inferred[0]
        a.mark_speculative(ids, f"{describe(node)} reshapes the channels into heads whose count it infers (-1), "
                                "which follows the cut")
    else:
        heads = next((d for d in literal if a.stored_width(node, d, line(ids, d), written, d, probe=True)), None)
        if heads is None:
            return False
        held = a.stored_width(node, heads, line(ids, heads), written, heads)
        a.mark_speculative(ids, f"{describe(node)} reshapes the channels into {written[heads]} heads, read from "
                                f"`{module_path(node)}.{held}`, updated by the cut")
    for d in varying:
        if d != heads:
            a.join(ids, ids.narrow(d, 0, 1).expand_as(ids),
                   strict=f"{describe(node)} splits it into heads beside channels that cannot be cut",
                   via=f"{describe(node)} (a head's channels go together)")
    return True


@register("roll", x=0)
def roll(a: Walk, node: fx.Node, args: dict, x: Val):
    """A shift along token or spatial axes (Swin's shifted windows) moves the entries with their
    channels; along the channels, a written shift would line up other channels after the cut."""
    dims = args.get("dims") or []
    if not dims or any(a.varies(x.ids, d % x.ids.dim()) for d in dims):
        return a.unsupported(node, f"{describe(node)} rolls the channel axis by a written shift")
    return Val(node.target(x.ids, *node.args[1:], **node.kwargs), node.target(x.lost, *node.args[1:], **node.kwargs))


@register("split", "split_with_sizes", "unbind", "chunk", x=0)
def split(a: Walk, node: fx.Node, args: dict, x: Val):
    pieces_ids = node.target(x.ids, *node.args[1:], **node.kwargs)
    pieces_lost = node.target(x.lost, *node.args[1:], **node.kwargs)
    dim = args.get("dim", 0) % x.ids.dim()
    if a.varies(x.ids, dim) and len(pieces_ids) > 1:
        if len({p.shape[dim] for p in pieces_ids}) != 1:
            return _split_at_stored_sizes(a, node, x, dim, pieces_ids, pieces_lost)
        if op_name(node) not in ("chunk", "unbind"):  # equal sizes, written or computed from the shape: confirmed by trial
            held = _stored_sizes(a, node, dim, pieces_ids)
            a.mark_speculative(x.ids, f"{describe(node)} splits the channels into pieces of the written size "
                                      f"{pieces_ids[0].shape[dim]}, " + (
                                          f"read from `{module_path(node)}.{held}`, updated by the cut" if held else
                                          "which the compacted model may not follow"))
        for p in pieces_ids[1:]:  # equal pieces must lose the same positions
            a.join(pieces_ids[0], p, strict=f"{describe(node)} splits it beside channels that cannot be cut",
                   via=f"{describe(node)} (equal pieces of a split)")
    return tuple(Val(i.contiguous(), lo.contiguous()) for i, lo in zip(pieces_ids, pieces_lost))


def _stream_parameters(a: Walk, vals: list[Val], dim: int) -> list[Val]:
    """A parameter concatenated into a stream along another axis than the channels' (ViT's class
    token, beside the patch tokens): cut with the stream's channels, zeroed at a removed one."""
    acts = [v for v in vals if not v.sources and bool((v.ids >= 0).any())]
    if not acts or a.varies(acts[0].ids, dim):
        return vals
    stream = acts[0].ids.narrow(dim, 0, 1)
    out = []
    for v in vals:
        ids = stream.expand(v.ids.shape) if v.sources and v.pos is not None else None
        if ids is not None and a.param_member(v, ids, "param", True):
            v = Val(ids.contiguous(), torch.zeros_like(v.lost))
        out.append(v)
    return out


def _stored_sizes(a: Walk, node: fx.Node, dim: int, pieces_ids) -> str | None:
    """Record where each piece's written size comes from (an attribute the cut updates); the first
    attribute, or None when some piece's size comes from none."""
    written, found = [p.shape[dim] for p in pieces_ids], []
    for i, p in enumerate(pieces_ids):
        ids = line(p, dim)
        if bool((ids >= 0).any()):
            found.append(a.stored_width(node, dim, ids, written, i))
    return found[0] if found and all(found) else None


def _split_at_stored_sizes(a: Walk, node: fx.Node, x: Val, dim: int, pieces_ids, pieces_lost):
    """Pieces of written, unequal sizes (LeViT's ``split([key_dim, key_dim, val_dim])``): each size
    must come from an attribute of the module, which the cut updates (pieces read from one
    attribute lose the same positions); else the channels cannot follow."""
    written = [p.shape[dim] for p in pieces_ids]
    if _stored_sizes(a, node, dim, pieces_ids) is None:
        return a.unsupported(node, f"{describe(node)} splits the channels at the written sizes {written}, which "
                                   f"not every piece reads from an attribute of `{module_path(node)}`: the pieces "
                                   "cannot follow the pruned width")
    a.mark_speculative(x.ids, f"{describe(node)} splits the channels at sizes {written} read from attributes of "
                              f"`{module_path(node)}`, updated by the cut")
    return tuple(Val(i.contiguous(), lo.contiguous()) for i, lo in zip(pieces_ids, pieces_lost))


@register("cat", "concat", "stack")
def cat(a: Walk, node: fx.Node, args: dict):
    vals = []
    for item in args["tensors"]:
        v = a.val(item)
        vals.append(v if isinstance(v, Val) else a.none(item))
    if any(not isinstance(v, Val) for v in vals):
        return a.unsupported(node)
    if op_name(node) != "stack":
        vals = _stream_parameters(a, vals, args["dim"] % vals[0].ids.dim())
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
