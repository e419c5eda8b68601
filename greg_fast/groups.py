"""Coupled channel groups, read from the model's ATen ops: every slice of every tensor that must go
when one channel goes.

The exported graph (:mod:`greg_fast.capture`) is run abstractly: every tensor gets an integer tensor
of its own shape saying which *element* (one output channel of one producer) each entry belongs
to, and a second one saying whether that entry is still exactly zero in the masked model once its
element is removed. Ops act on these the way they act on values (shape ops are applied to the id
tensor itself), and a few rules couple elements:

- add/sub/mul (residuals, squeeze-and-excitation gating ``x * s``) join the elements they combine;
- a grouped conv joins the input channels at the same place in every conv group (each conv group
  then keeps the same channels: the cut weight stays ``[out, in / groups, k]``), and a depthwise
  conv joins each input channel with its output channels;
- a reshape or chunk that splits the channel axis with a written size (channel shuffle's
  ``view(b, 2, -1, ...)``) joins the channels that differ only along that axis, so it stays true.

What each op does is one rule in ``RULES`` (by ATen op name); an op without one is followed only if
it is pointwise (judged by evaluating it at 0), else the channels reaching it are frozen. Joined
elements form a component; components that touch the same tensors form a group (``plan``'s unit).
A component is frozen, with a reason naming the module and the op, when a removed channel would
still change the output or its width could not follow: it reaches the model output, feeds an op
that is not understood, passes an op that maps 0 elsewhere before a consumer, is sliced or split
at written sizes, is combined with a tensor of its width that cannot be cut, or lines up with
F.pad's fixed zero channels. Channels a LayerNorm or a GroupNorm normalizes together, or that a
weight-standardized conv reads, are marked *approximate*
(the cut model computes a little differently): only ``plan(..., approximate=True)`` cuts them.

Single layers (``plan(..., coupled=False)``, the 2021 reference's rule) come from the same analysis
(:func:`analyze_layers`): a layer is one when its filters are a group that no op joins to other
channels and that only its norms and its consumers' whole input columns go with.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx
import torch.nn as nn

from .capture import LAYER_TYPES, describe, emitter, export, module_path
from .units import MemberKey

_NONE = -1  # an entry of no prunable channel

RULES: dict = {}


def rule(*names: str):
    """Register the function as what the ATen ops ``names`` do to channels."""
    def register(fn):
        for name in names:
            RULES[name] = fn
        return fn
    return register


@dataclass
class Group:
    """A coupled channel group as found in the graph: ``members`` maps each tensor axis it touches to
    the positions of its channels there, int64 ``[n_channels, k]`` (k entries per channel)."""
    name: str
    members: dict[MemberKey, torch.Tensor]
    reason: str | None  # why it cannot be removed, or None
    approximate: str | None = None  # why its cut changes what the model computes
    speculative: str | None = None  # a width that export wrote as a number: plan() confirms the cut by trial
    coupled_by: str | None = None  # the first op that joins its channels with others (None: a single layer's)

    @property
    def n_channels(self) -> int:
        return next(iter(self.members.values())).shape[0]


@dataclass
class _Val:
    ids: torch.Tensor   # int64, the tensor's shape: element of every entry, or _NONE
    lost: torch.Tensor  # int32, same shape: 0 while a removed element's entry is exactly zero, else a reason
    sources: frozenset = frozenset()  # parameters/buffers it is computed from alone (none for activations)
    pos: torch.Tensor | None = None   # a view of one parameter: the flat index of each entry in it

    @property
    def param(self) -> str | None:
        """The parameter this is a view of, if it is one."""
        return next(iter(self.sources)) if self.pos is not None and len(self.sources) == 1 else None


def _unique_pairs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The distinct pairs ``(a[i], b[i])`` of integer tensors, ``[n, 2]`` in sorted order: one int64
    key per pair, as a 1-d unique is many times faster than ``unique(dim=0)``."""
    if not a.numel():
        return torch.empty(0, 2, dtype=torch.int64)
    a, b = a.long(), b.long()
    a0, b0 = int(a.min()), int(b.min())
    m = int(b.max()) - b0 + 1
    keys = torch.unique((a - a0) * m + (b - b0))
    return torch.stack([keys // m + a0, keys % m + b0], 1)


def _varies(ids: torch.Tensor, dim: int) -> bool:
    return ids.shape[dim] > 1 and not bool((ids == ids.narrow(dim, 0, 1)).all())


def _along(ids: torch.Tensor, dim: int) -> torch.Tensor | None:
    """The ids along ``dim`` when they are the same at every index of the other axes, else None."""
    rows = ids.movedim(dim, -1).reshape(-1, ids.shape[dim])
    return rows[0].clone() if bool((rows == rows[0]).all()) else None


def _broadcast(ids: torch.Tensor, shape: tuple, d: int) -> bool:
    """Whether a tensor of ``ids``' shape is broadcast along axis ``d`` of the result ``shape``."""
    pad = len(shape) - ids.dim()
    return shape[d] > 1 and (d < pad or ids.shape[d - pad] == 1)


def _bind(node: fx.Node) -> dict:
    """The op's arguments by their schema names, defaults filled in."""
    out = {}
    for i, a in enumerate(node.target._schema.arguments):
        if i < len(node.args):
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _op_name(node: fx.Node) -> str | None:
    schema = getattr(node.target, "_schema", None)
    if schema is None or not schema.name.startswith("aten::"):
        return None
    return schema.name[len("aten::"):]


_ELEMENTWISE: dict = {}


def _elementwise(node: fx.Node) -> bool:
    """Whether the op acts on each entry of its first argument alone. Tagged pointwise, or (an op the
    tags miss, such as ``hardswish``) of one tensor and numbers and shown so: it commutes with a
    random shuffle of the entries of a random input of the same rank."""
    if torch.Tag.pointwise in node.target.tags:
        return True
    first, others = (node.args[0] if node.args else None), []
    fx.node.map_arg((node.args[1:], node.kwargs), others.append)
    if others or not isinstance(first, fx.Node) or not isinstance(first.meta.get("val"), torch.Tensor) \
            or _meta_shape(first.meta["val"]) != _meta_shape(node.meta.get("val")):
        return False
    key = (node.target, repr((node.args[1:], node.kwargs)), first.meta["val"].dim(), first.meta["val"].dtype)
    if key not in _ELEMENTWISE:
        g = torch.Generator().manual_seed(0)
        x = torch.randn((3,) * first.meta["val"].dim(), generator=g, dtype=first.meta["val"].dtype) * 4
        shuffle = torch.randperm(x.numel(), generator=g)
        try:
            with torch.no_grad():
                a = node.target(x.reshape(-1)[shuffle].reshape(x.shape).clone(), *node.args[1:], **node.kwargs)
                b = node.target(x.clone(), *node.args[1:], **node.kwargs)
            _ELEMENTWISE[key] = isinstance(a, torch.Tensor) and a.shape == x.shape and bool(
                torch.equal(a, b.reshape(-1)[shuffle].reshape(x.shape)))
        except Exception:
            _ELEMENTWISE[key] = False
    return _ELEMENTWISE[key]


def _meta_shape(meta) -> tuple | None:
    return tuple(meta.shape) if isinstance(meta, torch.Tensor) else None


class _Analysis:
    def __init__(self, model: nn.Module, ep: torch.export.ExportedProgram):
        self.model, self.ep = model, ep
        sig = ep.graph_signature
        self.fqn = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}  # placeholder -> name
        self.values = (dict(model.named_parameters(remove_duplicate=False))  # tied ones under every name
                       | dict(model.named_buffers(remove_duplicate=False)))
        self.shared = self._shared()
        self.approximate: dict[int, str] = {}
        self.speculative: dict[int, str] = {}
        self.parent: list[int] = []
        self.frozen: dict[int, str] = {}
        self.reasons = [""]
        self.members: dict[MemberKey, torch.Tensor] = {}
        self.env: dict[fx.Node, object] = {}
        self.joined_by: list[tuple[int, str]] = []  # (element, the op that joined it to another)
        self.layers: dict[str, None] = {}  # the conv/linear modules, in the order they run

    def _shared(self) -> dict[str, str]:
        """Parameters and buffers whose cut would reach more than one place: read by several ops (a
        module called more than once, a weight also read directly) or tied to another module."""
        why = {}
        for node in self.ep.graph.nodes:
            name = self.fqn.get(node.name) if node.op == "placeholder" else None
            if name is None:
                continue
            readers = [u for u in node.users if _op_name(u) not in _METADATA and not (
                _op_name(u) in _SHAPE_OF and u.args[0] is not node)]
            if len(readers) > 1:
                owner = name.rpartition(".")[0]
                why[name] = (f"`{owner}` is used more than once: its tensor '{name}' is read by "
                             f"{len(readers)} ops ({', '.join(sorted({emitter(u) for u in readers}))})")
        owners: dict[int, list[str]] = {}
        for name, p in self.model.named_parameters(remove_duplicate=False):
            owners.setdefault(id(p), []).append(name)
        for names in owners.values():
            for name in names if len(names) > 1 else ():
                why.setdefault(name, f"'{name}' is the same parameter as " + ", ".join(
                    repr(n) for n in names if n != name) + " (tied weights)")
        return why

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

    def join(self, a: torch.Tensor, b: torch.Tensor, strict: str | None = None, via: str | None = None) -> None:
        """Join the elements paired entry by entry. ``strict``: the pairing is a promise that both
        go together, so an element paired with a non-element is frozen with that reason. ``via``: the
        op that couples them (what a single-layer plan reports)."""
        a, b = torch.broadcast_tensors(a, b)
        if strict is not None:
            self.freeze(torch.cat([a[b < 0], b[a < 0]]), strict)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not bool(keep.any()):
            return
        for x, y in _unique_pairs(a[keep], b[keep]).tolist():
            rx, ry = self.root(x), self.root(y)
            if rx != ry:
                self.parent[max(rx, ry)] = min(rx, ry)
                if via is not None:
                    self.joined_by.append((x, via))

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.frozen.setdefault(e, reason)

    def mark_approximate(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.approximate.setdefault(e, reason)

    def mark_speculative(self, ids: torch.Tensor, reason: str) -> None:
        for e in ids[ids >= 0].unique().tolist():
            self.speculative.setdefault(e, reason)

    def varies(self, ids: torch.Tensor, dim: int) -> bool:
        """Whether ``ids`` hold different channels along ``dim``: joined elements are one channel
        (SK-Net's stacked branches, once summed, differ along the branch axis only by name)."""
        if not _varies(ids, dim):
            return False
        elements, inverse = ids.unique(return_inverse=True)
        roots = torch.tensor([self.root(e) if e >= 0 else e for e in elements.tolist()], dtype=torch.int64)
        return _varies(roots[inverse], dim)

    def reason(self, text: str) -> int:
        self.reasons.append(text)
        return len(self.reasons) - 1

    def lose(self, v: _Val, where: torch.Tensor, text: str) -> _Val:
        """``v`` with its element entries at ``where`` no longer zero once removed (reason ``text``)."""
        r = self.reason(text)
        return _Val(v.ids, torch.where(where & (v.ids >= 0) & (v.lost == 0), r, v.lost).to(torch.int32))

    def consume(self, v: _Val) -> None:
        """``v`` is read by a layer: a removed channel must be exactly zero there."""
        bad = (v.ids >= 0) & (v.lost > 0)
        if bool(bad.any()):
            for e, r in _unique_pairs(v.ids[bad], v.lost[bad]).tolist():
                self.frozen.setdefault(e, self.reasons[r])

    def member(self, module: str, tensor: str, axis: int, role: str, masked: bool, ids: torch.Tensor) -> None:
        key = MemberKey(module, tensor, axis, role, masked)
        if key in self.members:
            self.join(self.members[key], ids, via=f"`{module}.{tensor}`, read twice")
        else:
            self.members[key] = ids

    def param_member(self, p: _Val, ids: torch.Tensor, role: str, masked: bool) -> bool:
        """A parameter (or a view of one) read entry by entry beside channels ``ids`` (broadcast to
        its shape): cut it along them. False if its entries do not line up with whole channels."""
        live = ids >= 0
        if not bool(live.any()):
            return True
        name = p.param
        if name is None or name in self.shared:
            return False
        t = self.values[name]
        big = [d for d, s in enumerate(t.shape) if s > 1]
        if len(big) != 1 or big[0] > 1:  # compaction cuts rows or columns of one axis
            return False
        n, step = t.shape[big[0]], math.prod(t.shape[big[0] + 1:])
        at = torch.full((n,), _NONE, dtype=torch.int64)
        coord = (p.pos.expand(ids.shape) // step) % n
        pairs = _unique_pairs(coord.reshape(-1), ids.reshape(-1))
        at[pairs[:, 0]] = pairs[:, 1]
        if len(pairs) != n or bool((at < 0).any() and live.any()):  # one channel per entry, every entry one
            return False
        module, _, tensor = name.rpartition(".")
        self.member(module, tensor, big[0], role, masked, at)
        return True

    # ---- values ----
    def none(self, node) -> object:
        return self._none_like(node.meta.get("val") if isinstance(node, fx.Node) else None)

    def _none_like(self, meta):
        if isinstance(meta, (tuple, list)):
            return tuple(self._none_like(m) for m in meta)
        shape = _meta_shape(meta)
        if shape is None:
            return None
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
        why = why or f"it feeds {describe(node)}, which greg_fast does not follow"
        for v in self.tensors_in((node.args, node.kwargs)):
            self.freeze(v.ids, why)
        return self.none(node)

    # ---- the walk ----
    def run(self) -> None:
        for node in self.ep.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: fx.Node):
        if node.op == "placeholder":
            v = self.none(node)
            name = self.fqn.get(node.name)
            if name is not None and isinstance(v, _Val):
                v.sources, v.pos = frozenset([name]), torch.arange(v.ids.numel()).view(v.ids.shape)
            return v
        if node.op == "output":
            for v in self.tensors_in(node.args):
                self.freeze(v.ids, "it reaches a model output")
            return None
        if node.op != "call_function":
            return self.unsupported(node)
        if node.target is operator.getitem:
            v = self.val(node.args[0])
            return v[node.args[1]] if isinstance(v, (tuple, list)) else self.unsupported(node)
        name = _op_name(node)
        if name in _METADATA:
            return None
        operands = self.tensors_in((node.args, node.kwargs))
        if not operands:
            return self.none(node)  # a new tensor (zeros, arange): no channel of a producer
        if all(v.sources for v in operands):
            return self.derived(node, name, operands)
        fn = RULES.get(name)
        if fn is not None:
            out = fn(self, node, _bind(node))
        elif name is not None and _elementwise(node):
            out = self.pointwise(node, _bind(node))
        else:
            out = self.unsupported(node)
        schema = node.target._schema
        if schema.arguments and schema.arguments[0].alias_info is not None and schema.arguments[0].alias_info.is_write:
            self.env[node.args[0]] = out  # in place: later readers of the input read this
        return out

    def derived(self, node: fx.Node, name: str | None, operands: list[_Val]):
        """A value computed from parameters and buffers alone (a standardized weight, a view of a
        layer scale): no channels of its own; a view of one parameter keeps where its entries are."""
        out = self.none(node)
        if not isinstance(out, _Val):
            return out
        out.sources = frozenset().union(*(v.sources for v in operands))
        src = operands[0]
        if len(operands) == 1 and src.pos is not None and name in _MOVEMENT:
            out.pos = _move(node, name, _bind(node), src.pos)
        return out

    # ---- rules shared by several ops ----
    def producer_output(self, node: fx.Node, weight: _Val, bias, out_ids: torch.Tensor, axis: int) -> _Val:
        """The value a conv/linear writes: its channels ``out_ids`` on ``axis``, recorded as its
        filter rows and bias."""
        shape = _meta_shape(node.meta["val"])
        n = out_ids.numel()
        rows_of = [(weight, "filter")] + [(v, "bias") for v in (self.val(bias),) if isinstance(v, _Val)]
        std = weight.param is None  # computed from parameters: weight standardization
        if std:
            rows_of = [(self.param_val(s), "filter" if self.values[s].shape == weight.ids.shape else "param")
                       for s in sorted(weight.sources) if self.values[s].dim() and self.values[s].shape[0] == n]
            rows_of += [(v, "bias") for v in (self.val(bias),) if isinstance(v, _Val)]
        for v, role in rows_of:
            name = v.param
            t = self.values[name] if name else None
            if name is None or name in self.shared or t.shape[0] != n:
                self.freeze(out_ids, self.shared.get(name) or f"{describe(node)} reads a {role} tensor that "
                                                             "greg_fast cannot cut along its filters")
                continue
            module, _, tensor = name.rpartition(".")
            self.member(module, tensor, 0, role, True, out_ids)
        if std and not any(role == "filter" for _, role in rows_of):
            self.freeze(out_ids, f"{describe(node)} computes its weight from parameters in a way greg_fast "
                                 "cannot cut along its filters")
        view = [1] * len(shape)
        view[axis] = n
        return _Val(out_ids.view(view).expand(shape).clone(), torch.zeros(shape, dtype=torch.int32))

    def whole(self, v: _Val) -> bool:
        """``v`` is its parameter itself, entry for entry."""
        t = self.values[v.param]
        return tuple(v.pos.shape) == tuple(t.shape) and bool((v.pos.reshape(-1) == torch.arange(t.numel())).all())

    def param_val(self, name: str) -> _Val:
        t = self.values[name]
        return _Val(torch.full(t.shape, _NONE), torch.zeros(t.shape, dtype=torch.int32), frozenset([name]),
                    torch.arange(t.numel()).view(t.shape))

    def layer(self, node: fx.Node, x: _Val, weight, bias, axis: int, groups: int = 1) -> _Val:
        """A conv (channels on ``axis``) or linear (the last axis) reading ``x`` with ``weight``."""
        w = self.val(weight)
        if not isinstance(w, _Val) or not w.sources:
            self.unsupported(node, f"{describe(node)} takes its weight from the activations")
            return self.none(node)
        shape = w.ids.shape
        n_out, per_group = shape[0], shape[1]
        if w.param is not None and not self.whole(w):
            w = _Val(w.ids, w.lost, w.sources)  # a view that reorders a parameter: treated as computed
        in_ids = _along(x.ids, axis) if x.ids.dim() > axis else None
        self.layers.update(dict.fromkeys(s.rpartition(".")[0] for s in sorted(w.sources)[:1]))
        if in_ids is None:
            self.freeze(x.ids, f"{describe(node)} does not read the channels as its input channels")
            return self.producer_output(node, w, bias, self.fresh(n_out), axis)
        mult = n_out // groups
        if groups > 1 and per_group == 1:
            # depthwise: each input channel has its own `mult` filters, which go with it (zeroed with
            # it, they make its output exactly zero whatever the input holds); `groups` follows the
            # input's width, so an input channel that cannot be cut freezes its filters
            out_ids = self.fresh(n_out)
            self.join(out_ids, in_ids.repeat_interleave(mult),
                      strict=f"{describe(node)} is depthwise over channels that cannot be cut",
                      via=f"{describe(node)} (a depthwise conv: its filters go with their input channel)")
            return self.producer_output(node, w, bias, out_ids, axis)
        self.consume(x)
        sources = [w] if w.param is not None else [self.param_val(s) for s in sorted(w.sources)
                                       if self.values[s].shape == w.ids.shape]
        if not sources:
            self.freeze(in_ids, f"{describe(node)} computes its weight in a way greg_fast cannot cut along "
                                "its input channels")
        for src in sources:
            name = src.param
            if name in self.shared:
                self.freeze(in_ids, self.shared[name])
            module, _, tensor = name.rpartition(".")
            if groups == 1:
                self.member(module, tensor, 1, "input", False, in_ids)
            else:
                # grouped: the same input position in every conv group goes together
                by_group = in_ids.view(groups, per_group)
                self.join(by_group, by_group[:1].expand_as(by_group),
                          strict=f"{describe(node)} (groups={groups}) reads it beside channels that cannot be cut",
                          via=f"{describe(node)} (a grouped conv, groups={groups}: the same position in every "
                              "conv group goes together)")
                self.member(module, tensor, 1, "input", False, by_group[0])
        if w.param is None:  # weight standardization spans the input channels
            self.mark_approximate(in_ids, f"{describe(node)} standardizes its weight over its input channels: "
                                          "the compacted conv standardizes over the kept ones only")
        out_ids = self.fresh(n_out) if groups == 1 else self.fresh(mult).repeat(groups)
        return self.producer_output(node, w, bias, out_ids, axis)

    def channelwise_norm(self, node: fx.Node, x: _Val, tensors: list, what: str) -> _Val:
        """A norm with per-channel statistics on axis 1 (BatchNorm, InstanceNorm): weight, bias and
        statistics go with each channel."""
        ids = _along(x.ids, 1) if x.ids.dim() > 1 else None
        if ids is None:
            return self.unsupported(node, f"{describe(node)} does not normalize over the channels' axis")
        present = [(self.val(t), masked) for t, masked in tensors if isinstance(self.val(t), _Val)]
        for v, masked in present:
            if v.param in self.shared:
                return self.unsupported(node, self.shared[v.param])
            if not self.param_member(v, ids, "norm", masked):
                return self.unsupported(node, f"{describe(node)} reads '{sorted(v.sources)}' in a way greg_fast "
                                              "cannot cut along the channels")
        if not present and bool((ids >= 0).any()):  # no tensor: only its width follows
            self.member(module_path(node), "", 0, "norm", False, ids)
        return _Val(x.ids, x.lost)  # a removed channel: its weight and bias are zeroed, so 0 again

    def binary(self, node: fx.Node, a, b, kind: str):
        """``a (+ - * /) b`` (nodes, values or numbers): ``kind`` is "add" (add, sub), "mul" or "div"."""
        va, vb = (x if isinstance(x, _Val) else self.val(x) for x in (a, b))
        if not isinstance(va, _Val) or not isinstance(vb, _Val):  # a tensor with a number
            x, other, x_first = (va, b, True) if isinstance(va, _Val) else (vb, a, False)
            if isinstance(other, fx.Node):
                return self.unsupported(node)
            if kind == "mul" or (kind == "div" and x_first) or (kind == "add" and other == 0):
                return x
            if kind == "div":
                return self.unsupported(node, f"{describe(node)} divides by the channels")
            return self.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                             f"{describe(node)} combines the channels with the constant {other!r}, so a "
                             "removed channel would not be zero")
        shape = _meta_shape(node.meta["val"])
        ai, bi = va.ids.expand(shape), vb.ids.expand(shape)
        if kind == "div" and bool((bi >= 0).any()):
            return self.unsupported(node, f"{describe(node)} divides by channels")
        for v, other in ((va, bi), (vb, ai)):
            if not v.sources:
                continue
            # a parameter: a scalar or spatial one scales every channel alike (a product stays zero,
            # a sum does not); one along the channels (a bias, a layer scale) is cut with them
            if not any(not _broadcast(v.ids, shape, d) and _varies(other, d) for d in range(len(shape))):
                if kind == "add" and bool((other >= 0).any()):
                    x = va if v is vb else vb
                    return self.lose(_Val(other.contiguous(), x.lost.expand(shape).contiguous()),
                                     torch.ones(shape, dtype=torch.bool),
                                     f"{describe(node)} adds {sorted(v.sources)} alike to every channel, so a "
                                     "removed channel would not be zero")
            elif v.param in self.shared:
                return self.unsupported(node, self.shared[v.param])
            elif not self.param_member(v, other, "param", masked=kind == "add"):
                return self.unsupported(node, f"{describe(node)} combines the channels with "
                                              f"{sorted(v.sources)} in a way greg_fast cannot cut along them")
        acts = [v for v in (va, vb) if not v.sources]
        if len(acts) == 1:
            x = acts[0]
            return _Val(x.ids.expand(shape).contiguous(), x.lost.expand(shape).contiguous())
        # two activations: one broadcast over the other's channels must carry none of its own
        for v, o, oi in ((va, vb, bi), (vb, va, ai)):
            if any(_broadcast(v.ids, shape, d) and _varies(oi, d) for d in range(len(shape))):
                if bool((v.ids >= 0).any()):
                    return self.unsupported(node, f"{describe(node)} broadcasts channels over other channels")
                out = _Val(oi.contiguous(), o.lost.expand(shape).contiguous())
                if kind != "add":  # a product or a quotient of a removed channel stays zero
                    return out
                return self.lose(out, torch.ones(shape, dtype=torch.bool),
                                 f"{describe(node)} adds a tensor that is not a prunable channel, so a "
                                 "removed channel would not be zero")
        self.join(ai, bi, strict=f"{describe(node)} combines them with a tensor of the same width that "
                                 "cannot be cut",
                  via=f"{describe(node)} ({'a residual add' if kind == 'add' else 'a product: gating'})")
        al, bl = va.lost.expand(shape), vb.lost.expand(shape)
        ids = torch.where(ai >= 0, ai, bi)
        if kind == "add":
            lost = torch.where(al > 0, al, bl)
        else:  # a product is zero when either factor is
            zero = ((ai >= 0) & (al == 0)) | ((bi >= 0) & (bl == 0))
            lost = torch.where(zero, 0, torch.maximum(al, bl))
        return _Val(ids.contiguous(), lost.to(torch.int32).contiguous())

    def pointwise(self, node: fx.Node, args: dict):
        """An elementwise op of one activation (and numbers or per-channel parameters): judged at 0,
        with the parameters' real values."""
        x = self.val(node.args[0]) if node.args else None
        acts = [v for v in self.tensors_in((node.args, node.kwargs)) if not v.sources]
        if len(acts) != 1 or x is not acts[0]:
            return self.unsupported(node)
        call_args = []
        for arg in node.args[1:]:
            v = self.val(arg)
            if isinstance(v, _Val):  # a parameter (PReLU's slopes): cut with the channels
                if v.param is None or not self.param_member(v, x.ids, "param", False):
                    return self.unsupported(node)
                arg = self.values[v.param].detach().reshape(-1)[v.pos]
            elif isinstance(arg, fx.Node):
                return self.unsupported(node)
            call_args.append(arg)
        kwargs = {k: v for k, v in node.kwargs.items() if not isinstance(v, fx.Node)}
        per_entry = any(isinstance(arg, torch.Tensor) for arg in call_args)
        zeros = torch.zeros(x.ids.shape if per_entry else (1,) * x.ids.dim(), dtype=node.args[0].meta["val"].dtype)
        try:
            with torch.no_grad():
                out = node.target(zeros, *call_args, **kwargs)
        except Exception:
            return self.unsupported(node)
        if isinstance(out, torch.Tensor) and bool((out == 0).all()):
            return x
        return self.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                         f"{describe(node)} maps 0 to a non-zero value, so a removed channel would still "
                         "reach the consumer")

    def per_channel(self, node: fx.Node, x: _Val, dims: list[int], what: str, shape: tuple | None = None):
        """An op over ``dims`` that keeps the channels (pooling, interpolation, a reduction) and gives
        ``shape`` (the node's): fine unless channels vary along them."""
        if any(self.varies(x.ids, d) for d in dims):
            return self.unsupported(node, f"{describe(node)} {what} over the channel axis")
        shape = shape or _meta_shape(node.meta["val"])
        ids, lost = x.ids, x.lost
        for d in dims:
            ids, lost = ids.narrow(d, 0, 1), lost.amax(d, keepdim=True)
        if len(shape) < ids.dim():  # reduced without keepdim
            ids, lost = ids.reshape(shape), lost.reshape(shape)
        return _Val(ids.expand(shape).contiguous(), lost.expand(shape).contiguous())

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
        speculative: dict[int, str] = {}
        for e, why in self.speculative.items():
            speculative.setdefault(self.root(e), why)
        coupled_by: dict[int, str] = {}
        for e, via in self.joined_by:
            coupled_by.setdefault(self.root(e), via)
        by_signature: dict[tuple, list[int]] = {}
        for comp, touched in where.items():
            by_signature.setdefault(tuple(sorted((i, len(p)) for i, p in touched.items())), []).append(comp)
        keys = list(self.members)
        module_order = {m: i for i, (m, _) in enumerate(self.model.named_modules())}
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
            out.append((order, Group(name, members, reason,
                                     next((approximate[c] for c in comps if c in approximate), None),
                                     next((speculative[c] for c in comps if c in speculative), None),
                                     next((coupled_by[c] for c in comps if c in coupled_by), None))))
        return [g for _, g in sorted(out, key=lambda x: x[0])]


