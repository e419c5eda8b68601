"""Coupled channel groups: every slice of every tensor that must go when one channel goes.

The fx graph is run abstractly: every tensor gets an integer tensor of its own shape saying which
*element* (one output channel of one producer) each entry belongs to, and a second one saying
whether that entry is still exactly zero in the masked model once its element is removed. Ops act
on these the way they act on values (reshape, permute, cat, chunk and slicing are applied to the
id tensor itself), and three rules couple elements:

- add/sub/mul (residuals, squeeze-and-excitation gating ``x * s``) join the elements they combine;
- a grouped conv joins the input channels at the same place in every conv group (each conv group
  then keeps the same channels: the cut weight stays ``[out, in / groups, k]``), and a depthwise
  conv joins each input channel with its output channels;
- a reshape that splits the channel axis with a written size (channel shuffle's ``view(b, 2, -1, ...)``)
  joins the channels that differ only along that axis, so the written size stays true.

Joined elements form a component; components that touch the same tensors form a group (``plan``'s
unit). A component is frozen, with a reason, when a removed channel would still change the output:
it reaches the model output, feeds an op that is not understood, passes an op that maps 0 elsewhere
before a consumer, is normalized together with other channels by a GroupNorm, is sliced or split
with written sizes, or lines up with F.pad's fixed zero channels. Channels a LayerNorm normalizes
together are marked *approximate* instead (the cut model normalizes over fewer channels than the
masked one): only ``plan(..., approximate=True)`` cuts them.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from .graph import (LAYER_TYPES, NORM_TYPES, _ELEMENTWISE, _ELEMENTWISE_FUNCTIONS, _ELEMENTWISE_METHODS,
                    _POOL_FUNCTIONS, _POOLS, _REDUCTIONS, _maps_zero_to_zero, _shape_args, _shared_modules,
                    traced_with_shapes)

_NONE = -1  # an entry of no prunable channel
_ZERO = -2  # an entry that is always exactly zero (F.pad's constant)

_ADD = {operator.add, operator.iadd, torch.add, "add", "add_", operator.sub, operator.isub, torch.sub, "sub", "sub_"}
_MUL = {operator.mul, operator.imul, torch.mul, "mul", "mul_"}
_DIV = {operator.truediv, torch.div, "div", "div_"}
_IDENTITY = {"contiguous", "clone", "detach", "float", "half", "bfloat16", "to", "type_as"}
_SHAPE_OPS = {"permute", "transpose", "squeeze", "unsqueeze", torch.permute, torch.transpose, torch.squeeze,
              torch.unsqueeze, torch.flatten, "flatten"}
_RESHAPES = {"view", "reshape", torch.reshape}
_CHUNKS = {"chunk", torch.chunk, "split", torch.split}
_CATS = {torch.cat, torch.concat, torch.stack}
_OTHER_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d,
                nn.LocalResponseNorm)
_NORM_FUNCTIONS = {F.layer_norm, F.group_norm, F.instance_norm, F.local_response_norm}
_RESAMPLE = (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d)


def _stochastic_depth():
    try:
        from torchvision.ops import stochastic_depth
    except ImportError:
        return set()
    return {stochastic_depth}


@dataclass(frozen=True)
class MemberKey:
    """One axis of one tensor of one module: ``module.<tensor>`` along ``axis`` (``tensor`` is empty
    for a BatchNorm that holds none: only its width follows)."""
    module: str
    tensor: str
    axis: int
    role: str     # "filter" (conv/linear rows), "bias", "norm", "input" (a consumer's columns), "param"
    masked: bool  # zeroed at a removed channel so that the channel is exactly zero downstream


@dataclass
class Group:
    """A coupled channel group as found in the graph: ``members`` maps each tensor axis it touches to
    the positions of its channels there, int64 ``[n_channels, k]`` (k entries per channel)."""
    name: str
    members: dict[MemberKey, torch.Tensor]
    reason: str | None  # why it cannot be removed, or None
    approximate: str | None = None  # why its cut changes what the model computes (LayerNorm over channels)

    @property
    def n_channels(self) -> int:
        return next(iter(self.members.values())).shape[0]


@dataclass
class _Val:
    ids: torch.Tensor   # int64, the tensor's shape: element of every entry, or _NONE / _ZERO
    lost: torch.Tensor  # int32, same shape: 0 while a removed element's entry is exactly zero, else a reason
    param: str | None = None  # a parameter or buffer read by get_attr


def _varies(ids: torch.Tensor, dim: int) -> bool:
    return ids.shape[dim] > 1 and not bool((ids == ids.narrow(dim, 0, 1)).all())


def _along(ids: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The ids along ``dim`` when they are the same at every index of the other axes, else None."""
    rows = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
    return rows[0].clone() if bool((rows == rows[0]).all()) else None


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return f"{node.op} '{target}' at node '{node.name}'"


class _Analysis:
    def __init__(self, model: nn.Module, gm: fx.GraphModule):
        self.model, self.gm = model, gm
        self.approximate: dict[int, str] = {}  # elements a LayerNorm normalizes with others
        self.modules = dict(gm.named_modules())
        self.shared = _shared_modules(model, gm)
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.reasons = [""]
        self.members: dict[MemberKey, torch.Tensor] = {}
        self.env: dict[fx.Node, object] = {}
        self.stochastic_depth = _stochastic_depth()

    # ---- elements ----
    def fresh(self, n: int) -> torch.Tensor:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return torch.arange(start, start + n)

    def root(self, e: int) -> int:
        while self.parent[e] != e:
            self.parent[e] = self.parent[self.parent[e]]
            e = self.parent[e]
        return e

    def join(self, a: torch.Tensor, b: torch.Tensor, strict: str | None = None) -> None:
        """Join the elements paired entry by entry. ``strict``: the pairing is a promise that both
        go together, so an element paired with a non-element is frozen with that reason."""
        a, b = torch.broadcast_tensors(a, b)
        if strict is not None:
            self.freeze(torch.cat([a[b < 0], b[a < 0]]), strict)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        for x, y in torch.stack([a[keep], b[keep]], 1).unique(dim=0).tolist():
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.frozen.setdefault(e, reason)

    def reason(self, text: str) -> int:
        self.reasons.append(text)
        return len(self.reasons) - 1

    def consume(self, v: _Val) -> None:
        """``v`` is read by a layer or leaves the model: a removed channel must be exactly zero there."""
        bad = (v.ids >= 0) & (v.lost > 0)
        if bool(bad.any()):
            for e, r in torch.stack([v.ids[bad], v.lost[bad].long()], 1).unique(dim=0).tolist():
                self.frozen.setdefault(e, self.reasons[r])

    def member(self, module: str, tensor: str, axis: int, role: str, masked: bool, ids: torch.Tensor) -> None:
        key = MemberKey(module, tensor, axis, role, masked)
        if key in self.members:
            self.join(self.members[key], ids)
        else:
            self.members[key] = ids

    # ---- values ----
    def none(self, node) -> object:
        meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
        return self._none_like(meta)

    def _none_like(self, meta):
        if meta is None:
            return None
        if not hasattr(meta, "shape"):  # a tuple of outputs (TensorMetadata is a tuple itself)
            return tuple(self._none_like(m) for m in meta) if isinstance(meta, (tuple, list)) else None
        shape = tuple(meta.shape)
        return _Val(torch.full(shape, _NONE, dtype=torch.int64), torch.zeros(shape, dtype=torch.int32))

    def val(self, arg):
        return self.env.get(arg) if isinstance(arg, fx.Node) else None

    def tensors_in(self, args) -> list[_Val]:
        out = []

        def visit(a):
            v = self.val(a)
            out.extend(x for x in (v if isinstance(v, (tuple, list)) else (v,)) if isinstance(x, _Val))
            return a
        fx.node.map_arg(args, visit)
        return out

    def unsupported(self, node: fx.Node, why: str | None = None):
        why = why or f"it feeds unsupported {_describe(node)}"
        for v in self.tensors_in((node.args, node.kwargs)):
            self.freeze(v.ids, why)
        return self.none(node)

    # ---- the walk ----
    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            return self.none(node)
        if node.op == "get_attr":
            v = self.none(node)
            if isinstance(v, _Val):
                v.param = node.target
            return v
        if node.op == "output":
            for v in self.tensors_in(node.args):
                self.freeze(v.ids, "it reaches a model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node, self.modules[node.target])
        return self.visit_function(node)

    def visit_module(self, node: fx.Node, m: nn.Module):
        x = self.val(node.args[0]) if node.args else None
        name = node.target
        if isinstance(m, LAYER_TYPES + NORM_TYPES) and name in self.shared:
            why = f"it feeds '{name}', which is used more than once: {self.shared[name]}"
            self.unsupported(node, why)
            if isinstance(m, LAYER_TYPES):
                return self.producer_output(node, m, frozen=f"the module is used more than once: {self.shared[name]}")
            return self.none(node)
        if not isinstance(x, _Val):
            return self.unsupported(node)
        if isinstance(m, LAYER_TYPES):
            return self.layer(node, m, x)
        if isinstance(m, NORM_TYPES):
            return self.batch_norm(node, m, x)
        if isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            return self.layer_norm(node, x, name, "weight" if m.weight is not None else None,
                                   "bias" if m.bias is not None else None, f"LayerNorm '{name}'")
        if isinstance(m, _OTHER_NORMS):
            return self.unsupported(node, f"{type(m).__name__} '{name}' normalizes channels together: "
                                          "removing one would change the others")
        if type(m) in _POOLS:
            return self.per_channel_resample(node, x, _POOLS[type(m)])
        if isinstance(m, _RESAMPLE):
            return self.per_channel_resample(node, x, x.ids.dim() - 2)
        if isinstance(m, nn.Flatten):
            return self.reshaped(node, x)
        if isinstance(m, _ELEMENTWISE):
            return self.elementwise(node, x, m)
        return self.unsupported(node, f"it feeds unsupported module '{name}' ({type(m).__name__})")

    def visit_function(self, node: fx.Node):
        t = node.target
        if node.op == "call_function" and t is getattr or t in ("size", "dim", "numel"):
            return None  # reads the shape, not the values
        if node.op == "call_function" and t is operator.getitem:
            return self.getitem(node)
        if t in _ADD or t in _MUL or t in _DIV:
            return self.binary(node)
        if t in _CATS:
            return self.cat(node)
        if t is F.layer_norm and isinstance(self.val(node.args[0]), _Val):
            args = list(node.args) + [None] * 5
            shape = args[1] if args[1] is not None else node.kwargs.get("normalized_shape")
            params = [a if a is not None else node.kwargs.get(k) for a, k in zip(args[2:4], ("weight", "bias"))]
            if (isinstance(shape, (tuple, list)) and len(shape) == 1
                    and all(p is None or (isinstance(p, fx.Node) and p.op == "get_attr") for p in params)):
                owner = {p.target.rpartition(".")[0] for p in params if p is not None}
                if len(owner) <= 1:
                    return self.layer_norm(node, self.val(node.args[0]), owner.pop() if owner else "",
                                           *(p.target.rpartition(".")[2] if p is not None else None for p in params),
                                           _describe(node))
        if t in _NORM_FUNCTIONS:
            return self.unsupported(node, f"{_describe(node)} normalizes channels together: removing one "
                                          "would change the others")
        x = self.val(node.args[0]) if node.args else None
        if not isinstance(x, _Val):
            return self.unsupported(node)
        if any(isinstance(a, fx.Node) and isinstance(self.val(a), _Val)
               for a in list(node.args[1:]) + list(node.kwargs.values())):
            return self.unsupported(node, f"it feeds {_describe(node)} through an argument other than the input")
        if t in self.stochastic_depth:
            return x  # scales whole samples: 0 stays 0
        if t in _IDENTITY:
            return x
        if t in _POOL_FUNCTIONS:
            return self.per_channel_resample(node, x, _POOL_FUNCTIONS[t])
        if t is F.interpolate:
            return self.per_channel_resample(node, x, x.ids.dim() - 2)
        if t in _REDUCTIONS:
            return self.reduced(node, x)
        if t in _SHAPE_OPS or t in _RESHAPES:
            return self.reshaped(node, x)
        if t in _CHUNKS:
            return self.chunked(node, x)
        if t is F.pad:
            return self.padded(node, x)
        if (node.op == "call_function" and t in _ELEMENTWISE_FUNCTIONS) or t in _ELEMENTWISE_METHODS \
                or t in (operator.neg, torch.neg, "neg", "abs", torch.abs):
            fn = t if node.op == "call_function" else getattr(torch.Tensor, t)
            return self.elementwise(node, x, fn)
        return self.unsupported(node)

    # ---- layers ----
    def producer_output(self, node: fx.Node, m: nn.Module, out_ids: torch.Tensor | None = None,
                        frozen: str | None = None) -> _Val:
        """The value a conv/linear writes: its channels on their axis, each an element (fresh unless
        given), recorded as the layer's filter rows and bias."""
        shape = tuple(node.meta["tensor_meta"].shape)
        n = m.weight.shape[0]
        if out_ids is None:
            out_ids = self.fresh(n)
        if frozen:
            self.freeze(out_ids, frozen)
        self.member(node.target, "weight", 0, "filter", True, out_ids)
        if m.bias is not None:
            self.member(node.target, "bias", 0, "bias", True, out_ids)
        axis = len(shape) - 1 if isinstance(m, nn.Linear) else len(shape) - m.weight.dim() + 1
        view = [1] * len(shape)
        view[axis] = n
        ids = out_ids.view(view).expand(shape).clone()
        return _Val(ids, torch.zeros(shape, dtype=torch.int32))

    def layer(self, node: fx.Node, m: nn.Module, x: _Val) -> _Val:
        name = node.target
        if isinstance(m, nn.Linear):
            axis = x.ids.dim() - 1
        else:
            axis = x.ids.dim() - m.weight.dim() + 1
        in_ids = _along(x.ids, axis)
        if in_ids is None:
            self.freeze(x.ids, f"{type(m).__name__.lower()} '{name}' does not read the channels as its input channels")
            return self.producer_output(node, m)
        groups = getattr(m, "groups", 1)
        per_group = m.weight.shape[1]
        mult = m.weight.shape[0] // groups
        if groups > 1 and per_group == 1:
            # depthwise: each input channel has its own `mult` filters, which go with it; being zeroed
            # with it, they make its output exactly zero whatever the input holds
            out_ids = self.fresh(m.weight.shape[0])
            self.join(out_ids, in_ids.repeat_interleave(mult))
            return self.producer_output(node, m, out_ids)
        self.consume(x)
        if groups == 1:
            self.member(name, "weight", 1, "input", False, in_ids)
            return self.producer_output(node, m)
        # grouped: the same input position in every conv group goes together, and so do the filters
        by_group = in_ids.view(groups, per_group)
        self.join(by_group, by_group[:1].expand_as(by_group),
                  strict=f"grouped conv '{name}' reads it beside channels that cannot be removed")
        self.member(name, "weight", 1, "input", False, by_group[0])
        return self.producer_output(node, m, self.fresh(mult).repeat(groups))

    def batch_norm(self, node: fx.Node, m: nn.Module, x: _Val) -> _Val:
        ids = _along(x.ids, 1) if x.ids.dim() > 1 else None
        if ids is None or m.num_features != ids.numel():
            self.freeze(x.ids, f"BatchNorm '{node.target}' does not normalize over the channels' axis")
            return self.none(node)
        tensors = [(t, masked) for t, masked in (("weight", True), ("bias", True), ("running_mean", True),
                                                 ("running_var", False)) if getattr(m, t, None) is not None]
        for tensor, masked in tensors or [("", False)]:  # "": no tensor, only its width to keep in step
            self.member(node.target, tensor, 0, "norm", masked, ids)
        return _Val(torch.where(x.ids == _ZERO, _NONE, x.ids), x.lost)  # BN(0) is the bias, not 0

    def layer_norm(self, node: fx.Node, x: _Val, owner: str, weight: str | None, bias: str | None, what: str):
        """LayerNorm over the last axis. Over the channels it is approximate: the compacted model
        normalizes over fewer channels than the masked one (where a removed channel is a zero in the
        statistics), so these channels are cut only by plans that ask for approximate groups."""
        ids = _along(x.ids, x.ids.dim() - 1)
        if ids is None or (bool((ids < 0).any()) and bool((ids >= 0).any())):
            return self.unsupported(node, f"{what} normalizes channels together with entries that cannot "
                                          "be removed")
        if not bool((ids >= 0).any()):
            return self.none(node)  # no prunable channel in what it normalizes
        for e in ids.unique().tolist():
            self.approximate.setdefault(e, f"{what} normalizes channels together: the compacted model "
                                           "normalizes over the kept ones only, so it does not compute "
                                           "exactly what the masked model does")
        for tensor in (weight, bias):  # zeroed at a removed channel: its output is then exactly 0
            if tensor is not None:
                self.member(owner, tensor, 0, "norm", True, ids)
        if not weight and not bias:
            self.member(owner, "", 0, "norm", False, ids)
        self.consume(x)  # its statistics read every entry
        return _Val(x.ids, torch.zeros_like(x.lost))

    # ---- per-channel ops ----
    def elementwise(self, node: fx.Node, x: _Val, fn) -> _Val:
        if _maps_zero_to_zero(fn, node, x.ids.shape, node.args[0].meta["tensor_meta"].dtype):
            return x
        what = f"{type(fn).__name__} '{node.target}'" if isinstance(fn, nn.Module) else _describe(node)
        r = self.reason(f"{what} maps 0 to a non-zero value, so a removed channel would still reach the consumer")
        ids = torch.where(x.ids == _ZERO, _NONE, x.ids)
        return _Val(ids, torch.where(ids >= 0, torch.where(x.lost > 0, x.lost, r), x.lost))

    def per_channel_resample(self, node: fx.Node, x: _Val, n_axes: int):
        """Pooling or interpolation over the last ``n_axes`` axes: fine unless channels vary there."""
        shape = tuple(node.meta["tensor_meta"].shape)
        dims = list(range(x.ids.dim() - n_axes, x.ids.dim()))
        if any(_varies(x.ids, d) for d in dims):
            return self.unsupported(node, f"{_describe(node)} pools over the channel axis")
        ids, lost = x.ids, x.lost
        for d in dims:
            ids, lost = ids.narrow(d, 0, 1), lost.amax(d, keepdim=True)
        return _Val(ids.expand(shape).clone(), lost.expand(shape).clone())

    def reduced(self, node: fx.Node, x: _Val):
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keepdim = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        if dims is None or not isinstance(keepdim, bool):
            return self.unsupported(node, f"{_describe(node)} reduces over the channel axis")
        dims = sorted({d % x.ids.dim() for d in ((dims,) if isinstance(dims, int) else dims)})
        if any(_varies(x.ids, d) for d in dims):
            return self.unsupported(node, f"{_describe(node)} reduces over the channel axis")
        ids, lost = x.ids, x.lost
        for d in dims:
            ids, lost = ids.narrow(d, 0, 1), lost.amax(d, keepdim=True)
        if not keepdim:
            for d in reversed(dims):
                ids, lost = ids.squeeze(d), lost.squeeze(d)
        return _Val(ids.contiguous(), lost.contiguous())

    def reshaped(self, node: fx.Node, x: _Val):
        shape, t = tuple(node.meta["tensor_meta"].shape), node.target
        reshape = node.op != "call_module" and t in _RESHAPES
        if node.op == "call_module" or reshape or t in (torch.flatten, "flatten"):
            ids, lost = x.ids.reshape(shape), x.lost.reshape(shape)
        elif any(isinstance(a, fx.Node) for a in list(node.args[1:]) + list(node.kwargs.values())):
            return self.unsupported(node)
        else:
            fn = t if node.op == "call_function" else getattr(torch.Tensor, t)
            ids, lost = fn(x.ids, *node.args[1:], **node.kwargs), fn(x.lost, *node.args[1:], **node.kwargs)
        if reshape:
            written = _shape_args(node)
            varying = [d for d in range(len(shape)) if _varies(ids, d)]
            literal = [d for d in varying if d < len(written) and isinstance(written[d], int) and written[d] != -1]
            if varying and len(literal) == len(varying):
                return self.unsupported(node, f"{_describe(node)} writes the channel axis as the literal "
                                              f"{written[literal[0]]}, which cannot follow the pruned width "
                                              "(write -1 or x.size(...))")
            for d in literal:  # a written split of the channel axis: keep it true after the cut
                self.join(ids, ids.narrow(d, 0, 1).expand_as(ids),
                          strict=f"{_describe(node)} splits it with a written size beside channels that cannot be removed")
        return _Val(ids.contiguous(), lost.contiguous())

    def chunked(self, node: fx.Node, x: _Val):
        args = list(node.args[1:])
        dim = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        how = args[0] if args else node.kwargs.get("chunks", node.kwargs.get("split_size_or_sections",
                                                                             node.kwargs.get("split_size")))
        if not isinstance(dim, int) or isinstance(how, fx.Node):
            return self.unsupported(node)
        fn = node.target if node.op == "call_function" else getattr(torch.Tensor, node.target)
        pieces_ids, pieces_lost = fn(x.ids, how, dim), fn(x.lost, how, dim)
        if _varies(x.ids, dim):
            sizes = {p.shape[dim] for p in pieces_ids}
            if isinstance(how, (list, tuple)) or len(sizes) != 1:
                return self.unsupported(node, f"{_describe(node)} splits the channels at written sizes, which "
                                              "cannot follow the pruned width")
            for p in pieces_ids[1:]:  # equal pieces must lose the same positions
                self.join(pieces_ids[0], p, strict=f"{_describe(node)} splits it beside channels that cannot "
                                                   "be removed")
        return tuple(_Val(i.contiguous(), lo.contiguous()) for i, lo in zip(pieces_ids, pieces_lost))

    def getitem(self, node: fx.Node):
        src, index = node.args
        v = self.val(src)
        if isinstance(v, (tuple, list)):
            return v[index] if isinstance(index, int) else self.unsupported(node)
        if not isinstance(v, _Val):
            return None if v is None and not isinstance(self.none(node), _Val) else self.unsupported(node)
        index = index if isinstance(index, tuple) else (index,)
        if any(isinstance(i, fx.Node) or (isinstance(i, slice) and any(
                isinstance(b, fx.Node) for b in (i.start, i.stop, i.step))) for i in index):
            return self.unsupported(node)
        n_axes = sum(1 for i in index if i is not None and i is not Ellipsis)
        axis, axes = 0, []
        for i in index:  # the input axis each index item reads
            if i is Ellipsis:
                axis += v.ids.dim() - n_axes
            elif i is not None:
                axes.append((axis, i))
                axis += 1
        for d, i in axes:
            if _varies(v.ids, d) and not (isinstance(i, slice) and i == slice(None)):
                return self.unsupported(node, f"{_describe(node)} slices the channel axis at written positions, "
                                              "which cannot follow the pruned width")
        return _Val(v.ids[node.args[1]].contiguous(), v.lost[node.args[1]].contiguous())

    def padded(self, node: fx.Node, x: _Val):
        pad = node.args[1] if len(node.args) > 1 else node.kwargs.get("pad")
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        if not isinstance(pad, (tuple, list)) or not all(isinstance(p, int) for p in pad):
            return self.unsupported(node)
        ids, lost = x.ids, x.lost
        for k in range(len(pad) // 2):
            d, before, after = ids.dim() - 1 - k, pad[2 * k], pad[2 * k + 1]
            if before == after == 0:
                continue
            if _varies(ids, d):
                if mode != "constant" or value not in (None, 0, 0.0):
                    return self.unsupported(node)
                fixed = self.fresh(1)  # their number is written: what they line up with cannot shrink
                self.freeze(fixed, f"it lines up with the {before + after} zero channels that {_describe(node)} "
                                   "adds, whose number is fixed")
                parts = [ids.new_full(ids.shape[:d] + (n,) + ids.shape[d + 1:], int(fixed)) for n in (before, after)]
                ids = torch.cat([parts[0], ids, parts[1]], d)
            else:
                size = ids.shape[d] + before + after
                ids = ids.narrow(d, 0, 1).expand(ids.shape[:d] + (size,) + ids.shape[d + 1:])
            zeros = [lost.new_zeros(lost.shape[:d] + (n,) + lost.shape[d + 1:]) for n in (before, after)]
            lost = torch.cat([zeros[0], lost, zeros[1]], d)
        return _Val(ids.contiguous(), lost.contiguous())

    def cat(self, node: fx.Node):
        items = node.args[0] if node.args else node.kwargs.get("tensors")
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        if not isinstance(items, (list, tuple)) or not isinstance(dim, int):
            return self.unsupported(node)
        vals = []
        for item in items:
            v = self.val(item)
            vals.append(v if isinstance(v, _Val) else self.none(item))
        if any(not isinstance(v, _Val) for v in vals):
            return self.unsupported(node)
        fn = torch.stack if node.target is torch.stack else torch.cat
        return _Val(fn([v.ids for v in vals], dim), fn([v.lost for v in vals], dim))

    def binary(self, node: fx.Node):
        t = node.target
        a, b = (list(node.args) + [node.kwargs.get("other")])[:2]
        va, vb = self.val(a), self.val(b)
        add, mul = t in _ADD, t in _MUL
        if node.kwargs.get("alpha") is not None and isinstance(node.kwargs["alpha"], fx.Node):
            return self.unsupported(node)
        if not isinstance(va, _Val) and not isinstance(vb, _Val):
            if isinstance(a, fx.Node) or isinstance(b, fx.Node):
                return self.unsupported(node) if self.tensors_in((node.args, node.kwargs)) else self.none(node)
            return self.none(node)
        if not isinstance(va, _Val) or not isinstance(vb, _Val):  # tensor with a number
            x, other, x_first = (va, b, True) if isinstance(va, _Val) else (vb, a, False)
            if isinstance(other, fx.Node):
                return self.unsupported(node)
            if mul or (t in _DIV and x_first) or (add and other == 0):
                return x
            r = self.reason(f"{_describe(node)} combines the channels with the constant {other!r}, so a "
                            "removed channel would not be zero")
            ids = torch.where(x.ids == _ZERO, _NONE, x.ids)
            return _Val(ids, torch.where(ids >= 0, torch.where(x.lost > 0, x.lost, r), x.lost))
        if t in _DIV:
            if bool((vb.ids >= 0).any()):
                return self.unsupported(node, f"{_describe(node)} divides by channels")
        shape = tuple(node.meta["tensor_meta"].shape)
        ai, bi = va.ids.expand(shape), vb.ids.expand(shape)
        al, bl = va.lost.expand(shape), vb.lost.expand(shape)
        for v, other_ids in ((va, bi), (vb, ai)):
            if v.param is not None and not self.param_member(v, other_ids, shape, masked=add):
                return self.unsupported(node, f"{_describe(node)} combines the channels with '{v.param}' "
                                              "in a way that cannot follow them")
        self.join(ai, bi)
        ids = torch.where(ai >= 0, ai, torch.where(bi >= 0, bi, torch.where((ai == _ZERO) & (bi == _ZERO), _ZERO,
                                                                             _NONE)))
        la = torch.where(ai >= 0, al, 0)
        lb = torch.where(bi >= 0, bl, 0)
        if add or t in _DIV:
            r = self.reason(f"{_describe(node)} adds a tensor that is not a prunable channel, so a removed "
                            "channel would not be zero")
            plain = lambda v, i: (i == _NONE) & (v.param is None)  # noqa: E731
            other_live = ((ai >= 0) & plain(vb, bi)) | ((bi >= 0) & plain(va, ai))
            lost = torch.where(la > 0, la, torch.where(lb > 0, lb, torch.where(other_live, r, 0)))
        else:  # a product is zero when either factor is
            zero = ((ai >= 0) & (al == 0)) | ((bi >= 0) & (bl == 0)) | (ai == _ZERO) | (bi == _ZERO)
            lost = torch.where(zero, 0, torch.where(la > 0, la, lb))
            ids = torch.where((ai == _ZERO) | (bi == _ZERO), _ZERO, ids)
        return _Val(ids.contiguous(), lost.to(torch.int32).contiguous())

    def param_member(self, p: _Val, other_ids: torch.Tensor, shape: tuple, masked: bool) -> bool:
        """A parameter combined elementwise with channels (a layer scale, a bias): cut along them."""
        live = other_ids >= 0
        if not bool(live.any()):
            return True
        pshape = tuple(p.ids.shape)
        big = [d for d, s in enumerate(pshape) if s > 1]
        if len(big) != 1 or big[0] > 1:  # compaction cuts rows or columns
            return not big and not masked  # a scalar parameter scales (fine) or shifts (not zero)
        d_out = len(shape) - len(pshape) + big[0]
        ids = _along(other_ids, d_out)
        if ids is None:
            return False
        module, _, tensor = p.param.rpartition(".")
        self.member(module, tensor, big[0], "param", masked, ids)
        return True

    # ---- result ----
    def groups(self) -> list[Group]:
        index = {key: i for i, key in enumerate(self.members)}
        where: dict[int, dict[int, list[int]]] = {}  # component -> member index -> positions
        for key, i in index.items():
            for pos, e in enumerate(self.members[key].tolist()):
                if e >= 0:
                    where.setdefault(self.root(e), {}).setdefault(i, []).append(pos)
        frozen: dict[int, str] = {}
        for e, why in self.frozen.items():
            frozen.setdefault(self.root(e), why)
        approximate: dict[int, str] = {}
        for e, why in self.approximate.items():
            approximate.setdefault(self.root(e), why)
        by_signature: dict[tuple, list[int]] = {}
        for comp, touched in where.items():
            by_signature.setdefault(tuple(sorted((i, len(p)) for i, p in touched.items())), []).append(comp)
        keys = list(self.members)
        module_order = {m: i for i, m in enumerate(self.modules)}
        out, seen = [], {}
        for signature, comps in by_signature.items():
            touched = [keys[i] for i, _ in signature]
            first = signature[0][0]
            comps.sort(key=lambda c: min(where[c][first]))
            members = {keys[i]: torch.tensor([sorted(where[c][i]) for c in comps], dtype=torch.int64)
                       for i, _ in signature}
            filters = [k for k in touched if k.role == "filter"]
            name = (filters or touched)[0].module
            seen[name] = seen.get(name, 0) + 1
            if seen[name] > 1:
                name = f"{name}#{seen[name]}"
            reason = next((frozen[c] for c in comps if c in frozen), None)
            if reason is None and not filters:
                reason = "it has no filters to remove"
            order = min((module_order.get(k.module, 0) for k in filters), default=len(module_order))
            out.append((order, Group(name, members, reason, next((approximate[c] for c in comps if c in approximate),
                                                                 None))))
        return [g for _, g in sorted(out, key=lambda x: x[0])]


def analyze_groups(model: nn.Module, example_inputs: tuple) -> list[Group]:
    """Every channel group of ``model`` (prunable or not, with the reason), in the order of their
    first producer."""
    gm = traced_with_shapes(model, example_inputs)
    analysis = _Analysis(model, gm)
    analysis.run()
    return analysis.groups()