# ---- the op table ----
_METADATA = {"sym_size", "sym_numel", "sym_stride", "sym_storage_offset", "size", "stride", "dim", "numel",
             "_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size"}
_SHAPE_OF = {"reshape_as", "view_as", "expand_as", "type_as"}  # their second argument gives only its shape
_IDENTITY = {"clone", "contiguous", "alias", "detach", "lift_fresh_copy", "_to_copy", "to", "type_as",
             "dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "_assert_async"}
_MOVEMENT = {"view", "_unsafe_view", "reshape", "flatten", "unflatten", "permute", "transpose", "t", "squeeze",
             "unsqueeze", "expand", "movedim", "reshape_as", "view_as", "expand_as", "slice", "select",
             "narrow"} | _IDENTITY


def _move(node: fx.Node, name: str, args: dict, t: torch.Tensor) -> torch.Tensor:
    """Apply a shape op to an id (or position) tensor as it is applied to the value."""
    shape = _meta_shape(node.meta["val"])
    if name in _IDENTITY:
        return t
    if name in ("view", "_unsafe_view", "reshape", "reshape_as", "view_as", "flatten", "unflatten"):
        return t.reshape(shape)
    if name == "expand_as":
        return t.expand(shape)
    return node.target(t, *node.args[1:], **node.kwargs).contiguous()


@rule(*_MOVEMENT)
def _movement(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(node.args[0])
    if not isinstance(x, _Val):
        return a.unsupported(node)
    name = _op_name(node)
    ids, lost = _move(node, name, args, x.ids), _move(node, name, args, x.lost)
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
    return _Val(ids.contiguous(), lost.contiguous(), x.sources, None)


@rule("split", "split_with_sizes", "unbind", "chunk")
def _split(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(node.args[0])
    if not isinstance(x, _Val):
        return a.unsupported(node)
    pieces_ids = node.target(x.ids, *node.args[1:], **node.kwargs)
    pieces_lost = node.target(x.lost, *node.args[1:], **node.kwargs)
    dim = args.get("dim", 0) % x.ids.dim()
    if a.varies(x.ids, dim) and len(pieces_ids) > 1:
        if len({p.shape[dim] for p in pieces_ids}) != 1:
            return a.unsupported(node, f"{describe(node)} splits the channels at written sizes, which cannot "
                                       "follow the pruned width")
        if _op_name(node) not in ("chunk", "unbind"):  # equal sizes, written or computed from the shape: confirmed by trial
            a.mark_speculative(x.ids, f"{describe(node)} splits the channels into pieces of the written size "
                                      f"{pieces_ids[0].shape[dim]}, which the compacted model does not follow")
        for p in pieces_ids[1:]:  # equal pieces must lose the same positions
            a.join(pieces_ids[0], p, strict=f"{describe(node)} splits it beside channels that cannot be cut",
                   via=f"{describe(node)} (equal pieces of a split)")
    return tuple(_Val(i.contiguous(), lo.contiguous()) for i, lo in zip(pieces_ids, pieces_lost))


@rule("cat", "concat", "stack")
def _cat(a: _Analysis, node: fx.Node, args: dict):
    vals = []
    for item in args["tensors"]:
        v = a.val(item)
        vals.append(v if isinstance(v, _Val) else a.none(item))
    if any(not isinstance(v, _Val) for v in vals):
        return a.unsupported(node)
    fn = torch.stack if _op_name(node) == "stack" else torch.cat
    return _Val(fn([v.ids for v in vals], args["dim"]), fn([v.lost for v in vals], args["dim"]))


@rule("pad", "constant_pad_nd")
def _pad(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(node.args[0])
    pad, mode = args["pad"], args.get("mode", "constant")
    value = args.get("value")
    if not isinstance(x, _Val) or not all(isinstance(p, int) for p in pad):
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
    return _Val(ids.contiguous(), lost.contiguous())


@rule("conv1d", "conv2d", "conv3d", "convolution", "_convolution")
def _conv(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(args["input"])
    if args.get("transposed"):
        return a.unsupported(node, f"{describe(node)} is a transposed conv, which greg_fast does not cut")
    if not isinstance(x, _Val) or x.sources:
        return a.unsupported(node)
    w = a.val(args["weight"])
    k = w.ids.dim() - 2 if isinstance(w, _Val) else 0
    return a.layer(node, x, args["weight"], args["bias"], x.ids.dim() - k - 1, args["groups"])


@rule("linear")
def _linear(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(args["input"])
    if not isinstance(x, _Val) or x.sources:
        return a.unsupported(node)
    return a.layer(node, x, args["weight"], args["bias"], x.ids.dim() - 1)


@rule("batch_norm", "instance_norm", "_native_batch_norm_legit_no_training", "native_batch_norm")
def _batch_norm(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(args["input"])
    out = a.channelwise_norm(node, x, [(args["weight"], True), (args["bias"], True),
                                       (args.get("running_mean"), True), (args.get("running_var"), False)],
                             "normalizes")
    meta = node.meta["val"]
    return (out,) + a._none_like(meta)[1:] if isinstance(meta, (tuple, list)) else out


def _normalized_together(a: _Analysis, node: fx.Node, args: dict, x: _Val, ids: torch.Tensor):
    """A norm whose statistics span the channels ``ids`` (LayerNorm, GroupNorm): approximate, as the
    compacted model normalizes over the kept channels only; its weight and bias go with them."""
    a.mark_approximate(ids, f"{describe(node)} normalizes channels together: the compacted model normalizes "
                            "over the kept ones only, so it does not compute exactly what the masked model does")
    a.consume(x)  # its statistics read every entry
    tensors = [a.val(args[t]) for t in ("weight", "bias") if isinstance(a.val(args[t]), _Val)]
    for v in tensors:  # zeroed at a removed channel: its output is then exactly 0
        if not a.param_member(v, ids, "norm", True):
            return a.unsupported(node)
    if not tensors:
        return a.unsupported(node, f"{describe(node)} has no weight or bias to zero a removed channel with")
    return _Val(x.ids, torch.zeros_like(x.lost))


@rule("layer_norm")
def _layer_norm(a: _Analysis, node: fx.Node, args: dict):
    """LayerNorm over the last axis. Over the channels it is approximate: the compacted model
    normalizes over fewer channels than the masked one (where a removed channel is a zero in the
    statistics), so these channels are cut only by plans that ask for approximate groups."""
    x = a.val(args["input"])
    if len(args["normalized_shape"]) != 1:
        return a.unsupported(node, f"{describe(node)} normalizes channels together over several axes")
    ids = _along(x.ids, x.ids.dim() - 1)
    if ids is None or (bool((ids < 0).any()) and bool((ids >= 0).any())):
        return a.unsupported(node, f"{describe(node)} normalizes channels together with entries that cannot be cut")
    if not bool((ids >= 0).any()):
        return a.none(node)  # no prunable channel in what it normalizes
    return _normalized_together(a, node, args, x, ids)


@rule("group_norm")
def _group_norm(a: _Analysis, node: fx.Node, args: dict):
    """GroupNorm over the channels (axis 1): approximate, as LayerNorm; each group must keep as many
    channels as the others, so the same position in every group goes together (as in a grouped conv)."""
    x, groups = a.val(args["input"]), args["num_groups"]
    ids = _along(x.ids, 1) if isinstance(x, _Val) and x.ids.dim() > 1 else None
    if ids is None or isinstance(groups, fx.Node) or ids.numel() % groups:
        return a.unsupported(node, f"{describe(node)} does not normalize over the channels' axis")
    if bool((ids < 0).any()) and bool((ids >= 0).any()):
        return a.unsupported(node, f"{describe(node)} normalizes channels together with entries that cannot be cut")
    if not bool((ids >= 0).any()):
        return a.none(node)
    by_group = ids.view(groups, -1)
    a.join(by_group, by_group[:1].expand_as(by_group),
           via=f"{describe(node)} (GroupNorm, {groups} groups: the same position in every group goes together)")
    return _normalized_together(a, node, args, x, ids)


@rule("native_group_norm", "local_response_norm", "_weight_norm", "_weight_norm_interface")
def _other_norms(a: _Analysis, node: fx.Node, args: dict):
    return a.unsupported(node, f"{describe(node)} normalizes channels together: removing one would change the others")


@rule("add", "add_", "sub", "sub_")
def _add(a: _Analysis, node: fx.Node, args: dict):
    alpha = args.get("alpha")
    if isinstance(alpha, fx.Node):
        return a.unsupported(node)
    return a.binary(node, args["self"], args["other"], "add")


@rule("rsub")
def _rsub(a: _Analysis, node: fx.Node, args: dict):
    return a.binary(node, args["other"], args["self"], "add")


@rule("mul", "mul_")
def _mul(a: _Analysis, node: fx.Node, args: dict):
    return a.binary(node, args["self"], args["other"], "mul")


@rule("div", "div_")
def _div(a: _Analysis, node: fx.Node, args: dict):
    if args.get("rounding_mode") is not None:
        return a.unsupported(node)
    return a.binary(node, args["self"], args["other"], "div")


@rule("addcmul", "addcmul_")
def _addcmul(a: _Analysis, node: fx.Node, args: dict):
    """``self + value * t1 * t2`` (a layer scale and bias in one op, ConvNeXt-V2's GRN)."""
    if args.get("value", 1) != 1:
        return a.unsupported(node)
    product = a.binary(node, args["tensor1"], args["tensor2"], "mul")
    if not isinstance(product, _Val):
        return product
    return a.binary(node, args["self"], product, "add")


_ZERO_OF_ZEROS = {"mean", "sum", "amax", "amin", "max", "min", "linalg_vector_norm", "norm", "std", "var"}


@rule("mean", "sum", "amax", "amin", "linalg_vector_norm", "norm", "std", "var", "var_mean", "std_mean",
      "max", "min", "logsumexp")
def _reduce(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(node.args[0])
    dims = args.get("dim")
    if not isinstance(x, _Val) or isinstance(dims, fx.Node):
        return a.unsupported(node)
    if isinstance(dims, int):
        dims = [dims]
    dims = list(range(x.ids.dim())) if not dims else sorted({d % x.ids.dim() for d in dims})
    name = _op_name(node)
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
        if name in ("mean", "var", "std"):
            a.mark_approximate(x.ids, f"{describe(node)} averages over the channels: the compacted model "
                                      "averages over the kept ones only")
            a.consume(x)
            return a.none(node)
        return a.unsupported(node, f"{describe(node)} reduces over the channel axis")
    if not isinstance(meta, (tuple, list)):
        return a.per_channel(node, x, dims, "reduces")
    first = a.per_channel(node, x, dims, "reduces", _meta_shape(meta[0]))
    if name in ("max", "min"):  # values and indices
        return first, a.none(node)[1]
    return first, a.per_channel(node, x, dims, "reduces", _meta_shape(meta[1]))  # var (std) and mean


@rule("max_pool1d", "max_pool2d", "max_pool3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
      "adaptive_avg_pool2d", "adaptive_avg_pool3d", "adaptive_max_pool1d", "adaptive_max_pool2d",
      "adaptive_max_pool3d", "max_pool2d_with_indices", "max_pool3d_with_indices", "upsample_nearest1d",
      "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
      "upsample_trilinear3d", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
      "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa", "lp_pool1d", "lp_pool2d")
def _spatial(a: _Analysis, node: fx.Node, args: dict):
    """Pooling and interpolation over the trailing 1-3 axes (by the op's name)."""
    x = a.val(node.args[0])
    if not isinstance(x, _Val):
        return a.unsupported(node)
    name = _op_name(node)
    n = int(next(c for c in reversed(name) if c.isdigit()))
    dims = list(range(x.ids.dim() - n, x.ids.dim()))
    meta = node.meta["val"]
    if isinstance(meta, (tuple, list)):  # values and indices
        return a.per_channel(node, x, dims, "pools", _meta_shape(meta[0])), a.none(node)[1]
    return a.per_channel(node, x, dims, "pools")


@rule("softmax", "_softmax", "log_softmax", "_log_softmax")
def _softmax(a: _Analysis, node: fx.Node, args: dict):
    x = a.val(node.args[0])
    dim = args["dim"] % x.ids.dim()
    if a.varies(x.ids, dim):
        return a.unsupported(node, f"{describe(node)} normalizes over the channels")
    return a.lose(x, torch.ones_like(x.ids, dtype=torch.bool),
                  f"{describe(node)} maps a removed channel's zeros to 1/n, so it would still reach the consumer")


def _analysis(model: nn.Module, example_inputs: tuple) -> _Analysis:
    analysis = _Analysis(model, export(model, example_inputs))
    analysis.run()
    return analysis


def _unfiltered(name: str, shared: dict) -> str:
    """Why a layer that runs has its filters in no group."""
    return shared.get(f"{name}.weight", "greg_fast cannot cut its weight along its filters")


def analyze_groups(model: nn.Module, example_inputs: tuple) -> tuple[list[Group], dict[str, str]]:
    """Every channel group of ``model`` (prunable or not, with the reason), in the order of their
    first producer; and why, for each conv/linear that runs but whose filters are in no group."""
    analysis = _analysis(model, example_inputs)
    groups = analysis.groups()
    with_filters = {k.module for g in groups for k in g.members if k.role == "filter"}
    return groups, {n: _unfiltered(n, analysis.shared) for n in analysis.layers if n not in with_filters}


# ---- single layers: the groups that couple nothing (the 2021 reference's rule) ----
@dataclass
class Consumer:
    """A layer that reads a producer's channels as its input channels."""
    name: str
    spatial: int  # input features per producer channel (>1 only for flatten-before-linear)


@dataclass
class LayerDeps:
    name: str
    module: nn.Module
    consumers: list[Consumer] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)     # the norms carrying this layer's filters
    filter_reason: str | None = None                    # why its filters cannot be cut alone
    producer: str | None = None                         # the layer whose filters are its input channels
    input_spatial: int = 1                              # features per input channel (flatten-before-linear)
    channel_reason: str | None = None                   # why its input channels cannot be cut


_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var", "")


def _grouped(m: nn.Module) -> bool:
    return isinstance(m, nn.modules.conv._ConvNd) and m.groups != 1


def _alone(name: str, group: Group | None, modules: dict, shared: dict) -> str | None:
    """Why the filters of layer ``name`` are not a group of their own that only its norms and its
    consumers' columns go with, in the way the single-layer plan cuts them (None: they are)."""
    m = modules[name]
    if group is None:
        return _unfiltered(name, shared)
    if _grouped(m):
        return f"grouped/depthwise conv (groups={m.groups}): its filters go with its input channels"
    if group.reason or group.approximate or group.speculative:
        return group.reason or group.approximate or group.speculative
    if group.coupled_by:
        return f"its channels are tied to other channels by {group.coupled_by}; coupled groups cut them together"
    rows = torch.arange(m.weight.shape[0]).view(-1, 1)
    for key, pos in group.members.items():
        same = pos.shape == rows.shape and torch.equal(pos, rows)
        if key.role in ("filter", "bias") and key.module == name and same:
            continue
        if key.role == "norm" and key.tensor in _NORM_TENSORS and same:
            continue
        if key.role == "input" and key.tensor == "weight" and key.axis == 1 and pos.shape[0] == len(rows):
            if modules[key.module].weight.shape[1] != pos.numel():
                return f"`{key.module}` reads its channels beside others (a concat)"
            if not torch.equal(pos, torch.arange(pos.numel()).view(pos.shape)):
                return f"`{key.module}` reads its channels interleaved with another axis, not one block per channel"
            continue
        return f"its channels also reach `{key.module}.{key.tensor}`; coupled groups cut them together"
    return None


def analyze_layers(model: nn.Module, example_inputs: tuple) -> tuple[dict[str, LayerDeps], list[str]]:
    """Every conv/linear layer that runs, in the order it runs, with what a cut of its filters takes
    along when they couple nothing (``filter_reason`` None) and which layer's filters its input
    channels are (``producer``, when that layer's filters feed it alone)."""
    analysis = _analysis(model, example_inputs)
    modules = dict(model.named_modules())
    order = [n for n in analysis.layers if isinstance(modules.get(n), LAYER_TYPES)]
    groups = analysis.groups()
    of_filters = {k.module: g for g in groups for k in g.members if k.role == "filter" and k.tensor == "weight"}
    read_by: dict[str, list[Group]] = {}  # layer -> the groups its input columns belong to
    for g in groups:
        for m in dict.fromkeys(k.module for k in g.members if k.role == "input"):
            read_by.setdefault(m, []).append(g)
    deps = {}
    for name in order:
        d = deps[name] = LayerDeps(name, modules[name])
        g = of_filters.get(name)
        d.filter_reason = _alone(name, g, modules, analysis.shared)
        if d.filter_reason is None:
            d.norms = list(dict.fromkeys(k.module for k in g.members if k.role == "norm"))
            d.consumers = [Consumer(k.module, pos.shape[1]) for k, pos in g.members.items() if k.role == "input"]
    for name in order:
        d, m = deps[name], modules[name]
        sources = read_by.get(name, [])
        if _grouped(m):
            d.channel_reason = f"grouped/depthwise conv (groups={m.groups})"
        elif not sources:
            d.channel_reason = "its input channels come from the model input or from ops without filters to cut"
        elif len(sources) > 1:
            d.channel_reason = "its input channels come from several layers (a concat)"
        else:
            producer = next((k.module for k in sources[0].members if k.role == "filter"), None)
            p = deps.get(producer)
            if p is None:
                d.channel_reason = f"its input channels are group {sources[0].name!r}, which has no layer's filters"
            elif p.filter_reason is not None:
                d.channel_reason = f"its producer '{producer}' cannot be cut: {p.filter_reason}"
            elif [c.name for c in p.consumers] != [name]:
                d.channel_reason = f"its producer '{producer}' also feeds " + ", ".join(
                    repr(c.name) for c in p.consumers if c.name != name)
            else:
                d.producer, d.input_spatial = producer, p.consumers[0].spatial
    return deps, order
